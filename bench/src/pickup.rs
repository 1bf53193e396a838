//! Pickup latency: an idle worker (one slot), jobs submitted one at a time;
//! the time from the start of the submit call to the arrival of the job's
//! `started` event at the observer. Each job finishes before the next is sent.

use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use tokio::sync::mpsc;
use trainyard::submit::Submitter;
use trainyard_common::topology::Topology;

use crate::{
    broker::{self, Seen},
    dispatch::{self, noop_spec, Kind, Shape},
    procs::{self, Env},
    raw,
};

/// Warm-up jobs before measuring.
const WARM: usize = 20;

async fn wait_for(rx: &mut mpsc::UnboundedReceiver<Seen>, id: &str, status: &str) -> anyhow::Result<Instant> {
    loop {
        let s =
            tokio::time::timeout(Duration::from_secs(30), rx.recv()).await.context("no event within 30 s")?.context("observer closed")?;
        if s.job_id == id && s.status == status {
            return Ok(s.at);
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Runs `jobs` one at a time against one idle worker with one slot.
pub async fn run(env: &Env, kind: Kind, prefix: &str, jobs: usize, recorder: bool) -> anyhow::Result<serde_json::Value> {
    let out = run_inner(env, kind, prefix, jobs, recorder).await;
    broker::cleanup(&env.amqp_url, prefix).await?;
    out
}

async fn run_inner(env: &Env, kind: Kind, prefix: &str, jobs: usize, recorder: bool) -> anyhow::Result<serde_json::Value> {
    let topology = Topology::new(prefix);
    let shape = Shape { jobs, workers: 1, concurrency: 1, submitters: 1, recorder };
    let mut procs = dispatch::start_consumers(env, kind, prefix, &shape).await?;
    let result = async {
        let (_obs, mut rx) = broker::observe(&env.amqp_url, &topology, &["noop.started", "noop.succeeded"]).await?;
        let submitter = Submitter::new(&env.amqp_url, topology.clone())?;
        let rawp = if kind == Kind::Raw { Some(raw::Publisher::connect(&env.amqp_url, &topology, 1).await?) } else { None };
        let mut pickup = Vec::with_capacity(jobs);
        let mut submit = Vec::with_capacity(jobs);
        for i in 0..WARM + jobs {
            let t0 = Instant::now();
            let id = match &rawp {
                Some(p) => p.publish(0).await?,
                None => {
                    let spec = noop_spec();
                    submitter.submit(&spec).await?;
                    spec.job_id
                }
            };
            let t_submit = Instant::now();
            let started = wait_for(&mut rx, &id, "started").await?;
            wait_for(&mut rx, &id, "succeeded").await?;
            if i >= WARM {
                pickup.push(started.duration_since(t0).as_secs_f64() * 1e3);
                submit.push(t_submit.duration_since(t0).as_secs_f64() * 1e3);
            }
        }
        pickup.sort_by(f64::total_cmp);
        submit.sort_by(f64::total_cmp);
        let mean = pickup.iter().sum::<f64>() / pickup.len().max(1) as f64;
        anyhow::Ok(json!({
            "kind": if kind == Kind::Trainyard { "trainyard" } else { "raw" },
            "jobs": jobs,
            "p50_ms": percentile(&pickup, 50.0), "p90_ms": percentile(&pickup, 90.0), "p99_ms": percentile(&pickup, 99.0),
            "max_ms": pickup.last().copied().unwrap_or(f64::NAN), "mean_ms": mean,
            "submit_call_p50_ms": percentile(&submit, 50.0), "submit_call_p99_ms": percentile(&submit, 99.0),
        }))
    }
    .await;
    procs::stop(&mut procs).await;
    result
}
