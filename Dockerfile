# syntax=docker/dockerfile:1
# One image with both binaries: /usr/local/bin/trainyard (producer CLI, control plane)
# and /usr/local/bin/trainyard-worker.
#
#   CPU:  docker build -t trainyard:0.1.0 .
#   GPU:  docker build -t trainyard:0.1.0-cuda --build-arg FEATURES=cuda .
#
# The GPU build compiles against the CUDA toolkit (burn's CUDA backend) and runs on an
# nvidia/cuda runtime base; the NVIDIA container toolkit on the node mounts the driver.
ARG FEATURES=""
ARG RUST_VERSION=1.95
ARG CUDA_VERSION=12.8.1

# ---------------------------------------------------------------- build (CPU)
FROM rust:${RUST_VERSION}-bookworm AS build-cpu
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p trainyard -p trainyard-worker \
 && install -D -m 0755 target/release/trainyard /out/trainyard \
 && install -D -m 0755 target/release/trainyard-worker /out/trainyard-worker

# ---------------------------------------------------------------- build (CUDA)
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04 AS build-cuda
ARG RUST_VERSION
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl build-essential pkg-config \
 && rm -rf /var/lib/apt/lists/* \
 && curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain ${RUST_VERSION}
ENV PATH=/root/.cargo/bin:${PATH}
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/root/.cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p trainyard \
 && cargo build --release --locked -p trainyard-worker --features cuda \
 && install -D -m 0755 target/release/trainyard /out/trainyard \
 && install -D -m 0755 target/release/trainyard-worker /out/trainyard-worker

# ---------------------------------------------------------------- runtime (CPU)
# distroless/cc: glibc, libgcc, CA certificates, user nonroot (65532), no shell.
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime-cpu
COPY --from=build-cpu /out/ /usr/local/bin/

# ---------------------------------------------------------------- runtime (CUDA)
FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04 AS runtime-cuda
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && (getent group 65532 || groupadd --gid 65532 nonroot) \
 && (getent passwd 65532 || useradd --uid 65532 --gid 65532 --home-dir /home/nonroot --create-home --shell /usr/sbin/nologin nonroot)
COPY --from=build-cuda /out/ /usr/local/bin/
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# ---------------------------------------------------------------- final
# FEATURES="" picks runtime-cpu, FEATURES=cuda picks runtime-cuda (BuildKit builds only that chain).
FROM runtime-${FEATURES:-cpu} AS final
# Datasets that ship with the project (TRAINYARD_DATA_DIR in k8s/base/config.yaml).
COPY --chown=65532:65532 data/ /usr/share/trainyard/data/
ENV TRAINYARD_DATA_DIR=/usr/share/trainyard/data
USER 65532:65532
WORKDIR /var/lib/trainyard
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/trainyard"]
CMD ["--help"]
