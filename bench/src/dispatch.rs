//! Dispatch throughput: N `noop` jobs through the real pipeline (the
//! `Submitter`, `trainyard-worker` processes, the `trainyard serve` recorder),
//! and the same broker operations with raw lapin ([`crate::raw`]).
//!
//! The clock runs from the first submit to the last `succeeded` event seen by
//! the observer; the recorder's drain is reported beside it.

use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use serde_json::json;
use tokio::sync::mpsc;
use trainyard::submit::Submitter;
use trainyard_common::{amqp, topology::Topology, JobSpec, Trigger};

use crate::{
    broker::{self, Seen},
    procs::{self, CpuMeter, Env, Proc},
    raw,
};

/// The shape of one dispatch run.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Jobs to time.
    pub jobs: usize,
    /// Worker processes.
    pub workers: usize,
    /// Slots (prefetch) per worker process.
    pub concurrency: u16,
    /// Concurrent submits.
    pub submitters: usize,
    /// Run the recorder (`trainyard serve`, or the raw drainer).
    pub recorder: bool,
}

/// Which implementation runs the jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `Submitter` + `trainyard-worker` + `trainyard serve`.
    Trainyard,
    /// The raw-lapin baseline.
    Raw,
}

/// A new noop job.
pub fn noop_spec() -> JobSpec {
    JobSpec::new("noop", "bench", json!({}), Trigger::manual("bench"))
}

/// Starts the consumers of a run (workers, and the recorder or drainer) and waits until they consume.
pub async fn start_consumers(env: &Env, kind: Kind, prefix: &str, shape: &Shape) -> anyhow::Result<Vec<Proc>> {
    let topology = Topology::new(prefix);
    let conn = amqp::connect(&env.amqp_url, "trainyard-bench setup").await?;
    let ch = conn.create_channel().await?;
    topology.declare_job_type(&ch, "noop").await?;
    let dir = env.work_dir.join(prefix);
    std::fs::create_dir_all(&dir)?;
    let envs = vec![
        ("TRAINYARD_PREFIX", prefix.to_string()),
        ("TRAINYARD_ARTIFACTS", env.artifacts_root.join(prefix).join("artifacts").display().to_string()),
        ("TRAINYARD_DATABASE_URL", format!("sqlite://{}", dir.join("jobs.db").display())),
    ];
    let me = std::env::current_exe()?;
    let mut procs = Vec::new();
    if shape.recorder {
        let p = match kind {
            Kind::Trainyard => env.spawn(
                &format!("recorder-{prefix}"),
                &env.bin("trainyard"),
                &["serve", "--listen", "127.0.0.1:0", "--types", "noop"],
                &envs,
            )?,
            Kind::Raw => {
                let offset_file = dir.join("raw-drain.offset").display().to_string();
                env.spawn(&format!("recorder-{prefix}"), &me, &["raw-drain", "--prefix", prefix, "--offset-file", &offset_file], &envs)?
            }
        };
        procs.push(p);
        // Both consume the dead-letter copy queue after subscribing to the stream (which reports no consumers).
        broker::wait_consumers(&conn, &[topology.dead_recorder_queue()], 1, Duration::from_secs(60)).await?;
    }
    let c = shape.concurrency.to_string();
    for i in 0..shape.workers {
        let name = format!("worker-{prefix}-{i}");
        let p = match kind {
            Kind::Trainyard => env.spawn(&name, &env.bin("trainyard-worker"), &["run", "--types", "noop", "--concurrency", &c], &envs)?,
            Kind::Raw => env.spawn(&name, &me, &["raw-worker", "--prefix", prefix, "--prefetch", &c], &envs)?,
        };
        procs.push(p);
    }
    broker::wait_consumers(&conn, &[topology.jobs_queue("noop")], shape.workers as u32, Duration::from_secs(60)).await?;
    let _ = conn.close(200, "bench setup done".into()).await;
    Ok(procs)
}

/// Something that submits one job per call.
enum Publisher {
    Trainyard(Submitter),
    Raw(raw::Publisher),
}

impl Publisher {
    async fn publish(&self, worker: usize) -> anyhow::Result<()> {
        match self {
            Publisher::Trainyard(s) => s.submit(&noop_spec()).await.context("submit"),
            Publisher::Raw(p) => p.publish(worker).await.map(|_| ()),
        }
    }
}

/// Runs `n` submits over `k` tasks; returns when all were confirmed.
async fn submit_all(p: &Arc<Publisher>, n: usize, k: usize) -> anyhow::Result<()> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for w in 0..k {
        let (p, next) = (p.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < n {
                p.publish(w).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// Waits until `n` distinct jobs reached `status`; returns when the last one arrived.
async fn wait_jobs(
    rx: &mut mpsc::UnboundedReceiver<Seen>,
    seen: &mut HashSet<String>,
    n: usize,
    timeout: Duration,
) -> anyhow::Result<Instant> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = Instant::now();
    while seen.len() < n {
        let s = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .map_err(|_| anyhow::anyhow!("only {} of {n} jobs finished within {timeout:?}", seen.len()))?
            .context("observer closed")?;
        if seen.insert(s.job_id) {
            last = s.at;
        }
    }
    Ok(last)
}

/// Stream entries per noop job: its `queued`, `started` and `succeeded` events.
const EVENTS_PER_JOB: usize = 3;

/// The broker operations per job of both runs (`docs/performance.md`, "Broker operations per
/// job"); the recorder drain above waits for exactly `EVENTS_PER_JOB` stream entries a job.
fn broker_ops() -> serde_json::Value {
    json!({
        "confirmed_publishes": 4,
        "queue_writes": 1 + EVENTS_PER_JOB,
        "writes": {"job_queue": 1, "events_stream": EVENTS_PER_JOB},
        "deliveries": 1 + EVENTS_PER_JOB,
        "acks": "1 (the job) + the stream entries' share of one multiple ack per recorder batch",
        "before_18_5": {"confirmed_publishes": 4, "queue_writes": 1 + 2 * EVENTS_PER_JOB},
    })
}

/// Waits until the recorder (its position in the job store) or the raw drainer (its offset
/// file) has read the events stream up to offset `last`; returns when that was seen.
async fn wait_read(env: &Env, kind: Kind, prefix: &str, last: i64, timeout: Duration) -> anyhow::Result<Instant> {
    let dir = env.work_dir.join(prefix);
    let store = match kind {
        Kind::Trainyard => Some(trainyard::store::Store::open(&format!("sqlite://{}", dir.join("jobs.db").display())).await?),
        Kind::Raw => None,
    };
    let stream = Topology::new(prefix).events_log();
    let deadline = Instant::now() + timeout;
    loop {
        let read = match &store {
            Some(s) => s.stream_position(&stream).await?.map_or(-1, |p| p.last_offset),
            None => std::fs::read_to_string(dir.join("raw-drain.offset")).ok().and_then(|t| t.trim().parse().ok()).unwrap_or(-1),
        };
        if read >= last {
            if let Some(s) = store {
                s.close().await;
            }
            return Ok(Instant::now());
        }
        anyhow::ensure!(Instant::now() < deadline, "the events stream was read up to offset {read}, not {last}, within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One dispatch run with its own prefix; the queues are deleted afterwards.
/// The artifacts stay until `bench.sh` ends: deleting thousands of files between
/// runs would slow the next run's file creation (see docs/performance.md).
pub async fn run(env: &Env, kind: Kind, prefix: &str, shape: Shape) -> anyhow::Result<serde_json::Value> {
    let out = run_inner(env, kind, prefix, shape).await;
    broker::cleanup(&env.amqp_url, prefix).await?;
    out
}

async fn run_inner(env: &Env, kind: Kind, prefix: &str, shape: Shape) -> anyhow::Result<serde_json::Value> {
    let topology = Topology::new(prefix);
    let mut procs = start_consumers(env, kind, prefix, &shape).await?;
    let result = async {
        let (_obs, mut rx) = broker::observe(&env.amqp_url, &topology, &["noop.succeeded"]).await?;
        let publisher = Arc::new(match kind {
            Kind::Trainyard => Publisher::Trainyard(Submitter::new(&env.amqp_url, topology.clone())?),
            Kind::Raw => Publisher::Raw(raw::Publisher::connect(&env.amqp_url, &topology, shape.submitters).await?),
        });
        // Warm-up: open every channel and wake every worker before the clock starts.
        let warm = shape.submitters.max(shape.workers);
        let mut seen = HashSet::new();
        submit_all(&publisher, warm, shape.submitters).await?;
        wait_jobs(&mut rx, &mut seen, warm, Duration::from_secs(60)).await?;

        let reductions = broker::reductions().await;
        let cpu = CpuMeter::start(&procs);
        let t0 = Instant::now();
        let submitting = {
            let p = publisher.clone();
            let (n, k) = (shape.jobs, shape.submitters);
            tokio::spawn(async move {
                submit_all(&p, n, k).await?;
                anyhow::Ok(Instant::now())
            })
        };
        let last = wait_jobs(&mut rx, &mut seen, warm + shape.jobs, Duration::from_secs(900)).await?;
        let submitted = submitting.await??;
        let secs = last.duration_since(t0).as_secs_f64();
        let mut r = json!({
            "kind": if kind == Kind::Trainyard { "trainyard" } else { "raw" },
            "jobs": shape.jobs, "workers": shape.workers, "concurrency": shape.concurrency,
            "submitters": shape.submitters, "recorder": shape.recorder,
            "seconds": secs, "jobs_per_s": shape.jobs as f64 / secs,
            "submit_jobs_per_s": shape.jobs as f64 / submitted.duration_since(t0).as_secs_f64(),
        });
        let busy_rss: Vec<u64> =
            procs.iter().filter(|p| p.name.starts_with("worker")).filter_map(|p| procs::status_kb(p.pid(), "VmHWM")).collect();
        r["worker_peak_rss_mb"] = json!(busy_rss.iter().copied().max().unwrap_or(0) as f64 / 1024.0);
        if shape.recorder {
            // Every job is 3 stream entries (queued, started, succeeded), warm-up included.
            let last = (EVENTS_PER_JOB * (warm + shape.jobs)) as i64 - 1;
            let drained = wait_read(env, kind, prefix, last, Duration::from_secs(900)).await?;
            let rs = drained.duration_since(t0).as_secs_f64();
            r["recorded_seconds"] = json!(rs);
            r["recorded_jobs_per_s"] = json!(shape.jobs as f64 / rs);
        }
        r["broker_ops"] = broker_ops();
        // CPU of every process (and the broker) from the first submit to the end, recorder drain included.
        r["cpu_us_per_job"] = cpu.per_job_us(shape.jobs);
        // The broker's work over the same window, which its CPU time per job is not: that also
        // grows with what the other processes do to the machine (its disk above all).
        if let (Some(before), Some(after)) = (reductions, broker::reductions().await) {
            r["broker_reductions_per_job"] = json!((after.saturating_sub(before) as f64 / shape.jobs as f64).round());
        }
        anyhow::Ok(r)
    }
    .await;
    procs::stop(&mut procs).await;
    result
}
