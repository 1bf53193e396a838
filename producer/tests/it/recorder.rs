//! The recorder: idempotent and order-free, batch after batch.

use trainyard::store::Store;
use trainyard_common::{event::event_seq, JobEvent, JobStatus};

use crate::helpers::*;

async fn order_and_duplicates(store: Store) {
    let topo = topology();
    let (_conn, ch) = channel().await;
    topo.declare_shared(&ch).await.unwrap();
    let recorder = spawn_recorder(&store, &topo);
    let spec = spec("noop", "bot-a");
    let queued = JobEvent::queued(&spec);
    let started = JobEvent::new(&spec, JobStatus::Started, 1, event_seq(1, 0, 0));
    let mut done = JobEvent::new(&spec, JobStatus::Succeeded, 1, event_seq(1, 0, 2));
    done.result = Some(serde_json::json!({"slept_ms": 1}));
    // Succeeded before started, every event twice, queued last.
    for ev in [&done, &done, &started, &started, &queued, &queued] {
        publish_event(&ch, &topo, ev).await;
    }
    let job = eventually(20, "the queued event recorded", || async {
        let job = store.job(&spec.job_id).await.unwrap()?;
        job.spec.is_some().then_some(job)
    })
    .await;
    // A late progress event of the same attempt does not undo the final status.
    publish_event(&ch, &topo, &JobEvent::new(&spec, JobStatus::Progress, 1, event_seq(1, 0, 1))).await;
    eventually(20, "4 events", || async { (store.events(&spec.job_id).await.unwrap().len() == 4).then_some(()) }).await;
    let job2 = store.job(&spec.job_id).await.unwrap().unwrap();
    assert_eq!(job.status, JobStatus::Succeeded);
    assert_eq!(job2.status, JobStatus::Succeeded);
    assert_eq!(job2.attempts, 1);
    assert_eq!(job2.result, Some(serde_json::json!({"slept_ms": 1})));
    assert_eq!(job2.spec.as_ref(), Some(&spec));
    assert_eq!(job2.trigger.as_ref().map(|t| t.source.as_str()), Some("it"));
    let seqs: Vec<u64> = store.events(&spec.job_id).await.unwrap().iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![0, event_seq(1, 0, 0), event_seq(1, 0, 1), event_seq(1, 0, 2)]);
    recorder.stop().await;
    cleanup(&topo, &[]).await;
}

#[tokio::test]
async fn recorder_is_idempotent_and_order_free_on_sqlite() {
    let (store, _dir, _) = sqlite_store().await;
    order_and_duplicates(store).await;
}

#[tokio::test]
async fn recorder_is_idempotent_and_order_free_on_postgres() {
    let schema = PgSchema::new().await;
    let store = Store::open(&schema.url).await.unwrap();
    order_and_duplicates(store.clone()).await;
    store.close().await;
    schema.drop().await;
}

/// Publishes 1,000 events (250 jobs × 4), then times the recorder draining them.
async fn throughput(store: Store, backend: &str) {
    let topo = topology();
    let (_conn, ch) = channel().await;
    topo.declare_shared(&ch).await.unwrap();
    let specs: Vec<_> = (0..250).map(|i| spec("noop", &format!("bot-{i}"))).collect();
    for s in &specs {
        publish_event(&ch, &topo, &JobEvent::queued(s)).await;
        publish_event(&ch, &topo, &JobEvent::new(s, JobStatus::Started, 1, event_seq(1, 0, 0))).await;
        publish_event(&ch, &topo, &JobEvent::new(s, JobStatus::Progress, 1, event_seq(1, 0, 1))).await;
        publish_event(&ch, &topo, &JobEvent::new(s, JobStatus::Succeeded, 1, event_seq(1, 0, 2))).await;
    }
    let started = std::time::Instant::now();
    let recorder = spawn_recorder(&store, &topo);
    let last = &specs[249].job_id;
    eventually(120, "1000 events recorded", || async {
        let done = store.count_by_type_and_status().await.unwrap().iter().find(|(_, s, _)| *s == JobStatus::Succeeded).map(|(_, _, n)| *n);
        (done == Some(250) && store.events(last).await.unwrap().len() == 4).then_some(())
    })
    .await;
    let secs = started.elapsed().as_secs_f64();
    println!("recorder on {backend}: 1000 events in {secs:.2}s = {:.0} events/s", 1000.0 / secs);
    assert!(1000.0 / secs > 50.0, "recorder too slow on {backend}: {secs:.2}s for 1000 events");
    recorder.stop().await;
    cleanup(&topo, &[]).await;
}

#[tokio::test]
async fn recorder_throughput_on_sqlite() {
    let (store, _dir, _) = sqlite_store().await;
    throughput(store, "SQLite").await;
}

#[tokio::test]
async fn recorder_throughput_on_postgres() {
    let schema = PgSchema::new().await;
    let store = Store::open(&schema.url).await.unwrap();
    throughput(store.clone(), "PostgreSQL").await;
    store.close().await;
    schema.drop().await;
}

/// One batch with two jobs, out of order, with a duplicate inside the batch and one already stored.
async fn batch_semantics(store: Store) {
    let (a, b) = (spec("noop", "bot-a"), spec("noop", "bot-b"));
    let a_started = JobEvent::new(&a, JobStatus::Started, 1, event_seq(1, 0, 0));
    let mut a_done = JobEvent::new(&a, JobStatus::Succeeded, 1, event_seq(1, 0, 2));
    a_done.at = a.submitted_at + chrono::Duration::milliseconds(1500);
    let b_started = JobEvent::new(&b, JobStatus::Started, 1, event_seq(1, 0, 0));
    assert!(store.record_event(&JobEvent::queued(&a)).await.unwrap());
    let batch = [a_done.clone(), b_started.clone(), JobEvent::queued(&a), a_started.clone(), b_started.clone(), JobEvent::queued(&b)];
    let got = store.record_events(&batch).await.unwrap();
    let new: Vec<bool> = got.iter().map(|r| r.new).collect();
    // a's queued was stored before; b_started appears twice: the first copy (in job_id, seq order) is new.
    assert_eq!(new.iter().filter(|n| **n).count(), 4, "{new:?}");
    assert!(got[0].new && !got[2].new && got[3].new && got[5].new);
    assert!(got[1].new != got[4].new, "exactly one copy of b's started is new: {new:?}");
    // The terminal event carries the job's start for the duration metric.
    assert_eq!(got[0].since.map(|t| (a_done.at - t).num_milliseconds()), Some(1500));
    assert!(got.iter().enumerate().all(|(i, r)| i == 0 || r.since.is_none()));
    let (ja, jb) = (store.job(&a.job_id).await.unwrap().unwrap(), store.job(&b.job_id).await.unwrap().unwrap());
    assert_eq!((ja.status, jb.status), (JobStatus::Succeeded, JobStatus::Started));
    assert_eq!(jb.spec.as_ref(), Some(&b));
    assert_eq!(store.events(&a.job_id).await.unwrap().len(), 3);
    assert_eq!(store.events(&b.job_id).await.unwrap().len(), 2);
    // The same batch again is all duplicates and changes nothing.
    assert!(store.record_events(&batch).await.unwrap().iter().all(|r| !r.new));
    assert_eq!(store.job(&a.job_id).await.unwrap().unwrap().status, JobStatus::Succeeded);
    assert!(store.record_events(&[]).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_batch_is_recorded_like_its_events_one_by_one_on_sqlite() {
    let (store, _dir, _) = sqlite_store().await;
    batch_semantics(store).await;
}

#[tokio::test]
async fn a_batch_is_recorded_like_its_events_one_by_one_on_postgres() {
    let schema = PgSchema::new().await;
    let store = Store::open(&schema.url).await.unwrap();
    batch_semantics(store.clone()).await;
    store.close().await;
    schema.drop().await;
}

/// Jobs whose events all come in one batch (the store creates their rows from the batch
/// alone) get the rows, events and durations their events give one at a time: shuffled and
/// duplicated, a replayed run, events without a run (older releases), errors and retries.
async fn whole_jobs_in_one_batch(one_batch: Store, one_by_one: Store) {
    let worker = trainyard_common::WorkerInfo { id: "w-1".into(), attributes: Default::default() };
    let ev = |spec: &trainyard_common::JobSpec, status, attempt, n, ms: i64| {
        let mut e = JobEvent::new(spec, status, attempt, event_seq(attempt, 0, n));
        e.at = spec.submitted_at + chrono::Duration::milliseconds(ms);
        e.worker = Some(worker.clone());
        e
    };
    let (a, b, c, d) = (spec("noop", "bot-a"), spec("noop", "bot-b"), spec("noop", "bot-c"), spec("noop", "bot-d"));
    let mut events = vec![JobEvent::queued(&a), ev(&a, JobStatus::Started, 1, 0, 10), ev(&a, JobStatus::Progress, 1, 1, 20)];
    let mut a_done = ev(&a, JobStatus::Succeeded, 1, 2, 30);
    a_done.result = Some(serde_json::json!({"ok": 1}));
    events.push(a_done);
    // b failed, then a replay (run 1) succeeded.
    let mut b_failed = ev(&b, JobStatus::Failed, 1, 1, 40);
    b_failed.error = Some(trainyard_common::ErrorInfo { kind: trainyard_common::ErrorKind::Permanent, message: "no".into() });
    let mut b_again = ev(&b, JobStatus::Started, 1, 0, 900);
    b_again.run = Some(1);
    let mut b_done = ev(&b, JobStatus::Succeeded, 1, 2, 950);
    b_done.run = Some(1);
    events.extend([JobEvent::queued(&b), ev(&b, JobStatus::Started, 1, 0, 5), b_failed, b_again, b_done]);
    // c: from an older release, no run and no queued event.
    let (mut c_started, mut c_done) = (ev(&c, JobStatus::Started, 1, 0, 1), ev(&c, JobStatus::Succeeded, 1, 1, 2));
    (c_started.run, c_done.run) = (None, None);
    events.extend([c_started, c_done]);
    // d: a retry, still running.
    let mut d_retry = ev(&d, JobStatus::Retrying, 1, 1, 8);
    d_retry.error = Some(trainyard_common::ErrorInfo { kind: trainyard_common::ErrorKind::Transient, message: "later".into() });
    events.extend([JobEvent::queued(&d), ev(&d, JobStatus::Started, 1, 0, 3), d_retry, ev(&d, JobStatus::Started, 2, 0, 60)]);

    let mut since_by_one = Vec::new();
    for e in &events {
        since_by_one.push(one_by_one.record_events(std::slice::from_ref(e)).await.unwrap()[0].since);
    }
    // The batch shuffled (reversed, every other event twice).
    let mut batch: Vec<JobEvent> = events.iter().rev().cloned().collect();
    batch.extend(events.iter().step_by(2).cloned());
    let got = one_batch.record_events(&batch).await.unwrap();
    let since_in_batch: Vec<_> = got[..events.len()].iter().rev().map(|r| r.since).collect();
    // b's failure belongs to a run the same batch replaced: no duration is reported for it.
    let b_failed = events.iter().position(|e| e.job_id == b.job_id && e.status == JobStatus::Failed).unwrap();
    assert!(since_by_one[b_failed].is_some());
    since_by_one[b_failed] = None;
    assert_eq!(since_in_batch, since_by_one, "durations start at the same time");
    assert_eq!(since_in_batch.iter().filter(|s| s.is_some()).count(), 3, "a, b's replay and c succeeded");
    assert!(got[events.len()..].iter().all(|r| !r.new), "the second copies are duplicates");
    for s in [&a, &b, &c, &d] {
        let (row, expected) = (one_batch.job(&s.job_id).await.unwrap(), one_by_one.job(&s.job_id).await.unwrap());
        assert_eq!(row, expected, "job {}", s.bot);
        assert_eq!(one_batch.events(&s.job_id).await.unwrap(), one_by_one.events(&s.job_id).await.unwrap(), "job {}", s.bot);
    }
    let b_row = one_batch.job(&b.job_id).await.unwrap().unwrap();
    assert_eq!((b_row.run, b_row.status, b_row.error), (1, JobStatus::Succeeded, None), "the replay's run makes the row");
    assert_eq!(one_batch.job(&d.job_id).await.unwrap().unwrap().attempts, 2);
}

#[tokio::test]
async fn whole_jobs_in_one_batch_get_the_rows_of_their_events_one_by_one_on_sqlite() {
    let ((one_batch, _d1, _), (one_by_one, _d2, _)) = (sqlite_store().await, sqlite_store().await);
    whole_jobs_in_one_batch(one_batch, one_by_one).await;
}

#[tokio::test]
async fn whole_jobs_in_one_batch_get_the_rows_of_their_events_one_by_one_on_postgres() {
    let (s1, s2) = (PgSchema::new().await, PgSchema::new().await);
    let (one_batch, one_by_one) = (Store::open(&s1.url).await.unwrap(), Store::open(&s2.url).await.unwrap());
    whole_jobs_in_one_batch(one_batch.clone(), one_by_one.clone()).await;
    one_batch.close().await;
    one_by_one.close().await;
    s1.drop().await;
    s2.drop().await;
}

/// While the store fails, a batch goes back to the queue, nothing is lost, and it is
/// recorded once the store works again.
#[tokio::test]
async fn a_batch_the_store_rejects_is_requeued_and_recorded_later() {
    let (store, _dir, _) = sqlite_store().await;
    let topo = topology();
    let (_conn, ch) = channel().await;
    topo.declare_shared(&ch).await.unwrap();
    store.execute_raw("ALTER TABLE job_events RENAME TO job_events_away").await.unwrap();
    let recorder = spawn_recorder(&store, &topo);
    let specs: Vec<_> = (0..5).map(|i| spec("noop", &format!("bot-{i}"))).collect();
    for s in &specs {
        publish_event(&ch, &topo, &JobEvent::queued(s)).await;
    }
    // The store refuses every batch and the transaction rolls back as a whole: not even the job rows exist.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    for s in &specs {
        assert!(store.job(&s.job_id).await.unwrap().is_none(), "nothing committed while the store fails");
    }
    store.execute_raw("ALTER TABLE job_events_away RENAME TO job_events").await.unwrap();
    for s in &specs {
        let job = eventually(20, "recorded after the store recovered", || async {
            store.job(&s.job_id).await.unwrap().filter(|j| j.spec.is_some())
        })
        .await;
        assert_eq!(job.status, JobStatus::Queued);
        assert_eq!(store.events(&s.job_id).await.unwrap().len(), 1);
    }
    recorder.stop().await;
    cleanup(&topo, &[]).await;
}

/// A job with events but no row is something the store's own writes never make. An entry
/// that meets such events is refused as inconsistent and parked where `events parked` shows
/// it, and the entries around it are recorded. (Without the check on the insert's row count,
/// the entry was counted as recorded and nothing parked.)
#[tokio::test]
async fn an_entry_meeting_events_of_a_job_without_a_row_is_parked_not_counted() {
    let (store, _dir, _) = sqlite_store().await;
    let topo = topology();
    let (_conn, ch) = channel().await;
    topo.declare_shared(&ch).await.unwrap();
    let (orphan, other) = (spec("noop", "bot-orphan"), spec("noop", "bot-other"));
    store
        .execute_raw(&format!(
            "INSERT INTO job_events (job_id, run, seq, status, attempt, at, body, recorded_at) VALUES ('{}', 0, 0, 'queued', 0, 0, '{{}}', 0)",
            orphan.job_id
        ))
        .await
        .unwrap();
    let recorder = spawn_recorder(&store, &topo);
    publish_event(&ch, &topo, &JobEvent::queued(&orphan)).await;
    publish_event(&ch, &topo, &JobEvent::queued(&other)).await;
    eventually(20, "the other job recorded", || async { store.job(&other.job_id).await.unwrap().filter(|j| j.spec.is_some()) }).await;
    let parked =
        eventually(20, "one entry parked", || async { Some(store.parked_events().await.unwrap()).filter(|p| !p.is_empty()) }).await;
    assert_eq!(parked.len(), 1, "{parked:?}");
    assert!(parked[0].reason.contains("inconsistent"), "{}", parked[0].reason);
    assert_eq!(parked[0].routing_key, "noop.queued");
    assert!(store.job(&orphan.job_id).await.unwrap().is_none(), "nothing of the refused entry committed");
    recorder.stop().await;
    cleanup(&topo, &[]).await;
}
