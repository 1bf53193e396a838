//! The audit trail in the store: one row per [`AuditRecord`], recorded once by its id.

use chrono::Utc;
use serde::{Deserialize, Serialize};
use sqlx::{AssertSqlSafe, Row};

use super::{from_micros, micros, q, types, values_list, Store, StoreError, ROWS_PER_STATEMENT};
use crate::audit::AuditRecord;

/// Filter of `trainyard audit` and `GET /v1/audit`: every field narrows the list.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditFilter {
    /// Only this actor.
    pub actor: Option<String>,
    /// Only this action.
    pub action: Option<String>,
    /// Only this target (a job id or bot).
    pub target: Option<String>,
    /// At most this many, newest first (1..=10,000; 0 means 100).
    #[serde(default)]
    pub limit: i64,
}

impl Store {
    /// Records audit records (idempotent on their id), in one transaction.
    pub async fn record_audit(&self, records: &[AuditRecord]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await.map_err(q("begin recording audit records"))?;
        self.record_audit_in(&mut tx, records).await?;
        tx.commit().await.map_err(q("commit audit records"))
    }

    /// Records audit records (idempotent on their id) in the caller's transaction.
    pub(super) async fn record_audit_in(&self, conn: &mut sqlx::AnyConnection, records: &[AuditRecord]) -> Result<(), StoreError> {
        let now = micros(Utc::now());
        for chunk in records.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "INSERT INTO audit (id, at, actor, action, target, detail, recorded_at) VALUES {} ON CONFLICT (id) DO NOTHING",
                values_list(self.backend, chunk.len(), 7, "")
            );
            let mut query = sqlx::query(AssertSqlSafe(sql)).persistent(false);
            for r in chunk {
                query = query
                    .bind(&r.id)
                    .bind(micros(r.at))
                    .bind(types::text(&r.actor))
                    .bind(types::text(&r.action))
                    .bind(types::text(&r.target))
                    .bind(r.detail.as_ref().map(types::to_json))
                    .bind(now);
            }
            query.execute(&mut *conn).await.map_err(q("record audit records"))?;
        }
        Ok(())
    }

    /// Audit records matching `filter`, newest first.
    pub async fn audit(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>, StoreError> {
        let mut sql = String::from("SELECT id, at, actor, action, target, detail FROM audit WHERE 1 = 1");
        let mut binds = Vec::new();
        for (column, value) in [("actor", &filter.actor), ("action", &filter.action), ("target", &filter.target)] {
            if let Some(v) = value {
                // Stored escaped (`types::text`): compared so.
                binds.push(types::text(v));
                sql.push_str(&format!(" AND {column} = ${}", binds.len()));
            }
        }
        let limit = if filter.limit <= 0 { 100 } else { filter.limit.min(10_000) };
        sql.push_str(&format!(" ORDER BY at DESC, id DESC LIMIT {limit}"));
        let query = binds.into_iter().fold(sqlx::query(AssertSqlSafe(sql)).persistent(false), |q, v| q.bind(v));
        let rows = query.fetch_all(&self.pool).await.map_err(q("list audit records"))?;
        rows.iter()
            .map(|r| {
                let detail: Option<String> = r.get(5);
                Ok(AuditRecord {
                    version: Default::default(),
                    id: r.get(0),
                    at: from_micros(r.get(1)),
                    actor: types::untext(&r.get::<String, _>(2)),
                    action: types::untext(&r.get::<String, _>(3)),
                    target: types::untext(&r.get::<String, _>(4)),
                    detail: detail.map(|d| types::from_json("audit detail", &d)).transpose()?,
                })
            })
            .collect()
    }
}
