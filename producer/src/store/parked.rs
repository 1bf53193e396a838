//! Parked events: what the recorder received but could not record (undecodable,
//! a major version this build does not read, ids that are not ids), kept with the
//! reason in the same transaction as the batch it arrived with, so that acking
//! the batch never loses one. `trainyard events reprocess` records those that
//! now decode (after an upgrade) and removes them, in one transaction.

use sqlx::{AssertSqlSafe, Row};
use trainyard_common::JobEvent;

use crate::audit::AuditRecord;

use super::{micros, q, types, values_list, ParkedEvent, Recorded, Store, StoreError, ROWS_PER_STATEMENT};

/// What a parked message reads as now: a job event or an audit record.
#[derive(Debug, Clone)]
pub enum Unparked {
    /// A job event.
    Event(Box<JobEvent>),
    /// An operator action of the audit trail.
    Audit(AuditRecord),
}

impl Store {
    /// Records `events` and parks `parked`, in one transaction.
    pub async fn record_batch(&self, events: &[JobEvent], parked: &[ParkedEvent]) -> Result<Vec<Recorded>, StoreError> {
        if parked.is_empty() {
            return self.record_events(events).await;
        }
        let mut tx = self.pool.begin().await.map_err(q("begin recording events"))?;
        self.park_in(&mut tx, parked).await?;
        let out = self.record_events_in(&mut tx, events).await?;
        tx.commit().await.map_err(q("commit recorded events"))?;
        Ok(out)
    }

    /// Parks `parked` on its own (what is not a job event: an unusable trigger event); returns
    /// how many were new (an entry's id is its routing key and body: one parked again is not).
    pub async fn park(&self, parked: &[ParkedEvent]) -> Result<u64, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(q("park events"))?;
        self.park_in(&mut conn, parked).await
    }

    /// Parks `parked` on `conn`; returns how many were new.
    pub(super) async fn park_in(&self, conn: &mut sqlx::AnyConnection, parked: &[ParkedEvent]) -> Result<u64, StoreError> {
        let mut new = 0;
        for chunk in parked.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "INSERT INTO parked_events (id, routing_key, content_type, reason, body, at) VALUES {} ON CONFLICT (id) DO NOTHING",
                values_list(self.backend, chunk.len(), 6, "")
            );
            let mut query = sqlx::query(AssertSqlSafe(sql)).persistent(false);
            for p in chunk {
                query =
                    query.bind(&p.id).bind(&p.routing_key).bind(p.content_type.clone()).bind(&p.reason).bind(&p.body).bind(micros(p.at));
            }
            new += query.execute(&mut *conn).await.map_err(q("park events"))?.rows_affected();
        }
        Ok(new)
    }

    /// Parked events, oldest first.
    pub async fn parked_events(&self) -> Result<Vec<ParkedEvent>, StoreError> {
        let rows = sqlx::query("SELECT id, routing_key, content_type, reason, body, at FROM parked_events ORDER BY at, id")
            .fetch_all(&self.pool)
            .await
            .map_err(q("list parked events"))?;
        Ok(rows.iter().map(types::parked_event).collect())
    }

    /// Records every parked event or audit record that `decode` now reads and removes it from
    /// the parked ones, in one transaction; the others stay parked (with the new reason).
    /// When the store refuses what it is given (an error no retry changes: a trigger, a value
    /// it cannot hold), they are recorded one by one, and each one it refuses stays parked with
    /// the store's reason: one such entry used to fail every reprocess, and nothing was
    /// recorded. A failure a retry can fix is returned; what was committed before it stays.
    /// Returns (recorded, still parked).
    pub async fn reprocess_parked(
        &self,
        decode: impl Fn(&ParkedEvent, &[u8]) -> Result<Unparked, String>,
    ) -> Result<(usize, usize), StoreError> {
        let parked = self.parked_events().await?;
        let (mut readable, mut still) = (Vec::new(), Vec::new());
        let mut kept = 0;
        for p in &parked {
            // A trigger event is not a job event: it stays parked as it is, with its reason.
            if p.routing_key.starts_with(crate::triggers::PARKED_PREFIX) {
                kept += 1;
                continue;
            }
            match p.body_bytes().map_err(|e| e.to_string()).and_then(|body| decode(p, &body)) {
                Ok(read) => readable.push((p.id.as_str(), read)),
                Err(reason) => still.push((p.id.as_str(), reason)),
            }
        }
        match self.unpark(&readable, &still).await {
            Ok(()) => return Ok((readable.len(), still.len() + kept)),
            Err(e) if e.retryable() => return Err(e),
            Err(e) => {
                tracing::error!(error = %e, entries = readable.len(), "the store refuses reprocessed entries; recording them one by one")
            }
        }
        let mut recorded = 0;
        for (id, read) in &readable {
            match self.unpark(std::slice::from_ref(&(*id, read.clone())), &[]).await {
                Ok(()) => recorded += 1,
                Err(e) if e.retryable() => return Err(e),
                Err(e) => {
                    tracing::error!(error = %e, id = %id, "the store refuses a reprocessed entry; it stays parked");
                    still.push((*id, format!("the job store refused it: {e}")));
                }
            }
        }
        self.unpark(&[], &still).await?;
        Ok((recorded, still.len() + kept))
    }

    /// Records `readable` and removes them from the parked ones, and sets the reason of each of
    /// `still`, in one transaction.
    async fn unpark(&self, readable: &[(&str, Unparked)], still: &[(&str, String)]) -> Result<(), StoreError> {
        let (mut events, mut audit) = (Vec::new(), Vec::new());
        for (_, read) in readable {
            match read {
                Unparked::Event(e) => events.push((**e).clone()),
                Unparked::Audit(r) => audit.push(r.clone()),
            }
        }
        let mut tx = self.pool.begin().await.map_err(q("begin reprocessing parked events"))?;
        self.record_audit_in(&mut tx, &audit).await?;
        self.record_events_in(&mut tx, &events).await?;
        for (id, _) in readable {
            sqlx::query("DELETE FROM parked_events WHERE id = $1")
                .bind(*id)
                .execute(&mut *tx)
                .await
                .map_err(q(format!("unpark event {id}")))?;
        }
        for (id, reason) in still {
            sqlx::query("UPDATE parked_events SET reason = $1 WHERE id = $2")
                .bind(types::text(reason))
                .bind(*id)
                .execute(&mut *tx)
                .await
                .map_err(q(format!("update parked event {id}")))?;
        }
        tx.commit().await.map_err(q("commit reprocessed events"))?;
        Ok(())
    }

    /// Number of parked events.
    pub async fn parked_count(&self) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT COUNT(*) FROM parked_events").fetch_one(&self.pool).await.map_err(q("count parked events"))?;
        Ok(row.get::<i64, _>(0))
    }
}
