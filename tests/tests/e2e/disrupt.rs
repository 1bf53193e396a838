//! Tests that disrupt the broker for everyone (close every connection, or change a
//! broker-wide setting for a moment).
//! `scripts/test.sh` runs `disrupt::` alone, after the other tests.

use std::{process::Command, time::Duration};

use serde_json::json;
use trainyard_common::JobStatus;

use crate::support::{collect_until_terminal, events_within, wait_for, Env};

fn close_all_connections() {
    let st = Command::new("rabbitmqctl").args(["close_all_connections", "trainyard disrupt test"]).output().expect("rabbitmqctl");
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
}

/// A lost connection mid-job: nothing is acked on the dead session, the
/// worker reconnects with backoff, the broker redelivers, the job completes once.
#[tokio::test]
async fn lost_connection_mid_job_reconnects_and_completes_once() {
    let env = Env::new(&["noop"]).await;
    let w = env.spawn_worker(&["noop"], |_| {});
    let spec = env.spec("noop", json!({"sleep_ms": 3000}));
    let sub = env.submitter();
    let mut watch = sub.watch(&spec).await.unwrap();
    sub.submit(&spec).await.unwrap();
    wait_for(&mut watch, JobStatus::Started, Duration::from_secs(30)).await;
    // This also closes the test's own connections: watch again on a new one.
    tokio::task::spawn_blocking(close_all_connections).await.unwrap();
    let mut watch = env.watch(&spec).await;
    let events = collect_until_terminal(&mut watch, Duration::from_secs(60)).await;
    assert_eq!(events.last().unwrap().status, JobStatus::Succeeded);
    let outcome = env.artifacts.get(&trainyard_common::artifacts::keys::outcome(&spec.job_id)).await.unwrap();
    assert!(outcome.is_some());
    // Once: no second result comes after it, and nothing was dead-lettered on the way.
    let late = events_within(&mut watch, Duration::from_secs(2)).await;
    assert!(late.iter().all(|e| !e.status.is_terminal()), "a second terminal event: {late:?}");
    w.stop().await;
    // The test's own connection was closed too: count on a new one. After the stop, a
    // delivery left unacked would be back in the queue.
    let conn = trainyard_common::amqp::connect(crate::support::URL, "trainyard-tests-disrupt").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let passive = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
    for (queue, what) in [(env.topo.dead_queue("noop"), "nothing dead-lettered"), (env.topo.jobs_queue("noop"), "the job acked")] {
        let q = ch.queue_declare(queue.as_str().into(), passive, lapin::types::FieldTable::default()).await.unwrap();
        assert_eq!(q.message_count(), 0, "{what}");
    }
    let _ = conn.close(200, "checked".into()).await;
    env.cleanup().await;
}

/// Starts the broker application again when dropped, so that a failed test never leaves it stopped.
struct StartAppOnDrop;

impl Drop for StartAppOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").arg("start_app").output();
        let _ = Command::new("rabbitmqctl").arg("await_startup").output();
    }
}

fn rabbitmqctl(args: &[&str]) {
    let st = Command::new("rabbitmqctl").args(args).output().expect("rabbitmqctl");
    assert!(st.status.success(), "rabbitmqctl {args:?}: {}", String::from_utf8_lossy(&st.stderr));
}

/// The value of an unlabelled counter in a registry.
fn counter(registry: &prometheus::Registry, name: &str) -> u64 {
    crate::support::counter(registry, name).map_or(0, |v| v as u64)
}

/// A broker restart (`stop_app`/`start_app`): the worker, the recorder and the trigger
/// listener all come back through the one reconnect loop and count their reconnects,
/// and a job triggered after the restart runs and is recorded.
#[tokio::test]
async fn a_broker_restart_is_survived_by_the_worker_the_recorder_and_the_trigger_listener() {
    use trainyard::{config::TriggerRule, recorder::Recorder, store::Store, triggers::Triggers};
    use trainyard_common::metrics::{ControlMetrics, RECONNECTS_TOTAL};

    let env = Env::new(&["noop"]).await;
    env.topo.declare_shared(&env.ch).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&format!("sqlite://{}/t.db", dir.path().display())).await.unwrap();
    let control_registry = prometheus::Registry::new();
    let metrics = ControlMetrics::new(&control_registry, &["noop".to_string()]).unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let recorder = Recorder::new(store.clone(), env.topo.clone(), crate::support::URL, Some(metrics.clone()));
    let rule = TriggerRule {
        name: "restart".into(),
        routing_key: "bot.restart".into(),
        job_type: "noop".into(),
        bot: "{{bot}}".into(),
        params: json!({"sleep_ms": 1}),
        debounce_s: 0,
        priority: Default::default(),
        coalesce_key: None,
    };
    let triggers = Triggers::new(vec![rule], env.submitter(), crate::support::URL, Some(metrics.clone()));
    let queue = triggers.queue_name();
    let tasks = [
        tokio::spawn({
            let s = stop.clone();
            async move { recorder.run(s).await }
        }),
        tokio::spawn({
            let s = stop.clone();
            async move { triggers.run(s).await }
        }),
    ];
    let worker_registry = prometheus::Registry::new();
    let worker = trainyard_worker::runtime::Worker::new(
        env.config(),
        trainyard_worker::handlers::builtin().only(&["noop".to_string()]).unwrap(),
        &worker_registry,
        trainyard_worker::runtime::joblog::JobLogs::default(),
    )
    .unwrap();
    let worker_task = tokio::spawn({
        let s = stop.clone();
        async move { worker.run(s).await.expect("worker failed") }
    });
    // A job through the trigger, the worker and the recorder, before and after the restart.
    let run_one = |bot: &'static str| {
        let (env_topo, store) = (env.topo.clone(), store.clone());
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(120);
            let body = json!({"bot": bot}).to_string();
            let mut published = false;
            loop {
                assert!(std::time::Instant::now() < deadline, "no job for {bot} succeeded within 120 s");
                if !published {
                    // The broker may still be starting: publish until it takes the event.
                    if let Ok(conn) = trainyard_common::amqp::connect(crate::support::URL, "restart-test").await {
                        if let Ok(ch) = trainyard_common::amqp::confirm_channel(&conn).await {
                            let props = lapin::BasicProperties::default();
                            published = trainyard_common::amqp::publish_confirmed(
                                &ch,
                                &env_topo.triggers_exchange(),
                                "bot.restart",
                                body.as_bytes(),
                                props,
                                true,
                            )
                            .await
                            .is_ok();
                        }
                        let _ = conn.close(200, "bye".into()).await;
                    }
                }
                let filter = trainyard::store::JobFilter { bot: Some(bot.into()), limit: 5, ..Default::default() };
                if store.list_jobs(&filter).await.unwrap().iter().any(|j| j.status == JobStatus::Succeeded) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    run_one("before-restart").await;
    let guard = StartAppOnDrop;
    tokio::task::spawn_blocking(|| rabbitmqctl(&["stop_app"])).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    tokio::task::spawn_blocking(|| {
        rabbitmqctl(&["start_app"]);
        rabbitmqctl(&["await_startup"]);
    })
    .await
    .unwrap();
    drop(guard);
    let t0 = std::time::Instant::now();
    run_one("after-restart").await;
    eprintln!("a triggered job ran and was recorded {:.1}s after the broker came back", t0.elapsed().as_secs_f64());
    // Recorder and trigger listener reconnected (at least once each), and so did the worker.
    assert!(
        counter(&control_registry, RECONNECTS_TOTAL) >= 2,
        "control plane reconnects: {}",
        counter(&control_registry, RECONNECTS_TOTAL)
    );
    assert!(counter(&worker_registry, RECONNECTS_TOTAL) >= 1, "worker reconnects: {}", counter(&worker_registry, RECONNECTS_TOTAL));
    stop.cancel();
    for t in tasks {
        t.await.unwrap();
    }
    worker_task.await.unwrap();
    let conn = trainyard_common::amqp::connect(crate::support::URL, "restart-test-cleanup").await.unwrap();
    if let Ok(ch) = conn.create_channel().await {
        let _ = ch.queue_delete(queue.as_str().into(), Default::default()).await;
    }
    let _ = conn.close(200, "bye".into()).await;
    store.close().await;
    env.cleanup().await;
}

/// A RabbitMQ setting changed with `rabbitmqctl eval` for as long as this lives (a channel
/// reads it when it opens), then set back.
struct BrokerSetting {
    key: &'static str,
    before: u64,
}

impl BrokerSetting {
    /// Sets `key` to `value`; `default` is what is set back when the value before cannot be
    /// read (RabbitMQ's own default: a channel cannot live without either setting).
    fn set(key: &'static str, value: u64, default: u64) -> Self {
        let out =
            Command::new("rabbitmqctl").args(["eval", &format!("application:get_env(rabbit, {key}).")]).output().expect("rabbitmqctl");
        // `{ok,1800000}`.
        let text = String::from_utf8_lossy(&out.stdout);
        let before = text.trim().strip_prefix("{ok,").and_then(|v| v.strip_suffix('}')).and_then(|v| v.parse().ok()).unwrap_or(default);
        rabbitmqctl(&["eval", &format!("application:set_env(rabbit, {key}, {value}).")]);
        Self { key, before }
    }
}

impl Drop for BrokerSetting {
    fn drop(&mut self) {
        let restore = format!("application:set_env(rabbit, {}, {}).", self.key, self.before);
        let _ = Command::new("rabbitmqctl").args(["eval", &restore]).output();
    }
}

/// A channel the broker closes because a delivery stayed unacked past its `consumer_timeout`
/// is logged as an acknowledgement timeout, with the id of the job it held and the settings
/// to raise. The worker is told a consumer timeout far above the broker's (the misconfiguration
/// that leads there); the broker's is lowered to 2 s only while the worker opens its channels
/// (RabbitMQ 3.10 reads it when a channel opens), and checked every 0.5 s during the test.
#[tokio::test]
async fn an_acknowledgement_timeout_is_logged_as_one_with_the_job_id() {
    let env = Env::new(&["noop"]).await;
    let log_path = env.artifacts_dir.path().join("worker.log");
    let log = std::fs::File::create(&log_path).unwrap();
    // Every channel re-reads the tick interval when it re-arms its timer: faster checks, for
    // the whole test. The timeout is read once, when a channel opens: only the worker's.
    let _tick = BrokerSetting::set("channel_tick_interval", 500, 60_000);
    let mut worker = {
        let _timeout = BrokerSetting::set("consumer_timeout", 2000, 1_800_000);
        let child = crate::support::Killed(
            Command::new(crate::support::bin("trainyard-worker"))
                .args(["run", "--types", "noop", "--log-format", "text", "--consumer-timeout-s", "3600"])
                .env("TRAINYARD_PREFIX", env.topo.prefix())
                .env("TRAINYARD_ARTIFACTS", env.artifacts_dir.path())
                .env("TRAINYARD_AMQP_URL", crate::support::URL)
                .env("RUST_LOG", "info")
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("trainyard-worker"),
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while env.consumers(&env.topo.jobs_queue("noop")).await == 0 {
            assert!(std::time::Instant::now() < deadline, "the worker never consumed");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        child
    };
    let spec = env.spec("noop", json!({"sleep_ms": 30_000}));
    env.submitter().submit(&spec).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let line = loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains("acknowledgement timeout")) {
            break line.to_string();
        }
        assert!(std::time::Instant::now() < deadline, "no acknowledgement timeout logged within 60 s:\n{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let _ = worker.kill();
    let _ = worker.wait();
    assert!(line.contains(&spec.job_id), "the line names the job held on the channel: {line}");
    assert!(line.contains("delivery acknowledgement on channel"), "the broker's words: {line}");
    assert!(line.contains("consumer_timeout") && line.contains("TRAINYARD_CONSUMER_TIMEOUT_S"), "the settings: {line}");
    env.cleanup().await;
}
