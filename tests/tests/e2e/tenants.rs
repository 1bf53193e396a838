//! Bots as tenants: priority tiers and latest-wins coalescing against the real
//! RabbitMQ, including a worker SIGKILLed while it holds high-priority jobs.

use std::{collections::BTreeMap, time::Duration};

use lapin::{options::QueueDeclareOptions, types::FieldTable};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use trainyard::{coalesce::Coalescer, config::JobTypePolicy, recorder::Recorder, store::Store};
use trainyard_common::{amqp, artifacts::keys, job::Priority, JobEvent, JobSpec, JobStatus, Trigger};

use crate::support::{count_by_status, Env, NoopEvents, URL};

const T: Duration = Duration::from_secs(90);

/// The parts of the control plane these tests need: a recorder into a SQLite store and the coalescer.
struct ControlPlane {
    _dir: tempfile::TempDir,
    store: Store,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl ControlPlane {
    async fn start(env: &Env, policies: BTreeMap<String, JobTypePolicy>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("sqlite://{}/jobs.db", dir.path().display())).await.unwrap();
        let stop = CancellationToken::new();
        let coalescer = Coalescer::new(store.clone(), env.artifacts.clone(), env.topo.clone(), URL, policies);
        let recorder = Recorder::new(store.clone(), env.topo.clone(), URL, None);
        let (s1, s2) = (stop.clone(), stop.clone());
        let tasks = vec![tokio::spawn(async move { coalescer.run(s1).await }), tokio::spawn(async move { recorder.run(s2).await })];
        wait_for_queue(&Coalescer::queue_name(&env.topo)).await;
        Self { _dir: dir, store, stop, tasks }
    }

    async fn stop(self) {
        self.stop.cancel();
        for t in self.tasks {
            t.await.unwrap();
        }
        self.store.close().await;
    }
}

fn terminal(events: &[JobEvent]) -> usize {
    events.iter().filter(|e| e.status.is_terminal()).count()
}

fn noop(bot: &str, sleep_ms: u64, priority: Priority) -> JobSpec {
    let mut spec = JobSpec::new("noop", bot, json!({ "sleep_ms": sleep_ms }), Trigger::manual("tests"));
    spec.priority = priority;
    spec
}

/// A worker busy with a backlog of low-priority jobs starts a high-priority one at
/// the next free slot: in FIFO it would wait for the whole backlog.
#[tokio::test]
async fn a_high_priority_job_overtakes_a_backlog_of_low_ones() {
    let env = Env::new(&["noop"]).await;
    let mut events = NoopEvents::open(&env, "tenants-events").await;
    let sub = env.submitter();
    let lows: Vec<JobSpec> = (0..60).map(|i| noop(&format!("bulk-{i}"), 100, Priority::Low)).collect();
    for spec in &lows {
        sub.submit(spec).await.unwrap();
    }
    let worker = env.spawn_worker(&["noop"], |c| c.concurrency = 2);
    events.until(T, |seen| seen.iter().filter(|e| e.status == JobStatus::Started).count() >= 2).await;
    let high = noop("urgent", 10, Priority::High);
    sub.submit(&high).await.unwrap();
    let seen = events.until(T, |seen| terminal(seen) == 61).await;
    let mut started: Vec<&JobEvent> = seen.iter().filter(|e| e.status == JobStatus::Started).collect();
    started.sort_by_key(|e| e.at);
    let at = started.iter().position(|e| e.job_id == high.job_id).expect("the high-priority job started");
    let lows_after = started.len() - at - 1;
    assert!(lows_after >= 50, "the high job started after {at} of 60 low ones (only {lows_after} started after it)");
    assert_eq!(count_by_status(seen).get(&JobStatus::Succeeded), Some(&61));
    worker.stop().await;
    env.cleanup().await;
}

/// Under a backlog of high and low jobs, a 1-slot worker runs the high ones first: the slot
/// a high job frees waits a moment for the next high delivery (the broker sends it once it
/// has the ack) instead of going to a held low one. The tiers took turns: H, L, H, L, …
#[tokio::test]
async fn a_backlog_of_high_jobs_runs_before_the_low_backlog() {
    let env = Env::new(&["noop"]).await;
    let mut events = NoopEvents::open(&env, "tenants-events").await;
    let sub = env.submitter();
    let highs: Vec<JobSpec> = (0..8).map(|i| noop(&format!("high-{i}"), 100, Priority::High)).collect();
    let lows: Vec<JobSpec> = (0..8).map(|i| noop(&format!("low-{i}"), 100, Priority::Low)).collect();
    for spec in highs.iter().chain(&lows) {
        sub.submit(spec).await.unwrap();
    }
    let worker = env.spawn_worker(&["noop"], |c| c.concurrency = 1);
    let seen = events.until(T, |seen| terminal(seen) == 16).await;
    let mut started: Vec<&JobEvent> = seen.iter().filter(|e| e.status == JobStatus::Started).collect();
    started.sort_by_key(|e| e.at);
    let last_high = started.iter().rposition(|e| highs.iter().any(|h| h.job_id == e.job_id)).expect("the high jobs started");
    let lows_before = started[..last_high].iter().filter(|e| lows.iter().any(|l| l.job_id == e.job_id)).count();
    // One low job may start first (its delivery can come before any high one at start-up), and
    // one more on a loaded machine where a high delivery took longer than the wait; taking turns,
    // seven did.
    assert!(lows_before <= 2, "{lows_before} low jobs started before the last high one");
    worker.stop().await;
    env.cleanup().await;
}

/// Two submitters race ten jobs with one coalescing key while no worker is free:
/// the control plane supersedes all but the newest, which alone runs; the store
/// shows `superseded` with `superseded_by` and the key.
#[tokio::test]
async fn latest_wins_across_two_racing_submitters() {
    let env = Env::new(&["noop"]).await;
    let cp = ControlPlane::start(&env, BTreeMap::new()).await;
    let store = &cp.store;
    let mut events = NoopEvents::open(&env, "tenants-events").await;

    let batch = |_: usize| {
        (0..5)
            .map(|_| {
                let mut spec = noop("racing-bot", 10, Priority::Normal);
                spec.coalesce_key = Some(spec.bot_coalesce_key());
                spec
            })
            .collect::<Vec<_>>()
    };
    let (a, b) = (batch(0), batch(1));
    let (sub_a, sub_b) = (env.submitter(), env.submitter());
    let submit_all = |sub: trainyard::submit::Submitter, specs: Vec<JobSpec>| async move {
        for spec in &specs {
            sub.submit(spec).await.unwrap();
        }
    };
    tokio::join!(submit_all(sub_a, a.clone()), submit_all(sub_b, b.clone()));
    let all: Vec<JobSpec> = a.into_iter().chain(b).collect();
    let newest = all.iter().max_by_key(|s| (s.submitted_at, s.job_id.clone())).unwrap().job_id.clone();

    // The worker starts only once the control plane has marked the nine (the worker "was busy").
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let mut marked = 0;
        for s in &all {
            marked += usize::from(env.artifacts.exists(&keys::cancel_marker(&s.job_id)).await.unwrap());
        }
        if marked == 9 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "only {marked} of 9 jobs were superseded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!env.artifacts.exists(&keys::cancel_marker(&newest)).await.unwrap(), "the newest job is not superseded");
    let worker = env.spawn_worker(&["noop"], |_| {});
    let seen = events.until(T, |seen| terminal(seen) == 10).await.to_vec();
    // `superseded_by` names the job that was newest when this one was superseded; following
    // it always ends at the job that ran.
    let mut replaced_by = BTreeMap::new();
    for e in seen.iter().filter(|e| e.status.is_terminal()) {
        if e.job_id == newest {
            assert_eq!(e.status, JobStatus::Succeeded);
        } else {
            assert_eq!(e.status, JobStatus::Superseded, "{}", e.job_id);
            let by = e.result.as_ref().unwrap()["superseded_by"].as_str().unwrap().to_string();
            assert!(all.iter().any(|s| s.job_id == by && (s.submitted_at, &s.job_id) > (e_spec(&all, &e.job_id).submitted_at, &e.job_id)));
            replaced_by.insert(e.job_id.clone(), by);
        }
    }
    for start in replaced_by.keys() {
        let mut at = start.clone();
        for _ in 0..10 {
            match replaced_by.get(&at) {
                Some(next) => at = next.clone(),
                None => break,
            }
        }
        assert_eq!(at, newest, "the chain from {start} ends at the job that ran");
    }
    let started: Vec<&str> = seen.iter().filter(|e| e.status == JobStatus::Started).map(|e| e.job_id.as_str()).collect();
    assert_eq!(started, [newest.as_str()], "only the newest job ran");

    let loser = all.iter().find(|s| s.job_id != newest).unwrap();
    let deadline = tokio::time::Instant::now() + T;
    let row = loop {
        match store.job(&loser.job_id).await.unwrap() {
            Some(row) if row.status == JobStatus::Superseded => break row,
            _ if tokio::time::Instant::now() > deadline => panic!("the store never recorded {} as superseded", loser.job_id),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    assert_eq!(row.superseded_by.as_ref(), replaced_by.get(&loser.job_id));
    assert_eq!(row.coalesce_key.as_deref(), Some("noop/racing-bot"));
    assert_eq!(row.priority, Priority::Normal);

    worker.stop().await;
    cp.stop().await;
    env.cleanup().await;
}

/// With `[policy.noop] supersede_running = true`, a newer job with the same key
/// cancels the older one while it runs; the newer one runs.
#[tokio::test]
async fn supersede_running_cancels_the_running_older_job() {
    let env = Env::new(&["noop"]).await;
    let policies = BTreeMap::from([("noop".to_string(), JobTypePolicy { supersede_running: true, ..Default::default() })]);
    let cp = ControlPlane::start(&env, policies).await;
    let store = &cp.store;
    let mut events = NoopEvents::open(&env, "tenants-events").await;
    let worker = env.spawn_worker(&["noop"], |c| c.concurrency = 2);
    let keyed = |sleep_ms| {
        let mut spec = noop("editing-bot", sleep_ms, Priority::Normal);
        spec.coalesce_key = Some(spec.bot_coalesce_key());
        spec
    };
    let (old, new) = (keyed(20_000), keyed(10));
    let sub = env.submitter();
    sub.submit(&old).await.unwrap();
    // The store must know it runs before the newer job arrives.
    let deadline = tokio::time::Instant::now() + T;
    while store.job(&old.job_id).await.unwrap().map(|j| j.status) != Some(JobStatus::Started) {
        assert!(tokio::time::Instant::now() < deadline, "the old job never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sub.submit(&new).await.unwrap();
    let seen = events.until(T, |seen| terminal(seen) == 2).await;
    let end = |id: &str| seen.iter().find(|e| e.job_id == id && e.status.is_terminal()).unwrap().clone();
    let (old_end, new_end) = (end(&old.job_id), end(&new.job_id));
    assert_eq!(old_end.status, JobStatus::Cancelled, "the running older job is stopped");
    assert_eq!(new_end.status, JobStatus::Succeeded);
    worker.stop().await;
    cp.stop().await;
    env.cleanup().await;
}

/// A worker SIGKILLed while it runs high-priority jobs (and holds normal ones of
/// other bots) loses none: another worker finishes every job, each exactly once.
#[tokio::test]
async fn a_worker_killed_holding_high_priority_jobs_loses_none() {
    let env = Env::new(&["noop"]).await;
    let mut events = NoopEvents::open(&env, "tenants-events").await;
    let sub = env.submitter();
    let mut specs = Vec::new();
    for i in 0..3 {
        specs.push(noop(&format!("vip-{i}"), 1500, Priority::High));
        specs.push(noop(&format!("bot-{i}"), 1500, Priority::Normal));
        specs.push(noop(&format!("bulk-{i}"), 50, Priority::Low));
    }
    for spec in &specs {
        sub.submit(spec).await.unwrap();
    }
    let mut first = env.worker_process("noop", &["--concurrency", "2"]);
    events.until(T, |seen| seen.iter().filter(|e| e.status == JobStatus::Started).count() >= 2).await;
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();
    let mut second = env.worker_process("noop", &["--concurrency", "2"]);
    let seen = events.until(T, |seen| terminal(seen) >= specs.len()).await;
    for spec in &specs {
        let outcomes: Vec<JobStatus> =
            seen.iter().filter(|e| e.job_id == spec.job_id && e.status.is_terminal()).map(|e| e.status).collect();
        assert_eq!(outcomes, [JobStatus::Succeeded], "job {} ({})", spec.job_id, spec.priority);
    }
    second.kill().unwrap();
    second.wait().unwrap();
    env.cleanup().await;
}

fn e_spec<'a>(all: &'a [JobSpec], job_id: &str) -> &'a JobSpec {
    all.iter().find(|s| s.job_id == job_id).unwrap()
}

/// Waits until `queue` exists (a passive declare on a fresh channel each time).
async fn wait_for_queue(queue: &str) {
    let conn = amqp::connect(URL, "tenants-wait").await.unwrap();
    for _ in 0..300 {
        let ch = conn.create_channel().await.unwrap();
        let passive = QueueDeclareOptions { passive: true, ..Default::default() };
        if ch.queue_declare(queue.into(), passive, FieldTable::default()).await.is_ok() {
            let _ = conn.close(200, "done".into()).await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{queue} was never declared");
}
