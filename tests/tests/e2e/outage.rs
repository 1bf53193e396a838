//! An artifact-store outage delays jobs; it does not end the worker's broker
//! session, stop the jobs on it, or spend their delivery limit.

use std::{
    fmt,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use async_trait::async_trait;
use futures::{stream::BoxStream, StreamExt};
use object_store::{
    memory::InMemory, path::Path, CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use serde_json::json;
use trainyard_common::{artifacts::ArtifactStore, JobStatus};

use crate::support::{collect_until_terminal, events_within, wait_for, Env};

/// An in-memory store whose every operation fails while `failing` is set.
#[derive(Debug, Default)]
struct FlakyStore {
    inner: InMemory,
    failing: AtomicBool,
    injected: AtomicU64,
    /// The next write of an outcome record goes through, then reports a failure (a reply lost).
    lose_an_outcome_reply: AtomicBool,
    /// The next write of an outcome record answers that one exists, and writes nothing.
    claim_an_outcome: AtomicBool,
    /// The next listing of a job's prefix answers 2 s late, with what was there when it was asked.
    slow_job_listing: AtomicBool,
    /// Listings answered late whose answer is already taken.
    listings_taken: Arc<AtomicU64>,
}

impl fmt::Display for FlakyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FlakyStore")
    }
}

impl FlakyStore {
    fn check(&self) -> object_store::Result<()> {
        if !self.failing.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.injected.fetch_add(1, Ordering::SeqCst);
        let outage = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "injected outage");
        Err(object_store::Error::Generic { store: "FlakyStore", source: Box::new(outage) })
    }
}

#[async_trait]
impl ObjectStore for FlakyStore {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> object_store::Result<PutResult> {
        self.check()?;
        if location.as_ref().starts_with("outcomes/") && self.claim_an_outcome.swap(false, Ordering::SeqCst) {
            return Err(object_store::Error::AlreadyExists { path: location.to_string(), source: "injected: claimed, not written".into() });
        }
        let written = self.inner.put_opts(location, payload, opts).await;
        if location.as_ref().starts_with("outcomes/") && self.lose_an_outcome_reply.swap(false, Ordering::SeqCst) {
            let lost = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "injected: the reply was lost");
            return Err(object_store::Error::Generic { store: "FlakyStore", source: Box::new(lost) });
        }
        written
    }

    async fn put_multipart_opts(&self, location: &Path, opts: PutMultipartOptions) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.check()?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> object_store::Result<GetResult> {
        self.check()?;
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(&self, locations: BoxStream<'static, object_store::Result<Path>>) -> BoxStream<'static, object_store::Result<Path>> {
        match self.check() {
            Ok(()) => self.inner.delete_stream(locations),
            Err(e) => futures::stream::once(async move { Err(e) }).boxed(),
        }
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        if let Err(e) = self.check() {
            return futures::stream::once(async move { Err(e) }).boxed();
        }
        let of_a_job = prefix.is_some_and(|p| p.as_ref().starts_with("jobs/"));
        if of_a_job && self.slow_job_listing.swap(false, Ordering::SeqCst) {
            let (listing, taken) = (self.inner.list(prefix), self.listings_taken.clone());
            return futures::stream::once(async move {
                let items: Vec<_> = listing.collect().await;
                taken.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(2)).await;
                futures::stream::iter(items)
            })
            .flatten()
            .boxed();
        }
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.check()?;
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> object_store::Result<()> {
        self.check()?;
        self.inner.copy_opts(from, to, options).await
    }
}

/// A worker on a [`FlakyStore`] set up by `set`, and one `noop` job run to its end on it.
async fn one_noop_job(
    set: impl FnOnce(&FlakyStore),
) -> (Env, Arc<FlakyStore>, ArtifactStore, crate::support::WorkerHandle, trainyard_common::JobSpec, Vec<trainyard_common::JobEvent>) {
    let env = Env::new(&["noop"]).await;
    let flaky = Arc::new(FlakyStore::default());
    set(&flaky);
    let store = ArtifactStore::from_object_store(flaky.clone());
    let w = env.spawn_worker(&["noop"], |cfg| cfg.artifacts = store.clone());
    let spec = env.spec("noop", json!({}));
    let events = env.run_job(&spec, Duration::from_secs(30)).await;
    (env, flaky, store, w, spec, events)
}

/// The worker's `trainyard_amqp_reconnects_total`.
fn reconnects(metrics: &prometheus::Registry) -> Option<f64> {
    crate::support::counter(metrics, trainyard_common::metrics::RECONNECTS_TOTAL)
}

/// One job runs when the store goes down and must record its outcome during the outage;
/// five more arrive during it and must look up their outcome records. All wait and
/// succeed after it, each started once: no session lost, no redelivery, no dead letter.
/// (Before the retry, the first store error ended the session: the running job was
/// stopped and redelivered, and every held delivery counted a delivery.)
#[tokio::test]
async fn an_artifact_store_outage_delays_jobs_and_kills_none() {
    const OUTAGE: Duration = Duration::from_secs(3);
    let env = Env::new(&["noop"]).await;
    let flaky = Arc::new(FlakyStore::default());
    let metrics = prometheus::Registry::new();
    let store = ArtifactStore::from_object_store(flaky.clone());
    let w = env.spawn_worker_with_metrics(&["noop"], &metrics, |cfg| {
        cfg.artifacts = store;
        cfg.concurrency = 8;
    });
    let sub = env.submitter();
    let running = env.spec("noop", json!({"sleep_ms": 1500}));
    let mut running_watch = sub.watch(&running).await.unwrap();
    sub.submit(&running).await.unwrap();
    let mut seen = wait_for(&mut running_watch, JobStatus::Started, Duration::from_secs(30)).await;

    flaky.failing.store(true, Ordering::SeqCst);
    let later: Vec<_> = (0..5).map(|i| env.spec("noop", json!({"sleep_ms": 10 * i}))).collect();
    let mut watches = Vec::new();
    for spec in &later {
        watches.push(sub.watch(spec).await.unwrap());
        sub.submit(spec).await.unwrap();
    }
    // The running job finishes its work during the outage but cannot record it yet.
    let during = tokio::time::timeout(OUTAGE, async {
        while let Some(ev) = running_watch.next().await {
            seen.push(ev.unwrap());
        }
    })
    .await;
    assert!(during.is_err() && seen.iter().all(|e| !e.status.is_terminal()), "{:?}", seen.iter().map(|e| e.status).collect::<Vec<_>>());
    let outage_over = chrono::Utc::now();
    flaky.failing.store(false, Ordering::SeqCst);

    seen.extend(collect_until_terminal(&mut running_watch, Duration::from_secs(60)).await);
    let mut all = vec![(running.job_id.clone(), seen)];
    for (spec, watch) in later.iter().zip(watches.iter_mut()) {
        all.push((spec.job_id.clone(), collect_until_terminal(watch, Duration::from_secs(60)).await));
    }
    assert!(flaky.injected.load(Ordering::SeqCst) >= 6, "the outage failed {} operations", flaky.injected.load(Ordering::SeqCst));
    for (id, events) in &all {
        let statuses: Vec<JobStatus> = events.iter().map(|e| e.status).collect();
        let started = statuses.iter().filter(|s| **s == JobStatus::Started).count();
        assert_eq!(started, 1, "job {id} started once, never stopped and redelivered: {statuses:?}");
        assert_eq!(statuses.last(), Some(&JobStatus::Succeeded), "job {id}: {statuses:?}");
        // The jobs that arrived during the outage start only after it (their look-ups waited).
        let start = events.iter().find(|e| e.status == JobStatus::Started).unwrap();
        assert!(*id == running.job_id || start.at >= outage_over, "job {id} started during the outage");
        assert!(events.iter().all(|e| e.progress.as_ref().is_none_or(|p| p.get("redelivery").is_none())), "job {id} redelivered");
    }
    assert_eq!(reconnects(&metrics), Some(0.0), "the worker's broker session was never lost");
    assert!(env.drain(&env.topo.dead_queue("noop")).await.is_empty(), "nothing dead-lettered");
    w.stop().await;
    env.cleanup().await;
}

/// Never ack what was not kept: a job whose outcome record cannot be written (the store
/// fails from the moment it started) stays unacked however long it waits. When its worker
/// stops, the delivery goes back to the queue, and another worker runs it to one success.
/// (An ack before the outcome record would lose the job: nothing to put back.)
#[tokio::test]
async fn a_job_whose_outcome_cannot_be_kept_is_not_acked() {
    let env = Env::new(&["noop"]).await;
    let flaky = Arc::new(FlakyStore::default());
    let store = ArtifactStore::from_object_store(flaky.clone());
    let first = env.spawn_worker(&["noop"], |cfg| cfg.artifacts = store.clone());
    let sub = env.submitter();
    let spec = env.spec("noop", json!({"sleep_ms": 500}));
    let mut watch = sub.watch(&spec).await.unwrap();
    sub.submit(&spec).await.unwrap();
    let mut seen = wait_for(&mut watch, JobStatus::Started, Duration::from_secs(30)).await;
    flaky.failing.store(true, Ordering::SeqCst);
    // The job's work ends meanwhile; its outcome cannot be recorded.
    seen.extend(events_within(&mut watch, Duration::from_secs(3)).await);
    assert!(seen.iter().all(|e| !e.status.is_terminal()), "{:?}", seen.iter().map(|e| e.status).collect::<Vec<_>>());
    assert!(flaky.injected.load(Ordering::SeqCst) >= 1, "the outcome record was tried");
    first.stop().await;
    let queue = env.topo.jobs_queue("noop");
    let mut ready = 0;
    for _ in 0..50 {
        ready = env.ready(&queue).await;
        if ready == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ready, 1, "the delivery went back to the queue, not acked");

    flaky.failing.store(false, Ordering::SeqCst);
    let second = env.spawn_worker(&["noop"], |cfg| cfg.artifacts = store);
    seen.extend(collect_until_terminal(&mut watch, Duration::from_secs(30)).await);
    let statuses: Vec<JobStatus> = seen.iter().map(|e| e.status).collect();
    assert_eq!(statuses.iter().filter(|s| **s == JobStatus::Succeeded).count(), 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == JobStatus::Started).count(), 2, "run again by the second worker: {statuses:?}");
    second.stop().await;
    assert_eq!(env.ready(&queue).await, 0);
    env.cleanup().await;
}

/// A write of the outcome record that reached the store but whose reply was lost is tried
/// again, finds the record there, and publishes what is recorded: one `succeeded` event,
/// the recorded one (same seq and result), never a second result or a second run.
#[tokio::test]
async fn an_outcome_record_written_but_reported_failed_is_published_once() {
    let (env, flaky, store, w, spec, events) = one_noop_job(|f| f.lose_an_outcome_reply.store(true, Ordering::SeqCst)).await;
    // A moment for anything more to arrive (a second result would).
    let mut watch = env.watch(&spec).await;
    let late = tokio::time::timeout(Duration::from_secs(1), watch.next()).await;
    assert!(late.is_err(), "nothing after the terminal event: {late:?}");
    assert!(!flaky.lose_an_outcome_reply.load(Ordering::SeqCst), "the lost reply was injected");
    let statuses: Vec<JobStatus> = events.iter().map(|e| e.status).collect();
    assert_eq!(statuses.iter().filter(|s| **s == JobStatus::Started).count(), 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == JobStatus::Succeeded).count(), 1, "{statuses:?}");
    let done = events.iter().find(|e| e.status == JobStatus::Succeeded).unwrap();
    let recorded: serde_json::Value = store.get_json(&trainyard_common::artifacts::keys::outcome(&spec.job_id)).await.unwrap().unwrap();
    assert_eq!(recorded["event"]["seq"], json!(done.seq), "the recorded event was published");
    assert_eq!(recorded["event"]["result"], done.result.clone().unwrap());
    w.stop().await;
    env.cleanup().await;
}

/// A store that answers "already there" to the outcome record's write and then has no record
/// to read (another writer's record gone, a store that lies): the job may or may not have a
/// result elsewhere, so it is neither acked as done nor run again: dead-lettered with the
/// reason, where a person sees it, and nothing more is published.
#[tokio::test]
async fn an_outcome_record_claimed_but_missing_is_dead_lettered_with_the_reason() {
    let (env, flaky, _store, w, _spec, events) = one_noop_job(|f| f.claim_an_outcome.store(true, Ordering::SeqCst)).await;
    assert!(!flaky.claim_an_outcome.load(Ordering::SeqCst), "the claim was injected");
    let last = events.last().unwrap();
    assert_eq!(last.status, JobStatus::Dead, "{events:?}");
    assert!(events.iter().all(|e| e.status != JobStatus::Succeeded), "no result published: {events:?}");
    let reason = &last.error.as_ref().unwrap().message;
    assert!(reason.contains("gone when it was read"), "{reason}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(env.ready(&env.topo.dead_queue("noop")).await, 1, "parked in the dead-letter queue");
    assert_eq!(env.ready(&env.topo.jobs_queue("noop")).await, 0, "and acked");
    w.stop().await;
    env.cleanup().await;
}

/// A store outage that outlasts the broker's consumer timeout (less its margin) puts that
/// delivery alone back in the queue, before the broker would close the channel over it: the
/// session goes on, and the job runs once the store is back, started once, as a redelivery.
#[tokio::test]
async fn a_store_outage_past_the_consumer_timeout_requeues_the_delivery_and_keeps_the_session() {
    let env = Env::new(&["noop"]).await;
    let flaky = Arc::new(FlakyStore::default());
    flaky.failing.store(true, Ordering::SeqCst);
    let metrics = prometheus::Registry::new();
    let store = ArtifactStore::from_object_store(flaky.clone());
    let w = env.spawn_worker_with_metrics(&["noop"], &metrics, |cfg| {
        cfg.artifacts = store;
        cfg.consumer_timeout = Duration::from_secs(3);
    });
    let sub = env.submitter();
    let mut spec = env.spec("noop", json!({}));
    spec.timeout_s = 1; // within what the consumer timeout leaves (1.7 s), or the worker refuses it
    let mut watch = sub.watch(&spec).await.unwrap();
    sub.submit(&spec).await.unwrap();
    // Past the deadline (2.7 s after the delivery) at least once: the look-up gave up and requeued.
    let mut seen = events_within(&mut watch, Duration::from_secs(5)).await;
    assert!(seen.iter().all(|e| !e.status.is_terminal() && e.status != JobStatus::Started), "{seen:?}");
    flaky.failing.store(false, Ordering::SeqCst);
    seen.extend(collect_until_terminal(&mut watch, Duration::from_secs(30)).await);
    let statuses: Vec<JobStatus> = seen.iter().map(|e| e.status).collect();
    assert_eq!(statuses.last(), Some(&JobStatus::Succeeded), "{statuses:?}");
    let started: Vec<_> = seen.iter().filter(|e| e.status == JobStatus::Started).collect();
    assert_eq!(started.len(), 1, "{statuses:?}");
    let redelivery = started[0].progress.as_ref().and_then(|p| p.get("redelivery")).and_then(|r| r.as_u64());
    assert!(redelivery.is_some_and(|r| r >= 1), "it ran as a redelivery (requeued, not held): {:?}", started[0].progress);
    assert_eq!(reconnects(&metrics), Some(0.0), "the worker's broker session was never lost");
    assert!(env.drain(&env.topo.dead_queue("noop")).await.is_empty(), "nothing dead-lettered");
    w.stop().await;
    env.cleanup().await;
}

/// A cancel request that arrives after the worker looked for the job's cancel marker and found
/// none, but before the job started, is still heard: the job ends cancelled and never runs.
/// (The marker is written, then the request published, as `trainyard jobs cancel` does.)
#[tokio::test]
async fn a_cancel_arriving_between_the_marker_look_up_and_the_start_is_heard() {
    use trainyard_common::{artifacts::keys, codec, control::CancelRequest};
    let env = Env::new(&["noop"]).await;
    let flaky = Arc::new(FlakyStore::default());
    flaky.slow_job_listing.store(true, Ordering::SeqCst);
    let store = ArtifactStore::from_object_store(flaky.clone());
    let w = env.spawn_worker(&["noop"], |cfg| cfg.artifacts = store.clone());
    let spec = env.spec("noop", json!({}));
    let sub = env.submitter();
    let mut watch = sub.watch(&spec).await.unwrap();
    sub.submit(&spec).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while flaky.listings_taken.load(Ordering::SeqCst) == 0 {
        assert!(std::time::Instant::now() < deadline, "the worker never looked for the job's records");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let req = CancelRequest { job_id: spec.job_id.clone(), by: "tests".into(), reason: "changed my mind".into() };
    store.put_json(&keys::cancel_marker(&spec.job_id), &req).await.unwrap();
    let props = lapin::BasicProperties::default().with_content_type(codec::JSON.into());
    trainyard_common::amqp::publish_confirmed(&env.ch, &env.topo.control_exchange(), "", &codec::to_json(&req).unwrap(), props, false)
        .await
        .unwrap();
    let events = collect_until_terminal(&mut watch, Duration::from_secs(30)).await;
    let statuses: Vec<JobStatus> = events.iter().map(|e| e.status).collect();
    assert_eq!(statuses, vec![JobStatus::Queued, JobStatus::Cancelled], "cancelled before it started, never run");
    assert!(store.get(&keys::outcome(&spec.job_id)).await.unwrap().is_none(), "no outcome recorded");
    w.stop().await;
    env.cleanup().await;
}
