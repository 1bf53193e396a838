//! Tests that disrupt the broker for everyone (close every connection).
//! `scripts/test.sh` runs `disrupt::` alone, after the other tests.

use std::{process::Command, time::Duration};

use serde_json::json;
use trainyard_common::JobStatus;

use crate::support::{collect_until_terminal, wait_for, Env};

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
    w.stop().await;
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
    registry.gather().iter().find(|f| f.name() == name).map(|f| f.get_metric()[0].get_counter().get_value() as u64).unwrap_or(0)
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
