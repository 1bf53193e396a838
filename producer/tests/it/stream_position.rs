//! The recorder's position in the events stream: stored with what it recorded, resumed
//! after a restart (not read again from the stream's first entry), and what an earlier
//! release left in its own recorder queue recorded before that queue is deleted.

use lapin::{
    options::{QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions},
    types::{AMQPValue, FieldTable},
    BasicProperties,
};
use trainyard::store::{Store, StreamBatch, StreamPosition};
use trainyard_common::{codec, event::event_seq, metrics::ControlMetrics, JobEvent, JobStatus};

use crate::helpers::*;

pub(crate) async fn position(store: &Store, topo: &trainyard_common::topology::Topology) -> Option<StreamPosition> {
    store.stream_position(&topo.events_log()).await.unwrap()
}

/// Waits until the stored position is `want`.
pub(crate) async fn until_position(store: &Store, topo: &trainyard_common::topology::Topology, want: StreamPosition, what: &str) {
    eventually(20, what, || async { (position(store, topo).await == Some(want)).then_some(()) }).await;
}

/// Publishes a queued and a started event for each of `n` new jobs.
pub(crate) async fn publish_jobs(ch: &lapin::Channel, topo: &trainyard_common::topology::Topology, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let s = spec("noop", &format!("bot-{i}"));
        publish_event(ch, topo, &JobEvent::queued(&s)).await;
        publish_event(ch, topo, &JobEvent::new(&s, JobStatus::Started, 1, event_seq(1, 0, 0))).await;
        ids.push(s.job_id);
    }
    ids
}

async fn resumes_after_its_position(store: Store) {
    let topo = topology();
    let (_conn, ch) = channel().await;
    topo.declare_shared(&ch).await.unwrap();
    let first = publish_jobs(&ch, &topo, 10).await;
    let recorder = spawn_recorder(&store, &topo);
    let want = StreamPosition { last_offset: 19, entries: 20 };
    until_position(&store, &topo, want, "20 entries recorded").await;
    recorder.stop().await;
    // Restarted: it reads on after offset 19; read from the first entry again, the count would be 20 higher.
    let recorder = spawn_recorder(&store, &topo);
    let second = publish_jobs(&ch, &topo, 5).await;
    let want = StreamPosition { last_offset: 29, entries: 30 };
    until_position(&store, &topo, want, "10 more entries recorded").await;
    // Nothing read again after a while either.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(position(&store, &topo).await, Some(want));
    recorder.stop().await;
    for id in first.iter().chain(&second) {
        assert_eq!(store.job(id).await.unwrap().map(|j| j.status), Some(JobStatus::Started), "job {id}");
    }
    cleanup(&topo, &[]).await;
}

#[tokio::test]
async fn the_recorder_resumes_after_its_stored_position_on_sqlite() {
    let (store, _dir, _) = sqlite_store().await;
    resumes_after_its_position(store).await;
}

#[tokio::test]
async fn the_recorder_resumes_after_its_stored_position_on_postgres() {
    let schema = PgSchema::new().await;
    let store = Store::open(&schema.url).await.unwrap();
    resumes_after_its_position(store.clone()).await;
    store.close().await;
    schema.drop().await;
}

/// Two control planes record from one stream and may commit out of order: the stored
/// position only moves forward, so a batch ending before the stored offset never moves it
/// back (a restart would read entries again), while `entries` counts every batch.
async fn the_position_only_moves_forward(store: Store) {
    let stream = format!("position-test-{}", uuid::Uuid::now_v7());
    let batch = |last_offset, entries| StreamBatch { last_offset, entries, ..Default::default() };
    let at = |last_offset, entries| Some(StreamPosition { last_offset, entries });
    store.record_stream_batch(Some(&stream), &batch(10, 3)).await.unwrap();
    assert_eq!(store.stream_position(&stream).await.unwrap(), at(10, 3));
    store.record_stream_batch(Some(&stream), &batch(5, 2)).await.unwrap();
    assert_eq!(store.stream_position(&stream).await.unwrap(), at(10, 5), "not moved back");
    store.record_stream_batch(Some(&stream), &batch(12, 1)).await.unwrap();
    assert_eq!(store.stream_position(&stream).await.unwrap(), at(12, 6));
}

#[tokio::test]
async fn the_stored_position_only_moves_forward_on_sqlite() {
    let (store, _dir, _) = sqlite_store().await;
    the_position_only_moves_forward(store).await;
}

#[tokio::test]
async fn the_stored_position_only_moves_forward_on_postgres() {
    let schema = PgSchema::new().await;
    let store = Store::open(&schema.url).await.unwrap();
    the_position_only_moves_forward(store.clone()).await;
    store.close().await;
    schema.drop().await;
}

/// Deletes the events stream (its consumers are cancelled) and declares it again, empty.
async fn recreate_stream(ch: &lapin::Channel, topo: &trainyard_common::topology::Topology) {
    let (conn, del) = channel().await;
    del.queue_delete(topo.events_log().as_str().into(), QueueDeleteOptions::default()).await.unwrap();
    let _ = conn.close(200, "bye".into()).await;
    topo.declare_shared(ch).await.unwrap();
}

/// Waits until every job of `ids` is recorded as started.
async fn all_started(store: &Store, ids: &[String]) {
    for id in ids {
        let started = || async { store.job(id).await.unwrap().filter(|j| j.status == JobStatus::Started) };
        eventually(20, &format!("job {id} recorded as started"), started).await;
    }
}

/// A stream deleted and declared again starts its offsets at 0, below the stored position: the
/// recorder finds its last offset short of it, resets the position, counts the restart and
/// records the new stream from its first entry, whether the stream is recreated while it reads
/// (its consumer cancelled, the next session reads the new one) or between two sessions. Without
/// the check every entry up to the old offset is skipped and the first `all_started` times out.
async fn a_recreated_stream_is_read_from_its_first_entry(store: Store) {
    let topo = topology();
    let (_conn, ch) = channel().await;
    topo.declare_shared(&ch).await.unwrap();
    let metrics = ControlMetrics::new(&prometheus::Registry::new(), &[]).unwrap();
    let restarts = |n| {
        let m = metrics.clone();
        move || {
            let m = m.clone();
            async move { (m.stream_restarts.get() == n).then_some(()) }
        }
    };
    let recorder = spawn_recorder_with(&store, &topo, Some(metrics.clone()));
    publish_jobs(&ch, &topo, 10).await;
    let want = StreamPosition { last_offset: 19, entries: 20 };
    until_position(&store, &topo, want, "20 entries recorded").await;
    // Recreated while the recorder reads it: 6 entries, offsets 0 to 5.
    recreate_stream(&ch, &topo).await;
    let second = publish_jobs(&ch, &topo, 3).await;
    all_started(&store, &second).await;
    eventually(20, "one restart counted", restarts(1)).await;
    let want = StreamPosition { last_offset: 5, entries: 6 };
    until_position(&store, &topo, want, "the position in the new stream").await;
    recorder.stop().await;
    // Recreated between two sessions: 4 entries, offsets 0 to 3.
    recreate_stream(&ch, &topo).await;
    let third = publish_jobs(&ch, &topo, 2).await;
    let recorder = spawn_recorder_with(&store, &topo, Some(metrics.clone()));
    all_started(&store, &third).await;
    let want = StreamPosition { last_offset: 3, entries: 4 };
    until_position(&store, &topo, want, "the position in the third stream").await;
    recorder.stop().await;
    assert_eq!(metrics.stream_restarts.get(), 2);
    // A stream that reaches the position is read on after it, without a restart.
    let recorder = spawn_recorder_with(&store, &topo, Some(metrics.clone()));
    let fourth = publish_jobs(&ch, &topo, 1).await;
    all_started(&store, &fourth).await;
    let want = StreamPosition { last_offset: 5, entries: 6 };
    until_position(&store, &topo, want, "read on after the position").await;
    recorder.stop().await;
    assert_eq!(metrics.stream_restarts.get(), 2);
    cleanup(&topo, &[]).await;
}

#[tokio::test]
async fn a_recreated_stream_is_read_from_its_first_entry_on_sqlite() {
    let (store, _dir, _) = sqlite_store().await;
    a_recreated_stream_is_read_from_its_first_entry(store).await;
}

#[tokio::test]
async fn a_recreated_stream_is_read_from_its_first_entry_on_postgres() {
    let schema = PgSchema::new().await;
    let store = Store::open(&schema.url).await.unwrap();
    a_recreated_stream_is_read_from_its_first_entry(store.clone()).await;
    store.close().await;
    schema.drop().await;
}

/// A backup restored after the events stream was deleted and declared again holds a position
/// (offset 19) past the new stream's end (offsets 0 to 5). `rebuild_since` finds that as the
/// recorder does, forgets the position and reads the new stream from its first entry. Without
/// the check it reads on after offset 19 and records none of the new jobs.
#[tokio::test]
async fn a_rebuild_after_the_stream_was_recreated_reads_it_from_its_first_entry() {
    let (store, _dir, _) = sqlite_store().await;
    let topo = topology();
    let (_conn, ch) = channel().await;
    topo.declare_shared(&ch).await.unwrap();
    let recorder = spawn_recorder(&store, &topo);
    publish_jobs(&ch, &topo, 10).await;
    until_position(&store, &topo, StreamPosition { last_offset: 19, entries: 20 }, "20 entries recorded").await;
    recorder.stop().await;
    // The store is now the backup; then the stream goes and comes back with 3 new jobs.
    recreate_stream(&ch, &topo).await;
    let after = publish_jobs(&ch, &topo, 3).await;
    let since = chrono::Utc::now() - chrono::Duration::seconds(60);
    let idle = std::time::Duration::from_secs(1);
    let report = trainyard::rebuild::rebuild_since(&store, &topo, AMQP_URL, idle, since).await.unwrap();
    assert!(report.stream_restarted, "{report:?}");
    assert_eq!((report.read, report.recorded), (6, 6), "{report:?}");
    for id in &after {
        assert_eq!(store.job(id).await.unwrap().map(|j| j.status), Some(JobStatus::Started), "job {id}");
    }
    assert_eq!(position(&store, &topo).await, Some(StreamPosition { last_offset: 5, entries: 6 }));
    // Its position is in the new stream now: a second rebuild reads on after it.
    let again = trainyard::rebuild::rebuild_since(&store, &topo, AMQP_URL, idle, since).await.unwrap();
    assert!(!again.stream_restarted, "{again:?}");
    assert_eq!((again.read, again.recorded), (0, 0), "{again:?}");
    assert_eq!(position(&store, &topo).await, Some(StreamPosition { last_offset: 5, entries: 6 }));
    cleanup(&topo, &[]).await;
}

/// Declares the recorder queue of an earlier release, bound to the events exchange as it was.
pub(crate) async fn legacy_queue(ch: &lapin::Channel, topo: &trainyard_common::topology::Topology) -> String {
    let legacy = topo.legacy_recorder_queue();
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    ch.queue_declare(legacy.as_str().into(), QueueDeclareOptions { durable: true, ..Default::default() }, args).await.unwrap();
    let (exchange, bind) = (topo.events_exchange(), QueueBindOptions::default());
    ch.queue_bind(legacy.as_str().into(), exchange.as_str().into(), "#".into(), bind, FieldTable::default()).await.unwrap();
    legacy
}

/// Waits until `queue` is deleted: a passive declare fails (and closes its channel).
pub(crate) async fn until_deleted(conn: &lapin::Connection, queue: &str) {
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    eventually(20, "the queue deleted", || async {
        let ch = conn.create_channel().await.unwrap();
        ch.queue_declare(queue.into(), passive, FieldTable::default()).await.is_err().then_some(())
    })
    .await;
}

/// An installation of an earlier release: `<prefix>.recorder` bound to the events exchange,
/// holding events the stream does not have (published to the queue alone). The recorder
/// records them, unbinds and deletes the queue.
#[tokio::test]
async fn the_recorder_queue_of_an_earlier_release_is_recorded_then_deleted() {
    let (store, _dir, _) = sqlite_store().await;
    let topo = topology();
    let (conn, ch) = channel().await;
    topo.declare_shared(&ch).await.unwrap();
    let legacy = legacy_queue(&ch, &topo).await;
    let left = spec("noop", "legacy-bot");
    let props = BasicProperties::default().with_content_type(codec::JSON.into()).with_delivery_mode(2);
    let body = codec::to_json(&JobEvent::queued(&left)).unwrap();
    publish_raw(&ch, "", &legacy, &body, props.clone()).await;
    publish_raw(&ch, "", &legacy, b"{not an event", props).await;
    let recorder = spawn_recorder(&store, &topo);
    let job = eventually(20, "the left-over event recorded", || async { store.job(&left.job_id).await.unwrap() }).await;
    assert_eq!(job.status, JobStatus::Queued);
    eventually(20, "the unreadable one parked", || async { (store.parked_count().await.unwrap() == 1).then_some(()) }).await;
    until_deleted(&conn, &legacy).await;
    recorder.stop().await;
    cleanup(&topo, &[]).await;
}

/// A crash between recording a batch and storing its offset, made certain: a trigger fails the
/// first update of the stored position once (a sequence counts the tries; it is not rolled
/// back). With the offset in the batch's transaction, the whole batch rolls back, the session
/// ends, and the next one records it once. Another trigger counts every row written to
/// `job_events` in committed transactions (duplicates included: `BEFORE INSERT` fires for rows
/// `ON CONFLICT DO NOTHING` then skips): it must equal the events published. Were the offset
/// committed apart from (after) the events, the failed batch would be written twice (30, not
/// 20); were it not stored, all of it would.
#[tokio::test]
async fn a_failure_between_the_events_and_their_offset_records_them_once_on_postgres() {
    let schema = PgSchema::new().await;
    let store = Store::open(&schema.url).await.unwrap();
    for sql in [
        "CREATE SEQUENCE position_fault",
        "CREATE TABLE written (n BIGINT)",
        "CREATE FUNCTION count_written() RETURNS trigger AS $$ BEGIN INSERT INTO written VALUES (1); RETURN NEW; END $$ LANGUAGE plpgsql",
        "CREATE TRIGGER count_written BEFORE INSERT ON job_events FOR EACH ROW EXECUTE FUNCTION count_written()",
        "CREATE FUNCTION fail_once() RETURNS trigger AS $$ BEGIN IF nextval('position_fault') = 1 THEN \
         RAISE EXCEPTION 'injected: the offset cannot be stored'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql",
        "CREATE TRIGGER fail_once BEFORE UPDATE ON stream_positions FOR EACH ROW EXECUTE FUNCTION fail_once()",
    ] {
        store.execute_raw(sql).await.unwrap();
    }
    let topo = topology();
    let (_conn, ch) = channel().await;
    topo.declare_shared(&ch).await.unwrap();
    let recorder = spawn_recorder(&store, &topo);
    publish_jobs(&ch, &topo, 5).await;
    let want = StreamPosition { last_offset: 9, entries: 10 };
    until_position(&store, &topo, want, "the first 10 entries recorded").await;
    // The next batch's offset update fails once.
    publish_jobs(&ch, &topo, 5).await;
    let want = StreamPosition { last_offset: 19, entries: 20 };
    until_position(&store, &topo, want, "20 entries recorded").await;
    recorder.stop().await;
    // `SELECT` reports the rows it returned.
    assert_eq!(store.execute_raw("SELECT 1 FROM position_fault WHERE last_value >= 2").await.unwrap(), 1, "the fault fired");
    assert_eq!(store.execute_raw("SELECT n FROM written").await.unwrap(), 20, "each event written once in a committed transaction");
    store.close().await;
    schema.drop().await;
    cleanup(&topo, &[]).await;
}
