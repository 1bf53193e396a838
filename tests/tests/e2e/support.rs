//! Test environment: a unique topology prefix, a temporary artifact store,
//! in-process workers and worker processes.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use futures::StreamExt;
use lapin::{
    options::{
        BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
        QueueDeleteOptions,
    },
    types::FieldTable,
    BasicProperties, Channel, Connection,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use trainyard::submit::{JobWatch, Submitter};
use trainyard_common::{amqp, artifacts::ArtifactStore, headers, topology::Topology, JobEvent, JobSpec, Trigger};
use trainyard_worker::runtime::{joblog::JobLogs, Backoff, Worker, WorkerConfig};

/// The broker consumer timeout the tests' workers are told (`WorkerConfig::consumer_timeout`,
/// `TRAINYARD_CONSUMER_TIMEOUT_S`): 4,100 s, so that jobs of the default `timeout_s` and of
/// the wire contract's example (3,600 s, `../shared/DESIGN.md`) run (a worker keeps a tenth
/// of it for ending a job, and a minute for waiting for a slot). The tests' jobs take seconds,
/// far below the local broker's own value (30 min unless `scripts/lib.sh` raised it), so the
/// broker never closes a channel on them.
pub const CONSUMER_TIMEOUT_S: u64 = 4100;

pub const URL: &str = trainyard_common::config::DEFAULT_AMQP_URL;

pub struct Env {
    pub topo: Topology,
    pub artifacts_dir: tempfile::TempDir,
    pub artifacts: ArtifactStore,
    pub conn: Connection,
    pub ch: Channel,
    pub types: Vec<String>,
}

pub struct WorkerHandle {
    pub shutdown: CancellationToken,
    pub join: JoinHandle<()>,
}

impl WorkerHandle {
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.join).await.expect("worker did not stop in time").expect("worker task panicked");
    }
}

impl Env {
    /// A fresh prefix with `types` declared.
    pub async fn new(types: &[&str]) -> Self {
        let topo = Topology::new(format!("t-{}", uuid::Uuid::new_v4().simple()));
        let conn = amqp::connect(URL, "trainyard-tests").await.expect("RabbitMQ must run on localhost:5672 (scripts/test.sh starts it)");
        let ch = amqp::confirm_channel(&conn).await.unwrap();
        for t in types {
            topo.declare_job_type(&ch, t).await.unwrap();
        }
        let artifacts_dir = tempfile::tempdir().unwrap();
        let artifacts = ArtifactStore::open(artifacts_dir.path().to_str().unwrap()).unwrap();
        Self { topo, artifacts_dir, artifacts, conn, ch, types: types.iter().map(|s| s.to_string()).collect() }
    }

    pub fn config(&self) -> WorkerConfig {
        let mut cfg = WorkerConfig::new(URL, self.topo.clone(), self.artifacts.clone());
        cfg.backoff = Backoff { base_ms: 100, max_ms: 400 };
        cfg.grace_period = Duration::from_secs(2);
        cfg.reconnect_max = Duration::from_secs(2);
        cfg.consumer_timeout = Duration::from_secs(CONSUMER_TIMEOUT_S);
        cfg
    }

    /// Points a `trainyard` or `trainyard-worker` process at this environment (prefix, broker,
    /// artifacts, `data_dir`), with warnings only and its output discarded.
    pub fn quiet_process(&self, c: &mut Command, data_dir: &std::path::Path) {
        c.env("TRAINYARD_PREFIX", self.topo.prefix())
            .env("TRAINYARD_AMQP_URL", URL)
            .env("TRAINYARD_ARTIFACTS", self.artifacts_dir.path())
            .env("TRAINYARD_DATA_DIR", data_dir)
            .env("TRAINYARD_CONSUMER_TIMEOUT_S", CONSUMER_TIMEOUT_S.to_string())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
    }

    /// Starts an in-process worker for `types`.
    pub fn spawn_worker(&self, types: &[&str], tweak: impl FnOnce(&mut WorkerConfig)) -> WorkerHandle {
        self.spawn_worker_with_metrics(types, &prometheus::Registry::new(), tweak)
    }

    /// Starts an in-process worker for `types` whose metrics go to `metrics`.
    pub fn spawn_worker_with_metrics(
        &self,
        types: &[&str],
        metrics: &prometheus::Registry,
        tweak: impl FnOnce(&mut WorkerConfig),
    ) -> WorkerHandle {
        let types: Vec<String> = types.iter().map(|s| s.to_string()).collect();
        let registry = trainyard_worker::handlers::builtin().only(&types).unwrap();
        self.spawn_worker_serving(registry, metrics, tweak)
    }

    /// Starts an in-process worker for the job types of `registry`.
    pub fn spawn_worker_serving(
        &self,
        registry: trainyard_worker::handler::Registry,
        metrics: &prometheus::Registry,
        tweak: impl FnOnce(&mut WorkerConfig),
    ) -> WorkerHandle {
        let mut cfg = self.config();
        tweak(&mut cfg);
        let worker = Worker::new(cfg, registry, metrics, JobLogs::default()).unwrap();
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let join = tokio::spawn(async move { worker.run(token).await.expect("worker failed") });
        WorkerHandle { shutdown, join }
    }

    pub fn submitter(&self) -> Submitter {
        Submitter::new(URL, self.topo.clone()).unwrap()
    }

    pub fn spec(&self, job_type: &str, params: serde_json::Value) -> JobSpec {
        JobSpec::new(job_type, "test-bot", params, Trigger::manual("tests"))
    }

    /// Submits and follows a job; returns every event up to the terminal one.
    pub async fn run_job(&self, spec: &JobSpec, within: Duration) -> Vec<JobEvent> {
        let sub = self.submitter();
        let mut watch = sub.watch(spec).await.unwrap();
        sub.submit(spec).await.unwrap();
        collect_until_terminal(&mut watch, within).await
    }

    pub async fn watch(&self, spec: &JobSpec) -> JobWatch {
        self.submitter().watch(spec).await.unwrap()
    }

    /// Publishes raw bytes to the work exchange (as any client could).
    pub async fn publish_raw(&self, routing_key: &str, body: &[u8], props: BasicProperties) {
        self.ch
            .basic_publish(self.topo.jobs_exchange().into(), routing_key.into(), BasicPublishOptions::default(), body, props)
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// Drains a queue with basic.get: (body, dead reason header, attempt header) per message.
    pub async fn drain(&self, queue: &str) -> Vec<(Vec<u8>, Option<String>, u32)> {
        let mut out = Vec::new();
        let ch = self.conn.create_channel().await.unwrap();
        loop {
            match ch.basic_get(queue.into(), BasicGetOptions { no_ack: false }).await {
                Ok(Some(msg)) => {
                    let hdrs = msg.delivery.properties.headers().as_ref();
                    out.push((msg.delivery.data.clone(), headers::string(hdrs, headers::DEAD_REASON), headers::attempt(hdrs)));
                    msg.delivery.acker.ack(lapin::options::BasicAckOptions::default()).await.unwrap();
                }
                Ok(None) => break,
                Err(e) => panic!("basic.get {queue}: {e}"),
            }
        }
        out
    }

    /// Number of ready messages in a queue.
    pub async fn ready(&self, queue: &str) -> u32 {
        self.queue(queue).await.message_count()
    }

    /// Number of consumers of a queue.
    pub async fn consumers(&self, queue: &str) -> u32 {
        self.queue(queue).await.consumer_count()
    }

    /// A queue's counts, from a passive declare.
    async fn queue(&self, queue: &str) -> lapin::Queue {
        let passive = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
        self.ch.queue_declare(queue.into(), passive, FieldTable::default()).await.unwrap()
    }

    /// Deletes every queue and exchange of this prefix.
    pub async fn cleanup(self) {
        let t = &self.topo;
        // Every `trainyard serve` declares an admission queue per job type it knows (the built-in ones by default).
        let types: Vec<&str> = ["noop", "intent-train"].into_iter().chain(self.types.iter().map(String::as_str)).collect();
        let mut queues = trainyard::serve::queues(t, &types);
        for ty in &self.types {
            for d in [100u64, 200, 400] {
                queues.push(t.retry_queue(ty, d));
            }
        }
        // A fresh connection: a test may have had its own closed under it.
        let conn = amqp::connect(URL, "trainyard-tests-cleanup").await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        for q in queues {
            let _ = ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await;
        }
        for x in trainyard::serve::exchanges(t) {
            let _ = ch.exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default()).await;
        }
        let _ = conn.close(200, "done".into()).await;
        let _ = self.conn.close(200, "done".into()).await;
    }

    /// Starts a `trainyard-worker run` process for this environment.
    pub fn worker_process(&self, types: &str, extra: &[&str]) -> Killed {
        Killed(
            Command::new(bin("trainyard-worker"))
                .args(["run", "--types", types, "--log-format", "text", "--retry-base-ms", "100"])
                .args(extra)
                .env("TRAINYARD_PREFIX", self.topo.prefix())
                .env("TRAINYARD_ARTIFACTS", self.artifacts_dir.path())
                .env("TRAINYARD_AMQP_URL", URL)
                .env("TRAINYARD_CONSUMER_TIMEOUT_S", CONSUMER_TIMEOUT_S.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("failed to start trainyard-worker"),
        )
    }
}

pub async fn collect_until_terminal(watch: &mut JobWatch, within: Duration) -> Vec<JobEvent> {
    let mut events = Vec::new();
    let res = tokio::time::timeout(within, async {
        while let Some(ev) = watch.next().await {
            let ev = ev.unwrap();
            let done = ev.status.is_terminal();
            events.push(ev);
            if done {
                return;
            }
        }
    })
    .await;
    assert!(res.is_ok(), "no terminal event within {within:?}; saw {:?}", events.iter().map(|e| e.status).collect::<Vec<_>>());
    events
}

/// Every event that arrives within `window` (a test's "nothing more comes" check).
pub async fn events_within(watch: &mut JobWatch, window: Duration) -> Vec<JobEvent> {
    let mut seen = Vec::new();
    let _ = tokio::time::timeout(window, async {
        while let Some(ev) = watch.next().await {
            seen.push(ev.unwrap());
        }
    })
    .await;
    seen
}

/// Waits for the next event with `status` (other events are returned too).
pub async fn wait_for(watch: &mut JobWatch, status: trainyard_common::JobStatus, within: Duration) -> Vec<JobEvent> {
    let mut seen = Vec::new();
    tokio::time::timeout(within, async {
        while let Some(ev) = watch.next().await {
            let ev = ev.unwrap();
            let hit = ev.status == status;
            seen.push(ev);
            if hit {
                return;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {status} event within {within:?}"));
    seen
}

/// The value of an unlabelled counter (or of a vector's first series) in `registry`; `None`
/// when it is not registered.
pub fn counter(registry: &prometheus::Registry, name: &str) -> Option<f64> {
    registry.gather().iter().find(|f| f.name() == name).map(|f| f.get_metric()[0].get_counter().get_value())
}

/// Path of a workspace binary (built by `cargo build --bins`, which scripts/test.sh runs first).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|p| p.parent()).unwrap();
    let path = dir.join(name);
    assert!(path.exists(), "{} is missing: run `cargo build --bins` first", path.display());
    path
}

/// A PostgreSQL schema of its own in the test database (`TRAINYARD_TEST_DATABASE_URL`, default
/// the local `test` database); drop it with [`PgSchema::drop`].
pub struct PgSchema {
    pub url: String,
    name: String,
}

impl PgSchema {
    fn base() -> String {
        std::env::var("TRAINYARD_TEST_DATABASE_URL")
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".into())
    }
    pub async fn new() -> Self {
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        let base = Self::base();
        let admin = trainyard::store::Store::open(&base).await.unwrap();
        admin.execute_raw(&format!("CREATE SCHEMA {name}")).await.unwrap();
        admin.close().await;
        let sep = if base.contains('?') { '&' } else { '?' };
        Self { url: format!("{base}{sep}options=-c%20search_path%3D{name}"), name }
    }
    pub async fn drop(self) {
        let admin = trainyard::store::Store::open(&Self::base()).await.unwrap();
        admin.execute_raw(&format!("DROP SCHEMA {} CASCADE", self.name)).await.unwrap();
        admin.close().await;
    }
}

/// Every event of an environment's `noop` jobs, from an exclusive queue of its own.
pub struct NoopEvents {
    _conn: Connection,
    consumer: lapin::Consumer,
    /// Every event read so far, in arrival order.
    pub seen: Vec<JobEvent>,
}

impl NoopEvents {
    /// Binds the queue before returning: every event published afterwards is seen.
    pub async fn open(env: &Env, name: &str) -> Self {
        let conn = amqp::connect(URL, name).await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        let opts = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
        let q = ch.queue_declare("".into(), opts, FieldTable::default()).await.unwrap();
        let exchange = env.topo.events_exchange();
        ch.queue_bind(q.name().clone(), exchange.as_str().into(), "noop.*".into(), QueueBindOptions::default(), FieldTable::default())
            .await
            .unwrap();
        let opts = BasicConsumeOptions { no_ack: true, ..Default::default() };
        let consumer = ch.basic_consume(q.name().clone(), "".into(), opts, FieldTable::default()).await.unwrap();
        Self { _conn: conn, consumer, seen: Vec::new() }
    }

    /// Reads events until `done(all seen so far)`, or panics after `within`.
    pub async fn until(&mut self, within: Duration, done: impl Fn(&[JobEvent]) -> bool) -> &[JobEvent] {
        let res = tokio::time::timeout(within, async {
            while !done(&self.seen) {
                let d = self.consumer.next().await.expect("events consumer ended").unwrap();
                let ct = d.properties.content_type().as_ref().map(|s| s.as_str().to_string());
                self.seen.push(trainyard::recorder::decode_event(ct.as_deref(), &d.data).unwrap());
            }
        })
        .await;
        assert!(res.is_ok(), "timed out; saw {} events: {:?}", self.seen.len(), count_by_status(&self.seen));
        &self.seen
    }
}

/// How many of `events` have each status.
pub fn count_by_status(events: &[JobEvent]) -> std::collections::BTreeMap<trainyard_common::JobStatus, usize> {
    let mut n = std::collections::BTreeMap::new();
    for e in events {
        *n.entry(e.status).or_default() += 1;
    }
    n
}

/// A child process that is stopped when dropped, so that a test failing half-way leaves no
/// process behind: `SIGTERM`, up to 10 s to exit, then `SIGKILL`, and reaped. One that has
/// already exited is left alone (its pid may be another process's by now).
pub struct Killed(pub Child);

impl std::ops::Deref for Killed {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Killed {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        if !matches!(self.0.try_wait(), Ok(None)) {
            return;
        }
        let _ = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while matches!(self.0.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A job handler that sleeps its `ms` param without heeding a stop or a timeout, counting the
/// runs at once (a training step that cannot be interrupted).
#[derive(Debug, Clone, Default)]
pub struct Stubborn {
    now: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    most: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Stubborn {
    /// The most runs at once so far.
    pub fn most_at_once(&self) -> usize {
        self.most.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[async_trait::async_trait]
impl trainyard_worker::handler::JobHandler for Stubborn {
    fn validate(&self, _: &serde_json::Value) -> Result<(), trainyard_worker::handler::JobError> {
        Ok(())
    }
    async fn run(&self, ctx: trainyard_worker::handler::JobContext) -> Result<serde_json::Value, trainyard_worker::handler::JobError> {
        use std::sync::atomic::Ordering;
        let at_once = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(at_once, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(ctx.spec.params["ms"].as_u64().unwrap_or(0))).await;
        self.now.fetch_sub(1, Ordering::SeqCst);
        Ok(serde_json::json!({}))
    }
}
