//! Schedules fire once across replicas; triggers debounce bursts; the store rebuilds from the stream.

use std::time::Duration;

use lapin::{options::BasicGetOptions, BasicProperties};
use tokio_util::sync::CancellationToken;
use trainyard::{
    config::{MissedFire, ScheduleConfig, TriggerRule},
    scheduler::{fire_job_id, Scheduler},
    store::Store,
    submit::Submitter,
    triggers::Triggers,
};
use trainyard_common::{codec, event::event_seq, metrics::ControlMetrics, JobEvent, JobSpec, JobStatus};

use crate::helpers::*;

pub(crate) async fn drain(ch: &lapin::Channel, queue: &str) -> Vec<JobSpec> {
    let mut out = Vec::new();
    while let Some(m) = ch.basic_get(queue.into(), BasicGetOptions { no_ack: true }).await.unwrap() {
        out.push(codec::decode(Some(codec::MSGPACK), &m.delivery.data).unwrap());
    }
    out
}

/// A noop job for `bot` every minute, UTC, skipping missed fires.
pub(crate) fn every_minute(name: &str, bot: &str) -> ScheduleConfig {
    ScheduleConfig {
        name: name.into(),
        cron: "* * * * *".into(),
        timezone: "UTC".into(),
        job_type: "noop".into(),
        bot: bot.into(),
        params: serde_json::json!({}),
        missed: MissedFire::Skip,
        priority: Default::default(),
        coalesce_key: None,
    }
}

#[tokio::test]
async fn a_schedule_fires_once_across_two_schedulers_sharing_postgres() {
    let schema = PgSchema::new().await;
    let topo = topology();
    let (_conn, ch) = channel().await;
    topo.declare_job_type(&ch, "noop").await.unwrap();
    let cfg = ScheduleConfig {
        timezone: "Europe/Berlin".into(),
        params: serde_json::json!({"sleep_ms": 1}),
        ..every_minute("every-minute", "bot-s")
    };
    // Two replicas: their own store pools and publishers, one database.
    let a =
        Scheduler::new(vec![cfg.clone()], Store::open(&schema.url).await.unwrap(), Submitter::new(AMQP_URL, topo.clone()).unwrap(), None);
    let b =
        Scheduler::new(vec![cfg.clone()], Store::open(&schema.url).await.unwrap(), Submitter::new(AMQP_URL, topo.clone()).unwrap(), None);
    let t0: chrono::DateTime<chrono::Utc> = "2026-06-01T10:00:30Z".parse().unwrap();
    assert!(a.tick(t0).await.unwrap().is_empty());
    assert!(b.tick(t0).await.unwrap().is_empty());
    // Both see the same three minutes go by (injected clock), at the same time.
    let mut fired = 0;
    for step in 1..=3 {
        let now = t0 + chrono::TimeDelta::seconds(60 * step);
        let (ra, rb) = tokio::join!(a.tick(now), b.tick(now));
        fired += ra.unwrap().len() + rb.unwrap().len();
    }
    assert_eq!(fired, 3);
    let jobs = eventually(10, "3 jobs", || async {
        // Confirmed publishes are in the queue already; read them once.
        Some(drain(&ch, &topo.jobs_queue("noop")).await)
    })
    .await;
    assert_eq!(jobs.len(), 3);
    let mut ids: Vec<_> = jobs.iter().map(|j| j.job_id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3);
    let first: chrono::DateTime<chrono::Utc> = "2026-06-01T10:01:00Z".parse().unwrap();
    assert!(ids.contains(&fire_job_id("every-minute", first)));
    assert!(jobs.iter().all(|j| j.trigger.source == "every-minute" && j.bot == "bot-s"));
    // A restarted replica resumes from the store: a tick 10 minutes later skips the missed fires.
    let c = Scheduler::new(vec![cfg], Store::open(&schema.url).await.unwrap(), Submitter::new(AMQP_URL, topo.clone()).unwrap(), None);
    let later = t0 + chrono::TimeDelta::seconds(60 * 13 + 10);
    assert_eq!(c.tick(later).await.unwrap().len(), 1);
    schema.drop().await;
    cleanup(&topo, &["noop"]).await;
}

#[tokio::test]
async fn a_burst_of_trigger_events_yields_one_job() {
    let topo = topology();
    let (_conn, ch) = channel().await;
    topo.declare_job_type(&ch, "noop").await.unwrap();
    let rule = TriggerRule {
        name: "dataset-updated".into(),
        routing_key: "bot.dataset_updated".into(),
        job_type: "noop".into(),
        bot: "{{bot}}".into(),
        params: serde_json::json!({"sleep_ms": "{{n}}"}),
        debounce_s: 1,
        priority: Default::default(),
        coalesce_key: Some("noop/{{bot}}".into()),
    };
    let triggers = Triggers::new(vec![rule], Submitter::new(AMQP_URL, topo.clone()).unwrap(), AMQP_URL, None);
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let (t, s) = (triggers.clone(), stop.clone());
        async move { t.run(s).await }
    });
    // Wait for the binding, then a burst for one bot and one event for another.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for n in 1..=5 {
        let body = serde_json::json!({"bot": "banking", "n": n});
        publish_raw(&ch, &topo.triggers_exchange(), "bot.dataset_updated", body.to_string().as_bytes(), BasicProperties::default()).await;
    }
    let other = serde_json::json!({"bot": "travel", "n": 9});
    publish_raw(&ch, &topo.triggers_exchange(), "bot.dataset_updated", other.to_string().as_bytes(), BasicProperties::default()).await;
    publish_raw(&ch, &topo.triggers_exchange(), "bot.other_event", b"{\"bot\":\"banking\"}", BasicProperties::default()).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut jobs = drain(&ch, &topo.jobs_queue("noop")).await;
    jobs.sort_by(|a, b| a.bot.cmp(&b.bot));
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    assert_eq!((jobs[0].bot.as_str(), &jobs[0].params), ("banking", &serde_json::json!({"sleep_ms": 5})));
    assert_eq!(jobs[1].bot, "travel");
    assert_eq!(jobs[1].coalesce_key.as_deref(), Some("noop/travel"), "the rule's key template is filled from the event");
    assert_eq!(jobs[0].trigger.kind, trainyard_common::TriggerKind::Event);
    stop.cancel();
    task.await.unwrap();
    if let Ok(c) = _conn.create_channel().await {
        let _ = c.queue_delete(triggers.queue_name().as_str().into(), Default::default()).await;
    }
    cleanup(&topo, &["noop"]).await;
}

/// An event an immediate rule and a debounced rule both take stays unacked until the debounced
/// rule's job is out: a listener stopped inside the window leaves it in the queue (an ack at the
/// first rule's fire would lose the second's job). Delivered again to the next listener, it fires
/// both rules, the immediate one with the same job id as before (the event has a message id).
#[tokio::test]
async fn an_event_two_rules_take_is_acked_only_when_the_last_of_them_kept_it() {
    let topo = topology();
    let (_conn, ch) = channel().await;
    topo.declare_job_type(&ch, "noop").await.unwrap();
    let rule = |name: &str, debounce_s: u64| TriggerRule {
        name: name.into(),
        routing_key: "bot.mixed".into(),
        job_type: "noop".into(),
        bot: "{{bot}}".into(),
        params: serde_json::json!({}),
        debounce_s,
        priority: Default::default(),
        coalesce_key: None,
    };
    let triggers = Triggers::new(vec![rule("now", 0), rule("later", 3)], Submitter::new(AMQP_URL, topo.clone()).unwrap(), AMQP_URL, None);
    let listen = || {
        let (t, stop) = (triggers.clone(), CancellationToken::new());
        let s = stop.clone();
        (stop, tokio::spawn(async move { t.run(s).await }))
    };
    let (stop, task) = listen();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let props = BasicProperties::default().with_message_id("mixed-1".into());
    publish_raw(&ch, &topo.triggers_exchange(), "bot.mixed", br#"{"bot": "mixed"}"#, props).await;
    let first =
        eventually(20, "the immediate rule's job", || async { Some(drain(&ch, &topo.jobs_queue("noop")).await).filter(|j| !j.is_empty()) })
            .await;
    assert_eq!(first.iter().map(|j| j.trigger.source.as_str()).collect::<Vec<_>>(), ["bot.mixed (now)"]);
    // Inside the later rule's window: stop the listener.
    stop.cancel();
    task.await.unwrap();
    let queue = triggers.queue_name();
    // Not acked before the debounced rule's job was out.
    eventually(20, "the event back in its queue", || async { (message_count(&ch, &queue).await == 1).then_some(()) }).await;
    let (stop, task) = listen();
    let seen = std::sync::Mutex::new(Vec::new());
    let again = eventually(20, "both rules' jobs", || async {
        let drained = drain(&ch, &topo.jobs_queue("noop")).await;
        let mut jobs = seen.lock().unwrap();
        jobs.extend(drained);
        jobs.sort_by(|a, b| a.trigger.source.cmp(&b.trigger.source));
        (jobs.len() == 2).then(|| jobs.clone())
    })
    .await;
    assert_eq!(again[0].trigger.source, "bot.mixed (later)");
    assert_eq!(again[1].job_id, first[0].job_id, "the immediate rule's job again, with the same id");
    assert_eq!(message_count(&ch, &queue).await, 0, "acked once both kept it");
    stop.cancel();
    task.await.unwrap();
    let _ = ch.queue_delete(queue.as_str().into(), Default::default()).await;
    cleanup(&topo, &["noop"]).await;
}

/// In a debounced burst each event is checked as it comes: one that makes no job is parked at
/// once, with its routing key and bytes as received, and the burst fires with the latest good
/// event. Before, only the latest event was checked, when the window closed: a bad last event
/// took the good ones before it down (acked, no job, nothing parked), a bad first one went
/// unparked, and what was parked named the rule's pattern and a re-serialised body.
#[tokio::test]
async fn a_bad_event_in_a_debounced_burst_is_parked_and_the_good_one_fires() {
    let topo = topology();
    let (_conn, ch) = channel().await;
    topo.declare_job_type(&ch, "noop").await.unwrap();
    let (store, _dir, _) = sqlite_store().await;
    let rule =
        TriggerRule { params: serde_json::json!({"dataset": "{{dataset}}"}), debounce_s: 1, ..trigger_rule("debounced", "bot.*", "noop") };
    let triggers = Triggers::new(vec![rule], Submitter::new(AMQP_URL, topo.clone()).unwrap(), AMQP_URL, None).with_store(store.clone());
    let (stop, task) = listening(&triggers).await;
    let x = topo.triggers_exchange();
    // Good then bad for one bot, bad then good for another.
    let bad_a: &[u8] = br#"{"bot": "bank-a"}"#;
    let bad_b: &[u8] = br#"{"bot": "bank-b" }"#;
    for (key, body) in [
        ("bot.updated", &br#"{"bot": "bank-a", "dataset": "d1"}"#[..]),
        ("bot.updated", bad_a),
        ("bot.changed", bad_b),
        ("bot.changed", br#"{"bot": "bank-b", "dataset": "d2"}"#),
    ] {
        publish_raw(&ch, &x, key, body, BasicProperties::default()).await;
    }
    let jobs_queue = topo.jobs_queue("noop");
    eventually(20, "two jobs", || async { (message_count(&ch, &jobs_queue).await >= 2).then_some(()) }).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut jobs: Vec<(String, serde_json::Value)> =
        drain(&ch, &jobs_queue).await.into_iter().map(|j| (j.bot, j.params["dataset"].clone())).collect();
    jobs.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(jobs, [("bank-a".into(), "d1".into()), ("bank-b".into(), "d2".into())], "each bot's latest good event fired");
    let mut parked = store.parked_events().await.unwrap();
    parked.sort_by(|a, b| a.routing_key.cmp(&b.routing_key));
    let got: Vec<(String, Vec<u8>)> = parked.iter().map(|p| (p.routing_key.clone(), p.body_bytes().unwrap())).collect();
    assert_eq!(got, [("trigger:bot.changed".into(), bad_b.to_vec()), ("trigger:bot.updated".into(), bad_a.to_vec())]);
    assert!(parked.iter().all(|p| p.reason.contains("no field \"dataset\"")), "{parked:?}");
    stop.cancel();
    task.await.unwrap();
    assert_eq!(message_count(&ch, &triggers.queue_name()).await, 0, "every event settled");
    let _ = ch.queue_delete(triggers.queue_name().as_str().into(), Default::default()).await;
    store.close().await;
    cleanup(&topo, &["noop"]).await;
}

/// Never drop what cannot be read: a trigger event that can never become a job (not JSON, not
/// an object, no bot in it, a rule whose job type no queue takes, a coalescing key naming a
/// field the event lacks, a key no rule of this control plane matches: a binding a removed
/// rule left) is parked in the job store with the reason and acked; the good event beside them
/// still fires, an event two rules match fires both, and `events reprocess` leaves the parked
/// ones as they are (they are not job events).
#[tokio::test]
async fn trigger_events_that_cannot_become_jobs_are_parked_with_the_reason() {
    let topo = topology();
    let (_conn, ch) = channel().await;
    topo.declare_job_type(&ch, "noop").await.unwrap();
    let (store, _dir, _) = sqlite_store().await;
    let rule = trigger_rule;
    let keyed = TriggerRule { coalesce_key: Some("noop/{{team}}".into()), ..rule("keyed", "bot.keyed", "noop") };
    let rules = vec![
        rule("updated", "bot.updated", "noop"),
        rule("ghost", "bot.ghost", "ghost-type"),
        keyed,
        rule("fan-a", "bot.fan", "noop"),
        rule("fan-b", "bot.*", "noop"),
    ];
    let metrics = ControlMetrics::new(&prometheus::Registry::new(), &[]).unwrap();
    let submitter = Submitter::new(AMQP_URL, topo.clone()).unwrap();
    let triggers = Triggers::new(rules, submitter, AMQP_URL, Some(metrics.clone())).with_store(store.clone());
    let (stop, task) = listening(&triggers).await;
    let x = topo.triggers_exchange();
    // What a removed rule leaves: a binding no rule of this control plane matches.
    let q = triggers.queue_name();
    ch.queue_bind(q.as_str().into(), x.as_str().into(), "removed.rule".into(), Default::default(), Default::default()).await.unwrap();
    for (key, body) in [
        ("bot.updated", &b"not json"[..]),
        ("bot.updated", b"[1, 2]"),
        ("bot.updated", br#"{"dataset": "d"}"#),
        ("bot.ghost", br#"{"bot": "banking"}"#),
        ("bot.keyed", br#"{"bot": "keyed"}"#),
        ("removed.rule", br#"{"bot": "removed"}"#),
        ("bot.updated", br#"{"bot": "banking"}"#),
    ] {
        publish_raw(&ch, &x, key, body, BasicProperties::default()).await;
    }
    // One event delivered twice with its message id: each rule makes the same job both times.
    for _ in 0..2 {
        publish_raw(&ch, &x, "bot.fan", br#"{"bot": "fanned"}"#, BasicProperties::default().with_message_id("evt-1".into())).await;
    }
    // `bot.*` (fan-b) matches every `bot.` key: it parks the object without a bot too (one
    // entry: a parked entry's id is its key and body), and fires a plain noop job for
    // `bot.ghost`, `bot.keyed`, `bot.updated` and `bot.fan`.
    let parked = eventually(20, "the events parked", || async {
        let p = store.parked_events().await.unwrap();
        (p.len() == 6).then_some(p)
    })
    .await;
    let reasons: Vec<&str> = parked.iter().map(|p| p.reason.as_str()).collect();
    for (says, times) in [
        ("not JSON", 1),
        ("a JSON array, not an object", 1),
        ("the event has no field \"bot\"", 1),
        ("cannot be published", 1),
        ("coalesce_key: the event has no field \"team\"", 1),
        ("no rule of this control plane matches \"removed.rule\"", 1),
    ] {
        assert_eq!(reasons.iter().filter(|r| r.contains(says)).count(), times, "{says}: {reasons:#?}");
    }
    assert!(parked.iter().all(|p| p.routing_key.starts_with("trigger:bot.") || p.routing_key == "trigger:removed.rule"), "{parked:?}");
    assert_eq!(parked.iter().find(|p| p.reason.contains("not JSON")).unwrap().body_bytes().unwrap(), b"not json", "kept as received");
    let jobs_queue = topo.jobs_queue("noop");
    eventually(20, "eight jobs", || async { (message_count(&ch, &jobs_queue).await >= 8).then_some(()) }).await;
    let drained = drain(&ch, &jobs_queue).await;
    let mut jobs: Vec<&str> = drained.iter().map(|j| j.bot.as_str()).collect();
    jobs.sort();
    assert_eq!(jobs, ["banking", "banking", "banking", "fanned", "fanned", "fanned", "fanned", "keyed"], "every rule an event matches");
    let fanned: std::collections::BTreeSet<(&str, &str)> =
        drained.iter().filter(|j| j.bot == "fanned").map(|j| (j.trigger.source.as_str(), j.job_id.as_str())).collect();
    assert_eq!(fanned.len(), 2, "one job id per rule for the event delivered twice: {fanned:?}");
    // Counted per rule; the alert's count is one per entry, without the unmatched one (a
    // removed rule's binding would keep the alert firing) and without the second rule's
    // refusal of the event without a bot (one entry).
    let counted = |rule: &str, status: &str| metrics.trigger_events.with_label_values(&[rule, status]).get();
    let wanted = [("none", "parked", 2), ("none", "unmatched", 1), ("updated", "parked", 1), ("fan-b", "parked", 1)];
    let wanted = wanted.into_iter().chain([("ghost", "parked", 1), ("keyed", "parked", 1), ("fan-b", "fired", 5)]);
    let wanted: Vec<_> = wanted.collect();
    // A counter moves just after the store or the broker took what it counts.
    let count_all = || wanted.iter().map(|(rule, status, _)| (*rule, *status, counted(rule, status))).collect::<Vec<_>>();
    let total: u64 = wanted.iter().map(|w| w.2).sum();
    eventually(10, "the counters to reach their total", || async { (count_all().iter().map(|c| c.2).sum::<u64>() >= total).then_some(()) })
        .await;
    assert_eq!(count_all(), wanted);
    assert_eq!(metrics.events_parked.get(), 5, "the parked entries the alert watches");
    let (recorded, still) = store.reprocess_parked(|_, _| Err("not an event".into())).await.unwrap();
    assert_eq!((recorded, still), (0, 6));
    let after: Vec<String> = store.parked_events().await.unwrap().into_iter().map(|p| p.reason).collect();
    assert_eq!(after.iter().map(String::as_str).collect::<Vec<_>>(), reasons, "reasons kept");
    stop.cancel();
    task.await.unwrap();
    assert_eq!(message_count(&ch, &triggers.queue_name()).await, 0, "every event acked");
    let _ = ch.queue_delete(triggers.queue_name().as_str().into(), Default::default()).await;
    cleanup(&topo, &["noop"]).await;
}

#[tokio::test]
async fn store_rebuild_replays_the_events_stream() {
    let topo = topology();
    let (_conn, ch) = channel().await;
    topo.declare_shared(&ch).await.unwrap();
    let (live, _d1, _) = sqlite_store().await;
    let recorder = spawn_recorder(&live, &topo);
    let specs: Vec<JobSpec> = (0..3).map(|i| spec("noop", &format!("bot-{i}"))).collect();
    for s in &specs {
        publish_event(&ch, &topo, &JobEvent::queued(s)).await;
        publish_event(&ch, &topo, &JobEvent::new(s, JobStatus::Started, 1, event_seq(1, 0, 0))).await;
    }
    publish_event(&ch, &topo, &JobEvent::new(&specs[0], JobStatus::Succeeded, 1, event_seq(1, 0, 1))).await;
    eventually(20, "live store", || async { (live.job(&specs[0].job_id).await.unwrap()?.status == JobStatus::Succeeded).then_some(()) })
        .await;
    recorder.stop().await;

    let (fresh, _d2, _) = sqlite_store().await;
    let report = trainyard::rebuild::rebuild(&fresh, &topo, AMQP_URL, Duration::from_secs(1)).await.unwrap();
    assert_eq!((report.read, report.recorded), (7, 7));
    for s in &specs {
        let (a, b) = (live.job(&s.job_id).await.unwrap().unwrap(), fresh.job(&s.job_id).await.unwrap().unwrap());
        assert_eq!((a.status, a.attempts, &a.spec), (b.status, b.attempts, &b.spec));
        assert_eq!(live.events(&s.job_id).await.unwrap(), fresh.events(&s.job_id).await.unwrap());
    }
    // Only into an empty store.
    assert!(trainyard::rebuild::rebuild(&fresh, &topo, AMQP_URL, Duration::from_secs(1)).await.is_err());
    cleanup(&topo, &[]).await;
}

/// A restored backup catches up from the stream: `rebuild_since` from a little before the
/// backup records what came after it (and what the backup has, once), so the restored store
/// equals the live one.
#[tokio::test]
async fn a_restored_backup_catches_up_from_the_stream_since_it() {
    let topo = topology();
    let (_conn, ch) = channel().await;
    topo.declare_shared(&ch).await.unwrap();
    let (live, dir, _) = sqlite_store().await;
    let recorder = spawn_recorder(&live, &topo);
    let (early, late) = (spec("noop", "backup-bot"), spec("noop", "after-backup-bot"));
    publish_event(&ch, &topo, &JobEvent::queued(&early)).await;
    publish_event(&ch, &topo, &JobEvent::new(&early, JobStatus::Started, 1, event_seq(1, 0, 0))).await;
    eventually(20, "the early job started", || async {
        live.job(&early.job_id).await.unwrap().filter(|j| j.status == JobStatus::Started).map(|_| ())
    })
    .await;
    let backup_file = dir.path().join("backup.db");
    live.execute_raw(&format!("VACUUM INTO '{}'", backup_file.display())).await.unwrap();
    let backup_at = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(1100)).await; // the events after it are in later seconds
    publish_event(&ch, &topo, &JobEvent::new(&early, JobStatus::Succeeded, 1, event_seq(1, 0, 1))).await;
    publish_event(&ch, &topo, &JobEvent::queued(&late)).await;
    publish_event(&ch, &topo, &JobEvent::new(&late, JobStatus::Started, 1, event_seq(1, 0, 0))).await;
    eventually(20, "the late job started", || async { live.job(&late.job_id).await.unwrap().map(|_| ()) }).await;
    recorder.stop().await;

    let restored = Store::open(&format!("sqlite://{}", backup_file.display())).await.unwrap();
    assert!(restored.job(&late.job_id).await.unwrap().is_none(), "the backup predates the late job");
    let since = backup_at - chrono::Duration::seconds(2);
    let report = trainyard::rebuild::rebuild_since(&restored, &topo, AMQP_URL, Duration::from_secs(1), since).await.unwrap();
    assert!(report.recorded >= 3, "{report:?}");
    let all = trainyard::store::JobFilter { limit: 100, ..Default::default() };
    assert_eq!(live.list_jobs(&all).await.unwrap(), restored.list_jobs(&all).await.unwrap());
    for s in [&early, &late] {
        assert_eq!(live.events(&s.job_id).await.unwrap(), restored.events(&s.job_id).await.unwrap());
    }
    assert_eq!(restored.job(&early.job_id).await.unwrap().unwrap().status, JobStatus::Succeeded);
    cleanup(&topo, &[]).await;
}
