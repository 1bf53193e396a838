//! Queue positions: where a waiting job stands among the ready jobs of its type.
//!
//! Workers take the highest priority tier first and each tier in order, so a `queued`
//! job's position is the number of ready jobs of its type in a higher tier, plus those
//! of its tier submitted before it. It is the store's view: a job whose `queued` event
//! is not recorded yet, or one superseded but not yet taken off its queue, is counted
//! as the store sees it.

use std::collections::BTreeMap;

use sqlx::Row;
use trainyard_common::{job::Priority, JobSpec, JobStatus};

use super::{q, types, JobRow, Store, StoreError};

impl Store {
    /// The position (0 = next to start) of each `queued` job of `jobs`, by job id.
    pub async fn queue_positions(&self, jobs: &[JobRow]) -> Result<BTreeMap<String, u64>, StoreError> {
        let mut out = BTreeMap::new();
        let mut types: Vec<&str> = jobs.iter().filter(|j| j.status == JobStatus::Queued).map(|j| j.job_type.as_str()).collect();
        types.sort_unstable();
        types.dedup();
        for job_type in types {
            let rows = sqlx::query("SELECT job_id, spec, submitted_at FROM jobs WHERE job_type = $1 AND status = 'queued'")
                .bind(job_type)
                .fetch_all(&self.pool)
                .await
                .map_err(q(format!("read the queued jobs of {job_type}")))?;
            let mut waiting: Vec<(Priority, i64, String)> = rows
                .iter()
                .map(|r| {
                    let spec: Option<String> = r.get(1);
                    let priority = spec.and_then(|s| types::from_json::<JobSpec>("spec", &s).ok()).map(|s| s.priority);
                    (priority.unwrap_or_default(), r.get::<Option<i64>, _>(2).unwrap_or(i64::MAX), r.get(0))
                })
                .collect();
            waiting.sort();
            out.extend(waiting.into_iter().enumerate().map(|(i, (_, _, id))| (id, i as u64)));
        }
        out.retain(|id, _| jobs.iter().any(|j| &j.job_id == id));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use trainyard_common::{JobEvent, Trigger};

    use super::*;

    #[tokio::test]
    async fn higher_tiers_then_submit_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("sqlite://{}/t.db", dir.path().display())).await.unwrap();
        let job = |bot: &str, priority, ms| {
            let mut s = JobSpec::new("noop", bot, serde_json::json!({}), Trigger::manual("t"));
            s.priority = priority;
            s.submitted_at += chrono::Duration::milliseconds(ms);
            s
        };
        let (a1, a2, b, urgent, other) = (
            job("a", Priority::Normal, 0),
            job("a", Priority::Normal, 1),
            job("b", Priority::Low, -5),
            job("c", Priority::High, 9),
            job("d", Priority::Normal, 2),
        );
        for s in [&a1, &a2, &b, &urgent, &other] {
            store.record_event(&JobEvent::queued(s)).await.unwrap();
        }
        store.record_event(&JobEvent::new(&other, JobStatus::Started, 1, 1)).await.unwrap();
        let rows = store.list_jobs(&types::JobFilter { bot: Some("a".into()), limit: 10, ..Default::default() }).await.unwrap();
        let pos = store.queue_positions(&rows).await.unwrap();
        assert_eq!(
            pos,
            BTreeMap::from([(a1.job_id.clone(), 1), (a2.job_id.clone(), 2)]),
            "behind the high job; the running one does not count"
        );
        let all = store.list_jobs(&types::JobFilter { limit: 10, ..Default::default() }).await.unwrap();
        let pos = store.queue_positions(&all).await.unwrap();
        assert_eq!((pos[&urgent.job_id], pos[&b.job_id]), (0, 3), "high first, low last whatever its submit time");
        store.close().await;
    }
}
