//! Helper of `scripts/chaos.sh`: submits many jobs fast through the product's
//! own [`Submitter`] (confirmed publish + `queued` event, as `trainyard submit`
//! does), and deletes a prefix's queues and exchanges at the end.
//!
//! ```text
//! chaos submit --count N [--intent K] [--sleep-ms MIN..MAX] [--concurrency C] --out IDS
//! chaos cleanup --types noop,intent-train
//! ```
//! Broker URL and prefix come from `TRAINYARD_AMQP_URL` and `TRAINYARD_PREFIX`.
//! `IDS` gets one line per job: `<job_id> <job_type> <kind> [<coalescing key>]` where kind is
//! `ok`, `flaky` (fails transiently once, then succeeds), `fatal` (fails
//! permanently: ends `dead`), `train`, `latest` (the newest job of its coalescing key: must
//! succeed) or `keyed` (an older job of a key: superseded, cancelled while running, or
//! succeeded when it finished before a newer one came; never dead, never two results).

use std::{collections::HashMap, io::Write, time::Instant};

use anyhow::{bail, Context};
use futures::{stream, StreamExt, TryStreamExt};
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use serde_json::json;
use trainyard::submit::Submitter;
use trainyard_common::{amqp, config, job::Priority, topology::Topology, JobSpec, Trigger};

/// Deterministic xorshift, so a run's mix of jobs is reproducible from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

fn arg<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).map(String::as_str)
}

fn num(args: &[String], name: &str, default: u64) -> anyhow::Result<u64> {
    arg(args, name).map(|v| v.parse().with_context(|| format!("{name} {v:?} is not a number"))).transpose().map(|v| v.unwrap_or(default))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let url = std::env::var("TRAINYARD_AMQP_URL").unwrap_or_else(|_| config::DEFAULT_AMQP_URL.to_string());
    let prefix = std::env::var("TRAINYARD_PREFIX").context("TRAINYARD_PREFIX must be set")?;
    let topology = Topology::new(prefix);
    match args.first().map(String::as_str) {
        Some("submit") => submit(&url, topology, &args).await,
        Some("cleanup") => cleanup(&url, topology, &args).await,
        _ => bail!(
            "usage: chaos submit --count N [--intent K] [--sleep-ms MIN..MAX] [--concurrency C] --out IDS | chaos cleanup --types T,…"
        ),
    }
}

async fn submit(url: &str, topology: Topology, args: &[String]) -> anyhow::Result<()> {
    let count = num(args, "--count", 100)?;
    let intent = num(args, "--intent", 0)?;
    let concurrency = num(args, "--concurrency", 64)? as usize;
    let epochs = num(args, "--epochs", 3)?;
    let mut rng = Rng(num(args, "--seed", 0x5eed)?.max(1));
    let (lo, hi) = match arg(args, "--sleep-ms") {
        Some(r) => {
            let (a, b) = r.split_once("..").context("--sleep-ms is MIN..MAX")?;
            (a.parse()?, b.parse()?)
        }
        None => (0, 0),
    };
    // Flaky/fatal mix: 2% fail once then succeed, 1% fail permanently (unless --plain).
    let plain = args.iter().any(|a| a == "--plain");
    let out = arg(args, "--out").context("--out FILE is required")?;
    let mut jobs = Vec::new();
    for i in 0..count {
        let sleep = rng.range(lo, hi);
        let roll = rng.range(0, 99);
        let (params, kind) = match roll {
            0 | 1 if !plain => (json!({"sleep_ms": sleep, "fail": "transient", "fail_until": 2}), "flaky"),
            2 if !plain => (json!({"sleep_ms": sleep, "fail": "permanent"}), "fatal"),
            _ => (json!({"sleep_ms": sleep}), "ok"),
        };
        // Tenants mixed in: half the jobs are one bot's backlog, the rest spread over 3 bots
        // (fair share admits them bot by bot when serve's policy asks); a tenth high, a tenth low.
        let bot = if i % 2 == 0 { 0 } else { 1 + i % 6 };
        let mut spec = JobSpec::new("noop", format!("chaos-{bot}"), params, Trigger::manual("chaos"));
        spec.timeout_s = 120;
        spec.priority = match i % 10 {
            0 => Priority::High,
            1 => Priority::Low,
            _ => Priority::Normal,
        };
        // Coalescing mixed in: a tenth of the plain jobs share one of 2 keys (latest wins).
        if !plain && kind == "ok" && i % 10 == 5 {
            spec.coalesce_key = Some(format!("noop/chaos-key-{}", (i / 10) % 2));
        }
        jobs.push((spec, kind));
    }
    mark_newest_per_key(&mut jobs);
    for i in 0..intent {
        let params = json!({"dataset": "clinc150/data_small.json", "epochs": epochs, "seed": 7 + i, "promote": "manual"});
        let mut spec = JobSpec::new("intent-train", format!("chaos-intent-{i}"), params, Trigger::manual("chaos"));
        spec.timeout_s = 600;
        jobs.push((spec, "train"));
    }
    let submitter = Submitter::new(url, topology)?;
    submitter.declare_shared().await?;
    for t in ["noop", "intent-train"] {
        submitter.declare_job_type(t).await?;
    }
    let t0 = Instant::now();
    let mut file = std::io::BufWriter::new(std::fs::File::create(out).with_context(|| format!("create {out}"))?);
    // Submitted jobs are written as soon as the broker confirmed them: a job in the file was really queued.
    let mut confirmed = stream::iter(jobs.into_iter().map(|(spec, kind)| {
        let s = &submitter;
        async move { s.submit(&spec).await.map(|_| (spec, kind)) }
    }))
    .buffer_unordered(concurrency);
    let mut n = 0u64;
    while let Some((spec, kind)) = confirmed.try_next().await? {
        let key = spec.coalesce_key.as_deref().unwrap_or_default();
        writeln!(file, "{} {} {kind} {key}", spec.job_id, spec.job_type)?;
        n += 1;
    }
    file.flush()?;
    let secs = t0.elapsed().as_secs_f64();
    eprintln!("submitted {n} jobs in {secs:.1}s ({:.0}/s)", n as f64 / secs.max(1e-3));
    Ok(())
}

/// Kind `latest` for the job of each coalescing key that wins (the newest by `submitted_at`,
/// then `job_id`: the control plane's rule), `keyed` for the others.
fn mark_newest_per_key(jobs: &mut [(JobSpec, &str)]) {
    let mut newest: HashMap<String, (i64, String)> = HashMap::new();
    for (spec, _) in jobs.iter() {
        if let Some(key) = &spec.coalesce_key {
            let rank = (spec.submitted_at.timestamp_micros(), spec.job_id.clone());
            let slot = newest.entry(key.clone()).or_insert_with(|| rank.clone());
            if rank > *slot {
                *slot = rank;
            }
        }
    }
    for (spec, kind) in jobs.iter_mut() {
        if let Some(key) = &spec.coalesce_key {
            *kind = if newest[key].1 == spec.job_id { "latest" } else { "keyed" };
        }
    }
}

async fn cleanup(url: &str, t: Topology, args: &[String]) -> anyhow::Result<()> {
    let types: Vec<&str> = arg(args, "--types").unwrap_or("noop,intent-train").split(',').collect();
    let delays: Vec<u64> = arg(args, "--retry-delays").unwrap_or("").split(',').filter_map(|d| d.parse().ok()).collect();
    let mut queues = trainyard::serve::queues(&t, &types);
    for ty in &types {
        for d in &delays {
            queues.push(t.retry_queue(ty, *d));
        }
    }
    let conn = amqp::connect(url, "chaos-cleanup").await?;
    let ch = conn.create_channel().await?;
    for q in &queues {
        let _ = ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await;
    }
    for x in trainyard::serve::exchanges(&t) {
        let _ = ch.exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default()).await;
    }
    let _ = conn.close(200, "chaos cleanup".into()).await;
    Ok(())
}
