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
