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
#[derive(Debug)]
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

    /// Records every parked event or audit record that `decode` now reads and
    /// removes it from the parked ones, in one transaction; the others stay parked
    /// (with the new reason). Returns (recorded, still parked).
    pub async fn reprocess_parked(
        &self,
        decode: impl Fn(&ParkedEvent, &[u8]) -> Result<Unparked, String>,
    ) -> Result<(usize, usize), StoreError> {
        let parked = self.parked_events().await?;
        let (mut events, mut audit) = (Vec::new(), Vec::new());
        let mut done = Vec::new();
        let mut still = Vec::new();
        let mut kept = 0;
        for p in &parked {
            // A trigger event is not a job event: it stays parked as it is, with its reason.
            if p.routing_key.starts_with(crate::triggers::PARKED_PREFIX) {
                kept += 1;
                continue;
            }
            match decode(p, &p.body_bytes()?) {
                Ok(Unparked::Event(e)) => events.push(*e),
                Ok(Unparked::Audit(r)) => audit.push(r),
                Err(reason) => {
                    still.push((p.id.as_str(), reason));
                    continue;
                }
            }
            done.push(p.id.as_str());
        }
        let mut tx = self.pool.begin().await.map_err(q("begin reprocessing parked events"))?;
        self.record_audit_in(&mut tx, &audit).await?;
        self.record_events_in(&mut tx, &events).await?;
        for id in &done {
            sqlx::query("DELETE FROM parked_events WHERE id = $1")
                .bind(*id)
                .execute(&mut *tx)
                .await
                .map_err(q(format!("unpark event {id}")))?;
        }
        for (id, reason) in &still {
            sqlx::query("UPDATE parked_events SET reason = $1 WHERE id = $2")
                .bind(types::text(reason))
                .bind(*id)
                .execute(&mut *tx)
                .await
                .map_err(q(format!("update parked event {id}")))?;
        }
        tx.commit().await.map_err(q("commit reprocessed events"))?;
        Ok((done.len(), still.len() + kept))
    }

    /// Number of parked events.
    pub async fn parked_count(&self) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT COUNT(*) FROM parked_events").fetch_one(&self.pool).await.map_err(q("count parked events"))?;
        Ok(row.get::<i64, _>(0))
    }
}
