//! Subcommands of the `trainyard` binary.

mod admin;
mod audit;
mod follow;
mod manage;
mod serve;
mod submit;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use trainyard_common::{config, topology::Topology};

/// Command line of `trainyard`.
#[derive(Debug, Parser)]
#[command(name = "trainyard", version, about = "trainyard: submit and manage training jobs")]
pub struct Cli {
    /// Broker URL.
    #[arg(long, global = true, env = "TRAINYARD_AMQP_URL", default_value = config::DEFAULT_AMQP_URL, hide_env_values = true)]
    pub amqp_url: String,
    /// Prefix of exchange and queue names.
    #[arg(long, global = true, env = "TRAINYARD_PREFIX", default_value = "trainyard")]
    pub prefix: String,
    #[command(flatten)]
    target: manage::Target,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Submit a job.
    Submit(submit::SubmitArgs),
    /// Inspect and manage jobs.
    #[command(subcommand)]
    Jobs(manage::JobsCmd),
    /// Dead-letter queues.
    #[command(subcommand)]
    Dlq(admin::DlqCmd),
    /// Bots' production models.
    #[command(subcommand)]
    Models(admin::ModelsCmd),
    /// The audit trail: who submitted, cancelled, retried, replayed, promoted or rolled back what.
    Audit(audit::AuditArgs),
    /// Events the recorder parked because it could not record them.
    #[command(subcommand)]
    Events(admin::EventsCmd),
    /// Run the control plane: recorder, scheduler, triggers, HTTP API, metrics.
    Serve(serve::ServeArgs),
    /// The job store.
    #[command(subcommand)]
    Store(serve::StoreCmd),
    /// Declare the RabbitMQ topology (shared part, and the given job types).
    Topology {
        /// Job types whose queues to declare (comma-separated).
        #[arg(long, value_delimiter = ',')]
        types: Vec<String>,
    },
}

/// Runs a subcommand; the exit code says how it went.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let topology = Topology::new(cli.prefix.clone());
    match cli.command {
        Command::Submit(args) => submit::run(&cli.amqp_url, topology, args).await,
        Command::Jobs(cmd) => manage::jobs(cli.target, &cli.amqp_url, topology, cmd).await,
        Command::Dlq(cmd) => admin::dlq(cli.target, &cli.amqp_url, topology, cmd).await,
        Command::Models(cmd) => admin::models(cli.target, &cli.amqp_url, topology, cmd).await,
        Command::Events(cmd) => admin::events(cli.target, cmd).await,
        Command::Audit(args) => audit::run(cli.target, &cli.amqp_url, topology, args).await,
        Command::Serve(args) => serve::serve(cli.target, &cli.amqp_url, topology, args).await,
        Command::Store(cmd) => serve::store(cli.target, &cli.amqp_url, topology, cmd).await,
        Command::Topology { types } => {
            let s = trainyard::submit::Submitter::new(&cli.amqp_url, topology)?;
            s.declare_shared().await?;
            for t in &types {
                s.declare_job_type(t).await?;
            }
            eprintln!("declared shared topology and {} job type(s)", types.len());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Logs to stderr (stdout is for results): `RUST_LOG` filters, `TRAINYARD_LOG_FORMAT=json` for JSON.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if std::env::var("TRAINYARD_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().init();
    } else {
        builder.init();
    }
}
