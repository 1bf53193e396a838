//! The job pipeline with in-process workers: round trip, retries, dead
//! letters, poison messages, duplicates, timeouts, cancellation.

use std::time::Duration;

use lapin::{types::FieldTable, BasicProperties};
use serde_json::json;
use trainyard_common::{artifacts::keys, codec, control::CancelRequest, headers, job::Priority, ErrorKind, JobStatus};

use crate::support::{collect_until_terminal, wait_for, Env};

const T: Duration = Duration::from_secs(30);

/// Statuses in `seq` order: events of one job come from several publishers
/// (the producer's `queued`, the worker's), so arrival order is not guaranteed.
pub fn statuses(events: &[trainyard_common::JobEvent]) -> Vec<JobStatus> {
    let mut sorted: Vec<_> = events.iter().collect();
    sorted.sort_by_key(|e| e.seq);
    sorted.iter().map(|e| e.status).collect()
}

#[tokio::test]
async fn round_trip_submit_to_succeeded() {
    let env = Env::new(&["noop"]).await;
    let w = env.spawn_worker(&["noop"], |_| {});
    let spec = env.spec("noop", json!({"sleep_ms": 10}));
    let events = env.run_job(&spec, T).await;
    assert_eq!(statuses(&events), vec![JobStatus::Queued, JobStatus::Started, JobStatus::Succeeded]);
    let done = events.last().unwrap();
    assert_eq!(done.attempt, 1);
    assert_eq!(done.result.as_ref().unwrap()["slept_ms"], 10);
    assert!(done.worker.as_ref().is_some_and(|w| !w.id.is_empty()));
    // Seq numbers are unique per job.
    let mut seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    seqs.dedup();
    assert_eq!(seqs.len(), events.len(), "{events:?}");
    // The outcome is recorded in the artifact store.
    assert!(env.artifacts.exists(&keys::outcome(&spec.job_id)).await.unwrap());
    assert_eq!(env.ready(&env.topo.jobs_queue("noop")).await, 0);
    w.stop().await;
    env.cleanup().await;
}

/// 100 poison messages of every kind: each ends in the dead queue with a
/// reason, the worker survives, and a valid job after them succeeds.
#[tokio::test]
async fn poison_messages_are_dead_lettered_and_the_worker_lives_on() {
    let env = Env::new(&["noop"]).await;
    let w = env.spawn_worker(&["noop"], |c| c.max_message_bytes = 64 * 1024);
    let good = env.spec("noop", json!({}));
    let mut sent = 0;
    for i in 0..100u32 {
        let (body, ct): (Vec<u8>, Option<&str>) = match i % 10 {
            0 => ((0..(i * 7 % 50 + 1)).map(|b| (b * 31 + i) as u8).collect(), None),
            1 => (b"{\"not\": \"a job\"}".to_vec(), Some("application/json")),
            2 => (codec::to_msgpack(&good).unwrap(), Some("text/plain")),
            3 => {
                let mut s = good.clone();
                s.job_type = "other".into();
                (codec::to_msgpack(&s).unwrap(), None)
            }
            4 => (vec![b'x'; 70 * 1024], Some("application/json")),
            5 => {
                let mut v = serde_json::to_value(&good).unwrap();
                v.as_object_mut().unwrap().remove("bot");
                (serde_json::to_vec(&v).unwrap(), Some("application/json"))
            }
            6 => {
                // An unknown top-level field is a newer minor version and is read; an unknown
                // parameter is the handler's to refuse (a job of its own, dead at once).
                let v = serde_json::to_value(env.spec("noop", json!({"unknown_field": true}))).unwrap();
                (rmp_serde_bytes(&v), Some("application/msgpack"))
            }
            7 => {
                let mut v = serde_json::to_value(&good).unwrap();
                v["job_id"] = json!("not-a-uuid");
                (serde_json::to_vec(&v).unwrap(), Some("application/json"))
            }
            8 => (Vec::new(), None),
            _ => {
                let mut v = serde_json::to_value(&good).unwrap();
                v["version"] = json!(99);
                (serde_json::to_vec(&v).unwrap(), Some("application/json"))
            }
        };
        let mut props = BasicProperties::default();
        if let Some(ct) = ct {
            props = props.with_content_type(ct.into());
        }
        env.publish_raw("noop", &body, props).await;
        sent += 1;
    }
    let events = env.run_job(&good, T).await;
    assert_eq!(events.last().unwrap().status, JobStatus::Succeeded, "the worker still runs jobs");
    let dead = env.drain(&env.topo.dead_queue("noop")).await;
    assert_eq!(dead.len(), sent, "every poison message is dead-lettered");
    assert!(dead.iter().all(|(_, reason, _)| reason.as_deref().is_some_and(|r| !r.is_empty())), "each with a reason");
    assert!(dead.iter().any(|(_, r, _)| r.as_deref().unwrap().contains("oversized")));
    assert!(dead.iter().any(|(_, r, _)| r.as_deref().unwrap().contains("unknown_field")));
    assert!(dead.iter().any(|(_, r, _)| r.as_deref().unwrap().contains("does not match")));
    w.stop().await;
    env.cleanup().await;
}

fn rmp_serde_bytes(v: &serde_json::Value) -> Vec<u8> {
    codec::to_msgpack(v).unwrap()
}

/// The JSON example of DESIGN.md, published as plain JSON by "another system".
#[tokio::test]
async fn plain_json_jobs_are_accepted() {
    let env = Env::new(&["noop"]).await;
    let w = env.spawn_worker(&["noop"], |_| {});
    let job_id = uuid::Uuid::now_v7().to_string();
    let body = format!(
        r#"{{"version": 1, "job_id": "{job_id}", "job_type": "noop", "bot": "banking",
 "params": {{"sleep_ms": 5}}, "trigger": {{"kind": "event", "source": "bot.dataset_updated"}},
 "submitted_at": "2026-11-24T12:00:00Z", "max_attempts": 3, "timeout_s": 3600}}"#
    );
    let spec: trainyard_common::JobSpec = serde_json::from_str(&body).unwrap();
    let mut watch = env.watch(&spec).await;
    env.publish_raw("noop", body.as_bytes(), BasicProperties::default().with_content_type("application/json".into())).await;
    let events = collect_until_terminal(&mut watch, T).await;
    assert_eq!(events.last().unwrap().status, JobStatus::Succeeded);
    assert_eq!(events.last().unwrap().bot, "banking");
    w.stop().await;
    env.cleanup().await;
}

/// A finished job delivered again is acked without running: the stored
/// `succeeded` event is republished as is (same seq), no new `started`.
#[tokio::test]
async fn duplicate_delivery_of_a_finished_job_is_not_rerun() {
    let env = Env::new(&["noop"]).await;
    let w = env.spawn_worker(&["noop"], |_| {});
    let spec = env.spec("noop", json!({}));
    let first = env.run_job(&spec, T).await;
    let done = first.last().unwrap().clone();
    assert_eq!(done.status, JobStatus::Succeeded);
    let deliver_again = || async {
        let mut watch = env.watch(&spec).await;
        let mut hdrs = FieldTable::default();
        headers::set_int(&mut hdrs, headers::ATTEMPT, 1);
        env.publish_raw("noop", &codec::to_msgpack(&spec).unwrap(), BasicProperties::default().with_headers(hdrs)).await;
        let again = collect_until_terminal(&mut watch, T).await;
        assert_eq!(statuses(&again), vec![JobStatus::Succeeded], "no second run");
        assert_eq!(again[0].seq, done.seq, "the same recorded outcome");
        assert_eq!(again[0].result, done.result);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(env.ready(&env.topo.jobs_queue("noop")).await, 0, "acked");
    };
    deliver_again().await;
    // A store written before outcome records moved out of the job's directory: the record
    // at its old place is honoured too, so an upgrade does not run finished jobs again.
    let (key, legacy) = (keys::outcome(&spec.job_id), keys::legacy_outcome(&spec.job_id));
    let record = env.artifacts.get(&key).await.unwrap().expect("the outcome record");
    env.artifacts.put(&legacy, record).await.unwrap();
    env.artifacts.delete(&key).await.unwrap();
    deliver_again().await;
    assert!(!env.artifacts.exists(&key).await.unwrap(), "nothing recorded again");
    w.stop().await;
    env.cleanup().await;
}

/// An outcome record that cannot be read: the job may have run, so it is neither run again
/// nor acked as done; it is dead-lettered with the reason, where a person sees it. A cancel
/// marker that cannot be read still cancels. Neither ends the session: a job running beside
/// them finishes undisturbed, and the worker never reconnects.
#[tokio::test]
async fn an_unreadable_outcome_record_is_dead_lettered_and_the_session_goes_on() {
    use trainyard_common::metrics::RECONNECTS_TOTAL;
    let env = Env::new(&["noop"]).await;
    let metrics = prometheus::Registry::new();
    let w = env.spawn_worker_with_metrics(&["noop"], &metrics, |cfg| cfg.concurrency = 4);
    let sub = env.submitter();
    let beside = env.spec("noop", json!({"sleep_ms": 2000}));
    let mut beside_watch = sub.watch(&beside).await.unwrap();
    sub.submit(&beside).await.unwrap();
    let mut beside_events = wait_for(&mut beside_watch, JobStatus::Started, T).await;

    let spec = env.spec("noop", json!({}));
    env.artifacts.put(&keys::outcome(&spec.job_id), "{not json").await.unwrap();
    let events = env.run_job(&spec, T).await;
    // The `queued` event comes from the submitter and may arrive after the worker's last one.
    let never_started = |events: &[trainyard_common::JobEvent]| events.iter().all(|e| e.status != JobStatus::Started);
    assert_eq!(events.last().unwrap().status, JobStatus::Dead, "{events:?}");
    assert!(never_started(&events), "not run: {events:?}");
    let reason = &events.last().unwrap().error.as_ref().unwrap().message;
    assert!(reason.contains(&keys::outcome(&spec.job_id)) && reason.contains("cannot be read"), "{reason}");
    assert_eq!(env.artifacts.get(&keys::outcome(&spec.job_id)).await.unwrap().as_deref(), Some(&b"{not json"[..]), "left as found");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(env.ready(&env.topo.dead_queue("noop")).await, 1, "parked in the dead-letter queue");
    assert_eq!(env.ready(&env.topo.jobs_queue("noop")).await, 0, "and acked");

    let cancelled = env.spec("noop", json!({}));
    env.artifacts.put(&keys::cancel_marker(&cancelled.job_id), "\u{0}").await.unwrap();
    let events = env.run_job(&cancelled, T).await;
    assert_eq!(events.last().unwrap().status, JobStatus::Cancelled, "{events:?}");
    assert!(never_started(&events), "not run: {events:?}");

    beside_events.extend(collect_until_terminal(&mut beside_watch, T).await);
    let beside_statuses = statuses(&beside_events);
    assert_eq!(
        beside_statuses,
        [JobStatus::Queued, JobStatus::Started, JobStatus::Succeeded],
        "the job beside them was not stopped or redelivered"
    );
    let reconnects = crate::support::counter(&metrics, RECONNECTS_TOTAL).unwrap_or(0.0);
    assert_eq!(reconnects, 0.0, "the session went on");
    w.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_job_past_its_timeout_is_stopped_and_fails_as_timeout() {
    let env = Env::new(&["noop"]).await;
    let w = env.spawn_worker(&["noop"], |_| {});
    let mut spec = env.spec("noop", json!({"sleep_ms": 60_000}));
    spec.timeout_s = 1;
    spec.max_attempts = 1;
    let t0 = std::time::Instant::now();
    let events = env.run_job(&spec, T).await;
    let last = events.last().unwrap();
    assert_eq!(last.status, JobStatus::Failed);
    assert_eq!(last.error.as_ref().unwrap().kind, ErrorKind::Timeout);
    assert!(t0.elapsed() < Duration::from_secs(10));
    w.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_job_longer_than_the_consumer_timeout_ends_at_once_naming_the_setting() {
    let env = Env::new(&["noop"]).await;
    let w = env.spawn_worker(&["noop"], |cfg| cfg.consumer_timeout = Duration::from_secs(60));
    // Past what the broker's consumer timeout leaves room for: refused before it starts, `failed` (not `dead`:
    // the job is fine, a setting is not), not retried although attempts are left.
    let mut long = env.spec("noop", json!({"sleep_ms": 10}));
    long.timeout_s = 52;
    long.max_attempts = 3;
    let t0 = std::time::Instant::now();
    let events = env.run_job(&long, T).await;
    assert_eq!(statuses(&events), vec![JobStatus::Queued, JobStatus::Failed]);
    let error = events.last().unwrap().error.clone().unwrap();
    assert_eq!(error.kind, ErrorKind::Permanent);
    assert!(error.message.contains("timeout_s 52 exceeds 51s") && error.message.contains("consumer timeout of 60s"), "{}", error.message);
    assert!(error.message.contains("TRAINYARD_CONSUMER_TIMEOUT_S") && error.message.contains("--consumer-timeout-s"), "{}", error.message);
    assert!(t0.elapsed() < Duration::from_secs(10));
    let get = || env.ch.basic_get(env.topo.dead_queue("noop").as_str().into(), lapin::options::BasicGetOptions { no_ack: true });
    let letter = get().await.unwrap().expect("dead-lettered");
    let d = &letter.delivery;
    let ct = d.properties.content_type().as_ref().map(|s| s.as_str());
    let (_, recorded) = trainyard::recorder::dead_letter(ct, d.properties.headers().as_ref(), d.routing_key.as_str(), &d.data);
    assert_eq!(recorded.map(|e| e.status), Some(JobStatus::Failed), "the job store records `failed` too, not `dead`");
    assert!(get().await.unwrap().is_none(), "dead-lettered once, never retried");
    // A tenth of the consumer timeout is kept for ending a job, and 3 s for waiting for a
    // slot: up to 51 s it runs.
    let mut fits = env.spec("noop", json!({"sleep_ms": 10}));
    fits.timeout_s = 51;
    assert_eq!(env.run_job(&fits, T).await.last().unwrap().status, JobStatus::Succeeded);
    w.stop().await;
    env.cleanup().await;
}

/// A timed-out job that does not stop is given up after half the margin the worker keeps for
/// ending a job (a tenth of the consumer timeout), not a fixed 30 s: under a 60-s consumer
/// timeout (6 s kept) it ends `failed` 3 s after its timeout. (The 30-s wait went past the
/// margin, and a broker with that consumer timeout would have closed the channel under it.)
#[tokio::test]
async fn a_timed_out_job_that_does_not_stop_ends_inside_the_consumer_timeouts_margin() {
    let env = Env::new(&["noop"]).await;
    let registry = trainyard_worker::handler::Registry::new().register("noop", crate::support::Stubborn::default());
    let w = env.spawn_worker_serving(registry, &prometheus::Registry::new(), |cfg| cfg.consumer_timeout = Duration::from_secs(60));
    let mut job = env.spec("noop", json!({"ms": 20_000}));
    (job.timeout_s, job.max_attempts) = (2, 1);
    let t0 = std::time::Instant::now();
    let events = env.run_job(&job, T).await;
    let took = t0.elapsed();
    let last = events.last().unwrap();
    assert_eq!((last.status, last.error.as_ref().map(|e| e.kind)), (JobStatus::Failed, Some(ErrorKind::Timeout)), "{events:?}");
    assert!(took < Duration::from_secs(2 + 6), "ended {took:?} after it was submitted: past its timeout and the 6-s margin");
    w.stop().await;
    env.cleanup().await;
}

/// The broker's consumer timeout runs from a delivery's arrival: a delivery held while the
/// worker's slot is busy, which could no longer run to its timeout before that, is handed
/// back as a fresh copy (and runs once, later), so the broker never closes the channel under
/// the job that is running. Consumer timeout 60 s (6 s kept): a job of `timeout_s` 50 fits
/// until it has waited 4 s, and the one ahead of it takes 6.
#[tokio::test]
async fn a_delivery_that_waited_too_long_for_a_slot_is_handed_back_and_runs_once() {
    let env = Env::new(&["noop"]).await;
    let metrics = prometheus::Registry::new();
    let w = env.spawn_worker_with_metrics(&["noop"], &metrics, |cfg| {
        cfg.consumer_timeout = Duration::from_secs(60);
        cfg.concurrency = 1;
    });
    let sub = env.submitter();
    let mut ahead = env.spec("noop", json!({"sleep_ms": 6_000}));
    ahead.timeout_s = 50;
    let mut waiting = env.spec("noop", json!({"sleep_ms": 10}));
    (waiting.timeout_s, waiting.priority) = (50, Priority::Low);
    let mut watch_ahead = sub.watch(&ahead).await.unwrap();
    let mut watch_waiting = sub.watch(&waiting).await.unwrap();
    sub.submit(&ahead).await.unwrap();
    wait_for(&mut watch_ahead, JobStatus::Started, T).await;
    sub.submit(&waiting).await.unwrap();
    assert_eq!(collect_until_terminal(&mut watch_ahead, T).await.last().unwrap().status, JobStatus::Succeeded);
    let events = collect_until_terminal(&mut watch_waiting, T).await;
    assert_eq!(statuses(&events), vec![JobStatus::Queued, JobStatus::Started, JobStatus::Succeeded], "run once: {events:?}");
    assert!(events[1..].iter().all(|e| e.attempt == 1), "handing back spends no attempt: {events:?}");
    let released = crate::support::counter(&metrics, trainyard_common::metrics::DELIVERIES_RELEASED_TOTAL);
    assert!(released.is_some_and(|n| n >= 1.0), "the waiting delivery was handed back: {released:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    for queue in env.topo.tier_queues("noop") {
        assert_eq!(env.ready(&queue).await, 0, "no copy left behind in {queue}");
    }
    w.stop().await;
    env.cleanup().await;
}

/// On shutdown the deliveries a worker holds for a busy slot go back to the queue at once (for
/// other workers), not when its connection closes after the running job's grace period.
#[tokio::test]
async fn a_shutdown_returns_the_deliveries_waiting_for_a_slot_at_once() {
    let env = Env::new(&["noop"]).await;
    let w = env.spawn_worker(&["noop"], |cfg| {
        cfg.concurrency = 1;
        cfg.grace_period = Duration::from_secs(20);
    });
    let sub = env.submitter();
    let running = env.spec("noop", json!({"sleep_ms": 4_000}));
    let mut waiting = env.spec("noop", json!({}));
    waiting.priority = Priority::Low;
    let mut watch = sub.watch(&running).await.unwrap();
    sub.submit(&running).await.unwrap();
    wait_for(&mut watch, JobStatus::Started, T).await;
    sub.submit(&waiting).await.unwrap();
    let low = env.topo.tier_queue("noop", Priority::Low);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while env.consumers(&low).await == 0 || env.ready(&low).await > 0 {
        assert!(std::time::Instant::now() < deadline, "the low job never reached the worker");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t0 = std::time::Instant::now();
    w.shutdown.cancel();
    while env.ready(&low).await == 0 {
        assert!(t0.elapsed() < Duration::from_secs(2), "the waiting delivery stayed with the stopping worker");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let events = collect_until_terminal(&mut watch, T).await;
    assert_eq!(events.last().unwrap().status, JobStatus::Succeeded, "the running job finished in its grace period");
    tokio::time::timeout(Duration::from_secs(60), w.join).await.unwrap().unwrap();
    assert_eq!(env.ready(&low).await, 1, "the waiting job is in its queue for the next worker");
    env.cleanup().await;
}

/// A job handed back as a fresh copy counts its deliveries on (`x-trainyard-earlier-deliveries`),
/// which the broker's delivery limit does not see: past the limit the worker ends the crash loop
/// itself, `dead`, as the broker would.
#[tokio::test]
async fn a_copy_past_the_delivery_limit_ends_dead_as_a_crash_loop() {
    let env = Env::new(&["noop"]).await;
    let w = env.spawn_worker(&["noop"], |_| {});
    let limit = trainyard_common::topology::DELIVERY_LIMIT;
    for (earlier, status) in [(limit, JobStatus::Succeeded), (limit + 1, JobStatus::Dead)] {
        let spec = env.spec("noop", json!({}));
        let mut watch = env.watch(&spec).await;
        let mut h = FieldTable::default();
        headers::set_int(&mut h, headers::EARLIER_DELIVERIES, earlier);
        let props = BasicProperties::default()
            .with_content_type(codec::MSGPACK.into())
            .with_message_id(spec.job_id.as_str().into())
            .with_delivery_mode(2)
            .with_headers(h);
        let body = codec::to_msgpack(&spec).unwrap();
        trainyard_common::amqp::publish_confirmed(&env.ch, &env.topo.jobs_exchange(), "noop", &body, props, true).await.unwrap();
        let events = collect_until_terminal(&mut watch, T).await;
        let last = events.last().unwrap();
        assert_eq!(last.status, status, "{earlier} deliveries before: {events:?}");
        if status == JobStatus::Dead {
            let message = &last.error.as_ref().unwrap().message;
            assert!(message.contains("delivery limit reached (crash loop?)"), "{message}");
        }
    }
    w.stop().await;
    env.cleanup().await;
}

/// A handler that panics, in `validate` or in `run`, ends its job `dead` naming the panic,
/// acked; the worker goes on, and its one slot runs the next job.
#[tokio::test]
async fn a_panicking_handler_ends_its_job_dead_and_the_worker_goes_on() {
    use trainyard_worker::handler::{JobContext, JobError, JobHandler, Registry};
    struct Panics;
    #[async_trait::async_trait]
    impl JobHandler for Panics {
        fn validate(&self, params: &serde_json::Value) -> Result<(), JobError> {
            assert!(params.get("in_validate").is_none(), "validate exploded");
            Ok(())
        }
        async fn run(&self, ctx: JobContext) -> Result<serde_json::Value, JobError> {
            assert!(ctx.spec.params.get("in_run").is_none(), "run exploded");
            Ok(json!({}))
        }
    }
    let env = Env::new(&["noop"]).await;
    let w = env.spawn_worker_serving(Registry::new().register("noop", Panics), &prometheus::Registry::new(), |cfg| cfg.concurrency = 1);
    for (params, says) in [(json!({"in_run": true}), "run exploded"), (json!({"in_validate": true}), "validate exploded")] {
        let events = env.run_job(&env.spec("noop", params), T).await;
        let last = events.last().unwrap();
        assert_eq!(last.status, JobStatus::Dead, "{says}: {events:?}");
        let message = &last.error.as_ref().unwrap().message;
        assert!(message.contains("the handler panicked") && message.contains(says), "{message}");
    }
    assert_eq!(env.run_job(&env.spec("noop", json!({})), T).await.last().unwrap().status, JobStatus::Succeeded, "the slot is free");
    assert_eq!(env.drain(&env.topo.dead_queue("noop")).await.len(), 2, "both dead-lettered, where a person can replay them");
    w.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn cancel_stops_a_running_job_and_it_is_never_retried() {
    let env = Env::new(&["noop"]).await;
    let w = env.spawn_worker(&["noop"], |_| {});
    let spec = env.spec("noop", json!({"sleep_ms": 60_000}));
    let sub = env.submitter();
    let mut watch = sub.watch(&spec).await.unwrap();
    sub.submit(&spec).await.unwrap();
    wait_for(&mut watch, JobStatus::Started, T).await;
    let req = CancelRequest { job_id: spec.job_id.clone(), by: "tests".into(), reason: "changed my mind".into() };
    trainyard_common::amqp::publish_confirmed(
        &env.ch,
        &env.topo.control_exchange(),
        "",
        &codec::to_json(&req).unwrap(),
        BasicProperties::default().with_content_type(codec::JSON.into()),
        false,
    )
    .await
    .unwrap();
    let events = collect_until_terminal(&mut watch, T).await;
    let last = events.last().unwrap();
    assert_eq!(last.status, JobStatus::Cancelled);
    assert_eq!(last.error.as_ref().unwrap().kind, ErrorKind::Cancelled);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(env.ready(&env.topo.jobs_queue("noop")).await, 0);
    assert!(env.drain(&env.topo.dead_queue("noop")).await.is_empty());
    w.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn unroutable_submit_is_an_error() {
    let env = Env::new(&[]).await;
    let sub = env.submitter();
    sub.declare_shared().await.unwrap();
    let err = sub.submit(&env.spec("no-such-type", json!({}))).await.unwrap_err();
    assert!(matches!(err, trainyard_common::CommonError::Unroutable { .. }), "{err}");
    assert!(err.to_string().contains("no-such-type"));
    env.cleanup().await;
}

/// Prefetch = free slots: with one slot, a second job is not taken (parked)
/// while the first runs; a second worker picks it up at once.
#[tokio::test]
async fn a_busy_worker_does_not_hold_a_second_job() {
    let env = Env::new(&["noop"]).await;
    let w1 = env.spawn_worker(&["noop"], |_| {});
    let long = env.spec("noop", json!({"sleep_ms": 4000}));
    let sub = env.submitter();
    let mut wl = sub.watch(&long).await.unwrap();
    sub.submit(&long).await.unwrap();
    wait_for(&mut wl, JobStatus::Started, T).await;
    let short = env.spec("noop", json!({}));
    let mut ws = sub.watch(&short).await.unwrap();
    sub.submit(&short).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(env.ready(&env.topo.jobs_queue("noop")).await, 1, "the second job waits in the queue, not in the busy worker");
    let w2 = env.spawn_worker(&["noop"], |c| c.worker.id = "second".into());
    let t0 = std::time::Instant::now();
    let events = collect_until_terminal(&mut ws, T).await;
    assert_eq!(events.last().unwrap().worker.as_ref().unwrap().id, "second");
    assert!(t0.elapsed() < Duration::from_secs(3), "picked up while the first job still ran");
    collect_until_terminal(&mut wl, T).await;
    w1.stop().await;
    w2.stop().await;
    env.cleanup().await;
}
