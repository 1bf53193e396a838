//! Bots' production models: the production pointer and the promotion history.
//!
//! Plain file formats in the artifact store, shared by the worker (which
//! promotes after training) and the control plane (which promotes by hand and
//! rolls back) without linking any ML code:
//!
//! - `bots/<bot>/production.json`: a [`ProductionEntry`], the model serving the bot;
//! - `bots/<bot>/history/<seq>.json`: one [`PromotionRecord`] per change, numbered from 0
//!   and each written once ([`PromotionHistory`] reads them in order; records an older
//!   store kept in `bots/<bot>/promotions.json` come first);
//! - a trained model lives under `jobs/<job_id>/model/` ([`model_prefix`]), with its
//!   test metrics in `jobs/<job_id>/metrics.json` ([`metrics_key`]).
//!
//! Concurrent writers of one bot lose no record, on every store (local directory,
//! memory, S3): a change is computed from the history it read and created at the next
//! number only if that number is still free (create-once); a writer that loses the race
//! reads again and retries. The production pointer is then set to the last record's
//! model, and set again until the history it was computed from is still the whole
//! history, so after concurrent promotions the pointer matches the last record.
//!
//! Rollback replays the history as a stack: a promotion pushes a model, a
//! rollback pops the current one and restores the one below it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{
    artifacts::{keys, ArtifactStore},
    error::CommonError,
};

/// The key prefix of the model a job trained.
pub fn model_prefix(job_id: &str) -> String {
    format!("jobs/{job_id}/model")
}

/// The file of a model that says what its networks are. It is written last and taken away
/// before a model is written again, so a model with one is complete.
pub const MODEL_CONFIG: &str = "config.json";

/// The key of the test metrics of a job's model.
pub fn metrics_key(job_id: &str) -> String {
    format!("jobs/{job_id}/metrics.json")
}

/// The model serving a bot (`bots/<bot>/production.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ProductionEntry {
    /// The bot.
    pub bot: String,
    /// The job that trained the model.
    pub job_id: String,
    /// Key prefix of the model in the artifact store (`jobs/<job_id>/model`).
    pub model: String,
    /// Headline test metrics of the model when it was promoted (free-form JSON).
    #[serde(default)]
    pub metrics: serde_json::Value,
    /// When it became production.
    pub promoted_at: DateTime<Utc>,
    /// Why (gate decision, operator's reason, rollback).
    #[serde(default)]
    pub reason: String,
}

/// What a history record did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PromotionAction {
    /// A model became production.
    Promote,
    /// The production model was replaced by the previous one.
    Rollback,
}

/// One change of a bot's production model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PromotionRecord {
    /// Promote or rollback.
    pub action: PromotionAction,
    /// The production job before the change, if any.
    pub from: Option<String>,
    /// The production entry after the change (`None`: a rollback left no model).
    pub to: Option<ProductionEntry>,
    /// When.
    pub at: DateTime<Utc>,
    /// Why.
    #[serde(default)]
    pub reason: String,
}

/// A bot's promotion history (`bots/<bot>/promotions.json`), oldest first.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PromotionHistory {
    /// Every change, oldest first.
    pub records: Vec<PromotionRecord>,
}

impl PromotionHistory {
    /// The lineage of production models: promotions pushed, rollbacks popped. The last one is production.
    pub fn stack(&self) -> Vec<ProductionEntry> {
        let mut stack: Vec<ProductionEntry> = Vec::new();
        for r in &self.records {
            match r.action {
                PromotionAction::Promote => stack.extend(r.to.clone()),
                PromotionAction::Rollback => {
                    stack.pop();
                }
            }
        }
        stack
    }
}

/// The production model of `bot`, if it has one.
pub async fn production(store: &ArtifactStore, bot: &str) -> Result<Option<ProductionEntry>, CommonError> {
    store.get_json(&keys::production(bot)).await
}

/// The promotion history of `bot` (empty when none).
pub async fn history(store: &ArtifactStore, bot: &str) -> Result<PromotionHistory, CommonError> {
    Ok(read_history(store, bot).await?.0)
}

/// The history and the number the next record gets.
async fn read_history(store: &ArtifactStore, bot: &str) -> Result<(PromotionHistory, u64), CommonError> {
    let mut h: PromotionHistory = store.get_json(&keys::promotions(bot)).await?.unwrap_or_default();
    let keys = store.list(&keys::promotion_records(bot)).await?;
    for key in &keys {
        let record: PromotionRecord = store.get_json(key).await?.ok_or_else(|| CommonError::Artifacts {
            what: "read",
            path: key.clone(),
            source: object_store::Error::NotFound { path: key.clone(), source: "listed, then gone".into() },
        })?;
        h.records.push(record);
    }
    Ok((h, keys.len() as u64))
}

/// Appends the record `change` makes of the history as it stands: created once at the next
/// number; when another writer took that number first, reads again and retries. Then points
/// production at the last record's model (see [`sync_production`]). When `change` makes no
/// record (`Err`, saying why), nothing is written, and the pointer is set from the history all
/// the same; that answer is returned.
async fn append<Unchanged>(
    store: &ArtifactStore,
    bot: &str,
    change: impl Fn(&PromotionHistory) -> Result<PromotionRecord, Unchanged>,
) -> Result<Result<PromotionRecord, Unchanged>, CommonError> {
    loop {
        let (h, next) = read_history(store, bot).await?;
        let record = match change(&h) {
            Ok(record) => record,
            Err(unchanged) => {
                // Nothing to add; the pointer may still lag the history (a writer that failed
                // between its record and the pointer): set it from the history now.
                sync_production(store, bot).await?;
                return Ok(Err(unchanged));
            }
        };
        let bytes = serde_json::to_vec_pretty(&record).map_err(|e| crate::error::CodecError::Encode(e.to_string()))?;
        let key = keys::promotion_record(bot, next);
        // "Already there" may be this very write: a create retried after its reply was lost
        // (object_store retries a PUT answered 5xx, and the retry finds the object). Taken for
        // another writer's, a rollback popped a second model and a gate promoted twice.
        let ours = || async { Ok::<_, CommonError>(store.get(&key).await?.is_some_and(|b| b == bytes)) };
        if store.put_if_absent(&key, bytes.clone()).await? || ours().await? {
            sync_production(store, bot).await?;
            return Ok(Ok(record));
        }
    }
}

/// Sets the production pointer from the last record of the history, until the history
/// read before the write is still the whole history after it: a writer that computed
/// from an older history and wrote last sees the newer record and writes again.
async fn sync_production(store: &ArtifactStore, bot: &str) -> Result<(), CommonError> {
    loop {
        let (h, count) = read_history(store, bot).await?;
        match h.records.last().and_then(|r| r.to.as_ref()) {
            Some(e) => store.put_json(&keys::production(bot), e).await?,
            None => store.delete(&keys::production(bot)).await?,
        }
        if store.list(&keys::promotion_records(bot)).await?.len() as u64 == count {
            return Ok(());
        }
    }
}

/// Which production model a promotion may replace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replacing<'a> {
    /// Whichever is in production (a promotion by hand).
    Any,
    /// Only this one (`None`: only no model at all): the one a promotion gate compared the
    /// candidate with. A model made production meanwhile (another job's gate, an operator) was
    /// never compared with the candidate and is not replaced by it.
    Only(Option<&'a str>),
}

/// What [`set_production`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Promotion {
    /// The entry is the production model now.
    Made,
    /// It already was: nothing was written.
    AlreadyProduction,
    /// Production is no longer the model the promotion was to replace: nothing was written.
    Moved {
        /// The production model's job now.
        production: Option<String>,
    },
}

/// Makes `entry` the production model of `bot` in place of the model `replacing` allows:
/// appends a `promote` record to the history first, then replaces the pointer. The check
/// and the record are one step (a record is created only at the number after the history
/// it was computed from). Promoting the model already in production changes nothing: a
/// promote sent twice (a retried request, a training job's gate run again by its retry)
/// must not leave two records, or a rollback would restore the same model.
pub async fn set_production(
    store: &ArtifactStore,
    bot: &str,
    entry: ProductionEntry,
    replacing: Replacing<'_>,
) -> Result<Promotion, CommonError> {
    let appended = append(store, bot, |h| {
        let current = h.records.last().and_then(|r| r.to.as_ref()).map(|p| p.job_id.clone());
        match replacing {
            _ if current.as_deref() == Some(entry.job_id.as_str()) => Err(Promotion::AlreadyProduction),
            Replacing::Only(want) if want != current.as_deref() => Err(Promotion::Moved { production: current }),
            _ => Ok(PromotionRecord {
                action: PromotionAction::Promote,
                from: current,
                to: Some(entry.clone()),
                at: entry.promoted_at,
                reason: entry.reason.clone(),
            }),
        }
    })
    .await?;
    Ok(appended.map_or_else(|unchanged| unchanged, |_| Promotion::Made))
}

/// Makes the model that job `job_id` trained the production model of `bot`, by hand. Returns
/// the production entry and whether this call made it (`false`: it already was production).
///
/// Fails with [`CommonError::ModelMissing`] when the job has no complete model in the store
/// (its `config.json` is written last: a job stopped while writing its model has none).
pub async fn promote_job(store: &ArtifactStore, bot: &str, job_id: &str, reason: &str) -> Result<(ProductionEntry, bool), CommonError> {
    let prefix = model_prefix(job_id);
    if !store.exists(&format!("{prefix}/{MODEL_CONFIG}")).await? {
        return Err(CommonError::ModelMissing { job_id: job_id.into(), prefix });
    }
    let metrics: serde_json::Value = store.get_json(&metrics_key(job_id)).await?.unwrap_or(serde_json::Value::Null);
    let headline = headline(&metrics);
    let entry = ProductionEntry {
        bot: bot.into(),
        job_id: job_id.into(),
        model: prefix,
        metrics: headline,
        promoted_at: Utc::now(),
        reason: reason.into(),
    };
    match set_production(store, bot, entry.clone(), Replacing::Any).await? {
        // Already in production: the entry as it was promoted.
        Promotion::AlreadyProduction => Ok((production(store, bot).await?.unwrap_or(entry), false)),
        Promotion::Made | Promotion::Moved { .. } => Ok((entry, true)),
    }
}

/// Restores the production model that preceded the current one. Returns the new
/// production entry (`None`: there was no earlier model; the pointer is removed).
/// Fails with [`CommonError::NoProductionModel`] when the bot has no production model, and
/// with [`CommonError::ProductionMoved`] when `from` is given and production is another
/// model: a rollback sent twice, or by two operators at once, would otherwise go back two
/// models (and from the second-to-last, to none at all).
pub async fn rollback(store: &ArtifactStore, bot: &str, reason: &str, from: Option<&str>) -> Result<Option<ProductionEntry>, CommonError> {
    // The pointer from the history first: a writer that failed between its record and the
    // pointer left it behind (none at all after a first promotion), and a rollback refused a
    // bot whose history has a model.
    sync_production(store, bot).await?;
    if production(store, bot).await?.is_none() {
        return Err(CommonError::NoProductionModel { bot: bot.into() });
    }
    let now = Utc::now();
    let appended = append(store, bot, |h| {
        let mut stack = h.stack();
        let current = stack.pop().map(|c| c.job_id);
        if let Some(expected) = from.filter(|f| current.as_deref() != Some(*f)) {
            return Err(CommonError::ProductionMoved { bot: bot.into(), expected: expected.into(), current });
        }
        let to = stack.pop().map(|mut e| {
            e.promoted_at = now;
            e.reason = format!("rollback: {reason}");
            e
        });
        Ok(PromotionRecord { action: PromotionAction::Rollback, from: current, to, at: now, reason: reason.into() })
    })
    .await?;
    Ok(appended?.to)
}

/// The [`PROMOTIONS_TOTAL`](crate::metrics::PROMOTIONS_TOTAL) status of a training job's
/// result: its `promotion` gate decision is `promoted` (made production), `held` (passed,
/// not made production: manual promotion or a local run) or `rejected`. `None` for a result
/// without a gate decision (other job types).
pub fn promotion_status(result: &serde_json::Value) -> Option<&'static str> {
    let decision = result.get("promotion")?;
    match (decision.get("passed")?.as_bool()?, decision.get("promoted").and_then(|p| p.as_bool()).unwrap_or(false)) {
        (true, true) => Some("promoted"),
        (true, false) => Some("held"),
        (false, _) => Some("rejected"),
    }
}

/// The headline figures of a `metrics.json` (accuracy, macro-F1, in-scope accuracy, OOS recall).
pub fn headline(metrics: &serde_json::Value) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for k in ["accuracy", "macro_f1", "in_scope_accuracy", "oos_recall"] {
        if let Some(v) = metrics.get(k) {
            out.insert(k.into(), v.clone());
        }
    }
    serde_json::Value::Object(out)
}

#[cfg(test)]
mod tests;
