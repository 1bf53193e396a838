//! `trainyard serve` and `trainyard store rebuild`.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context;
use clap::{Args, Subcommand};
use tokio_util::sync::CancellationToken;
use trainyard::{
    api::{Tokens, DEFAULT_BODY_LIMIT},
    config::ControlConfig,
    serve::{ServeSettings, DEFAULT_JOB_TYPES},
    store::Store,
};
use trainyard_common::topology::Topology;

use super::manage::Target;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address of the HTTP API.
    #[arg(long, visible_alias = "http-addr", env = "TRAINYARD_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    listen: String,
    /// Configuration file (TOML): job types, schedules, trigger rules.
    #[arg(long, visible_alias = "schedules", env = "TRAINYARD_CONFIG")]
    config: Option<PathBuf>,
    /// Known job types (comma-separated); default: the config's, else the built-in ones.
    #[arg(long, env = "TRAINYARD_JOB_TYPES", value_delimiter = ',')]
    types: Vec<String>,
    /// API tokens: `TOKEN` or `NAME:SCOPE:TOKEN`, comma-separated, or `@FILE`.
    #[arg(long, env = "TRAINYARD_API_TOKENS", hide_env_values = true, default_value = "")]
    tokens: String,
    /// Request body limit of the API, bytes (at least 1 KiB: a smaller one refuses every job).
    #[arg(long, default_value_t = DEFAULT_BODY_LIMIT, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1024..))]
    body_limit: usize,
    /// Seconds between refreshes of the demand gauges (at least 1).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    demand_interval: u64,
    /// The broker's `consumer_timeout` in seconds (the workers' setting): trigger debounce
    /// windows must close well before it.
    #[arg(long, env = "TRAINYARD_CONSUMER_TIMEOUT_S", default_value_t = trainyard_common::job::DEFAULT_CONSUMER_TIMEOUT_S,
          value_parser = clap::value_parser!(u64).range(1..))]
    consumer_timeout_s: u64,
}

pub async fn serve(t: Target, url: &str, topology: Topology, a: ServeArgs) -> anyhow::Result<ExitCode> {
    let config = match a.config.as_ref().or(std::env::var_os("TRAINYARD_SCHEDULES").map(PathBuf::from).as_ref()) {
        Some(p) => ControlConfig::load(p).map_err(|e| anyhow::anyhow!("failed to load {}: {e}", p.display()))?,
        None => ControlConfig::default(),
    };
    let job_types = if !a.types.is_empty() {
        a.types.clone()
    } else if !config.job_types.is_empty() {
        config.job_types.clone()
    } else {
        DEFAULT_JOB_TYPES.iter().map(|s| s.to_string()).collect()
    };
    let tokens = Tokens::from_setting(&a.tokens)?;
    if tokens.is_empty() {
        tracing::warn!("no API tokens configured (TRAINYARD_API_TOKENS): every /v1/ request will be refused");
    }
    let settings = ServeSettings {
        amqp_url: url.to_string(),
        topology,
        database_url: t.database_url,
        artifacts: t.artifacts,
        job_types,
        tokens,
        config,
        body_limit: a.body_limit,
        demand_interval: Duration::from_secs(a.demand_interval),
        consumer_timeout: Duration::from_secs(a.consumer_timeout_s),
    };
    let listener = tokio::net::TcpListener::bind(&a.listen).await.with_context(|| format!("failed to listen on {}", a.listen))?;
    eprintln!("trainyard control plane on http://{}", listener.local_addr()?);
    let shutdown = CancellationToken::new();
    tokio::spawn({
        let s = shutdown.clone();
        async move {
            let _ = tokio::signal::ctrl_c().await;
            s.cancel();
        }
    });
    #[cfg(unix)]
    tokio::spawn({
        let s = shutdown.clone();
        async move {
            if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                term.recv().await;
                s.cancel();
            }
        }
    });
    trainyard::serve::serve(settings, listener, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Subcommand)]
pub enum StoreCmd {
    /// Replay the events.log stream into an empty store; stops when caught up. With
    /// `--since`, into a restored backup: the stream from that time (take it a little
    /// before the backup was taken; what the backup has is recorded once).
    Rebuild {
        /// Seconds without a new event that mean "caught up".
        #[arg(long, default_value_t = 2)]
        idle: u64,
        /// Replay from this time (RFC 3339, e.g. 2026-12-01T02:25:00Z) into a store that may hold jobs.
        #[arg(long)]
        since: Option<chrono::DateTime<chrono::Utc>>,
    },
}

pub async fn store(t: Target, url: &str, topology: Topology, cmd: StoreCmd) -> anyhow::Result<ExitCode> {
    let StoreCmd::Rebuild { idle, since } = cmd;
    let store = Store::open(&t.database_url).await?;
    let idle = Duration::from_secs(idle.max(1));
    let report = match since {
        Some(since) => trainyard::rebuild::rebuild_since(&store, &topology, url, idle, since).await?,
        None => trainyard::rebuild::rebuild(&store, &topology, url, idle).await?,
    };
    if t.json {
        println!("{}", serde_json::to_value(report)?);
    } else {
        if report.stream_restarted {
            println!("the events stream ends before the backup's stored position (deleted and declared again since): read it from its first entry");
        }
        println!("read {} stream entries, recorded {} events, parked {}", report.read, report.recorded, report.skipped);
    }
    Ok(ExitCode::SUCCESS)
}
