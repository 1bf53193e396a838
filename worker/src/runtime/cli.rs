//! `trainyard-worker run`: flags, logging, signals, and the worker.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use clap::Args;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::{layer::SubscriberExt, util::SubscriberInitExt, EnvFilter, Layer};
use trainyard_common::{amqp::redact_url, artifacts::ArtifactStore, config, topology::Topology};

use super::{joblog::JobLogs, Backoff, Worker, WorkerConfig};
use crate::intent::device::DeviceSpec;

/// Flags of `trainyard-worker run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Job types to consume (comma-separated), e.g. `intent-train` or `noop,intent-eval`.
    #[arg(long, value_delimiter = ',', required = true)]
    pub types: Vec<String>,
    /// Concurrent jobs per job type (= the prefetch of its queue).
    #[arg(long, default_value_t = 1)]
    pub concurrency: u16,
    /// Serve `/healthz`, `/readyz` and `/metrics` on this address.
    #[arg(long, env = "TRAINYARD_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Seconds running jobs get to finish on SIGTERM/SIGINT before they are stopped and requeued.
    #[arg(long, default_value_t = 25)]
    pub grace_period: u64,
    /// The broker's `consumer_timeout` in seconds (RabbitMQ's default: 1800). A job whose
    /// `timeout_s` is longer fails at once: raise the broker's value and this one together.
    #[arg(long, env = "TRAINYARD_CONSUMER_TIMEOUT_S", default_value_t = super::DEFAULT_CONSUMER_TIMEOUT_S,
        value_parser = clap::value_parser!(u64).range(1..))]
    pub consumer_timeout_s: u64,
    /// Job messages larger than this are dead-lettered unread.
    #[arg(long, default_value_t = trainyard_common::codec::DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,
    /// First retry delay in milliseconds (doubles per attempt).
    #[arg(long, env = "TRAINYARD_RETRY_BASE_MS", default_value_t = 5_000)]
    pub retry_base_ms: u64,
    /// Longest retry delay in milliseconds.
    #[arg(long, env = "TRAINYARD_RETRY_MAX_MS", default_value_t = 600_000)]
    pub retry_max_ms: u64,
    /// Broker URL.
    #[arg(long, env = "TRAINYARD_AMQP_URL", default_value = config::DEFAULT_AMQP_URL, hide_env_values = true)]
    pub amqp_url: String,
    /// Prefix of exchange and queue names.
    #[arg(long, env = "TRAINYARD_PREFIX", default_value = "trainyard")]
    pub prefix: String,
    /// Artifact store: a directory, `file://DIR` or `memory://`.
    #[arg(long, env = "TRAINYARD_ARTIFACTS", default_value = config::DEFAULT_ARTIFACTS)]
    pub artifacts: String,
    /// Root of datasets.
    #[arg(long, env = "TRAINYARD_DATA_DIR", default_value = config::DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// Default device of training jobs whose `device` is `auto`: `auto` (the first CUDA
    /// device when this build has the `cuda` feature and a GPU is visible, else the CPU), `cpu`, `cuda` or `cuda:N`.
    #[arg(long, env = "TRAINYARD_DEVICE", default_value = "auto", value_parser = parse_device)]
    pub device: DeviceSpec,
    /// Seconds between two heartbeats to the control plane (1–10; it shows a worker as gone after three missed).
    #[arg(long, env = "TRAINYARD_HEARTBEAT_S", default_value_t = trainyard_common::heartbeat::DEFAULT_INTERVAL_S)]
    pub heartbeat_s: u64,
    /// Log format on stdout: `json` or `text`.
    #[arg(long, env = "TRAINYARD_LOG_FORMAT", default_value = "json", value_parser = ["json", "text"])]
    pub log_format: String,
}

fn parse_device(s: &str) -> Result<DeviceSpec, String> {
    DeviceSpec::parse(s)
}

/// Installs logging: JSON (or text) on stdout with span fields, plus the job log capture.
pub fn init_tracing(format: &str, logs: &JobLogs) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,lapin=warn,amq_protocol=warn".into());
    let fmt = if format == "text" {
        tracing_subscriber::fmt::layer().with_writer(std::io::stdout).boxed()
    } else {
        json_layer(std::io::stdout).boxed()
    };
    let _ = tracing_subscriber::registry().with(filter).with(fmt).with(logs.layer()).try_init();
}

/// The JSON log lines: the event's fields at the top level, the current span (the job's
/// `job_id`, `job_type`, `bot`, `attempt`) under `span`. The Grafana dashboard's Loki queries
/// read these paths (see the test in `process::finish`).
pub fn json_layer<S, W>(writer: W) -> impl Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt::layer().json().with_current_span(true).with_span_list(false).flatten_event(true).with_writer(writer)
}

/// Runs the worker until SIGTERM/SIGINT.
pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let logs = JobLogs::default();
    init_tracing(&args.log_format, &logs);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(run_async(args, logs))
}

async fn run_async(args: RunArgs, logs: JobLogs) -> anyhow::Result<()> {
    let registry = crate::handlers::builtin_on(args.device).only(&args.types).map_err(anyhow::Error::msg)?;
    let host = crate::intent::device::Host::current();
    // A default device this build cannot use would fail every training job that does not name
    // one: refused here, at start, rather than job by job.
    let resolved = crate::intent::device::resolve(crate::intent::device::DeviceSpec::Auto, args.device, host, "this worker")
        .map_err(|e| anyhow::anyhow!("--device {} (TRAINYARD_DEVICE): {e}", args.device))?;
    tracing::info!(device = %args.device, resolves_to = %resolved, cuda_built = host.cuda_built, gpu_visible = host.gpu_visible, "training device");
    let artifacts = ArtifactStore::open(&args.artifacts)?;
    trainyard_common::artifacts::refuse_unfit(&artifacts).await?;
    let mut cfg = WorkerConfig::new(args.amqp_url.clone(), Topology::new(args.prefix.clone()), artifacts);
    cfg.concurrency = args.concurrency;
    cfg.grace_period = Duration::from_secs(args.grace_period);
    cfg.max_message_bytes = args.max_message_bytes;
    cfg.consumer_timeout = Duration::from_secs(args.consumer_timeout_s);
    cfg.backoff = Backoff { base_ms: args.retry_base_ms, max_ms: args.retry_max_ms };
    cfg.data_dir = args.data_dir.clone();
    cfg.heartbeat_interval = Duration::from_secs(args.heartbeat_s);
    cfg.device = args.device.to_string();
    // On Kubernetes: node and GPU model from the downward API and the Node's labels.
    cfg.worker.attributes.extend(crate::k8s::attributes_from_env().await);
    tracing::info!(worker = %cfg.worker.id, broker = %redact_url(&args.amqp_url), types = ?args.types, "starting worker");

    let metrics = prometheus::Registry::new();
    let worker = Worker::new(cfg, registry, &metrics, logs)?;
    // On Kubernetes: busy pods get a high pod-deletion-cost so scale-down removes idle ones first.
    let _pod_cost = crate::k8s::spawn_from_env(worker.running()).await;
    let shutdown = CancellationToken::new();
    // Served until the worker has stopped, not until the signal: the drain (jobs finishing or
    // requeued in the grace period) is what the last scrapes should see.
    let served = CancellationToken::new();
    if let Some(addr) = args.metrics_addr {
        let ready = worker.connected_flag();
        let bound = super::http::serve(addr, super::http::router(metrics.clone(), Arc::new(ready)), served.clone()).await?;
        tracing::info!(addr = %bound, "serving /healthz, /readyz and /metrics");
    }
    tokio::spawn(signal_shutdown(shutdown.clone()));
    let ran = worker.run(shutdown).await;
    served.cancel();
    ran?;
    Ok(())
}

/// Fires `token` on SIGTERM or SIGINT.
pub async fn signal_shutdown(token: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            tracing::error!("failed to install signal handlers");
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    token.cancel();
}
