//! The Workers view's data: workers publish heartbeats, the control plane serves them at
//! `/v1/workers` with their attributes and current jobs, and shows a worker as gone when it
//! says goodbye (a clean stop) or falls silent (killed) for three heartbeat intervals.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{
    browser::ControlPlane,
    series::{http, TOKEN},
    support::Env,
};

/// `GET /v1/workers` with a read token.
async fn workers(cp: &ControlPlane) -> Vec<Value> {
    let (status, body) = http(cp.addr.port(), "GET", "/v1/workers", None).await.expect("the control plane answers");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Polls `/v1/workers` until `ok` holds for the worker `id`; its row, and how long it took.
async fn wait_worker(cp: &ControlPlane, id: &str, what: &str, secs: u64, ok: impl Fn(&Value) -> bool) -> (Value, Duration) {
    let start = Instant::now();
    let mut last = Vec::new();
    while start.elapsed() < Duration::from_secs(secs) {
        last = workers(cp).await;
        if let Some(w) = last.iter().find(|w| w["worker"]["id"] == id && ok(w)) {
            return (w.clone(), start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{what}: not within {secs} s; /v1/workers: {last:?}");
}

#[tokio::test]
async fn workers_show_attributes_and_current_jobs_and_are_gone_after_goodbye_or_silence() {
    let env = Env::new(&["noop"]).await;
    let db = tempfile::tempdir().unwrap();
    let db_url = format!("sqlite://{}/cp.db", db.path().display());
    let cp = ControlPlane::start(&env, &db_url, &format!("reader:read:{TOKEN}"), None).await;
    let id = format!("hb-{}", uuid::Uuid::new_v4().simple());
    let worker = env.spawn_worker(&["noop"], |c| {
        c.worker.id = id.clone();
        c.worker.attributes.insert("node".into(), "gpu-node-7".into());
        c.worker.attributes.insert("gpu".into(), "NVIDIA-H100".into());
        c.heartbeat_interval = Duration::from_secs(1);
        c.device = "cuda:1".into();
        c.concurrency = 2;
    });

    let (w, _) = wait_worker(&cp, &id, "the worker live", 20, |w| w["state"] == "live").await;
    assert_eq!(w["worker"]["attributes"], json!({"node": "gpu-node-7", "gpu": "NVIDIA-H100"}));
    assert_eq!((w["device"].clone(), w["slots"].clone(), w["slots_in_use"].clone()), (json!("cuda:1"), json!(2), json!(0)));
    assert_eq!(w["job_types"], json!(["noop"]));
    assert_eq!(w["version"], json!(env!("CARGO_PKG_VERSION")));
    assert!(w["host"].as_str().is_some_and(|h| !h.is_empty()) && w["last_seen"].is_string(), "{w}");

    // While a job runs, the worker shows it and one slot in use.
    let long = env.spec("noop", json!({"sleep_ms": 600000}));
    env.submitter().submit(&long).await.unwrap();
    let running = |w: &Value| w["current_jobs"] == json!([long.job_id]) && w["slots_in_use"] == 1;
    wait_worker(&cp, &id, "the running job on the worker", 30, running).await;

    // A clean stop says goodbye: gone at once, not after the silence.
    worker.stop().await;
    let (_, took) = wait_worker(&cp, &id, "the stopped worker gone", 5, |w| w["state"] == "gone").await;
    assert!(took < Duration::from_secs(3), "a goodbye marks the worker gone at once, took {took:?}");

    // A killed worker says nothing: gone after three missed heartbeats (1 s each here).
    let mut child = env.worker_process("noop", &["--heartbeat-s", "1"]);
    let pid = child.id();
    let proc_id = |w: &Value| w["worker"]["id"].as_str().is_some_and(|i| i.ends_with(&format!("-{pid}"))) && w["state"] == "live";
    let start = Instant::now();
    let proc_row = loop {
        if let Some(w) = workers(&cp).await.into_iter().find(|w| proc_id(w)) {
            break w;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "the worker process never heartbeated");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(proc_row["interval_s"], 1);
    child.kill().unwrap();
    child.wait().unwrap();
    let proc_id = proc_row["worker"]["id"].as_str().unwrap();
    let (_, took) = wait_worker(&cp, proc_id, "the killed worker gone", 15, |w| w["state"] == "gone").await;
    assert!(took >= Duration::from_secs(1), "gone only after missed heartbeats, not at once: {took:?}");

    cp.stop().await;
    env.cleanup().await;
}

/// A busy worker says in its heartbeat which jobs it holds and has not started (its prefetch on
/// each priority tier), and the control plane adds them to `trainyard_jobs_demand`: the broker
/// counts such a job neither ready nor running, so a worker on a long job holding a high one
/// showed a demand of 1, and nothing scaled out for it.
#[tokio::test]
async fn a_job_held_for_a_busy_slot_counts_in_the_heartbeat_and_the_demand() {
    let env = Env::new(&["noop"]).await;
    let db = tempfile::tempdir().unwrap();
    let db_url = format!("sqlite://{}/cp.db", db.path().display());
    let cp = ControlPlane::start(&env, &db_url, &format!("reader:read:{TOKEN}"), None).await;
    let id = format!("held-{}", uuid::Uuid::new_v4().simple());
    let worker = env.spawn_worker(&["noop"], |c| {
        c.worker.id = id.clone();
        c.heartbeat_interval = Duration::from_secs(1);
        c.concurrency = 1;
    });
    wait_worker(&cp, &id, "the worker live", 20, |w| w["state"] == "live").await;
    let long = env.spec("noop", json!({"sleep_ms": 600000}));
    env.submitter().submit(&long).await.unwrap();
    wait_worker(&cp, &id, "the long job running", 30, |w| w["slots_in_use"] == 1).await;
    let mut urgent = env.spec("noop", json!({"sleep_ms": 10}));
    urgent.priority = trainyard_common::job::Priority::High;
    env.submitter().submit(&urgent).await.unwrap();
    wait_worker(&cp, &id, "the high job held", 20, |w| w["waiting"] == json!({"noop": 1})).await;
    let demand = || async {
        let (_, metrics) = http(cp.addr.port(), "GET", "/metrics", None).await.expect("the control plane answers");
        metrics.lines().find_map(|l| l.strip_prefix("trainyard_jobs_demand{job_type=\"noop\"} ")).map(str::to_string)
    };
    let start = Instant::now();
    while demand().await.as_deref() != Some("2") {
        assert!(start.elapsed() < Duration::from_secs(20), "demand {:?}, not 1 running + 1 held", demand().await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    worker.stop().await;
    cp.stop().await;
    env.cleanup().await;
}
