#!/usr/bin/env bash
# CPU-versus-CUDA training check for a GPU machine that has no Rust toolchain and no network.
#
#   scripts/gpu-check.sh build   # here (a development machine): a stripped release trainyard-worker
#                                # with --features cuda in target/gpu-check/ (at most 64 MiB)
#   scripts/gpu-check.sh run     # there (from the repo root, with target/gpu-check/ present):
#                                # CLINC150 data_full.json with each model on cpu and on cuda, same seed
#
# `run` prints one JSON line per training run as soon as it finishes:
#   {"model","device","gpu","epoch_s_p50","wall_s","in_scope_accuracy","oos_recall"}
# and then the best job (examples/jobs/clinc150-best.json) on cuda. It exits non-zero when a
# CUDA run fails or its in-scope accuracy is more than 1 point from the CPU run of the same model.
#
# What the binary needs at run time: burn's CUDA backend (cudarc, dynamic loading) opens the
# driver library libcuda.so.1 (installed with the NVIDIA driver) and NVRTC, libnvrtc.so.13
# (CUDA 13 toolkit, or the nvidia-cuda-nvrtc wheel that PyTorch installs), on first use. Both
# are found through the dynamic loader: `run` adds the usual toolkit and wheel folders to
# LD_LIBRARY_PATH. The build pins CUDA 13.0 (CUDARC_CUDA_VERSION=13000): any CUDA 13 driver
# serves it. NVRTC (~90 MB) is not bundled: it would not fit in 64 MiB beside the binary.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=target/gpu-check
MODELS=(bag conv)

build() {
  export CUDARC_CUDA_VERSION=${CUDARC_CUDA_VERSION:-13000}
  cargo build --release --locked -p trainyard-worker --features cuda --target-dir target/cuda
  mkdir -p "$OUT"
  cp target/cuda/release/trainyard-worker "$OUT/trainyard-worker"
  strip "$OUT/trainyard-worker"
  echo "cuda ${CUDARC_CUDA_VERSION}, built $(date -u +%FT%TZ) from $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" > "$OUT/BUILD"
  local size
  size=$(du -sb "$OUT" | cut -f1)
  echo "$OUT: $((size / 1048576)) MiB"
  ls -l "$OUT"
  if ((size > 64 * 1048576)); then
    echo "FAILED: $OUT is larger than 64 MiB" >&2
    exit 1
  fi
  echo "libraries the binary links (the CUDA ones are opened at run time, not linked):"
  ldd "$OUT/trainyard-worker" || true
}

cuda_library_path() {
  local dirs=() d
  for d in /usr/local/cuda/lib64 /usr/local/cuda-13*/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu; do
    [[ -d $d ]] && dirs+=("$d")
  done
  if command -v python3 >/dev/null; then
    while IFS= read -r d; do dirs+=("$d"); done < <(python3 - <<'EOF' 2>/dev/null || true
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
for r in roots:
    for d in glob.glob(os.path.join(r, "nvidia", "*", "lib")) + glob.glob(os.path.join(r, "nvidia", "cu13", "lib")):
        if glob.glob(os.path.join(d, "libnvrtc*")) or glob.glob(os.path.join(d, "libcuda*")):
            print(d)
EOF
    )
  fi
  local IFS=:
  echo "${dirs[*]}"
}

# one_run MODEL DEVICE [JOB]: trains, prints its JSON line, and leaves the result in $RUNS/MODEL-DEVICE.json.
one_run() {
  local model=$1 device=$2 job=${3:-} name=$1-$2 dir
  dir=$RUNS/$name
  if [[ -z $job ]]; then
    job=$RUNS/$name.job.json
    python3 - "$model" > "$job" <<'EOF'
import json, sys
j = json.load(open("examples/jobs/clinc150-full.json"))
j["params"]["model"] = sys.argv[1]
print(json.dumps(j))
EOF
  fi
  local t0 t1 rc=0
  t0=$(date +%s.%N)
  TRAINYARD_ARTIFACTS=$RUNS/store "$OUT/trainyard-worker" train --job-file "$job" --out "$dir" --device "$device" --data-dir data --json \
    > "$RUNS/$name.json" 2> "$RUNS/$name.log" || rc=$?
  t1=$(date +%s.%N)
  python3 - "$model" "$device" "$GPU" "$t0" "$t1" "$rc" "$dir" "$RUNS/$name.json" <<'EOF'
import json, statistics, sys
model, device, gpu, t0, t1, rc, d, res = sys.argv[1:]
line = {"model": model, "device": device, "gpu": gpu if device.startswith("cuda") else None,
        "epoch_s_p50": None, "wall_s": round(float(t1) - float(t0), 2), "in_scope_accuracy": None, "oos_recall": None}
if rc == "0":
    r = json.load(open(res))
    log = json.load(open(d + "/training_log.json"))
    line["epoch_s_p50"] = round(statistics.median(e["seconds"] for e in log), 3) if log else None
    line["in_scope_accuracy"], line["oos_recall"] = r.get("in_scope_accuracy"), r.get("oos_recall")
else:
    line["error"] = f"exit {rc}"
print(json.dumps(line), flush=True)
EOF
  return "$rc"
}

run() {
  [[ -x $OUT/trainyard-worker ]] || { echo "no $OUT/trainyard-worker: run 'scripts/gpu-check.sh build' on a machine with a Rust toolchain first" >&2; exit 2; }
  export LD_LIBRARY_PATH="$(cuda_library_path)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || true)
  GPU=${GPU:-unknown}
  RUNS=$(mktemp -d)
  echo "gpu-check: $(cat "$OUT/BUILD" 2>/dev/null), GPU ${GPU}, logs in $RUNS" >&2
  local failed=0 model
  for model in "${MODELS[@]}"; do
    one_run "$model" cpu || { echo "cpu run of $model failed: $(tail -3 "$RUNS/$model-cpu.log")" >&2; failed=1; }
    one_run "$model" cuda || { echo "CUDA run of $model failed: $(tail -5 "$RUNS/$model-cuda.log")" >&2; failed=1; continue; }
    python3 - "$RUNS/$model-cpu.json" "$RUNS/$model-cuda.json" "$model" <<'EOF' || failed=1
import json, sys
try:
    cpu, gpu = (json.load(open(p))["in_scope_accuracy"] for p in sys.argv[1:3])
except Exception as e:
    sys.exit(f"{sys.argv[3]}: no accuracy to compare ({e})")
if abs(cpu - gpu) > 0.01:
    sys.exit(f"{sys.argv[3]}: CUDA in-scope accuracy {gpu:.4f} is more than 1 point from the CPU run's {cpu:.4f}")
EOF
  done
  one_run best cuda examples/jobs/clinc150-best.json || { echo "CUDA run of clinc150-best.json failed: $(tail -5 "$RUNS/best-cuda.log")" >&2; failed=1; }
  if ((failed)); then
    echo "gpu-check FAILED" >&2
    exit 1
  fi
  echo "gpu-check passed" >&2
}

case "${1:-}" in
  build) build ;;
  run) run ;;
  *) echo "usage: scripts/gpu-check.sh build|run" >&2; exit 2 ;;
esac
