//! Two control planes on one PostgreSQL store and one broker: two `trainyard serve`
//! processes read the same events stream (recording is idempotent on
//! `(job_id, run, seq)`, and the stored stream offset only moves forward), both serve the
//! API, both run the same one-second cron schedule (a fire is claimed once in the store),
//! and SIGKILLing one mid-run loses nothing: the other reads every entry itself.

use std::path::Path;

use serde_json::{json, Value};
use trainyard::store::Store;

use crate::{
    series::{free_port, http, spawn_serve, until},
    support::{Env, Killed, PgSchema},
};

const JOBS: usize = 30;
const SCHEDULE: &str = "every-second";

fn start_serve(env: &Env, pg: &PgSchema, config: &Path, port: u16) -> Killed {
    let data = config.parent().expect("the config's folder");
    spawn_serve(env, &pg.url, data, port, &["--config".as_ref(), config.as_os_str()])
}

async fn status(port: u16, id: &str) -> Option<String> {
    let (code, body) = http(port, "GET", &format!("/v1/jobs/{id}"), None).await?;
    (code == 200).then(|| serde_json::from_str::<Value>(&body).ok()?["status"].as_str().map(str::to_string)).flatten()
}

/// Statuses of the recorded events of job `id`, read through the API on `port`.
async fn event_statuses(port: u16, id: &str) -> Vec<String> {
    let (code, body) = http(port, "GET", &format!("/v1/jobs/{id}/events"), None).await.expect("events");
    assert_eq!(code, 200, "{body}");
    let events: Vec<Value> = serde_json::from_str(&body).unwrap();
    events.iter().map(|e| e["status"].as_str().unwrap_or_default().to_string()).collect()
}

/// How many fires of [`SCHEDULE`] the replica on `port` published, from its `/metrics`.
async fn fires_published(port: u16) -> u64 {
    let (code, body) = http(port, "GET", "/metrics", None).await.expect("metrics");
    assert_eq!(code, 200, "{body}");
    let name = trainyard_common::metrics::SCHEDULE_FIRES_TOTAL;
    body.lines()
        .filter(|l| l.starts_with(name) && l.contains(&format!("\"{SCHEDULE}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

async fn wait_succeeded(port: u16, id: &str) {
    until(&format!("job {id} to succeed (read on :{port})"), || async move { status(port, id).await.as_deref() == Some("succeeded") })
        .await;
}

#[tokio::test]
async fn two_control_planes_share_one_store_and_a_sigkill_of_one_loses_nothing() {
    let env = Env::new(&["noop"]).await;
    let pg = PgSchema::new().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("control.toml");
    std::fs::write(
        &config,
        format!("job_types = [\"noop\"]\n\n[[schedule]]\nname = \"{SCHEDULE}\"\ncron = \"* * * * * *\"\njob_type = \"noop\"\nbot = \"cron-bot\"\n"),
    )
    .unwrap();
    let ports = [free_port(), free_port()];
    let mut a = start_serve(&env, &pg, &config, ports[0]);
    let b = start_serve(&env, &pg, &config, ports[1]);
    for port in ports {
        until(&format!("/readyz on :{port}"), || async move { http(port, "GET", "/readyz", None).await.is_some_and(|(s, _)| s == 200) })
            .await;
    }
    let worker = env.spawn_worker(&["noop"], |c| c.concurrency = 4);

    // Jobs submitted through both replicas, each job readable through the other one.
    let mut ids = Vec::new();
    for i in 0..JOBS {
        let body = json!({"job_type": "noop", "bot": "replica-bot", "params": {"sleep_ms": 200 + 20 * i}});
        let (code, reply) = http(ports[i % 2], "POST", "/v1/jobs", Some(&body)).await.expect("submit");
        assert_eq!(code, 201, "{reply}");
        ids.push(serde_json::from_str::<Value>(&reply).unwrap()["job_id"].as_str().unwrap().to_string());
    }
    wait_succeeded(ports[0], &ids[1]).await;
    wait_succeeded(ports[1], &ids[0]).await;

    // SIGKILL replica A mid-run: B records the rest (it reads every stream entry itself).
    let left = {
        let mut n = 0;
        for id in &ids {
            n += usize::from(status(ports[1], id).await.as_deref() != Some("succeeded"));
        }
        n
    };
    assert!(left > 0, "every job finished before the SIGKILL: the test proves nothing");
    let published_by_a = fires_published(ports[0]).await;
    a.0.kill().unwrap();
    a.0.wait().unwrap();
    for id in &ids {
        wait_succeeded(ports[1], id).await;
    }
    for id in &ids {
        let st = event_statuses(ports[1], id).await;
        assert_eq!(st.iter().filter(|s| *s == "succeeded").count(), 1, "job {id}: {st:?}");
    }

    // The schedule fired once per second across both replicas: one job per fire, each run once.
    // Read before the fires: B goes on firing, and each fire is claimed before it is published.
    let published_by_b = fires_published(ports[1]).await;
    let store = Store::open(&pg.url).await.unwrap();
    let fires = store.schedule_fires(SCHEDULE).await.unwrap();
    store.close().await;
    assert!(fires.len() >= 3, "the schedule fired {} times", fires.len());
    let mut fired_ids: Vec<&str> = fires.iter().map(|(_, id)| id.as_str()).collect();
    fired_ids.sort_unstable();
    fired_ids.dedup();
    assert_eq!(fired_ids.len(), fires.len(), "two fires share a job id");
    // Each fire published by one replica: a copy the other published too would run once all
    // the same (its job id is the fire's), so the count is what tells. A's count was read just
    // before its kill and may miss a fire or two it published after.
    let published = published_by_a + published_by_b;
    assert!(published <= fires.len() as u64, "{published} publishes for {} fires", fires.len());
    for (at, id) in &fires {
        wait_succeeded(ports[1], id).await;
        let st = event_statuses(ports[1], id).await;
        assert_eq!(st.iter().filter(|s| *s == "started").count(), 1, "fire at {at} ran more than once: {st:?}");
    }
    worker.stop().await;
    drop(b);
    pg.drop().await;
    env.cleanup().await;
}
