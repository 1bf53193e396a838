//! Shared set-up: unique topologies, stores on SQLite and PostgreSQL, clean-up.

use std::time::Duration;

use lapin::{
    options::{ExchangeDeleteOptions, QueueDeleteOptions},
    BasicProperties, Channel, Connection,
};
use tokio_util::sync::CancellationToken;
use trainyard::{config::TriggerRule, ops::Ops, recorder::Recorder, store::Store, triggers::Triggers};
use trainyard_common::{amqp, artifacts::ArtifactStore, codec, metrics::ControlMetrics, topology::Topology, JobEvent, JobSpec, Trigger};

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// A trigger rule `name` on `routing_key`: a `job_type` job for the event's `bot`, without
/// params, debounce or coalescing key.
pub fn trigger_rule(name: &str, routing_key: &str, job_type: &str) -> TriggerRule {
    TriggerRule {
        name: name.into(),
        routing_key: routing_key.into(),
        job_type: job_type.into(),
        bot: "{{bot}}".into(),
        params: serde_json::json!({}),
        debounce_s: 0,
        priority: Default::default(),
        coalesce_key: None,
    }
}

/// `triggers` listening in the background until the token is cancelled, once its queue is
/// bound (after 500 ms).
pub async fn listening(triggers: &Triggers) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let (t, s) = (triggers.clone(), stop.clone());
        async move { t.run(s).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    (stop, task)
}

/// A recorder running in the background on `store` until [`RunningRecorder::stop`].
pub struct RunningRecorder {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// Starts a recorder for `topo` writing into `store`.
pub fn spawn_recorder(store: &Store, topo: &Topology) -> RunningRecorder {
    spawn_recorder_with(store, topo, None)
}

/// [`spawn_recorder`] counting in `metrics`.
pub fn spawn_recorder_with(store: &Store, topo: &Topology, metrics: Option<ControlMetrics>) -> RunningRecorder {
    let recorder = Recorder::new(store.clone(), topo.clone(), AMQP_URL, metrics);
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move { recorder.run(stop).await }
    });
    RunningRecorder { stop, task }
}

impl RunningRecorder {
    /// Stops the recorder and waits for it to finish.
    pub async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap();
    }
}
/// PostgreSQL for the tests: `TRAINYARD_TEST_DATABASE_URL`, default the local `test` database.
pub fn pg_url() -> String {
    std::env::var("TRAINYARD_TEST_DATABASE_URL")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A unique topology for one test.
pub fn topology() -> Topology {
    Topology::new(format!("t-{}", uuid::Uuid::new_v4()))
}

pub async fn channel() -> (Connection, Channel) {
    let conn = amqp::connect(AMQP_URL, "trainyard-it").await.unwrap();
    let ch = amqp::confirm_channel(&conn).await.unwrap();
    (conn, ch)
}

/// Deletes every queue and exchange of `topo` for `types`.
pub async fn cleanup(topo: &Topology, types: &[&str]) {
    let (conn, _) = channel().await;
    // Every control plane declares an admission queue per job type it knows (the built-in ones by default).
    let known: Vec<&str> = ["noop", "intent-train"].iter().chain(types).copied().collect();
    let queues = trainyard::serve::queues(topo, &known);
    for q in queues {
        // A failed delete closes the channel: one channel per delete.
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await;
        }
    }
    for x in trainyard::serve::exchanges(topo) {
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch.exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default()).await;
        }
    }
    let _ = conn.close(200, "bye".into()).await;
}

/// A store in a fresh SQLite file; keep the directory alive.
pub async fn sqlite_store() -> (Store, tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/sub/trainyard.db", dir.path().display());
    (Store::open(&url).await.unwrap(), dir, url)
}

/// Runs `check` with the URL of a fresh SQLite store, then with that of a PostgreSQL schema of
/// its own (dropped after).
pub async fn on_sqlite_and_postgres<F, Fut>(check: F)
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let (_store, _dir, url) = sqlite_store().await;
    check(url).await;
    let pg = PgSchema::new().await;
    check(pg.url.clone()).await;
    pg.drop().await;
}

/// A PostgreSQL schema of its own; drop it with [`PgSchema::drop`].
pub struct PgSchema {
    pub url: String,
    name: String,
}

impl PgSchema {
    pub async fn new() -> Self {
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        let base = pg_url();
        let admin = Store::open(&base).await.unwrap();
        admin.execute_raw(&format!("CREATE SCHEMA {name}")).await.unwrap();
        admin.close().await;
        let sep = if base.contains('?') { '&' } else { '?' };
        Self { url: format!("{base}{sep}options=-c%20search_path%3D{name}"), name }
    }
    pub async fn drop(self) {
        let admin = Store::open(&pg_url()).await.unwrap();
        admin.execute_raw(&format!("DROP SCHEMA {} CASCADE", self.name)).await.unwrap();
        admin.close().await;
    }
}

pub fn spec(job_type: &str, bot: &str) -> JobSpec {
    JobSpec::new(job_type, bot, serde_json::json!({}), Trigger::manual("it"))
}

pub async fn publish_event(ch: &Channel, topo: &Topology, ev: &JobEvent) {
    amqp::publish_event(ch, topo, ev).await.unwrap();
}

pub async fn publish_raw(ch: &Channel, exchange: &str, key: &str, body: &[u8], props: BasicProperties) {
    amqp::publish_confirmed(ch, exchange, key, body, props, false).await.unwrap();
}

/// The ready messages of `queue` (a passive declare).
pub async fn message_count(ch: &Channel, queue: &str) -> u32 {
    let passive = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
    ch.queue_declare(queue.into(), passive, Default::default()).await.unwrap().message_count()
}

/// The messages of `queue` delivered and not yet acked, from `rabbitmqctl list_queues` (a
/// passive declare counts only the ready ones).
pub async fn unacked(queue: &str) -> u32 {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args(["list_queues", "name", "messages_unacknowledged", "--quiet", "--no-table-headers"])
        .output()
        .await
        .expect("rabbitmqctl");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed = String::from_utf8_lossy(&out.stdout);
    let row = listed.lines().find_map(|l| l.split_once('\t').filter(|(name, _)| *name == queue));
    row.unwrap_or_else(|| panic!("no queue {queue} in {listed}")).1.trim().parse().expect("a count")
}

/// The properties of a worker's dead letter of `job`: a permanent error, `unknown param`.
/// A SQLite trigger `name` that refuses every insert into `table` whose new row matches `when`
/// (SQL on `NEW`) with `message`, as a constraint would: an error no retry changes.
pub fn refusing_inserts(name: &str, table: &str, when: &str, message: &str) -> String {
    format!("CREATE TRIGGER {name} BEFORE INSERT ON {table} WHEN {when} BEGIN SELECT RAISE(ABORT, '{message}'); END")
}

pub fn worker_dead_letter(job: &JobSpec) -> BasicProperties {
    let mut h = lapin::types::FieldTable::default();
    trainyard_common::headers::set_str(&mut h, trainyard_common::headers::DEAD_REASON, "unknown param `colour`");
    trainyard_common::headers::set_str(&mut h, trainyard_common::headers::DEAD_KIND, "permanent");
    trainyard_common::headers::set_str(&mut h, trainyard_common::headers::JOB_ID, job.job_id.clone());
    BasicProperties::default().with_content_type(codec::MSGPACK.into()).with_headers(h)
}

pub fn msgpack(spec: &JobSpec) -> Vec<u8> {
    codec::to_msgpack(spec).unwrap()
}

/// Polls `f` every 50 ms until it returns `Some`, or panics after `secs`.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A topology with `noop` declared, a SQLite store and the operations on both (the
/// connection and folders kept for the test's life).
pub struct OpsSetup {
    pub topo: trainyard_common::topology::Topology,
    pub _conn: lapin::Connection,
    pub ch: lapin::Channel,
    pub store: trainyard::store::Store,
    pub ops: Ops,
    pub _dirs: (tempfile::TempDir, tempfile::TempDir),
}

/// A fresh [`OpsSetup`].
pub async fn ops_setup() -> OpsSetup {
    let topo = topology();
    let (_conn, ch) = channel().await;
    topo.declare_shared(&ch).await.unwrap();
    topo.declare_job_type(&ch, "noop").await.unwrap();
    let (store, store_dir, _) = sqlite_store().await;
    let artifacts_dir = tempfile::tempdir().unwrap();
    let artifacts = ArtifactStore::open(artifacts_dir.path().to_str().unwrap()).unwrap();
    let ops = Ops::new(store.clone(), artifacts, AMQP_URL, topo.clone()).unwrap();
    OpsSetup { topo, _conn, ch, store, ops, _dirs: (store_dir, artifacts_dir) }
}
