//! An in-process worker's stop: running jobs get the grace period to finish, and no new
//! work is taken meanwhile. (`processes::` covers SIGTERM on the binary, with a job longer
//! than the grace period.)

use std::time::Duration;

use lapin::BasicProperties;
use serde_json::json;
use trainyard_common::{amqp, codec, control::CancelRequest, JobStatus};

use crate::support::{collect_until_terminal, wait_for, Env};

const T: Duration = Duration::from_secs(30);

/// A job running when the worker is told to stop finishes within the grace period: it
/// succeeds once, without a redelivery, and is acked; a job submitted after the stop began
/// is not taken, and waits in its queue for the next worker.
#[tokio::test]
async fn a_running_job_finishes_within_the_grace_period_and_no_new_job_is_taken() {
    let env = Env::new(&["noop"]).await;
    let w = env.spawn_worker(&["noop"], |cfg| {
        cfg.grace_period = Duration::from_secs(15);
        cfg.concurrency = 2;
    });
    let sub = env.submitter();
    let running = env.spec("noop", json!({"sleep_ms": 2000}));
    let mut watch = sub.watch(&running).await.unwrap();
    sub.submit(&running).await.unwrap();
    let mut events = wait_for(&mut watch, JobStatus::Started, T).await;
    w.shutdown.cancel();
    // Let the stop take effect (consumers cancelled) before the next job arrives.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let later = env.spec("noop", json!({}));
    sub.submit(&later).await.unwrap();

    events.extend(collect_until_terminal(&mut watch, T).await);
    let statuses: Vec<JobStatus> = events.iter().map(|e| e.status).collect();
    assert_eq!(statuses.last(), Some(&JobStatus::Succeeded), "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == JobStatus::Started).count(), 1, "not stopped and run again: {statuses:?}");
    tokio::time::timeout(T, w.join).await.expect("the worker stops after its job").expect("worker task panicked");
    let queue = env.topo.jobs_queue("noop");
    assert_eq!(env.ready(&queue).await, 1, "the later job waits for the next worker, and the finished one was acked");
    env.cleanup().await;
}

/// A job cancelled while the worker drains on a stop is cancelled, not run on to success (and
/// its model promoted): the worker still hears cancel requests during the grace period. (The
/// control consumer was stopped with the job consumers, so the request found no queue bound.)
#[tokio::test]
async fn a_job_cancelled_during_the_grace_period_is_cancelled() {
    let env = Env::new(&["noop"]).await;
    let w = env.spawn_worker(&["noop"], |cfg| cfg.grace_period = Duration::from_secs(20));
    let sub = env.submitter();
    let job = env.spec("noop", json!({"sleep_ms": 8000}));
    let mut watch = sub.watch(&job).await.unwrap();
    sub.submit(&job).await.unwrap();
    let mut events = wait_for(&mut watch, JobStatus::Started, T).await;
    w.shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let req = CancelRequest { job_id: job.job_id.clone(), by: "tests".into(), reason: "cancelled while the worker stops".into() };
    let props = BasicProperties::default().with_content_type(codec::JSON.into());
    amqp::publish_confirmed(&env.ch, &env.topo.control_exchange(), "", &codec::to_json(&req).unwrap(), props, false).await.unwrap();
    events.extend(collect_until_terminal(&mut watch, T).await);
    let last = events.last().unwrap();
    assert_eq!(last.status, JobStatus::Cancelled, "{:?}", events.iter().map(|e| e.status).collect::<Vec<_>>());
    tokio::time::timeout(T, w.join).await.expect("the worker stops after its job").expect("worker task panicked");
    env.cleanup().await;
}
