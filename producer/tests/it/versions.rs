//! Versioned events: the recorder records what a newer minor version writes, parks
//! (never drops) what it cannot read, counts it, and the CLI lists and re-records it.

use base64::Engine;
use lapin::BasicProperties;
use serde_json::{json, Value};
use trainyard::{
    recorder::Recorder,
    store::{ParkedEvent, Store},
};
use trainyard_common::{codec, event::event_seq, metrics::ControlMetrics, topology::Topology, JobEvent, JobStatus};

use crate::helpers::*;

/// Runs `trainyard ARGS --json` against `db_url`.
pub async fn cli_json(db_url: &str, topo: &Topology, args: &[&str]) -> Value {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_trainyard"))
        .args(args)
        .arg("--json")
        .env("TRAINYARD_DATABASE_URL", db_url)
        .env("TRAINYARD_PREFIX", topo.prefix())
        .env("TRAINYARD_AMQP_URL", AMQP_URL)
        .env_remove("TRAINYARD_SERVER")
        .env_remove("TRAINYARD_TOKEN")
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "trainyard {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("trainyard {args:?}: not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

async fn publish_json(ch: &lapin::Channel, topo: &Topology, key: &str, body: &[u8]) {
    let props = BasicProperties::default().with_content_type(codec::JSON.into()).with_delivery_mode(2);
    publish_raw(ch, &topo.events_exchange(), key, body, props).await;
}

async fn newer_and_garbage_events(store: Store, db_url: &str) {
    let topo = topology();
    let (_conn, ch) = channel().await;
    topo.declare_shared(&ch).await.unwrap();
    let registry = prometheus::Registry::new();
    let metrics = ControlMetrics::new(&registry, &["noop".to_string()]).unwrap();
    let recorder = Recorder::new(store.clone(), topo.clone(), AMQP_URL, Some(metrics.clone()));
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move { recorder.run(stop).await }
    });
    assert_eq!(metrics.events_parked.get(), 0);

    let (a, b, c) = (spec("noop", "bot-a"), spec("noop", "bot-b"), spec("noop", "bot-c"));
    publish_event(&ch, &topo, &JobEvent::queued(&a)).await;
    // A worker one release ahead: a newer minor version, a field, a worker attribute and an error field this build does not know.
    let mut started = serde_json::to_value(JobEvent::new(&a, JobStatus::Started, 1, event_seq(1, 0, 0))).unwrap();
    started["version"] = "1.1".into();
    started["gpu_seconds"] = 3.into();
    started["worker"] = json!({"id": "w-next", "zone": "eu-1"});
    publish_json(&ch, &topo, "noop.started", &serde_json::to_vec(&started).unwrap()).await;
    // ... and a status it does not know.
    let mut paused = serde_json::to_value(JobEvent::new(&a, JobStatus::Progress, 1, event_seq(1, 0, 1))).unwrap();
    paused["status"] = "paused".into();
    publish_json(&ch, &topo, "noop.paused", &serde_json::to_vec(&paused).unwrap()).await;
    // Garbage, and an event of a major version this build does not read.
    let garbage = b"\x00{not an event\xff".to_vec();
    publish_json(&ch, &topo, "noop.started", &garbage).await;
    let mut v2 = serde_json::to_value(JobEvent::queued(&b)).unwrap();
    v2["version"] = 2.into();
    publish_json(&ch, &topo, "noop.queued", &serde_json::to_vec(&v2).unwrap()).await;
    // The events after them are recorded.
    publish_event(&ch, &topo, &JobEvent::new(&a, JobStatus::Succeeded, 1, event_seq(1, 0, 2))).await;
    publish_event(&ch, &topo, &JobEvent::queued(&c)).await;

    eventually(30, "job c recorded", || async { store.job(&c.job_id).await.unwrap() }).await;
    let row =
        eventually(30, "job a succeeded", || async { store.job(&a.job_id).await.unwrap().filter(|j| j.status == JobStatus::Succeeded) })
            .await;
    let events = store.events(&a.job_id).await.unwrap();
    let statuses: Vec<JobStatus> = events.iter().map(|e| e.status).collect();
    assert_eq!(statuses, [JobStatus::Queued, JobStatus::Started, JobStatus::Unknown, JobStatus::Succeeded]);
    assert_eq!(events[1].worker.as_ref().map(|w| w.id.as_str()), Some("w-next"));
    assert_eq!(row.attempts, 1);
    assert!(store.job(&b.job_id).await.unwrap().is_none(), "a version 2 event is parked, not recorded");

    // Parked, counted and listed with the reason and the exact body.
    eventually(10, "2 events counted as parked", || async { (metrics.events_parked.get() == 2).then_some(()) }).await;
    let rendered = trainyard_common::metrics::render(&registry);
    assert!(rendered.contains("trainyard_events_parked_total 2"), "{rendered}");
    let listed = cli_json(db_url, &topo, &["events", "parked"]).await;
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    let body = |p: &Value| base64::engine::general_purpose::STANDARD.decode(p["body"].as_str().unwrap()).unwrap();
    let g = listed.iter().find(|p| body(p) == garbage).expect("the garbage event is listed with its exact body");
    assert!(g["reason"].as_str().unwrap().contains("undecodable"), "{g}");
    assert_eq!(g["routing_key"], "noop.started");
    assert!(g["at"].as_str().unwrap().contains('T'));
    let p2 = listed.iter().find(|p| p["routing_key"] == "noop.queued").unwrap();
    assert!(p2["reason"].as_str().unwrap().contains("unsupported event schema version 2.0"), "{p2}");

    // An event parked by an earlier release (which refused unknown fields) is recorded by `events reprocess`;
    // what this build still cannot read stays parked.
    let d = spec("noop", "bot-d");
    let mut old = serde_json::to_value(JobEvent::queued(&d)).unwrap();
    old["priority"] = 5.into();
    let old_body = serde_json::to_vec(&old).unwrap();
    store.record_batch(&[], &[ParkedEvent::new("noop.queued", Some(codec::JSON), &old_body, "unknown field `priority`")]).await.unwrap();
    // ... and so is an audit record parked the same way (told apart by its routing key).
    let action = trainyard::audit::AuditRecord::new("ops-token", "cancel", &d.job_id, None);
    let mut old_action = serde_json::to_value(&action).unwrap();
    old_action["ip"] = "10.0.0.7".into();
    let old_action = serde_json::to_vec(&old_action).unwrap();
    store.record_batch(&[], &[ParkedEvent::new("audit.cancel", Some(codec::JSON), &old_action, "unknown field `ip`")]).await.unwrap();
    assert_eq!(store.parked_count().await.unwrap(), 4);
    let done = cli_json(db_url, &topo, &["events", "reprocess"]).await;
    assert_eq!(done, json!({"recorded": 2, "still_parked": 2}));
    let trail = store.audit(&trainyard::store::AuditFilter { target: Some(d.job_id.clone()), ..Default::default() }).await.unwrap();
    assert_eq!(
        trail.iter().map(|r| (r.id.as_str(), r.actor.as_str(), r.action.as_str())).collect::<Vec<_>>(),
        [(action.id.as_str(), "ops-token", "cancel")]
    );
    let job_d = store.job(&d.job_id).await.unwrap().expect("reprocessed event recorded");
    assert_eq!((job_d.status, job_d.spec.as_ref().map(|s| s.job_id.as_str())), (JobStatus::Queued, Some(d.job_id.as_str())));
    assert_eq!(store.parked_count().await.unwrap(), 2);

    stop.cancel();
    task.await.unwrap();
    cleanup(&topo, &[]).await;
}

#[tokio::test]
async fn newer_events_are_recorded_and_unreadable_ones_parked_counted_listed_on_sqlite() {
    let (store, _dir, url) = sqlite_store().await;
    newer_and_garbage_events(store, &url).await;
}

#[tokio::test]
async fn newer_events_are_recorded_and_unreadable_ones_parked_counted_listed_on_postgres() {
    let schema = PgSchema::new().await;
    let store = Store::open(&schema.url).await.unwrap();
    newer_and_garbage_events(store.clone(), &schema.url).await;
    store.close().await;
    schema.drop().await;
}
