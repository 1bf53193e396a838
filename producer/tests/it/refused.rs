//! Entries the job store refuses for what they hold: parked with the store's reason, and the
//! entries around them recorded, by every reader of the events stream (the recorder, its
//! upgrade path, `store rebuild`).

use lapin::BasicProperties;
use trainyard::store::{Store, StreamPosition};
use trainyard_common::{codec, JobEvent, JobStatus};

use crate::helpers::*;
use crate::stream_position::{legacy_queue, position, publish_jobs, until_deleted, until_position};

/// A SQLite trigger that refuses the events of job `id` as a constraint would.
fn refuse_on_sqlite(id: &str) -> String {
    refusing_inserts("refuse", "job_events", &format!("NEW.job_id = '{id}'"), "injected: refused")
}

/// Checks that the only parked entry is `routing_key`'s, refused by the store's trigger.
async fn parked_by_the_store(store: &Store, routing_key: &str) {
    let parked = store.parked_events().await.unwrap();
    assert_eq!(parked.len(), 1, "{parked:?}");
    assert!(parked[0].reason.starts_with("the job store refused it") && parked[0].reason.contains("injected"), "{}", parked[0].reason);
    assert_eq!(parked[0].routing_key, routing_key);
}

/// An entry the store refuses for what it holds (here a trigger refuses one job's events with
/// a data error, which no retry changes) is parked with the store's reason, and the entries
/// around it, in its batch and after it, are recorded: read again and again, it would stop
/// the recorder for good (without the entry-by-entry fallback this test times out at the
/// first `eventually`).
async fn an_entry_the_store_refuses_is_parked(store: Store, refuse: impl FnOnce(&str) -> Vec<String>) {
    let topo = topology();
    let (_conn, ch) = channel().await;
    topo.declare_shared(&ch).await.unwrap();
    let refused = spec("noop", "refused-bot");
    for sql in refuse(&refused.job_id) {
        store.execute_raw(&sql).await.unwrap();
    }
    let before = publish_jobs(&ch, &topo, 3).await;
    publish_event(&ch, &topo, &JobEvent::queued(&refused)).await;
    let after = publish_jobs(&ch, &topo, 3).await;
    // Published before the recorder starts, so the refused entry most likely shares a batch.
    let recorder = spawn_recorder(&store, &topo);
    let want = StreamPosition { last_offset: 12, entries: 13 };
    until_position(&store, &topo, want, "13 entries past").await;
    recorder.stop().await;
    for id in before.iter().chain(&after) {
        assert_eq!(store.job(id).await.unwrap().map(|j| j.status), Some(JobStatus::Started), "job {id}");
    }
    assert_eq!(store.job(&refused.job_id).await.unwrap().map(|j| j.status), None, "the refused job is not recorded");
    parked_by_the_store(&store, "noop.queued").await;
    cleanup(&topo, &[]).await;
}

#[tokio::test]
async fn an_entry_the_store_refuses_is_parked_and_the_rest_recorded_on_sqlite() {
    let (store, _dir, _) = sqlite_store().await;
    an_entry_the_store_refuses_is_parked(store, |id| vec![refuse_on_sqlite(id)]).await;
}

#[tokio::test]
async fn an_entry_the_store_refuses_is_parked_and_the_rest_recorded_on_postgres() {
    let schema = PgSchema::new().await;
    let store = Store::open(&schema.url).await.unwrap();
    an_entry_the_store_refuses_is_parked(store.clone(), |id| {
        vec![
            format!(
                "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN IF NEW.job_id = '{id}' THEN \
                 RAISE EXCEPTION 'injected: refused' USING ERRCODE = '22023'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql"
            ),
            "CREATE TRIGGER refuse BEFORE INSERT ON job_events FOR EACH ROW EXECUTE FUNCTION refuse()".into(),
        ]
    })
    .await;
    store.close().await;
    schema.drop().await;
}

/// `store rebuild` records as the recorder does: an entry the new store refuses for what it
/// holds is parked and counted as skipped, and the rebuild goes on past it. (It used to stop
/// with the store's error, leaving a store begun that it refuses to rebuild into again.)
#[tokio::test]
async fn a_rebuild_parks_an_entry_the_store_refuses_and_goes_on() {
    let topo = topology();
    let (_conn, ch) = channel().await;
    topo.declare_shared(&ch).await.unwrap();
    let refused = spec("noop", "refused-bot");
    let before = publish_jobs(&ch, &topo, 2).await;
    publish_event(&ch, &topo, &JobEvent::queued(&refused)).await;
    let after = publish_jobs(&ch, &topo, 2).await;
    let (store, _dir, _) = sqlite_store().await;
    store.execute_raw(&refuse_on_sqlite(&refused.job_id)).await.unwrap();
    let report = trainyard::rebuild::rebuild(&store, &topo, AMQP_URL, std::time::Duration::from_secs(1)).await.unwrap();
    assert_eq!((report.read, report.recorded, report.skipped), (9, 8, 1), "{report:?}");
    for id in before.iter().chain(&after) {
        assert_eq!(store.job(id).await.unwrap().map(|j| j.status), Some(JobStatus::Started), "job {id}");
    }
    parked_by_the_store(&store, "noop.queued").await;
    assert_eq!(position(&store, &topo).await, Some(StreamPosition { last_offset: 8, entries: 9 }));
    cleanup(&topo, &[]).await;
}

/// The upgrade path records as the recorder does: an entry of an earlier release's recorder
/// queue that the store refuses is parked, the others are recorded, the queue is deleted and
/// the stream read. (The session used to end at that entry, again and again, before it ever
/// read the stream.)
#[tokio::test]
async fn an_entry_of_an_earlier_releases_queue_the_store_refuses_is_parked() {
    let (store, _dir, _) = sqlite_store().await;
    let topo = topology();
    let (conn, ch) = channel().await;
    topo.declare_shared(&ch).await.unwrap();
    let legacy = legacy_queue(&ch, &topo).await;
    let (left, refused) = (spec("noop", "legacy-bot"), spec("noop", "refused-bot"));
    store.execute_raw(&refuse_on_sqlite(&refused.job_id)).await.unwrap();
    let props = BasicProperties::default().with_content_type(codec::JSON.into()).with_delivery_mode(2);
    for s in [&left, &refused] {
        publish_raw(&ch, "", &legacy, &codec::to_json(&JobEvent::queued(s)).unwrap(), props.clone()).await;
    }
    let on_stream = publish_jobs(&ch, &topo, 1).await;
    let recorder = spawn_recorder(&store, &topo);
    until_position(&store, &topo, StreamPosition { last_offset: 1, entries: 2 }, "the stream read").await;
    until_deleted(&conn, &legacy).await;
    recorder.stop().await;
    for id in [&left.job_id, &on_stream[0]] {
        assert!(store.job(id).await.unwrap().is_some(), "job {id} recorded");
    }
    assert!(store.job(&refused.job_id).await.unwrap().is_none());
    // Published to the queue by name: that is its routing key.
    parked_by_the_store(&store, &legacy).await;
    cleanup(&topo, &[]).await;
}

/// `events reprocess` records what now reads beside an entry the store still refuses, which
/// stays parked with the store's reason: the one transaction of them all failed, every time,
/// and nothing was recorded.
#[tokio::test]
async fn reprocess_records_the_entries_beside_one_the_store_still_refuses() {
    let (store, _dir, _) = sqlite_store().await;
    let (refused, readable) = (spec("noop", "refused-bot"), spec("noop", "readable-bot"));
    store.execute_raw(&refuse_on_sqlite(&refused.job_id)).await.unwrap();
    let parked: Vec<_> = [&refused, &readable]
        .iter()
        .map(|s| {
            let body = serde_json::to_vec(&JobEvent::queued(s)).unwrap();
            trainyard::store::ParkedEvent::new("noop.queued", Some(codec::JSON), &body, "parked by an earlier release")
        })
        .collect();
    store.park(&parked).await.unwrap();
    let decode =
        |p: &trainyard::store::ParkedEvent, body: &[u8]| trainyard::audit::decode_parked(&p.routing_key, p.content_type.as_deref(), body);
    assert_eq!(store.reprocess_parked(decode).await.unwrap(), (1, 1), "one recorded, one still parked");
    assert_eq!(store.job(&readable.job_id).await.unwrap().map(|j| j.status), Some(JobStatus::Queued));
    assert_eq!(store.job(&refused.job_id).await.unwrap(), None);
    parked_by_the_store(&store, "noop.queued").await;
}
