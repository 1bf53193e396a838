//! Fairness: one `trainyard-worker` with 4 slots, noop jobs of 50 ms, `trainyard serve` with and
//! without `[policy.noop] fair_share = true` (each part its own prefix):
//! - `backlog`: bot A submits N jobs, then M other bots one each: p95 submit → `started` of the M,
//!   fair share on and plain FIFO;
//! - `high`: 500 low-priority jobs ready (topped up before each trial), one high-priority job
//!   arrives: submit → `started`, p95 over the trials (fair share on);
//! - `coalesce`: 10 submits with one coalescing key while the 4 slots are busy: how many ran,
//!   how many ended `superseded`;
//! - `throughput`: N jobs of 0 ms from 20 bots, a tenth high and a tenth low, with fair share on
//!   and on the plain pipeline, one after the other.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use trainyard::submit::Submitter;
use trainyard_common::{job::Priority, topology::Topology, JobSpec, Trigger};

use crate::{
    broker::{self, Seen},
    procs::{self, Env, Proc},
};

/// What the run measures.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// Bot A's backlog.
    pub backlog: usize,
    /// Bots with one job each.
    pub others: usize,
    /// High-priority trials.
    pub trials: usize,
    /// Jobs of the throughput part.
    pub throughput_jobs: usize,
    /// `admit_ahead` of the fair-share policy (`None`: its default).
    pub admit_ahead: Option<u32>,
    /// Only the throughput part.
    pub throughput_only: bool,
}

fn spec(bot: &str, sleep_ms: u64, priority: Priority) -> JobSpec {
    let mut s = JobSpec::new("noop", bot, json!({ "sleep_ms": sleep_ms }), Trigger::manual("bench"));
    s.priority = priority;
    // Below the broker's default consumer timeout (30 min), which the worker checks.
    s.timeout_s = 600;
    s
}

fn p95(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = (0.95 * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// A running pipeline of one prefix: `trainyard serve` and one worker with 4 slots.
struct Pipeline {
    prefix: String,
    procs: Vec<Proc>,
    sub: Submitter,
    rx: mpsc::UnboundedReceiver<Seen>,
    _obs: lapin::Connection,
}

impl Pipeline {
    async fn start(env: &Env, prefix: &str, fair: bool, ahead: Option<u32>) -> anyhow::Result<Self> {
        let topology = Topology::new(prefix);
        let dir = env.work_dir.join(prefix);
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("control.toml");
        let ahead = ahead.map(|n| format!("admit_ahead = {n}\n")).unwrap_or_default();
        let policy = if fair { format!("\n[policy.noop]\nfair_share = true\n{ahead}") } else { String::new() };
        std::fs::write(&config, format!("job_types = [\"noop\"]\n{policy}"))?;
        let envs = vec![
            ("TRAINYARD_PREFIX", prefix.to_string()),
            ("TRAINYARD_ARTIFACTS", env.artifacts_root.join(prefix).join("artifacts").display().to_string()),
            ("TRAINYARD_DATABASE_URL", format!("sqlite://{}", dir.join("jobs.db").display())),
        ];
        let conn = trainyard_common::amqp::connect(&env.amqp_url, "trainyard-bench fairness").await?;
        let cfg = config.display().to_string();
        let mut procs = vec![env.spawn(
            &format!("serve-{prefix}"),
            &env.bin("trainyard"),
            &["serve", "--listen", "127.0.0.1:0", "--config", &cfg],
            &envs,
        )?];
        broker::wait_consumers(&conn, &[topology.admission_queue("noop")], 1, Duration::from_secs(60)).await?;
        procs.push(env.spawn(
            &format!("worker-{prefix}"),
            &env.bin("trainyard-worker"),
            &["run", "--types", "noop", "--concurrency", "4", "--heartbeat-s", "1"],
            &envs,
        )?);
        broker::wait_consumers(&conn, &[topology.jobs_queue("noop")], 1, Duration::from_secs(60)).await?;
        // The admitter sizes its window from the worker's heartbeats.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let _ = conn.close(200, "bench setup done".into()).await;
        let keys = ["noop.started", "noop.succeeded", "noop.superseded", "noop.cancelled"];
        let (obs, rx) = broker::observe(&env.amqp_url, &topology, &keys).await?;
        let sub = Submitter::new(&env.amqp_url, topology)?;
        Ok(Self { prefix: prefix.to_string(), procs, sub, rx, _obs: obs })
    }

    async fn stop(mut self, env: &Env) -> anyhow::Result<()> {
        procs::stop(&mut self.procs).await;
        broker::cleanup(&env.amqp_url, &self.prefix).await
    }

    /// Submits `specs` over 8 concurrent submitters.
    async fn submit_all(&self, specs: Vec<JobSpec>) -> anyhow::Result<()> {
        let specs = Arc::new(tokio::sync::Mutex::new(specs));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (sub, specs) = (self.sub.clone(), specs.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let Some(s) = specs.lock().await.pop() else { return anyhow::Ok(()) };
                    sub.submit(&s).await?;
                }
            }));
        }
        for t in tasks {
            t.await??;
        }
        Ok(())
    }

    /// Reads events until `done` says so; `seen` keeps the first arrival of each (job, status).
    async fn until(
        &mut self,
        seen: &mut HashMap<(String, String), Instant>,
        within: Duration,
        done: impl Fn(&HashMap<(String, String), Instant>) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        while !done(seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            let s = tokio::time::timeout(left, self.rx.recv()).await.context("timed out waiting for events")?.context("observer closed")?;
            seen.entry((s.job_id, s.status)).or_insert(s.at);
        }
        Ok(())
    }
}

fn started(seen: &HashMap<(String, String), Instant>, id: &str) -> Option<Instant> {
    seen.get(&(id.to_string(), "started".to_string())).copied()
}

/// Bot A's backlog, then one job each of `others` bots: their submit → start p95 (ms).
async fn backlog(env: &Env, prefix: &str, fair: bool, sizes: Sizes) -> anyhow::Result<Value> {
    let ahead = sizes.admit_ahead;
    let mut p = Pipeline::start(env, prefix, fair, ahead).await?;
    let out = async {
        p.submit_all((0..sizes.backlog).map(|_| spec("bot-a", 50, Priority::Normal)).collect()).await?;
        let mut sent = Vec::new();
        for i in 0..sizes.others {
            let s = spec(&format!("bot-{i}"), 50, Priority::Normal);
            let t0 = Instant::now();
            p.sub.submit(&s).await?;
            sent.push((s.job_id, t0));
        }
        let mut seen = HashMap::new();
        let ids: Vec<String> = sent.iter().map(|(id, _)| id.clone()).collect();
        p.until(&mut seen, Duration::from_secs(600), |seen| ids.iter().all(|id| started(seen, id).is_some())).await?;
        let lat: Vec<f64> = sent.iter().map(|(id, t0)| started(&seen, id).map_or(f64::NAN, |at| (at - *t0).as_secs_f64() * 1e3)).collect();
        anyhow::Ok(json!({"backlog": sizes.backlog, "others": sizes.others, "p95_ms": p95(lat.clone()), "max_ms": lat.iter().copied().fold(0.0, f64::max)}))
    }
    .await;
    p.stop(env).await?;
    out
}

/// 500 low-priority jobs ready, one high-priority job arrives: its submit → start (ms), per trial.
async fn high(env: &Env, prefix: &str, trials: usize) -> anyhow::Result<Value> {
    let mut p = Pipeline::start(env, prefix, true, None).await?;
    let out = async {
        let mut seen = HashMap::new();
        let mut lows: Vec<String> = Vec::new();
        let mut lat = Vec::new();
        for i in 0..trials {
            let ready = lows.iter().filter(|id| started(&seen, id).is_none()).count();
            let more: Vec<JobSpec> = (ready..500).map(|_| spec("bulk", 50, Priority::Low)).collect();
            lows.extend(more.iter().map(|s| s.job_id.clone()));
            p.submit_all(more).await?;
            let s = spec(&format!("urgent-{i}"), 50, Priority::High);
            let t0 = Instant::now();
            p.sub.submit(&s).await?;
            let id = s.job_id.clone();
            p.until(&mut seen, Duration::from_secs(60), |seen| started(seen, &id).is_some()).await?;
            lat.push(started(&seen, &s.job_id).map_or(f64::NAN, |at| (at - t0).as_secs_f64() * 1e3));
        }
        anyhow::Ok(
            json!({"ready_low": 500, "trials": trials, "p95_ms": p95(lat.clone()), "max_ms": lat.iter().copied().fold(0.0, f64::max)}),
        )
    }
    .await;
    p.stop(env).await?;
    out
}

/// 10 submits with one coalescing key while the 4 slots run 3 s jobs.
async fn coalesce(env: &Env, prefix: &str) -> anyhow::Result<Value> {
    let mut p = Pipeline::start(env, prefix, true, None).await?;
    let out = async {
        let mut seen = HashMap::new();
        let busy: Vec<JobSpec> = (0..4).map(|i| spec(&format!("busy-{i}"), 3000, Priority::Normal)).collect();
        let busy_ids: Vec<String> = busy.iter().map(|s| s.job_id.clone()).collect();
        p.submit_all(busy).await?;
        p.until(&mut seen, Duration::from_secs(60), |seen| busy_ids.iter().all(|id| started(seen, id).is_some())).await?;
        let mut ids = Vec::new();
        for _ in 0..10 {
            let mut s = spec("keyed", 10, Priority::Normal);
            s.coalesce_key = Some(s.bot_coalesce_key());
            p.sub.submit(&s).await?;
            ids.push(s.job_id);
        }
        let end = |seen: &HashMap<(String, String), Instant>, id: &String, st: &str| seen.contains_key(&(id.clone(), st.to_string()));
        let ended = |seen: &HashMap<(String, String), Instant>| {
            ids.iter().filter(|id| ["succeeded", "superseded", "cancelled"].iter().any(|st| end(seen, id, st))).count()
        };
        p.until(&mut seen, Duration::from_secs(120), |seen| ended(seen) == 10).await?;
        let ran = ids.iter().filter(|id| end(&seen, id, "succeeded")).count();
        let superseded = ids.iter().filter(|id| end(&seen, id, "superseded")).count();
        anyhow::Ok(json!({"submitted": 10, "ran": ran, "superseded": superseded}))
    }
    .await;
    p.stop(env).await?;
    out
}

/// Jobs per second from the first submit to the last `succeeded`.
async fn throughput(env: &Env, prefix: &str, fair: bool, jobs: usize, ahead: Option<u32>) -> anyhow::Result<f64> {
    let mut p = Pipeline::start(env, prefix, fair, ahead).await?;
    let out = async {
        let tier = |i: usize| match i % 10 {
            0 => Priority::High,
            1 => Priority::Low,
            _ => Priority::Normal,
        };
        let specs: Vec<JobSpec> = (0..jobs).map(|i| spec(&format!("bot-{}", i % 20), 0, tier(i))).collect();
        let ids: Vec<String> = specs.iter().map(|s| s.job_id.clone()).collect();
        let t0 = Instant::now();
        p.submit_all(specs).await?;
        let mut seen = HashMap::new();
        let ok = |seen: &HashMap<(String, String), Instant>| ids.iter().all(|id| seen.contains_key(&(id.clone(), "succeeded".into())));
        p.until(&mut seen, Duration::from_secs(600), ok).await?;
        let last = ids.iter().filter_map(|id| seen.get(&(id.clone(), "succeeded".to_string()))).max().copied().unwrap_or(t0);
        anyhow::Ok(jobs as f64 / (last - t0).as_secs_f64())
    }
    .await;
    p.stop(env).await?;
    out
}

/// The whole scenario.
pub async fn run(env: &Env, prefix: &str, sizes: Sizes) -> anyhow::Result<Value> {
    if sizes.throughput_only {
        let fair_tp = throughput(env, &format!("{prefix}-tf"), true, sizes.throughput_jobs, sizes.admit_ahead).await?;
        let plain_tp = throughput(env, &format!("{prefix}-tp"), false, sizes.throughput_jobs, None).await?;
        let t = json!({"jobs": sizes.throughput_jobs, "admit_ahead": sizes.admit_ahead, "fair_share_jobs_per_s": fair_tp, "plain_jobs_per_s": plain_tp, "ratio": fair_tp / plain_tp});
        return Ok(json!({ "throughput": t }));
    }
    let fair = backlog(env, &format!("{prefix}-af"), true, sizes).await?;
    eprintln!("fairness backlog, fair share: {fair}");
    let fifo = backlog(env, &format!("{prefix}-ap"), false, sizes).await?;
    eprintln!("fairness backlog, plain FIFO: {fifo}");
    let high = high(env, &format!("{prefix}-h"), sizes.trials).await?;
    eprintln!("fairness high priority: {high}");
    let coalesce = coalesce(env, &format!("{prefix}-c")).await?;
    eprintln!("fairness coalescing: {coalesce}");
    let fair_tp = throughput(env, &format!("{prefix}-tf"), true, sizes.throughput_jobs, sizes.admit_ahead).await?;
    let plain_tp = throughput(env, &format!("{prefix}-tp"), false, sizes.throughput_jobs, None).await?;
    Ok(json!({
        "backlog_fair_share": fair,
        "backlog_fifo": fifo,
        "high_priority": high,
        "coalesce": coalesce,
        "throughput": {"jobs": sizes.throughput_jobs, "admit_ahead": sizes.admit_ahead, "fair_share_jobs_per_s": fair_tp, "plain_jobs_per_s": plain_tp, "ratio": fair_tp / plain_tp},
    }))
}
