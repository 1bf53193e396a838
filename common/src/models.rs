//! Bots' production models: the production pointer and the promotion history.
//!
//! Plain file formats in the artifact store, shared by the worker (which
//! promotes after training) and the control plane (which promotes by hand and
//! rolls back) without linking any ML code:
//!
//! - `bots/<bot>/production.json`: a [`ProductionEntry`], the model serving the bot;
//! - `bots/<bot>/promotions.json`: a [`PromotionHistory`], every change, appended to;
//! - a trained model lives under `jobs/<job_id>/model/` ([`model_prefix`]), with its
//!   test metrics in `jobs/<job_id>/metrics.json` ([`metrics_key`]).
//!
//! Each object write is atomic. Writers of one bot are not serialised against
//! each other (last writer wins): promotions of one bot are rare and come from
//! one training queue or an operator.
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

/// The key of the test metrics of a job's model.
pub fn metrics_key(job_id: &str) -> String {
    format!("jobs/{job_id}/metrics.json")
}

/// The model serving a bot (`bots/<bot>/production.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PromotionAction {
    /// A model became production.
    Promote,
    /// The production model was replaced by the previous one.
    Rollback,
}

/// One change of a bot's production model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
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
    Ok(store.get_json(&keys::promotions(bot)).await?.unwrap_or_default())
}

/// Makes `entry` the production model of `bot`: appends a `promote` record to the
/// history first, then replaces the pointer (each write atomic).
pub async fn set_production(store: &ArtifactStore, bot: &str, entry: ProductionEntry) -> Result<(), CommonError> {
    let previous = production(store, bot).await?;
    let mut h = history(store, bot).await?;
    h.records.push(PromotionRecord {
        action: PromotionAction::Promote,
        from: previous.map(|p| p.job_id),
        to: Some(entry.clone()),
        at: entry.promoted_at,
        reason: entry.reason.clone(),
    });
    store.put_json(&keys::promotions(bot), &h).await?;
    store.put_json(&keys::production(bot), &entry).await
}

/// Makes the model that job `job_id` trained the production model of `bot`, by hand.
///
/// Fails with [`CommonError::ModelMissing`] when the job has no model in the store.
pub async fn promote_job(store: &ArtifactStore, bot: &str, job_id: &str, reason: &str) -> Result<ProductionEntry, CommonError> {
    let prefix = model_prefix(job_id);
    if store.list(&prefix).await?.is_empty() {
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
    set_production(store, bot, entry.clone()).await?;
    Ok(entry)
}

/// Restores the production model that preceded the current one. Returns the new
/// production entry (`None`: there was no earlier model; the pointer is removed).
/// Fails with [`CommonError::NoProductionModel`] when the bot has no production model.
pub async fn rollback(store: &ArtifactStore, bot: &str, reason: &str) -> Result<Option<ProductionEntry>, CommonError> {
    let Some(current) = production(store, bot).await? else {
        return Err(CommonError::NoProductionModel { bot: bot.into() });
    };
    let mut h = history(store, bot).await?;
    let mut stack = h.stack();
    stack.pop();
    let to = stack.pop().map(|mut e| {
        e.promoted_at = Utc::now();
        e.reason = format!("rollback: {reason}");
        e
    });
    h.records.push(PromotionRecord {
        action: PromotionAction::Rollback,
        from: Some(current.job_id),
        to: to.clone(),
        at: Utc::now(),
        reason: reason.into(),
    });
    store.put_json(&keys::promotions(bot), &h).await?;
    match &to {
        Some(e) => store.put_json(&keys::production(bot), e).await?,
        None => store.delete(&keys::production(bot)).await?,
    }
    Ok(to)
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
mod tests {
    use super::*;

    #[test]
    fn promotion_status_reads_the_gate_decision_of_a_result() {
        use serde_json::json;
        let cases = [
            (json!({"promotion": {"passed": true, "promoted": true}}), Some("promoted")),
            (json!({"promotion": {"passed": true, "promoted": false, "mode": "manual"}}), Some("held")),
            (json!({"promotion": {"passed": false, "promoted": false}}), Some("rejected")),
            (json!({"promotion": {"passed": false}}), Some("rejected")),
            (json!({"slept_ms": 5}), None),
            (json!({"promotion": "yes"}), None),
        ];
        for (result, want) in cases {
            assert_eq!(promotion_status(&result), want, "{result}");
            if let Some(w) = want {
                assert!(crate::metrics::PROMOTION_STATUSES.contains(&w));
            }
        }
    }

    fn entry(job: &str) -> ProductionEntry {
        ProductionEntry {
            bot: "b".into(),
            job_id: job.into(),
            model: model_prefix(job),
            metrics: serde_json::json!({"accuracy": 0.9}),
            promoted_at: Utc::now(),
            reason: "test".into(),
        }
    }

    #[tokio::test]
    async fn promote_then_rollback_restores_previous() {
        let store = ArtifactStore::open("memory://").unwrap();
        assert_eq!(production(&store, "b").await.unwrap(), None);
        assert!(rollback(&store, "b", "x").await.is_err());
        set_production(&store, "b", entry("j1")).await.unwrap();
        set_production(&store, "b", entry("j2")).await.unwrap();
        set_production(&store, "b", entry("j3")).await.unwrap();
        assert_eq!(production(&store, "b").await.unwrap().unwrap().job_id, "j3");
        assert_eq!(rollback(&store, "b", "bad").await.unwrap().unwrap().job_id, "j2");
        assert_eq!(rollback(&store, "b", "bad too").await.unwrap().unwrap().job_id, "j1");
        assert_eq!(production(&store, "b").await.unwrap().unwrap().job_id, "j1");
        assert_eq!(rollback(&store, "b", "none left").await.unwrap(), None);
        assert_eq!(production(&store, "b").await.unwrap(), None);
        let h = history(&store, "b").await.unwrap();
        assert_eq!(h.records.len(), 6);
        assert_eq!(h.records[3].action, PromotionAction::Rollback);
        assert_eq!(h.records[3].from.as_deref(), Some("j3"));
    }

    #[tokio::test]
    async fn promote_job_needs_a_model() {
        let store = ArtifactStore::open("memory://").unwrap();
        assert!(promote_job(&store, "b", "nope", "by hand").await.is_err());
        store.put("jobs/j9/model/model.bin", "x").await.unwrap();
        store.put_json(&metrics_key("j9"), &serde_json::json!({"accuracy": 0.5, "per_class": {}})).await.unwrap();
        let e = promote_job(&store, "b", "j9", "by hand").await.unwrap();
        assert_eq!(e.metrics, serde_json::json!({"accuracy": 0.5}));
        assert_eq!(production(&store, "b").await.unwrap().unwrap().job_id, "j9");
    }
}
