//! Where the recorder stands in the events stream.
//!
//! The recorder reads `<prefix>.events.log` itself and keeps, per stream, the offset of
//! the last entry it recorded. That offset is written in the **same transaction** as the
//! entries it covers ([`Store::record_stream_batch`]), so a crash can neither skip an
//! entry (offset committed, entries not) nor record one twice (entries committed, offset
//! not); on start the recorder resumes at the stored offset + 1.
//!
//! Two control planes may read the same stream: the stored offset only moves forward
//! (the larger of the stored and the new one), and each recorder reads on from where the
//! store stood when it started, so every offset at or below the stored one is recorded.
//! `entries` counts the stream entries recorded in all: one per entry and transaction, so
//! a re-read entry counts twice (tests read it to prove "exactly once").
//!
//! The one way back: a stream deleted and declared again starts its offsets at 0, so the
//! recorder resets a position its stream no longer reaches ([`Store::reset_stream_position`]).

use chrono::Utc;
use sqlx::Row;
use trainyard_common::JobEvent;

use super::{micros, q, ParkedEvent, Recorded, Store, StoreError};
use crate::audit::AuditRecord;

/// One batch of stream entries, sorted by what became of them.
#[derive(Debug, Clone, Default)]
pub struct StreamBatch {
    /// Entries that are job events.
    pub events: Vec<JobEvent>,
    /// Entries that are audit records.
    pub audit: Vec<AuditRecord>,
    /// Entries that cannot be recorded, parked with the reason.
    pub parked: Vec<ParkedEvent>,
    /// The offset of the batch's last entry.
    pub last_offset: i64,
    /// How many stream entries the batch holds.
    pub entries: u64,
}

/// What [`Store::record_stream_batch`] did.
#[derive(Debug, Clone, Default)]
pub struct BatchRecorded {
    /// What it did with each of the batch's events, in their order.
    pub events: Vec<Recorded>,
    /// How many parked entries were new (an entry parked before is kept once).
    pub parked: u64,
}

/// A consumer's stored position in a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamPosition {
    /// The offset of the last entry recorded.
    pub last_offset: i64,
    /// Stream entries recorded in all (an entry recorded twice counts twice).
    pub entries: i64,
}

impl Store {
    /// Records a batch read from `stream` and moves the stream's position to its last
    /// offset, all in one transaction. Without a stream (messages of the recorder queue of
    /// earlier releases), records the batch alone.
    pub async fn record_stream_batch(&self, stream: Option<&str>, batch: &StreamBatch) -> Result<BatchRecorded, StoreError> {
        let mut tx = self.pool.begin().await.map_err(q("begin recording a stream batch"))?;
        self.record_audit_in(&mut tx, &batch.audit).await?;
        let parked = self.park_in(&mut tx, &batch.parked).await?;
        let events = self.record_events_in(&mut tx, &batch.events).await?;
        if let Some(stream) = stream {
            self.move_position_in(&mut tx, stream, batch).await?;
        }
        tx.commit().await.map_err(q("commit a stream batch"))?;
        Ok(BatchRecorded { events, parked })
    }

    /// Moves `stream`'s position to the batch's last offset (never back) and counts its entries.
    /// Last in its transaction: every recorder takes this row after its job rows, so two cannot deadlock.
    async fn move_position_in(&self, tx: &mut sqlx::AnyConnection, stream: &str, batch: &StreamBatch) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO stream_positions (stream, last_offset, entries, updated_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (stream) DO UPDATE SET \
             last_offset = CASE WHEN stream_positions.last_offset > excluded.last_offset \
                           THEN stream_positions.last_offset ELSE excluded.last_offset END, \
             entries = stream_positions.entries + excluded.entries, updated_at = excluded.updated_at",
        )
        .bind(stream)
        .bind(batch.last_offset)
        .bind(batch.entries as i64)
        .bind(micros(Utc::now()))
        .execute(&mut *tx)
        .await
        .map_err(q(format!("store the position in {stream}")))?;
        Ok(())
    }

    /// Where the recorder stands in `stream`; `None` before it recorded anything from it.
    pub async fn stream_position(&self, stream: &str) -> Result<Option<StreamPosition>, StoreError> {
        let row = sqlx::query("SELECT last_offset, entries FROM stream_positions WHERE stream = $1")
            .bind(stream)
            .fetch_optional(&self.pool)
            .await
            .map_err(q(format!("read the position in {stream}")))?;
        Ok(row.map(|r| StreamPosition { last_offset: r.get(0), entries: r.get(1) }))
    }

    /// Forgets `stream`'s position (its row, `entries` included) if it still stands at
    /// `last_offset`: the stream was deleted and declared again, its offsets restarted at 0,
    /// and reading on after the old one would skip every entry up to it. A position another
    /// recorder moved since (reading the new stream) is kept. Whether it was forgotten.
    pub async fn reset_stream_position(&self, stream: &str, last_offset: i64) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM stream_positions WHERE stream = $1 AND last_offset = $2")
            .bind(stream)
            .bind(last_offset)
            .execute(&self.pool)
            .await
            .map_err(q(format!("reset the position in {stream}")))?;
        Ok(done.rows_affected() > 0)
    }
}
