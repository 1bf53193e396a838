//! `trainyard-bench`: the benchmark driver behind `scripts/bench.sh`.
//!
//! Each subcommand prints one JSON document on stdout; `bench.sh` assembles
//! them into `target/bench/results.json`. Every run uses its own
//! `TRAINYARD_PREFIX` and deletes its queues and exchanges afterwards.
//!
//! - `dispatch`: N noop jobs through `Submitter` → `trainyard-worker` → recorder, or `--raw`;
//! - `pickup`: submit → `started` latency against an idle one-slot worker, or `--raw`;
//! - `scaling`: dispatch over worker processes × slots, trainyard and raw;
//! - `rss`: idle resident memory of any command once it consumes its queues;
//! - `store`: a job store of N jobs on SQLite and PostgreSQL: `jobs list` and demand p95, HTTP page p95, recorder events/s;
//! - `fairness`: fair share, priority tiers and coalescing on one 4-slot worker (see `fairness.rs`);
//! - `outcomes`: recording job outcomes on a local artifact directory, alone (µs per record);
//! - `raw-worker`, `raw-drain`: the processes of the raw-lapin baseline;
//! - `cleanup`: deletes a prefix's queues and exchanges.

mod broker;
mod dispatch;
mod fairness;
mod outcomes;
mod pickup;
mod procs;
mod raw;
mod store;

use std::{path::PathBuf, time::Duration};

use clap::{Parser, Subcommand};
use dispatch::{Kind, Shape};
use serde_json::json;

#[derive(Debug, Parser)]
#[command(name = "trainyard-bench", about = "Benchmarks of trainyard against raw lapin (see scripts/bench.sh)")]
struct Cli {
    /// Broker URL.
    #[arg(long, global = true, env = "TRAINYARD_AMQP_URL", default_value = trainyard_common::config::DEFAULT_AMQP_URL)]
    amqp_url: String,
    /// Directory of the `trainyard` and `trainyard-worker` binaries.
    #[arg(long, global = true, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Scratch directory: artifacts, job stores, process logs.
    #[arg(long, global = true, default_value = "target/bench/run")]
    work_dir: PathBuf,
    /// Where the artifact stores go (default: the scratch directory).
    #[arg(long, global = true)]
    artifacts_root: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, clap::Args)]
struct ShapeArgs {
    /// Jobs to time.
    #[arg(long, default_value_t = 20_000)]
    jobs: usize,
    /// Worker processes.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Slots (prefetch) per worker process.
    #[arg(long, default_value_t = 64)]
    concurrency: u16,
    /// Concurrent submits.
    #[arg(long, default_value_t = 8)]
    submitters: usize,
    /// Run without the recorder (`trainyard serve`) / the raw drainer.
    #[arg(long)]
    no_recorder: bool,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Dispatch throughput of trainyard, or of the raw baseline with `--raw`.
    Dispatch {
        /// Queue and exchange prefix of this run.
        #[arg(long)]
        prefix: String,
        #[command(flatten)]
        shape: ShapeArgs,
        /// Run the raw-lapin baseline instead.
        #[arg(long)]
        raw: bool,
    },
    /// Submit → `started` latency against an idle worker.
    Pickup {
        /// Queue and exchange prefix of this run.
        #[arg(long)]
        prefix: String,
        /// Jobs, one at a time.
        #[arg(long, default_value_t = 1000)]
        jobs: usize,
        /// Run the raw-lapin baseline instead.
        #[arg(long)]
        raw: bool,
        /// Run without the recorder.
        #[arg(long)]
        no_recorder: bool,
    },
    /// Dispatch throughput over worker processes × slots, trainyard and raw.
    Scaling {
        /// Prefix; each point gets `<prefix>-<kind><workers>x<slots>`.
        #[arg(long)]
        prefix: String,
        /// Jobs per point.
        #[arg(long, default_value_t = 3000)]
        jobs: usize,
        /// Worker process counts.
        #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
        workers: Vec<usize>,
        /// Slot counts per process.
        #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
        slots: Vec<u16>,
        /// Concurrent submits.
        #[arg(long, default_value_t = 8)]
        submitters: usize,
        /// Skip the raw baseline.
        #[arg(long)]
        no_raw: bool,
    },
    /// Idle RSS of a command once each queue has a consumer and it settled.
    Rss {
        /// Queues the command must consume before it counts as idle.
        #[arg(long, required = true)]
        queue: Vec<String>,
        /// Seconds to stay idle before reading `VmRSS`.
        #[arg(long, default_value_t = 5)]
        settle_s: u64,
        /// Name of the process log.
        #[arg(long, default_value = "rss")]
        name: String,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Recording outcome records on a local artifact directory (under the scratch
    /// directory or `--artifacts-root`), `--concurrency` at a time.
    Outcomes {
        /// Records to write.
        #[arg(long, default_value_t = 2000)]
        records: usize,
        /// Records written at a time (a worker's slots).
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
    /// A job store of `--jobs` jobs (about 5 events each, 10,000 bots) on SQLite and PostgreSQL:
    /// `jobs list` p95 by filter, demand query p95, a filtered page over HTTP, recorder events/s.
    Store {
        /// Jobs to generate.
        #[arg(long, default_value_t = 1_000_000)]
        jobs: usize,
        /// PostgreSQL (a schema of its own is created and dropped).
        #[arg(long, env = "TRAINYARD_BENCH_DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:5432/test")]
        pg_url: String,
        /// Name of this run (schema, file and queue names).
        #[arg(long)]
        prefix: String,
        /// The stores to measure.
        #[arg(long, value_delimiter = ',', default_value = "sqlite,postgres", value_parser = ["sqlite", "postgres"])]
        backends: Vec<String>,
    },
    /// Fair share, a high-priority job behind low ones, coalescing, and dispatch with admission
    /// against the plain pipeline, on one worker with 4 slots (see `fairness.rs`).
    Fairness {
        /// Queue and exchange prefix of this run (each part adds a suffix).
        #[arg(long)]
        prefix: String,
        /// Bot A's backlog.
        #[arg(long, default_value_t = 5000)]
        backlog: usize,
        /// Bots with one job each behind it.
        #[arg(long, default_value_t = 50)]
        others: usize,
        /// High-priority trials.
        #[arg(long, default_value_t = 20)]
        trials: usize,
        /// Jobs of the throughput part (each pipeline).
        #[arg(long, default_value_t = 3000)]
        throughput_jobs: usize,
        /// `admit_ahead` of the fair-share policy (default: the policy's default, 2).
        #[arg(long)]
        admit_ahead: Option<u32>,
        /// Only the throughput part (fair share against the plain pipeline).
        #[arg(long)]
        throughput_only: bool,
    },
    /// The raw baseline's worker process.
    RawWorker {
        /// Queue and exchange prefix.
        #[arg(long)]
        prefix: String,
        /// Prefetch (slots).
        #[arg(long, default_value_t = 64)]
        prefetch: u16,
    },
    /// The raw baseline's event drainer (the recorder's broker work).
    RawDrain {
        /// Queue and exchange prefix.
        #[arg(long)]
        prefix: String,
        /// Where to write the offset of the last stream entry read, after each batch.
        #[arg(long)]
        offset_file: PathBuf,
    },
    /// Deletes the queues and exchanges of prefixes.
    Cleanup {
        /// Prefixes.
        #[arg(required = true)]
        prefix: Vec<String>,
    },
}

impl From<&ShapeArgs> for Shape {
    fn from(a: &ShapeArgs) -> Self {
        Shape { jobs: a.jobs, workers: a.workers, concurrency: a.concurrency, submitters: a.submitters, recorder: !a.no_recorder }
    }
}

fn env_of(cli: &Cli) -> anyhow::Result<procs::Env> {
    std::fs::create_dir_all(&cli.work_dir)?;
    let work_dir = std::path::absolute(&cli.work_dir)?;
    let artifacts_root = match &cli.artifacts_root {
        Some(root) => std::path::absolute(root)?,
        None => work_dir.clone(),
    };
    Ok(procs::Env { amqp_url: cli.amqp_url.clone(), bin_dir: std::path::absolute(&cli.bin_dir)?, work_dir, artifacts_root })
}

fn kind(raw: bool) -> Kind {
    if raw {
        Kind::Raw
    } else {
        Kind::Trainyard
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let out = match &cli.cmd {
        Cmd::Dispatch { prefix, shape, raw } => dispatch::run(&env_of(&cli)?, kind(*raw), prefix, shape.into()).await?,
        Cmd::Pickup { prefix, jobs, raw, no_recorder } => pickup::run(&env_of(&cli)?, kind(*raw), prefix, *jobs, !no_recorder).await?,
        Cmd::Scaling { prefix, jobs, workers, slots, submitters, no_raw } => {
            let env = env_of(&cli)?;
            let mut points = Vec::new();
            for &w in workers {
                for &c in slots {
                    let shape = Shape { jobs: *jobs, workers: w, concurrency: c, submitters: *submitters, recorder: true };
                    let ty = dispatch::run(&env, Kind::Trainyard, &format!("{prefix}-t{w}x{c}"), shape).await?;
                    let mut point = json!({"workers": w, "slots": c, "jobs_per_s": ty["jobs_per_s"], "trainyard": ty});
                    if !no_raw {
                        let raw = dispatch::run(&env, Kind::Raw, &format!("{prefix}-r{w}x{c}"), shape).await?;
                        point["raw_jobs_per_s"] = raw["jobs_per_s"].clone();
                        point["ratio"] = json!(ty["jobs_per_s"].as_f64().unwrap_or(0.0) / raw["jobs_per_s"].as_f64().unwrap_or(1.0));
                        point["raw"] = raw;
                    }
                    eprintln!("scaling {w} process(es) x {c} slot(s): {point}");
                    points.push(point);
                }
            }
            json!(points)
        }
        Cmd::Rss { queue, settle_s, name, command } => {
            let env = env_of(&cli)?;
            let conn = trainyard_common::amqp::connect(&env.amqp_url, "trainyard-bench rss").await?;
            let args: Vec<&str> = command[1..].iter().map(String::as_str).collect();
            let mut p = vec![env.spawn(name, std::path::Path::new(&command[0]), &args, &[])?];
            let waited = broker::wait_consumers(&conn, queue, 1, Duration::from_secs(120)).await;
            tokio::time::sleep(Duration::from_secs(*settle_s)).await;
            let pid = p[0].pid();
            let (rss, hwm) = (procs::status_kb(pid, "VmRSS"), procs::status_kb(pid, "VmHWM"));
            procs::stop(&mut p).await;
            waited?;
            let mb = |kb: Option<u64>| kb.map(|v| v as f64 / 1024.0);
            json!({"rss_mb": mb(rss), "peak_rss_mb": mb(hwm)})
        }
        Cmd::Outcomes { records, concurrency } => outcomes::run(&env_of(&cli)?.artifacts_root, *records, *concurrency).await?,
        Cmd::Store { jobs, pg_url, prefix, backends } => {
            store::run(&env_of(&cli)?.work_dir, pg_url, *jobs, &cli.amqp_url, prefix, backends).await?
        }
        Cmd::Fairness { prefix, backlog, others, trials, throughput_jobs, admit_ahead, throughput_only } => {
            let sizes = fairness::Sizes {
                backlog: *backlog,
                others: *others,
                trials: *trials,
                throughput_jobs: *throughput_jobs,
                admit_ahead: *admit_ahead,
                throughput_only: *throughput_only,
            };
            fairness::run(&env_of(&cli)?, prefix, sizes).await?
        }
        Cmd::RawWorker { prefix, prefetch } => {
            raw::worker(&cli.amqp_url, prefix, *prefetch).await?;
            return Ok(());
        }
        Cmd::RawDrain { prefix, offset_file } => {
            raw::drain(&cli.amqp_url, prefix, offset_file).await?;
            return Ok(());
        }
        Cmd::Cleanup { prefix } => {
            for p in prefix {
                broker::cleanup(&cli.amqp_url, p).await?;
            }
            return Ok(());
        }
    };
    println!("{out}");
    Ok(())
}
