//! Failed jobs: transient failures retried after a delay, on their own retry queues; permanent
//! ones and invalid params dead at once; a crash loop dead-lettered by the broker.

use std::time::Duration;

use lapin::types::FieldTable;
use serde_json::json;
use trainyard_common::{codec, job::Priority, topology::jobs_routing_key, ErrorKind, JobStatus};

use trainyard_worker::handler::Registry;

use crate::{
    pipeline::statuses,
    support::{collect_until_terminal, counter, Env, Stubborn},
};

const T: Duration = Duration::from_secs(30);

#[tokio::test]
async fn transient_failures_retry_with_delay_until_success() {
    let env = Env::new(&["noop"]).await;
    let w = env.spawn_worker(&["noop"], |_| {});
    let mut spec = env.spec("noop", json!({"fail": "transient", "fail_until": 3}));
    spec.max_attempts = 3;
    let t0 = std::time::Instant::now();
    let events = env.run_job(&spec, T).await;
    let s = statuses(&events);
    assert_eq!(s.iter().filter(|s| **s == JobStatus::Retrying).count(), 2, "{s:?}");
    assert_eq!(*s.last().unwrap(), JobStatus::Succeeded);
    assert_eq!(events.last().unwrap().attempt, 3, "attempts are counted in the header");
    let retry = events.iter().find(|e| e.status == JobStatus::Retrying).unwrap();
    assert_eq!(retry.error.as_ref().unwrap().kind, ErrorKind::Transient);
    assert_eq!(retry.result.as_ref().unwrap()["retry_in_ms"], 100);
    // Backoff 100 ms then 200 ms: the retries really waited.
    assert!(t0.elapsed() >= Duration::from_millis(300), "{:?}", t0.elapsed());
    w.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn transient_failures_end_failed_in_the_dead_queue_when_attempts_run_out() {
    let env = Env::new(&["noop"]).await;
    let w = env.spawn_worker(&["noop"], |_| {});
    let mut spec = env.spec("noop", json!({"fail": "transient"}));
    spec.max_attempts = 2;
    let events = env.run_job(&spec, T).await;
    let last = events.last().unwrap();
    assert_eq!(last.status, JobStatus::Failed);
    assert_eq!(last.attempt, 2);
    assert!(last.error.as_ref().unwrap().message.contains("attempts used up"), "{last:?}");
    let dead = env.drain(&env.topo.dead_queue("noop")).await;
    assert_eq!(dead.len(), 1);
    assert!(dead[0].1.as_deref().unwrap().contains("attempts used up"));
    w.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn permanent_failure_goes_dead_at_once_with_reason() {
    let env = Env::new(&["noop"]).await;
    let w = env.spawn_worker(&["noop"], |_| {});
    let spec = env.spec("noop", json!({"fail": "permanent"}));
    let events = env.run_job(&spec, T).await;
    assert_eq!(statuses(&events), vec![JobStatus::Queued, JobStatus::Started, JobStatus::Dead]);
    assert_eq!(events.last().unwrap().error.as_ref().unwrap().kind, ErrorKind::Permanent);
    let dead = env.drain(&env.topo.dead_queue("noop")).await;
    assert_eq!(dead.len(), 1, "exactly one dead letter, no retry");
    assert!(dead[0].1.as_deref().unwrap().contains("permanent"));
    // The recorder's copy of the dead letter.
    assert_eq!(env.drain(&env.topo.dead_recorder_queue()).await.len(), 1);
    w.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn invalid_params_are_dead_without_running() {
    let env = Env::new(&["noop"]).await;
    let w = env.spawn_worker(&["noop"], |_| {});
    let spec = env.spec("noop", json!({"sleep_ms": "soon", "colour": 1}));
    let events = env.run_job(&spec, T).await;
    assert_eq!(statuses(&events), vec![JobStatus::Queued, JobStatus::Dead]);
    assert!(events[1].error.as_ref().unwrap().message.contains("invalid noop params"));
    w.stop().await;
    env.cleanup().await;
}

/// A crash loop: the broker itself dead-letters a job returned more than the
/// delivery limit; it lands in the dead queue and the recorder's copy, and a
/// watcher sees it as `dead`.
#[tokio::test]
async fn the_broker_dead_letters_a_crash_looping_job_at_the_delivery_limit() {
    let env = Env::new(&["noop"]).await;
    // Every tier: the broker dead-letters with the tier queue's routing key, and the letter
    // must still reach the type's dead-letter queue, where `dlq replay` reads it.
    for priority in Priority::ALL {
        crash_loop(&env, priority).await;
    }
    env.cleanup().await;
}

async fn crash_loop(env: &Env, priority: Priority) {
    use futures::StreamExt;
    use lapin::options::{BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
    let mut spec = env.spec("noop", json!({}));
    spec.priority = priority;
    let mut watch = env.watch(&spec).await;
    env.submitter().submit(&spec).await.unwrap();
    // A "worker" that dies on every delivery: each return counts toward the limit.
    let ch = env.conn.create_channel().await.unwrap();
    ch.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    let mut consumer = ch
        .basic_consume(
            env.topo.tier_queue("noop", priority).as_str().into(),
            "crash-loop".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut returns = 0;
    while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(2), consumer.next()).await {
        d.acker.nack(BasicNackOptions { requeue: true, multiple: false }).await.unwrap();
        returns += 1;
        assert!(returns <= trainyard_common::topology::DELIVERY_LIMIT + 1, "{priority}: never stops looping");
    }
    assert_eq!(returns, trainyard_common::topology::DELIVERY_LIMIT + 1, "{priority}");
    let _ = ch.close(200, "done".into()).await;
    let events = collect_until_terminal(&mut watch, T).await;
    let last = events.last().unwrap();
    assert_eq!(last.status, JobStatus::Dead, "{priority}");
    assert!(last.error.as_ref().unwrap().message.contains("delivery limit"), "{priority}: {last:?}");
    let dead = env.drain(&env.topo.dead_queue("noop")).await;
    assert_eq!(dead.len(), 1, "{priority}: the letter is in the type's dead-letter queue");
    assert_eq!(codec::decode_job(None, &dead[0].0, 1 << 20).unwrap().job_id, spec.job_id);
    assert_eq!(env.drain(&env.topo.dead_recorder_queue()).await.len(), 1, "{priority}");
}

/// Closes the broker connection whose client named itself `name` (one process's, leaving every
/// other test's alone), with `rabbitmqctl close_connection`.
fn close_connection_named(name: &str) {
    let rabbitmqctl = |args: &[&str]| {
        let out = std::process::Command::new("rabbitmqctl").args(args).output().expect("rabbitmqctl");
        assert!(out.status.success(), "rabbitmqctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // One line a connection: its pid (`<rabbit@host.N.N.N>`, which `close_connection` takes; the
    // JSON formatter writes another form), then its client properties as Erlang terms.
    let listed = rabbitmqctl(&["list_connections", "pid", "client_properties", "--quiet", "--no-table-headers"]);
    let property = format!("{{\"connection_name\",\"{name}\"}}");
    let line = listed.lines().find(|l| l.contains(&property)).unwrap_or_else(|| panic!("no connection named {name:?} in {listed}"));
    let pid = &line[..=line.find('>').expect("a pid")];
    rabbitmqctl(&["close_connection", pid, "trainyard test"]);
}

/// A worker declares its retry queues again in each new session: one deleted under it (by an
/// operator, or a broker that lost its definitions) would make every later retry of that delay
/// unroutable, since the worker remembered it as declared.
#[tokio::test]
async fn a_retry_queue_deleted_under_a_worker_is_declared_again_in_its_next_session() {
    let env = Env::new(&["noop"]).await;
    let metrics = prometheus::Registry::new();
    // Named apart: every in-process worker of this binary is `<host>-<pid>`.
    let worker_id = format!("retry-redeclare-{}", uuid::Uuid::new_v4().simple());
    let w = env.spawn_worker_with_metrics(&["noop"], &metrics, |cfg| cfg.worker.id = worker_id.clone());
    let fails_once = || {
        let mut spec = env.spec("noop", json!({"fail": "transient", "fail_until": 2}));
        spec.max_attempts = 2;
        spec
    };
    let first = env.run_job(&fails_once(), T).await;
    assert_eq!(first.last().unwrap().status, JobStatus::Succeeded, "{:?}", statuses(&first));
    let retry = first.iter().find(|e| e.status == JobStatus::Retrying).expect("a retry");
    let delay = retry.result.as_ref().unwrap()["retry_in_ms"].as_u64().unwrap();
    let retry_queue = env.topo.retry_queue(&jobs_routing_key("noop", Priority::Normal), delay);
    // Deleting a queue that is not there succeeds: look first, so a wrong name cannot pass.
    let passive = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
    let look = env.conn.create_channel().await.unwrap();
    look.queue_declare(retry_queue.as_str().into(), passive, FieldTable::default()).await.expect("the retry queue was declared");
    env.ch.queue_delete(retry_queue.as_str().into(), Default::default()).await.unwrap();

    let name = format!("trainyard-worker {worker_id}");
    tokio::task::spawn_blocking(move || close_connection_named(&name)).await.unwrap();
    let reconnected = std::time::Instant::now();
    while counter(&metrics, trainyard_common::metrics::RECONNECTS_TOTAL).unwrap_or(0.0) < 1.0 {
        assert!(reconnected.elapsed() < T, "the worker never reconnected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let second = env.run_job(&fails_once(), T).await;
    let last = second.last().unwrap();
    assert_eq!((last.status, last.attempt), (JobStatus::Succeeded, 2), "{:?}", statuses(&second));
    w.stop().await;
    env.cleanup().await;
}

/// A job that does not stop when its session is lost keeps its slot into the next session: with
/// one slot, the job's redelivery waits until the first run has ended instead of running beside
/// it. (Each session had slots of its own: the new one started the redelivered job while the
/// abandoned run still ran, two runs of one job at once: two trainings on one GPU.)
#[tokio::test]
async fn a_job_still_running_from_a_lost_session_keeps_its_slot() {
    let env = Env::new(&["noop"]).await;
    let stubborn = Stubborn::default();
    let registry = Registry::new().register("noop", stubborn.clone());
    let worker_id = format!("stubborn-{}", uuid::Uuid::new_v4().simple());
    let w = env.spawn_worker_serving(registry, &prometheus::Registry::new(), |cfg| {
        cfg.concurrency = 1;
        cfg.worker.id = worker_id.clone();
    });
    // Longer than the 30 s a lost session gives its jobs to stop before it closes.
    let stop_wait_ms = trainyard_worker::runtime::session::STOPPED_JOBS_WAIT.as_millis() as u64;
    let job = env.spec("noop", json!({"ms": stop_wait_ms + 5_000}));
    let sub = env.submitter();
    let mut watch = sub.watch(&job).await.unwrap();
    sub.submit(&job).await.unwrap();
    crate::support::wait_for(&mut watch, JobStatus::Started, T).await;
    let name = format!("trainyard-worker {worker_id}");
    tokio::task::spawn_blocking(move || close_connection_named(&name)).await.unwrap();
    let events = collect_until_terminal(&mut watch, Duration::from_secs(90)).await;
    assert_eq!(events.last().unwrap().status, JobStatus::Succeeded, "{:?}", statuses(&events));
    assert_eq!(stubborn.most_at_once(), 1, "two runs of the job at once on a one-slot worker");
    w.stop().await;
    env.cleanup().await;
}

/// A job that ends after its session was lost while its publish channel still worked (here
/// the broker cancelled another type's consumer) publishes no copy: its ack would be refused
/// and the broker delivers it again. Before, its dead letter went out, the ack was refused,
/// and the redelivery ended in a second dead letter (or, for a retry, a second live attempt).
#[tokio::test]
async fn a_job_ending_in_a_lost_session_publishes_no_copy() {
    let env = Env::new(&["noop", "other"]).await;
    let stubborn = Stubborn::default();
    let registry = Registry::new().register("noop", stubborn.clone()).register("other", stubborn.clone());
    let w = env.spawn_worker_serving(registry, &prometheus::Registry::new(), |cfg| cfg.concurrency = 1);
    // It ignores its stop and runs past its timeout: it ends as a timeout, its last attempt.
    let mut job = env.spec("noop", json!({"ms": 8_000}));
    (job.max_attempts, job.timeout_s) = (1, 2);
    let sub = env.submitter();
    let mut watch = sub.watch(&job).await.unwrap();
    sub.submit(&job).await.unwrap();
    crate::support::wait_for(&mut watch, JobStatus::Started, T).await;
    env.ch.queue_delete(env.topo.jobs_queue("other").as_str().into(), Default::default()).await.unwrap();
    let events = collect_until_terminal(&mut watch, Duration::from_secs(90)).await;
    assert_eq!(events.last().unwrap().status, JobStatus::Failed, "{:?}", statuses(&events));
    // Time for the redelivery of a first attempt that sent its letter to end in a second one.
    let dead = env.topo.dead_queue("noop");
    let until = std::time::Instant::now() + Duration::from_secs(12);
    while std::time::Instant::now() < until && env.ready(&dead).await < 2 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(env.ready(&dead).await, 1, "one dead letter");
    w.stop().await;
    env.cleanup().await;
}

/// A handler whose thread ignores its stop, on a 1-slot worker.
#[derive(Clone, Default)]
struct Deaf(Stubborn);

#[async_trait::async_trait]
impl trainyard_worker::handler::JobHandler for Deaf {
    fn validate(&self, _: &serde_json::Value) -> Result<(), trainyard_worker::handler::JobError> {
        Ok(())
    }
    async fn run(&self, ctx: trainyard_worker::handler::JobContext) -> Result<serde_json::Value, trainyard_worker::handler::JobError> {
        let stubborn = self.0.clone();
        let run = ctx.clone();
        trainyard_worker::handler::on_thread("deaf", ctx.slot.clone(), move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
            rt.block_on(trainyard_worker::handler::JobHandler::run(&stubborn, run))
        })
        .await
    }
}

/// An attempt that timed out while its thread ignored the stop keeps its slot until the thread
/// ends: its retry, back on the same 1-slot worker, waits instead of running beside it. The
/// slot was freed when the attempt was given up, and the retry ran beside the thread (two
/// trainings on one GPU).
#[tokio::test]
async fn a_timed_out_attempts_thread_keeps_its_slot_until_it_ends() {
    let env = Env::new(&["noop"]).await;
    let deaf = Deaf::default();
    let registry = Registry::new().register("noop", deaf.clone());
    let w = env.spawn_worker_serving(registry, &prometheus::Registry::new(), |cfg| {
        cfg.concurrency = 1;
        cfg.backoff.base_ms = 100;
        // A timed-out job gets 3 s to unwind (half the tenth of this kept for ending a job).
        cfg.consumer_timeout = Duration::from_secs(60);
    });
    // 1 s of timeout and 3 s to unwind: the thread runs on 2 s after its attempt is given up.
    let mut job = env.spec("noop", json!({"ms": 6_000}));
    (job.max_attempts, job.timeout_s) = (2, 1);
    let events = env.run_job(&job, Duration::from_secs(60)).await;
    assert_eq!(events.last().unwrap().status, JobStatus::Failed, "{:?}", statuses(&events));
    assert!(events.iter().any(|e| e.status == JobStatus::Retrying), "{:?}", statuses(&events));
    assert_eq!(deaf.0.most_at_once(), 1, "the retry ran beside the first attempt's thread");
    w.stop().await;
    env.cleanup().await;
}
