//! `outcomes`: the cost of recording job outcomes on a local artifact directory, the
//! worker's one disk write per finished job (a create-once record, see
//! `ArtifactStore::put_if_absent`), without the broker around it.

use std::{path::Path, time::Instant};

use futures::{StreamExt, TryStreamExt};
use serde_json::{json, Value};
use trainyard_common::artifacts::{keys, ArtifactStore};

/// Writes `records` outcome records of a realistic size (a `succeeded` event, ~0.6 KB)
/// into a fresh store under `dir`, `concurrency` at a time (a worker's slots; 1: one after
/// the other, the latency of one); reports µs per record and records/s.
pub async fn run(dir: &Path, records: usize, concurrency: usize) -> anyhow::Result<Value> {
    let root = dir.join(format!("outcomes-{}", uuid_like()));
    let store = ArtifactStore::open(root.to_str().ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", root.display()))?)?;
    let body = serde_json::to_vec(&json!({"event": {
        "version": "1.1", "job_id": "00000000-0000-0000-0000-000000000000", "status": "succeeded", "attempt": 1, "seq": 1048576,
        "job_type": "noop", "bot": "bench-bot", "at": "2026-12-01T20:00:00.000000Z",
        "worker": {"id": "bench-worker-1", "attributes": {"host": "bench", "pool": "cpu"}},
        "result": {"slept_ms": 0, "duration_s": 0.000_123, "note": "x".repeat(300)},
    }}))?;
    let ids: Vec<String> = (0..records).map(|i| format!("{:08x}-0000-4000-8000-{:012x}", i, i)).collect();
    let t0 = Instant::now();
    let written: Vec<bool> = futures::stream::iter(&ids)
        .map(|id| {
            let (store, body) = (&store, body.clone());
            async move { store.put_if_absent(&keys::outcome(id), body).await }
        })
        .buffer_unordered(concurrency.max(1))
        .try_collect()
        .await?;
    let secs = t0.elapsed().as_secs_f64();
    anyhow::ensure!(written.iter().all(|w| *w), "a record was written twice");
    std::fs::remove_dir_all(&root)?;
    Ok(json!({
        "records": records,
        "concurrency": concurrency,
        "bytes_per_record": body.len(),
        "seconds": secs,
        "us_per_record": secs * 1e6 / records.max(1) as f64,
        "records_per_s": records as f64 / secs,
    }))
}

fn uuid_like() -> String {
    format!("{}-{}", std::process::id(), chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default())
}
