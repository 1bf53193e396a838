//! Jobs named before they are published (an idempotency key through the operations, the API's
//! and the console's path; a trigger event's message id) are published once the store has them.

use lapin::BasicProperties;
use trainyard::{ops::OpsError, submit::Submitter, triggers::Triggers};
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

/// A job confirmed in its queue whose `queued` event cannot be published (here the events
/// exchange is gone) is answered as submitted: it runs, and its worker's events record it.
/// Before, the submit answered an error (the CLI exit 2, the API 503) for a job already
/// queued, and a caller that submitted it again made a second job.
#[tokio::test]
async fn a_queued_job_whose_queued_event_fails_is_answered_as_submitted() {
    let OpsSetup { topo, ch, store: _, ops, _conn, _dirs } = ops_setup().await;
    ops.submit(spec("noop", "bot-first")).await.unwrap();
    ch.exchange_delete(topo.events_exchange().as_str().into(), Default::default()).await.unwrap();
    let job = spec("noop", "bot-unannounced");
    let done = ops.submit(job.clone()).await;
    assert!(done.is_ok(), "a queued job is answered as submitted: {done:?}");
    assert_eq!(message_count(&ch, &topo.jobs_queue("noop")).await, 2, "both jobs are in their queue");
    cleanup(&topo, &["noop"]).await;
}

/// A trigger event delivered again with its message id (its publisher sent it twice, or a
/// session was lost while a debounced rule held it) makes the same job id, and once the store
/// has that job it is not published again: the second copy ran beside the first while it was
/// queued or running.
#[tokio::test]
async fn a_trigger_event_seen_again_does_not_publish_its_known_job_again() {
    let OpsSetup { topo, ch, store, ops: _, _conn, _dirs } = ops_setup().await;
    let recorder = spawn_recorder(&store, &topo);
    let rule = trigger_rule("again", "bot.again", "noop");
    let triggers = Triggers::new(vec![rule], Submitter::new(AMQP_URL, topo.clone()).unwrap(), AMQP_URL, None).with_store(store.clone());
    let (stop, task) = listening(&triggers).await;
    let send = || async {
        let props = BasicProperties::default().with_message_id("evt-again-1".into());
        publish_raw(&ch, &topo.triggers_exchange(), "bot.again", br#"{"bot": "again"}"#, props).await;
    };
    send().await;
    let jobs_queue = topo.jobs_queue("noop");
    eventually(20, "the job queued", || async { (message_count(&ch, &jobs_queue).await == 1).then_some(()) }).await;
    let job = eventually(20, "the job recorded", || async { store.list_jobs(&Default::default()).await.unwrap().into_iter().next() }).await;
    send().await;
    let queue = triggers.queue_name();
    eventually(20, "the second delivery acked", || async {
        (message_count(&ch, &queue).await == 0 && unacked(&queue).await == 0).then_some(())
    })
    .await;
    assert_eq!(message_count(&ch, &jobs_queue).await, 1, "job {} published once", job.job_id);
    stop.cancel();
    task.await.unwrap();
    recorder.stop().await;
    let _ = ch.queue_delete(triggers.queue_name().as_str().into(), Default::default()).await;
    cleanup(&topo, &["noop"]).await;
}

/// A retry whose audit record was lost (neither the events stream nor the store took it) is
/// passed over once it has finished: the next retry computed the same job id, found it known
/// and finished, and answered it, every time, never making another.
#[tokio::test]
async fn a_finished_retry_whose_audit_record_was_lost_is_passed_over() {
    use trainyard_common::{event::event_seq, JobEvent, TriggerKind};
    let OpsSetup { topo, ch, store, ops, _conn, _dirs } = ops_setup().await;
    let failed = spec("noop", "bot-retry");
    store.record_event(&JobEvent::queued(&failed)).await.unwrap();
    store.record_event(&JobEvent::new(&failed, JobStatus::Failed, 1, event_seq(1, 0, 1))).await.unwrap();
    let first = ops.retry(&failed.job_id, "it", TriggerKind::Manual).await.unwrap();
    assert_eq!(first.known, None, "a new job");
    store.execute_raw("DELETE FROM audit").await.unwrap();
    store.record_event(&JobEvent::queued(&first.spec)).await.unwrap();
    store.record_event(&JobEvent::new(&first.spec, JobStatus::Succeeded, 1, event_seq(1, 0, 1))).await.unwrap();
    let next = ops.retry(&failed.job_id, "it", TriggerKind::Manual).await.unwrap();
    assert_eq!(next.known, None, "a new job, not the finished one: {:?}", next.known);
    assert_ne!(next.spec.job_id, first.spec.job_id);
    // Sent again before the store has it: the job the audit record names (the id was rebuilt
    // from the number of records, and named the finished one).
    let again = ops.retry(&failed.job_id, "it", TriggerKind::Manual).await.unwrap();
    assert_eq!((again.spec.job_id.as_str(), again.known), (next.spec.job_id.as_str(), Some(JobStatus::Queued)));
    cleanup(&topo, &["noop"]).await;
    drop(ch);
}
