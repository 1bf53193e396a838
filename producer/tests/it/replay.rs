//! Dead-letter replays: a new run of the job, filed under its run, that nothing can lose once
//! its letter is acked.

use lapin::{options::BasicGetOptions, types::FieldTable, BasicProperties};
use trainyard::ops::ReplayRequest;
use trainyard_common::{codec, event::event_seq, headers, JobEvent, JobStatus};

use crate::helpers::*;

/// A worker's dead letter of a new `noop` job of `bot`, once in its dead queue; the job and the queue.
async fn a_dead_letter(ch: &lapin::Channel, topo: &trainyard_common::topology::Topology, bot: &str) -> (trainyard_common::JobSpec, String) {
    let job = spec("noop", bot);
    publish_raw(ch, &topo.dead_exchange(), "noop", &msgpack(&job), worker_dead_letter(&job)).await;
    let dead_queue = topo.dead_queue("noop");
    eventually(10, "the letter in its dead queue", || async { (message_count(ch, &dead_queue).await == 1).then_some(()) }).await;
    (job, dead_queue)
}

/// A worker whose clock runs minutes behind still files a replayed run's events under that
/// run: the replay sets the run in the job message (`x-trainyard-run`), every event carries
/// it, and the store files by it. (Filed by time, as before runs were carried, these events
/// from "before the replay" went to run 0 and the job stayed `queued`.)
#[tokio::test]
async fn a_replayed_runs_events_from_a_slow_clock_are_filed_under_their_run() {
    let OpsSetup { topo, ch, store, ops, _conn, _dirs } = ops_setup().await;
    let recorder = spawn_recorder(&store, &topo);
    // Run 0: submitted, then dead-lettered by a worker.
    let spec = spec("noop", "clock-bot");
    publish_event(&ch, &topo, &JobEvent::queued(&spec)).await;
    let mut hdrs = FieldTable::default();
    headers::set_str(&mut hdrs, headers::DEAD_REASON, "failed on purpose");
    headers::set_str(&mut hdrs, headers::DEAD_KIND, "permanent");
    let props = BasicProperties::default().with_content_type(codec::MSGPACK.into()).with_headers(hdrs);
    publish_raw(&ch, &topo.dead_exchange(), "noop", &msgpack(&spec), props).await;
    let mut dead = JobEvent::new(&spec, JobStatus::Dead, 1, event_seq(1, 0, 1));
    dead.error = Some(trainyard_common::ErrorInfo { kind: trainyard_common::ErrorKind::Permanent, message: "failed on purpose".into() });
    publish_event(&ch, &topo, &dead).await;
    eventually(20, "run 0 dead, its letter listed", || async {
        let dead = store.job(&spec.job_id).await.unwrap().is_some_and(|j| j.status == JobStatus::Dead);
        (dead && !store.dead_letters(Some("noop")).await.unwrap().is_empty()).then_some(())
    })
    .await;

    let req = ReplayRequest { job_id: Some(spec.job_id.clone()), job_type: None, all: false };
    assert_eq!(ops.replay(&req, "it").await.unwrap(), vec![spec.job_id.clone()]);
    let msg = ch.basic_get(topo.jobs_queue("noop").into(), BasicGetOptions { no_ack: true }).await.unwrap().expect("the replayed job");
    assert_eq!(headers::run(msg.delivery.properties.headers().as_ref()), 1, "the replay sets run 1 in the job message");

    // The worker of run 1 runs 10 minutes behind the control plane.
    let behind = chrono::Utc::now() - chrono::Duration::minutes(10);
    for (n, status) in [(0, JobStatus::Started), (1, JobStatus::Succeeded)] {
        let mut ev = JobEvent::new(&spec, status, 1, event_seq(1, 0, n));
        (ev.run, ev.at) = (Some(1), behind);
        publish_event(&ch, &topo, &ev).await;
    }
    eventually(20, "run 1 to succeed", || async {
        store.job(&spec.job_id).await.unwrap().filter(|j| j.status == JobStatus::Succeeded).map(|_| ())
    })
    .await;
    let job = store.job(&spec.job_id).await.unwrap().unwrap();
    assert_eq!((job.run, job.attempts), (1, 1));
    let filed: Vec<(Option<u32>, JobStatus)> = store.events(&spec.job_id).await.unwrap().iter().map(|e| (e.run, e.status)).collect();
    for want in [(Some(0), JobStatus::Dead), (Some(1), JobStatus::Queued), (Some(1), JobStatus::Started), (Some(1), JobStatus::Succeeded)] {
        assert!(filed.contains(&want), "{want:?} not in {filed:?}");
    }
    recorder.stop().await;
    cleanup(&topo, &["noop"]).await;
}

/// A replay whose store write fails once its letter is acked still starts the new run: the
/// run's `queued` event goes to the events stream first, and the recorder files it from there.
/// (The store was written first: its failure answered an error for a letter already gone from
/// its queue, and the run's `queued` event was never published, so no rebuild could see it.)
#[tokio::test]
async fn a_replay_the_store_fails_to_note_is_filed_from_the_stream() {
    let OpsSetup { topo, ch, store, ops, _conn, _dirs } = ops_setup().await;
    let (job, dead_queue) = a_dead_letter(&ch, &topo, "bot-replay-store").await;
    let refuse = refusing_inserts("refuse_queued", "job_events", "NEW.status = 'queued'", "the store refuses for a moment");
    store.execute_raw(&refuse).await.unwrap();

    let req = ReplayRequest { job_id: None, job_type: Some("noop".into()), all: true };
    assert_eq!(ops.replay(&req, "it").await.expect("replayed, the store's failure only logged"), vec![job.job_id.clone()]);
    assert_eq!(message_count(&ch, &dead_queue).await, 0, "the letter is acked");
    assert_eq!(message_count(&ch, &topo.jobs_queue("noop")).await, 1, "the new run is queued");
    assert!(store.events(&job.job_id).await.unwrap().is_empty(), "the store took nothing");

    store.execute_raw("DROP TRIGGER refuse_queued").await.unwrap();
    let recorder = spawn_recorder(&store, &topo);
    let filed = eventually(20, "run 1's queued event, from the stream", || async {
        let events = store.events(&job.job_id).await.unwrap();
        events.iter().any(|e| (e.run, e.status) == (Some(1), JobStatus::Queued)).then_some(events)
    })
    .await;
    assert!(filed.iter().all(|e| e.run <= Some(1)), "{filed:?}");
    let row = store.job(&job.job_id).await.unwrap().expect("the job's row");
    assert_eq!((row.run, row.status), (1, JobStatus::Queued));
    recorder.stop().await;
    cleanup(&topo, &["noop"]).await;
}

/// A replay whose `queued` event cannot reach the events stream (here the events exchange is
/// gone) answers an error and leaves its letter in the dead queue, with nothing queued and
/// nothing filed; once the exchange is back the replay starts run 1. (The job used to be
/// republished and its letter acked first, the failure only logged: a run neither the stream
/// nor a rebuild ever saw queued.)
#[tokio::test]
async fn a_replay_whose_queued_event_cannot_reach_the_stream_leaves_its_letter_queued() {
    let OpsSetup { topo, ch, store, ops, _conn, _dirs } = ops_setup().await;
    let (job, dead_queue) = a_dead_letter(&ch, &topo, "bot-replay-stream").await;
    ch.exchange_delete(topo.events_exchange().as_str().into(), Default::default()).await.unwrap();

    let req = ReplayRequest { job_id: None, job_type: Some("noop".into()), all: true };
    let err = ops.replay(&req, "it").await.expect_err("the queued event had nowhere to go");
    assert!(err.to_string().contains(&topo.events_exchange()), "{err}");
    eventually(10, "the letter back in its dead queue", || async { (message_count(&ch, &dead_queue).await == 1).then_some(()) }).await;
    assert_eq!(message_count(&ch, &topo.jobs_queue("noop")).await, 0, "no run started");
    assert!(store.events(&job.job_id).await.unwrap().is_empty(), "nothing filed");

    topo.declare_shared(&ch).await.unwrap();
    assert_eq!(ops.replay(&req, "it").await.unwrap(), vec![job.job_id.clone()]);
    assert_eq!(message_count(&ch, &dead_queue).await, 0, "the letter is acked");
    assert_eq!(message_count(&ch, &topo.jobs_queue("noop")).await, 1, "run 1 is queued");
    let filed: Vec<_> = store.events(&job.job_id).await.unwrap().iter().map(|e| (e.run, e.status)).collect();
    assert_eq!(filed, [(Some(1), JobStatus::Queued)]);
    cleanup(&topo, &["noop"]).await;
}

/// An operator action whose audit record the events stream cannot take (here the events
/// exchange is gone) is done and answered done, its record kept in the store; it used to
/// answer an error for an action already taken (a job already queued, submitted again).
#[tokio::test]
async fn an_audit_record_the_stream_cannot_take_is_kept_in_the_store() {
    let OpsSetup { topo, ch, store, ops, _conn, _dirs } = ops_setup().await;
    // The first action declares the shared topology once for the submitter's life.
    ops.cancel(&uuid::Uuid::now_v7().to_string(), "it", "").await.unwrap();
    ch.exchange_delete(topo.events_exchange().as_str().into(), Default::default()).await.unwrap();
    let job_id = uuid::Uuid::now_v7().to_string();
    ops.cancel(&job_id, "it", "no longer wanted").await.expect("cancelled, its audit record kept in the store");
    let filter = trainyard::store::AuditFilter { target: Some(job_id.clone()), ..Default::default() };
    let trail = store.audit(&filter).await.unwrap();
    assert_eq!(trail.iter().map(|r| (r.action.as_str(), r.actor.as_str())).collect::<Vec<_>>(), [("cancel", "it")]);
    cleanup(&topo, &["noop"]).await;
}

/// A replay of `all` that fails partway answers the failure and names the letters it replayed
/// before it: those stay replayed (their runs queued, their letters acked), and the letter it
/// failed on goes back to its queue. (It answered the bare failure, so a caller could not tell
/// that anything had been replayed.) The second letter here is of a job type no queue takes,
/// left in `noop`'s dead queue: its job has nowhere to go.
#[tokio::test]
async fn a_replay_of_all_that_fails_partway_names_the_letters_it_replayed() {
    let OpsSetup { topo, ch, store, ops, _conn, _dirs } = ops_setup().await;
    let first = spec("noop", "bot-replay-partly");
    let mut stray = spec("noop", "bot-replay-partly");
    stray.job_type = format!("ghost-{}", uuid::Uuid::new_v4().simple());
    for job in [&first, &stray] {
        publish_raw(&ch, &topo.dead_exchange(), "noop", &msgpack(job), worker_dead_letter(job)).await;
    }
    let dead_queue = topo.dead_queue("noop");
    eventually(10, "both letters in the dead queue", || async { (message_count(&ch, &dead_queue).await == 2).then_some(()) }).await;

    let req = ReplayRequest { job_id: None, job_type: Some("noop".into()), all: true };
    let err = ops.replay(&req, "it").await.expect_err("the stray letter's job has no queue");
    let trainyard::ops::OpsError::Partial { done, source } = &err else { panic!("not a partial failure: {err:?}") };
    assert_eq!(done, std::slice::from_ref(&first.job_id));
    assert!(source.to_string().contains(&stray.job_type), "{source}");
    assert!(err.to_string().contains(&first.job_id), "the answer names the replayed letter: {err}");
    assert_eq!(trainyard::api::ApiError::from(err).0, axum::http::StatusCode::SERVICE_UNAVAILABLE);
    eventually(10, "the stray letter back in its queue", || async { (message_count(&ch, &dead_queue).await == 1).then_some(()) }).await;
    assert_eq!(message_count(&ch, &topo.jobs_queue("noop")).await, 1, "the first letter's run is queued");
    let row = store.job(&first.job_id).await.unwrap().expect("the replayed job noted");
    assert_eq!((row.run, row.status), (1, JobStatus::Queued));
    cleanup(&topo, &["noop"]).await;
}
