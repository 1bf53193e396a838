//! `trainyard-worker`: consumes training jobs from RabbitMQ and runs them.
//!
//! Subcommands: `run` (the worker), `train --job-file` (one job locally, no
//! broker), `predict` (query a trained model).

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "trainyard-worker", version, about = "trainyard worker: runs jobs from RabbitMQ")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Consume and run jobs of the given types.
    Run(trainyard_worker::runtime::cli::RunArgs),
    /// Run one intent-train / intent-eval job locally, without a broker.
    Train(trainyard_worker::intent::cli::TrainArgs),
    /// Print the top intents of utterances with a trained model.
    Predict(trainyard_worker::intent::cli::PredictArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => trainyard_worker::runtime::cli::run(args),
        Command::Train(args) => trainyard_worker::intent::cli::train(args),
        Command::Predict(args) => trainyard_worker::intent::cli::predict(args),
    }
}
