//! Submits through the operations (the API's and the console's path): an idempotency key
//! names one job, run once.

use trainyard::ops::OpsError;
use trainyard_common::JobStatus;

use crate::helpers::*;

/// A second submit with the idempotency key of a job the store already has answers that job,
/// with its status, and publishes nothing: before, it published a second copy, which a free
/// slot ran beside the first (twice the GPU time, two promotions), and which ran a failed job
/// again as run 0. The same key for other work is still a conflict.
#[tokio::test]
async fn a_known_idempotency_key_answers_its_job_and_publishes_nothing() {
    let OpsSetup { topo, ch, store, ops, _conn, _dirs } = ops_setup().await;
    let recorder = spawn_recorder(&store, &topo);
    let key = format!("nightly-{}", uuid::Uuid::new_v4());
    let mut job = spec("noop", "bot-idem");
    job.set_idempotency_key(&key).unwrap();
    let first = ops.submit(job.clone()).await.unwrap();
    assert_eq!((first.spec.job_id.as_str(), first.known), (job.job_id.as_str(), None), "published");
    eventually(20, "the job recorded", || async { store.job(&job.job_id).await.unwrap().map(|_| ()) }).await;

    let again = ops.submit(job.clone()).await.unwrap();
    assert_eq!(again.known, Some(JobStatus::Queued), "the job the key names, as the store has it");
    assert_eq!(message_count(&ch, &topo.jobs_queue("noop")).await, 1, "one copy of the job in its queue");

    let mut other = spec("noop", "bot-other");
    other.set_idempotency_key(&key).unwrap();
    assert!(matches!(ops.submit(other).await, Err(OpsError::Conflict(_))), "the key names other work");
    assert_eq!(message_count(&ch, &topo.jobs_queue("noop")).await, 1);
    recorder.stop().await;
    cleanup(&topo, &["noop"]).await;
}
