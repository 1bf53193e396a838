//! Schedules when the broker or the store fails at fire time: each fire published once, and
//! every wait bounded inside the claim's lease.

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc, Mutex,
};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use trainyard::{
    config::ScheduleConfig,
    scheduler::{fire_job_id, ScheduleError, Scheduler, NOTE_TIMEOUT, PUBLISH_TIMEOUT, RETRY_AFTER},
    store::Store,
    submit::Submitter,
};

use chrono::{DateTime, Utc};
use trainyard_common::{topology::Topology, JobSpec};

use crate::helpers::*;
use crate::schedules::{drain, every_minute};

/// A TCP proxy to the local broker that can be taken down (every connection cut), brought back
/// on its port, or stalled (connections kept open, nothing passed on: a broker that hangs).
struct Proxy {
    port: u16,
    stalled: Arc<AtomicBool>,
    tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Proxy {
    async fn start(port: u16) -> Self {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stalled, tasks) = (Arc::new(AtomicBool::new(false)), Arc::<Mutex<Vec<_>>>::default());
        let (st, t) = (stalled.clone(), tasks.clone());
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let st = st.clone();
                let conn = tokio::spawn(async move {
                    if let Ok(outbound) = tokio::net::TcpStream::connect("127.0.0.1:5672").await {
                        let ((in_r, in_w), (out_r, out_w)) = (inbound.into_split(), outbound.into_split());
                        tokio::join!(pipe(in_r, out_w, st.clone()), pipe(out_r, in_w, st));
                    }
                });
                t.lock().unwrap().push(conn);
            }
        });
        tasks.lock().unwrap().push(accept);
        Self { port, stalled, tasks }
    }
    /// Cuts every connection and stops listening (its port free again on return).
    async fn down(&self) {
        let tasks: Vec<_> = self.tasks.lock().unwrap().drain(..).collect();
        for t in tasks {
            t.abort();
            let _ = t.await;
        }
    }
    /// Holds every byte from now on, in both directions, with the connections left open.
    fn stall(&self) {
        self.stalled.store(true, Ordering::SeqCst);
    }
}

/// Copies `from` to `to`, holding what it read while `stalled`.
async fn pipe(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, stalled: Arc<AtomicBool>) {
    let mut buf = vec![0; 16 * 1024];
    while let Ok(n @ 1..) = from.read(&mut buf).await {
        while stalled.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A scheduler of `cfg` through the broker at `url`, connected (so that no later publish waits
/// for a connection) and ticked once at `t0`, before its first fire.
async fn started(url: &str, topo: &Topology, store: &Store, cfg: ScheduleConfig, t0: DateTime<Utc>) -> Scheduler {
    let submitter = Submitter::new(url, topo.clone()).unwrap();
    submitter.declare_shared().await.unwrap();
    let s = Scheduler::new(vec![cfg], store.clone(), submitter, None);
    assert!(s.tick(t0).await.unwrap().is_empty());
    s
}

/// Ticks at each of `times` (300 ms apart in real time, while the client reconnects) until a
/// tick publishes something; what it published.
async fn tick_until_published(s: &Scheduler, times: impl Iterator<Item = chrono::DateTime<chrono::Utc>>) -> Vec<JobSpec> {
    for now in times {
        if let Ok(published) = s.tick(now).await {
            if !published.is_empty() {
                return published;
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Vec::new()
}

/// The broker is unreachable at fire time: the fire stays claimed, is retried once the
/// broker is back, and is published exactly once.
#[tokio::test]
async fn a_fire_the_broker_missed_is_published_once_when_it_is_back() {
    let (store, _dir, _) = sqlite_store().await;
    let topo = topology();
    let (_conn, ch) = channel().await;
    topo.declare_job_type(&ch, "noop").await.unwrap();
    let proxy = Proxy::start(0).await;
    let url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port);
    let cfg = ScheduleConfig { params: serde_json::json!({"sleep_ms": 1}), ..every_minute("every-minute", "bot-r") };
    let s = Scheduler::new(vec![cfg], store.clone(), Submitter::new(&url, topo.clone()).unwrap(), None);
    let t0: chrono::DateTime<chrono::Utc> = "2026-06-01T10:00:30Z".parse().unwrap();
    assert!(s.tick(t0).await.unwrap().is_empty());
    // Connections cut at fire time: the claim is taken, the publish fails.
    proxy.down().await;
    let fire_at = t0 + chrono::TimeDelta::seconds(30);
    assert!(s.tick(fire_at).await.is_err(), "the publish must fail while the broker is unreachable");
    assert_eq!(store.schedule_fires("every-minute").await.unwrap().len(), 1, "claimed");
    assert!(drain(&ch, &topo.jobs_queue("noop")).await.is_empty());
    // Back: a later tick publishes it (retrying while the client reconnects), once.
    let _proxy = Proxy::start(proxy.port).await;
    // Retried once the claim's lease is over (30 s), before the next minute's fire.
    let times = (0..=9).map(|step| fire_at + RETRY_AFTER + chrono::TimeDelta::seconds(1 + 3 * step));
    let published = tick_until_published(&s, times).await;
    assert_eq!(published.len(), 1, "{published:?}");
    let first: chrono::DateTime<chrono::Utc> = "2026-06-01T10:01:00Z".parse().unwrap();
    assert_eq!(published[0].job_id, fire_job_id("every-minute", first));
    // Later ticks (before the next minute) publish nothing more.
    for step in 11..=12 {
        assert!(s.tick(fire_at + chrono::TimeDelta::seconds(2 * step)).await.unwrap().is_empty());
    }
    let jobs = drain(&ch, &topo.jobs_queue("noop")).await;
    assert_eq!(jobs.iter().map(|j| j.job_id.as_str()).collect::<Vec<_>>(), [fire_job_id("every-minute", first).as_str()]);
    cleanup(&topo, &["noop"]).await;
}

/// A fire published while the store cannot note it for a moment is noted once the store is
/// back, within the same tick, and never published again: a failed note used to leave the
/// fire unpublished in the store, so a later tick (of any replica) published it a second time.
#[tokio::test]
async fn a_fire_whose_note_fails_for_a_moment_is_published_once() {
    let (store, _dir, _) = sqlite_store().await;
    let topo = topology();
    let (_conn, ch) = channel().await;
    topo.declare_job_type(&ch, "noop").await.unwrap();
    let t0: chrono::DateTime<chrono::Utc> = "2026-06-01T10:00:30Z".parse().unwrap();
    let s = started(AMQP_URL, &topo, &store, every_minute("noted", "bot-n"), t0).await;
    // Every update of `schedule_fires` fails for 1.5 s (claims are inserts and still work).
    store
        .execute_raw("CREATE TRIGGER refuse_notes BEFORE UPDATE ON schedule_fires BEGIN SELECT RAISE(ABORT, 'busy for a moment'); END")
        .await
        .unwrap();
    let lift = tokio::spawn({
        let store = store.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            store.execute_raw("DROP TRIGGER refuse_notes").await.unwrap();
        }
    });
    let fire_at = t0 + chrono::TimeDelta::seconds(30);
    let published = s.tick(fire_at).await.expect("noted once the store is back");
    assert_eq!(published.len(), 1);
    lift.await.unwrap();
    // Past the claim's lease: nothing is left to publish again.
    assert!(s.tick(fire_at + RETRY_AFTER + chrono::TimeDelta::seconds(5)).await.unwrap().is_empty());
    assert_eq!(drain(&ch, &topo.jobs_queue("noop")).await.len(), 1, "published once");
    cleanup(&topo, &["noop"]).await;
}

/// A fire whose publish landed but whose note failed past the claim's lease, and whose job
/// the store has since recorded (its `queued` event), is only noted published by the tick that
/// takes over its retry: publishing it again ran the job twice, at once while the first copy
/// was queued or running.
#[tokio::test]
async fn a_retried_fire_whose_job_the_store_has_is_noted_not_published_again() {
    let (store, _dir, _) = sqlite_store().await;
    let topo = topology();
    let (_conn, ch) = channel().await;
    topo.declare_job_type(&ch, "noop").await.unwrap();
    let t0: DateTime<Utc> = "2026-06-01T10:00:30Z".parse().unwrap();
    let s = started(AMQP_URL, &topo, &store, every_minute("landed", "bot-l"), t0).await;
    let refuse = "CREATE TRIGGER refuse_notes BEFORE UPDATE ON schedule_fires BEGIN SELECT RAISE(ABORT, 'the note fails'); END";
    store.execute_raw(refuse).await.unwrap();
    let fire_at = t0 + chrono::TimeDelta::seconds(30);
    assert!(s.tick(fire_at).await.is_err(), "published, not noted");
    let published = drain(&ch, &topo.jobs_queue("noop")).await;
    assert_eq!(published.len(), 1);
    // The recorder files its `queued` event; the store is back.
    store.record_event(&trainyard_common::JobEvent::queued(&published[0])).await.unwrap();
    store.execute_raw("DROP TRIGGER refuse_notes").await.unwrap();
    assert!(s.tick(fire_at + RETRY_AFTER + chrono::TimeDelta::seconds(1)).await.unwrap().is_empty(), "nothing published again");
    assert!(drain(&ch, &topo.jobs_queue("noop")).await.is_empty(), "one copy of the job in all");
    assert!(store.unpublished_fires("landed", fire_at + RETRY_AFTER * 2).await.unwrap().is_empty(), "noted published");
    cleanup(&topo, &["noop"]).await;
}

/// After a restore from a backup (claims are not rebuilt, jobs are, from the events stream),
/// a fire after the backup's last claim that is still due when the control plane comes back
/// has no claim but a job: it is noted published, not published again. It was claimed and
/// published a second time (under `missed = fire_once` a missed one too), and ran beside its
/// first copy.
#[tokio::test]
async fn a_missed_fire_whose_job_the_store_has_is_not_published_again() {
    let (store, _dir, _) = sqlite_store().await;
    let topo = topology();
    let (_conn, ch) = channel().await;
    topo.declare_job_type(&ch, "noop").await.unwrap();
    let cfg = every_minute("restored", "bot-r");
    // The backup's last claim, published.
    let backed_up: DateTime<Utc> = "2026-06-01T10:00:00Z".parse().unwrap();
    assert!(store.claim_schedule_fire("restored", backed_up, &fire_job_id("restored", backed_up)).await.unwrap());
    store.mark_fire_published("restored", backed_up).await.unwrap();
    // The fire at 10:05 ran after the backup: the stream gave the restored store its job.
    let fired: DateTime<Utc> = "2026-06-01T10:05:00Z".parse().unwrap();
    let mut job = cfg.job_spec();
    job.job_id = fire_job_id("restored", fired);
    store.record_event(&trainyard_common::JobEvent::queued(&job)).await.unwrap();
    let submitter = Submitter::new(AMQP_URL, topo.clone()).unwrap();
    submitter.declare_shared().await.unwrap();
    let s = Scheduler::new(vec![cfg], store.clone(), submitter, None);
    // The control plane comes back at 10:05:30, inside the fire's grace.
    assert!(s.tick("2026-06-01T10:05:30Z".parse().unwrap()).await.unwrap().is_empty(), "nothing published");
    assert!(drain(&ch, &topo.jobs_queue("noop")).await.is_empty(), "no second copy of the 10:05 job");
    let claims = store.schedule_fires("restored").await.unwrap();
    assert!(claims.iter().any(|(at, _)| *at == fired), "the fire is claimed: {claims:?}");
    assert!(store.unpublished_fires("restored", fired + RETRY_AFTER * 10).await.unwrap().is_empty(), "and noted published");
    cleanup(&topo, &["noop"]).await;
}

/// A store that refuses claims at fire time and for longer than the 60-s grace after it (a
/// database failing over) while the control plane runs: the fire is published late, once the
/// store is back, under `missed = skip` too (that policy is for fires missed while no control
/// plane ran). It was skipped for good: the next tick that worked took it as missed.
#[tokio::test]
async fn a_fire_due_while_the_store_refuses_claims_is_published_once_it_is_back() {
    let (store, _dir, _) = sqlite_store().await;
    let topo = topology();
    let (_conn, ch) = channel().await;
    topo.declare_job_type(&ch, "noop").await.unwrap();
    let t0: DateTime<Utc> = "2026-06-01T10:00:30Z".parse().unwrap();
    let cfg = ScheduleConfig { cron: "*/5 * * * *".into(), ..every_minute("store-down", "bot-d") };
    let s = started(AMQP_URL, &topo, &store, cfg, t0).await;
    let refuse = refusing_inserts("refuse_claims", "schedule_fires", "1", "the database is failing over");
    store.execute_raw(&refuse).await.unwrap();
    let fire_at: DateTime<Utc> = "2026-06-01T10:05:00Z".parse().unwrap();
    for late in [1, 40, 80] {
        let now = fire_at + chrono::TimeDelta::seconds(late);
        assert!(s.tick(now).await.is_err(), "no claim while the store refuses them ({now})");
    }
    store.execute_raw("DROP TRIGGER refuse_claims").await.unwrap();
    // 100 s after the fire, past the grace; the next fire (10:10) is not due yet.
    let published = s.tick(fire_at + chrono::TimeDelta::seconds(100)).await.unwrap();
    assert_eq!(published.iter().map(|j| j.job_id.clone()).collect::<Vec<_>>(), [fire_job_id("store-down", fire_at)]);
    assert!(s.tick(fire_at + chrono::TimeDelta::seconds(105)).await.unwrap().is_empty(), "once");
    assert_eq!(drain(&ch, &topo.jobs_queue("noop")).await.len(), 1);
    cleanup(&topo, &["noop"]).await;
}

/// A broker that hangs at fire time (the connection open, no confirm coming): the publish is
/// given up after `PUBLISH_TIMEOUT` (15 s), inside the claim's lease, and the fire is published
/// once by a tick after the lease. Without the timeout the tick waits for the confirm until
/// the connection's heartbeat gives up, past the lease, while another replica could publish
/// the fire again.
#[tokio::test]
async fn a_fire_whose_broker_hangs_is_given_up_inside_its_lease_and_published_once() {
    let (store, _dir, _) = sqlite_store().await;
    let topo = topology();
    let (_conn, ch) = channel().await;
    topo.declare_job_type(&ch, "noop").await.unwrap();
    let proxy = Proxy::start(0).await;
    let url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port);
    // Hourly: retries a lease apart (a failed one takes the claim again) all come before the next fire.
    let cfg = ScheduleConfig { cron: "0 * * * *".into(), ..every_minute("hung", "bot-h") };
    let t0: chrono::DateTime<chrono::Utc> = "2026-06-01T10:59:30Z".parse().unwrap();
    let s = started(&url, &topo, &store, cfg, t0).await;
    proxy.stall();
    let fire_at = t0 + chrono::TimeDelta::seconds(30);
    let started = std::time::Instant::now();
    let err = s.tick(fire_at).await.expect_err("no confirm comes");
    let took = started.elapsed();
    assert!(matches!(err, ScheduleError::PublishTimedOut { .. }), "{err}");
    assert!(took >= PUBLISH_TIMEOUT && took < PUBLISH_TIMEOUT + Duration::from_secs(5), "given up after {took:?}");
    assert!(took.as_secs() < RETRY_AFTER.num_seconds() as u64, "inside the lease");
    // The hung connection is cut; a tick after the lease publishes the fire, once.
    proxy.down().await;
    let _proxy = Proxy::start(proxy.port).await;
    let times = (1..=10).map(|step| fire_at + (RETRY_AFTER + chrono::TimeDelta::seconds(1)) * step);
    let published = tick_until_published(&s, times).await;
    let fire: chrono::DateTime<chrono::Utc> = "2026-06-01T11:00:00Z".parse().unwrap();
    assert_eq!(published.iter().map(|j| j.job_id.clone()).collect::<Vec<_>>(), [fire_job_id("hung", fire)]);
    let jobs = drain(&ch, &topo.jobs_queue("noop")).await;
    assert_eq!(jobs.iter().map(|j| j.job_id.as_str()).collect::<Vec<_>>(), [fire_job_id("hung", fire).as_str()], "published once");
    cleanup(&topo, &["noop"]).await;
}

/// A store that hangs when the fire is noted (a trigger sleeps 30 s in every update of
/// `schedule_fires` while `hang_on` has a row): each of the five attempts is given up after
/// `NOTE_TIMEOUT` (2 s), so the tick ends inside the claim's lease with the fire published once
/// and left unnoted, for a tick after the lease to publish again under the same job id. Without
/// the bound the first attempt waits the store out (30 s), past the lease, while another replica
/// could take the fire over.
#[tokio::test]
async fn a_fire_whose_note_hangs_is_given_up_inside_its_lease() {
    let schema = PgSchema::new().await;
    let store = Store::open(&schema.url).await.unwrap();
    for sql in [
        "CREATE TABLE hang_on (x INT)",
        "INSERT INTO hang_on VALUES (1)",
        "CREATE FUNCTION hang() RETURNS trigger AS $$ BEGIN IF EXISTS (SELECT 1 FROM hang_on) THEN PERFORM pg_sleep(30); END IF; \
         RETURN NEW; END $$ LANGUAGE plpgsql",
        "CREATE TRIGGER hang BEFORE UPDATE ON schedule_fires FOR EACH ROW EXECUTE FUNCTION hang()",
    ] {
        store.execute_raw(sql).await.unwrap();
    }
    let topo = topology();
    let (_conn, ch) = channel().await;
    topo.declare_job_type(&ch, "noop").await.unwrap();
    let t0: chrono::DateTime<chrono::Utc> = "2026-06-01T10:00:30Z".parse().unwrap();
    let s = started(AMQP_URL, &topo, &store, every_minute("hung-note", "bot-n"), t0).await;
    let started = std::time::Instant::now();
    let err = s.tick(t0 + chrono::TimeDelta::seconds(30)).await.expect_err("the note cannot be made");
    let took = started.elapsed();
    assert!(matches!(err, ScheduleError::Store(_)), "{err}");
    assert!(took >= NOTE_TIMEOUT * 5 && took.as_secs() < RETRY_AFTER.num_seconds() as u64 - 10, "given up after {took:?}");
    assert_eq!(drain(&ch, &topo.jobs_queue("noop")).await.len(), 1, "published once");
    // Let the sleepers go: no new one sleeps, the current ones are ended.
    let admin = Store::open(&schema.url).await.unwrap();
    admin.execute_raw("DELETE FROM hang_on").await.unwrap();
    admin
        .execute_raw(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE wait_event = 'PgSleep' AND query LIKE 'UPDATE schedule_fires%' AND pid <> pg_backend_pid()",
        )
        .await
        .unwrap();
    admin.close().await;
    drop((s, store));
    schema.drop().await;
    cleanup(&topo, &["noop"]).await;
}
