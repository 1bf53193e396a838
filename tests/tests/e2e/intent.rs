//! A full broker round trip of an `intent-train` job: submit → worker →
//! `progress` events → `succeeded` with metrics, artifacts and the promotion
//! decision; then the production pointer names the job, and the worker's
//! `/metrics` has the epoch histogram's samples.

use std::time::Duration;

use serde_json::json;
use trainyard_common::{models, JobStatus};

use crate::support::Env;

/// Three intents and out-of-scope lines, as CSV.
pub(crate) fn tiny_csv() -> String {
    let intents = [
        ("balance", ["balance", "money", "account", "funds"]),
        ("weather", ["weather", "rain", "forecast", "sunny"]),
        ("alarm", ["alarm", "wake", "clock", "morning"]),
    ];
    let fillers = ["please", "can you", "tell me", "i want", "what about", "now", "my", "the"];
    let mut s = String::from("text,label\n");
    for i in 0..40 {
        for (label, words) in &intents {
            s.push_str(&format!("{} {} {},{label}\n", fillers[i % fillers.len()], words[i % 4], words[(i / 4) % 4]));
        }
        s.push_str(&format!("{} pizza poem {},oos\n", fillers[(i + 3) % fillers.len()], ["galaxy", "movie", "ocean", "robot"][i % 4]));
    }
    s
}

#[tokio::test]
async fn intent_train_round_trip_produces_all_artifacts_and_promotes() {
    let env = Env::new(&["intent-train"]).await;
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("tiny.csv"), tiny_csv()).unwrap();
    let data_dir = data.path().to_path_buf();
    let metrics = prometheus::Registry::new();
    let w = env.spawn_worker_with_metrics(&["intent-train"], &metrics, move |c| c.data_dir = data_dir);
    let stop_http = tokio_util::sync::CancellationToken::new();
    let router = trainyard_worker::runtime::http::router(metrics, std::sync::Arc::new(|| true));
    let addr = trainyard_worker::runtime::http::serve("127.0.0.1:0".parse().unwrap(), router, stop_http.clone()).await.unwrap();
    let spec = env.spec("intent-train", json!({"dataset": "tiny.csv", "epochs": 4, "seed": 3}));
    let events = env.run_job(&spec, Duration::from_secs(120)).await;
    let done = events.last().unwrap();
    assert_eq!(done.status, JobStatus::Succeeded, "{done:?}");
    let progress: Vec<_> = events.iter().filter(|e| e.status == JobStatus::Progress).collect();
    assert!(!progress.is_empty(), "live progress events");
    let first = progress[0].progress.as_ref().unwrap();
    assert!(first.get("epoch").is_some());
    assert_eq!(first["device"], "cpu", "progress names the device: {first}");
    let result = done.result.as_ref().unwrap();
    assert!(result["accuracy"].as_f64().unwrap() > 0.8, "{result}");
    assert_eq!(result["promotion"]["promoted"], true, "first model of a bot that meets the minimum is promoted: {result}");
    for file in ["metrics.json", "confusion_matrix.json", "confusion_matrix.png"] {
        let key = format!("jobs/{}/{file}", spec.job_id);
        assert!(env.artifacts.exists(&key).await.unwrap(), "missing {key}");
    }
    assert!(env.artifacts.exists(&trainyard_common::artifacts::keys::outcome(&spec.job_id)).await.unwrap(), "missing the outcome");
    let png = env.artifacts.get(&format!("jobs/{}/confusion_matrix.png", spec.job_id)).await.unwrap().unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let prod = models::production(&env.artifacts, "test-bot").await.unwrap().expect("a production pointer");
    assert_eq!(prod.job_id, spec.job_id);
    // One epoch-seconds sample per epoch, labelled with the device, on the worker's /metrics.
    let text = scrape(addr).await;
    let count = text
        .lines()
        .find(|l| l.starts_with("trainyard_training_epoch_seconds_count{device=\"cpu\"}"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<u64>().ok());
    assert_eq!(count, Some(progress.len() as u64), "epoch histogram samples on /metrics:\n{text}");
    stop_http.cancel();
    w.stop().await;
    env.cleanup().await;
}

/// GET /metrics over plain HTTP/1.1.
async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}
