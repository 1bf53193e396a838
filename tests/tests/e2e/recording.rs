//! The recorder reads the events stream and keeps its offset in the job store, in the same
//! transaction as the entries it recorded: a control plane SIGKILLed mid-recording and
//! started again records every entry exactly once, on SQLite and on PostgreSQL.
//!
//! How "exactly once" is seen: the store counts, per stream, the entries it recorded
//! (`StreamPosition::entries`, added to in each batch's transaction), so an entry recorded
//! twice counts twice. After the kills, that count must equal the number of entries
//! published and the stored offset must be the last one: an offset not stored, or not used
//! on start, makes the restarted recorder read from the first entry again (count too
//! high). An offset committed apart from its entries is caught here only when a kill lands
//! between the two commits (rare); producer `stream_position::a_failure_between_…` makes
//! that failure certain.

use std::time::{Duration, Instant};

use futures::future::try_join_all;
use trainyard::store::{Store, StreamPosition};
use trainyard_common::{amqp, event::event_seq, JobEvent, JobStatus};

use crate::{
    series::{free_port, spawn_serve},
    support::{Env, Killed, PgSchema},
};

const JOBS: usize = 4_000;
const EVENTS_PER_JOB: usize = 3;
const KILLS: usize = 3;

fn start_serve(env: &Env, db_url: &str, data: &std::path::Path) -> Killed {
    spawn_serve(env, db_url, data, free_port(), &["--types".as_ref(), "noop".as_ref()])
}

/// Publishes `JOBS` jobs' queued, started and succeeded events (confirmed) before any recorder runs.
async fn publish_events(env: &Env) -> Vec<String> {
    let mut ids = Vec::with_capacity(JOBS);
    let mut events = Vec::with_capacity(JOBS * EVENTS_PER_JOB);
    for i in 0..JOBS {
        let spec = env.spec("noop", serde_json::json!({"sleep_ms": i}));
        events.push(JobEvent::queued(&spec));
        events.push(JobEvent::new(&spec, JobStatus::Started, 1, event_seq(1, 0, 0)));
        events.push(JobEvent::new(&spec, JobStatus::Succeeded, 1, event_seq(1, 0, 2)));
        ids.push(spec.job_id.clone());
    }
    for chunk in events.chunks(256) {
        try_join_all(chunk.iter().map(|e| amqp::publish_event(&env.ch, &env.topo, e))).await.expect("publish events");
    }
    ids
}

async fn position(store: &Store, env: &Env) -> Option<StreamPosition> {
    store.stream_position(&env.topo.events_log()).await.expect("read the stream position")
}

async fn kill_mid_recording_and_restart(db_url: &str) {
    let env = Env::new(&["noop"]).await;
    let store = Store::open(db_url).await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let ids = publish_events(&env).await;
    let total = (JOBS * EVENTS_PER_JOB) as i64;
    let mut serve = start_serve(&env, db_url, data.path());
    let mut kills = 0;
    // SIGKILL at a quarter, half and three quarters of the stream recorded, restarting each time.
    for k in 1..=KILLS as i64 {
        let at = total * k / (KILLS as i64 + 1);
        let deadline = Instant::now() + Duration::from_secs(180);
        while position(&store, &env).await.is_none_or(|p| p.last_offset + 1 < at) {
            assert!(Instant::now() < deadline, "the recorder did not reach offset {at}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let reached = position(&store, &env).await.unwrap();
        if reached.last_offset + 1 >= total {
            break;
        }
        serve.0.kill().unwrap();
        serve.0.wait().unwrap();
        kills += 1;
        serve = start_serve(&env, db_url, data.path());
    }
    assert_eq!(kills, KILLS, "the recorder finished before every kill: the test proves less than it says");
    let deadline = Instant::now() + Duration::from_secs(180);
    while position(&store, &env).await.is_none_or(|p| p.last_offset + 1 < total) {
        assert!(Instant::now() < deadline, "the recorder did not catch up after the kills: {:?}", position(&store, &env).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(serve);
    let end = position(&store, &env).await.unwrap();
    assert_eq!(end, StreamPosition { last_offset: total - 1, entries: total }, "every stream entry recorded exactly once");
    for id in &ids {
        let job = store.job(id).await.unwrap().unwrap_or_else(|| panic!("job {id} missing"));
        assert_eq!(job.status, JobStatus::Succeeded, "job {id}");
        assert_eq!(store.events(id).await.unwrap().len(), EVENTS_PER_JOB, "job {id}");
    }
    store.close().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_control_plane_sigkilled_mid_recording_records_every_entry_once_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    kill_mid_recording_and_restart(&format!("sqlite://{}/store.db", dir.path().display())).await;
}

#[tokio::test]
async fn a_control_plane_sigkilled_mid_recording_records_every_entry_once_on_postgres() {
    let pg = PgSchema::new().await;
    kill_mid_recording_and_restart(&pg.url).await;
    pg.drop().await;
}
