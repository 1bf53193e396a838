//! Latest wins, decided by the control plane's coalescer called directly (no worker): which
//! jobs of a key get a cancel marker, in the orders and states a live system can show it.

use std::collections::BTreeMap;

use trainyard::{
    coalesce::{key_dir, Coalescer},
    store::Store,
};
use trainyard_common::{amqp, artifacts::keys, event::event_seq, job::Priority, JobEvent, JobSpec, JobStatus, Trigger};

use crate::support::{Env, URL};

/// A coalescer over a SQLite store of its own, and a confirm channel for it.
struct Rig {
    env: Env,
    _dir: tempfile::TempDir,
    store: Store,
    coalescer: Coalescer,
    conn: lapin::Connection,
    ch: lapin::Channel,
}

impl Rig {
    async fn new(name: &str) -> Self {
        let env = Env::new(&["noop"]).await;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("sqlite://{}/jobs.db", dir.path().display())).await.unwrap();
        let coalescer = Coalescer::new(store.clone(), env.artifacts.clone(), env.topo.clone(), URL, BTreeMap::new());
        let conn = amqp::connect(URL, name).await.unwrap();
        let ch = amqp::confirm_channel(&conn).await.unwrap();
        Self { env, _dir: dir, store, coalescer, conn, ch }
    }

    async fn coalesce(&self, spec: &JobSpec) {
        self.coalescer.coalesce(&self.ch, spec).await.unwrap();
    }

    /// The cancel marker of job `id`, as text.
    async fn marker(&self, id: &str) -> Option<String> {
        self.env.artifacts.get(&keys::cancel_marker(id)).await.unwrap().map(|m| String::from_utf8_lossy(&m).into_owned())
    }

    /// Records that `spec` was queued and then ended `status`.
    async fn ended(&self, spec: &JobSpec, status: JobStatus) {
        self.store.record_events(&[JobEvent::queued(spec), JobEvent::new(spec, status, 1, event_seq(1, 0, 9))]).await.unwrap();
    }

    async fn close(self) {
        self.conn.close(200, "done".into()).await.unwrap();
        self.store.close().await;
        self.env.cleanup().await;
    }
}

/// A noop job of `bot` with the coalescing key `key` (its bot's by default), submitted a
/// second after `after` when given.
fn keyed(bot: &str, key: Option<&str>, after: Option<&JobSpec>) -> JobSpec {
    let mut spec = JobSpec::new("noop", bot, serde_json::json!({"sleep_ms": 10}), Trigger::manual("test"));
    spec.priority = Priority::Normal;
    spec.coalesce_key = Some(key.map_or_else(|| spec.bot_coalesce_key(), str::to_string));
    if let Some(earlier) = after {
        spec.submitted_at = earlier.submitted_at + chrono::Duration::seconds(1);
    }
    spec
}

/// One job queued twice (`submit --coalesce --idempotency-key K` run again: the same id, a
/// later `submitted_at`) is not superseded by itself: it used to get a cancel marker naming
/// itself and never run. Nor does a superseded job queued again supersede the job that
/// superseded it. A record under the key that cannot be read is passed over: coalescing
/// goes on for the key (it used to end the session on every redelivery, for ever).
#[tokio::test]
async fn a_job_queued_twice_is_not_superseded_by_itself_and_an_unreadable_record_jams_nothing() {
    let rig = Rig::new("coalesce-twice").await;
    let first = keyed("twice-bot", None, None);
    let mut again = first.clone();
    again.submitted_at += chrono::Duration::seconds(1);
    rig.coalesce(&first).await;
    rig.coalesce(&again).await;
    assert!(rig.marker(&first.job_id).await.is_none(), "a job queued twice is not superseded by itself");

    let key = first.coalesce_key.clone().unwrap();
    rig.env.artifacts.put(&format!("{}00000000000000000001-garbage.json", key_dir(&key)), "{not json").await.unwrap();
    let newer = keyed("twice-bot", None, Some(&again));
    rig.coalescer.coalesce(&rig.ch, &newer).await.expect("an unreadable record is passed over");
    let m = rig.marker(&first.job_id).await.expect("the older job is superseded by the newer one");
    assert!(m.contains(&newer.job_id), "{m}");
    assert!(rig.marker(&newer.job_id).await.is_none());
    // The superseded job queued once more, latest of all: it will not run, so it supersedes
    // nothing (it used to mark the newer job too, and neither ran).
    let mut third = first.clone();
    third.submitted_at = newer.submitted_at + chrono::Duration::seconds(1);
    rig.coalesce(&third).await;
    assert!(rig.marker(&newer.job_id).await.is_none(), "the newer job still runs");
    rig.close().await;
}

/// An older job whose `queued` event reaches the coalescer after the newest job of its key has
/// succeeded (its submitter was slow to publish the event) is superseded: it ran after the
/// newest, and its result (a model of older data) replaced the newest's. A newest job that ended
/// without a result (cancelled before it ran, dead) supersedes nothing: then the older job runs;
/// nor does one that succeeded supersede an operator's dead-letter replay of an older job.
#[tokio::test]
async fn an_older_job_queued_after_the_newest_ran_is_superseded() {
    let rig = Rig::new("coalesce-late").await;
    let pair = |bot: &str| {
        let older = keyed(bot, None, None);
        let newest = keyed(bot, None, Some(&older));
        (older, newest)
    };
    let (older, newest) = pair("late-bot");
    rig.coalesce(&newest).await;
    rig.ended(&newest, JobStatus::Succeeded).await;
    rig.coalesce(&older).await;
    let m = rig.marker(&older.job_id).await.expect("the older job queued after the newest ran is superseded");
    assert!(m.contains(&newest.job_id), "{m}");

    for (bot, end) in [("cancelled-bot", JobStatus::Cancelled), ("dead-bot", JobStatus::Dead)] {
        let (older, newest) = pair(bot);
        rig.coalesce(&newest).await;
        rig.ended(&newest, end).await;
        rig.coalesce(&older).await;
        assert_eq!(rig.marker(&older.job_id).await, None, "the newest ended {end:?}: the older one runs");
    }

    let (older, newest) = pair("replay-bot");
    rig.coalesce(&newest).await;
    rig.ended(&newest, JobStatus::Succeeded).await;
    rig.coalescer.coalesce_run(&rig.ch, &older, 1).await.unwrap();
    assert_eq!(rig.marker(&older.job_id).await, None, "a replay of the older job runs");
    rig.close().await;
}

/// A coalescing key is its job type's own: a newer job of another type with the same key
/// supersedes nothing (a newer evaluation ended the older training it was meant to follow), and
/// the newer job of the first type supersedes only its own type's older one.
#[tokio::test]
async fn a_coalescing_key_is_its_job_types_own() {
    let rig = Rig::new("coalesce-types").await;
    let train = keyed("typed-bot", Some("nightly"), None);
    let mut eval = keyed("typed-bot", Some("nightly"), Some(&train));
    eval.job_type = "intent-eval".into();
    let train2 = keyed("typed-bot", Some("nightly"), Some(&eval));
    rig.coalesce(&train).await;
    rig.coalesce(&eval).await;
    assert!(rig.marker(&train.job_id).await.is_none(), "a newer job of another type with the key supersedes nothing");
    rig.coalesce(&train2).await;
    assert!(rig.marker(&train.job_id).await.is_some(), "the newer job of its own type supersedes it");
    assert!(rig.marker(&eval.job_id).await.is_none(), "nor is a job of another type superseded");
    assert!(rig.marker(&train2.job_id).await.is_none());
    rig.close().await;
}
