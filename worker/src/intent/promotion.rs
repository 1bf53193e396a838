//! The promotion gate: does a candidate model replace the bot's production model?
//!
//! Both are evaluated on the same test set; the candidate passes when
//! 1. its accuracy is at least `min_accuracy`;
//! 2. it is no worse than production's accuracy minus `tolerance`;
//! 3. no label (with at least `min_support` test examples) loses more than
//!    `max_recall_drop` of recall against production.
//!
//! The first model of a bot only needs rule 1. The pointer and history files
//! live in [`trainyard_common::models`] (re-exported here) so that the control
//! plane can promote and roll back without linking burn.

use serde::{Deserialize, Serialize};
pub use trainyard_common::models::{history, production, promote_job, rollback, set_production, ProductionEntry, Promotion, Replacing};

use super::metrics::Metrics;

/// The configurable rules (`gate` in the job params).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GateRules {
    /// Lowest acceptable test accuracy. Default 0.7.
    pub min_accuracy: f64,
    /// How much worse than production the accuracy may be. Default 0.005.
    pub tolerance: f64,
    /// Largest allowed drop of one label's recall. Default 0.10.
    pub max_recall_drop: f64,
    /// Labels with fewer test examples are ignored by the recall rule. Default 5.
    pub min_support: usize,
}

impl Default for GateRules {
    fn default() -> Self {
        Self { min_accuracy: 0.7, tolerance: 0.005, max_recall_drop: 0.10, min_support: 5 }
    }
}

impl GateRules {
    /// Range checks.
    pub fn check(&self) -> Result<(), String> {
        for (name, v) in
            [("gate.min_accuracy", self.min_accuracy), ("gate.tolerance", self.tolerance), ("gate.max_recall_drop", self.max_recall_drop)]
        {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("{name} {v} must be in 0..=1"));
            }
        }
        Ok(())
    }
}

/// A label whose recall dropped too much.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecallDrop {
    /// The label.
    pub label: String,
    /// Production's recall.
    pub production: f64,
    /// The candidate's recall.
    pub candidate: f64,
}

/// The gate's verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateDecision {
    /// Did the candidate pass every rule?
    pub passed: bool,
    /// Was it made production (passed and `promote=auto`)?
    pub promoted: bool,
    /// `auto` or `manual`.
    pub mode: String,
    /// One line per rule checked, and the outcome.
    pub reasons: Vec<String>,
    /// The candidate's test accuracy.
    pub candidate_accuracy: f64,
    /// The production model compared against, if any.
    pub production_job_id: Option<String>,
    /// Its accuracy on the same test set.
    pub production_accuracy: Option<f64>,
    /// Labels whose recall dropped past the limit.
    pub recall_drops: Vec<RecallDrop>,
}

/// Applies the rules. `production`: the production job id and its metrics on the same test set.
pub fn decide(rules: &GateRules, candidate: &Metrics, production: Option<(&str, &Metrics)>) -> GateDecision {
    let mut reasons = Vec::new();
    let mut passed = true;
    let acc = candidate.accuracy;
    if acc >= rules.min_accuracy {
        reasons.push(format!("accuracy {acc:.4} >= minimum {:.4}", rules.min_accuracy));
    } else {
        passed = false;
        reasons.push(format!("FAIL: accuracy {acc:.4} < minimum {:.4}", rules.min_accuracy));
    }
    let mut recall_drops = Vec::new();
    match production {
        None => reasons.push("no production model: first model of the bot".into()),
        Some((job, prod)) => {
            let floor = prod.accuracy - rules.tolerance;
            if acc + 1e-12 >= floor {
                reasons.push(format!("accuracy {acc:.4} >= production ({job}) {:.4} - tolerance {:.4}", prod.accuracy, rules.tolerance));
            } else {
                passed = false;
                reasons
                    .push(format!("FAIL: accuracy {acc:.4} < production ({job}) {:.4} - tolerance {:.4}", prod.accuracy, rules.tolerance));
            }
            for (label, p) in &prod.per_class {
                if p.support < rules.min_support {
                    continue;
                }
                let c = candidate.per_class.get(label).map_or(0.0, |c| c.recall);
                if p.recall - c > rules.max_recall_drop + 1e-12 {
                    recall_drops.push(RecallDrop { label: label.clone(), production: p.recall, candidate: c });
                }
            }
            if recall_drops.is_empty() {
                reasons.push(format!("no label's recall dropped by more than {:.3}", rules.max_recall_drop));
            } else {
                passed = false;
                let list: Vec<String> =
                    recall_drops.iter().take(5).map(|d| format!("{} {:.3} -> {:.3}", d.label, d.production, d.candidate)).collect();
                reasons.push(format!(
                    "FAIL: {} label(s) lost more than {:.3} recall: {}",
                    recall_drops.len(),
                    rules.max_recall_drop,
                    list.join(", ")
                ));
            }
        }
    }
    GateDecision {
        passed,
        promoted: false,
        mode: String::new(),
        reasons,
        candidate_accuracy: acc,
        production_job_id: production.map(|(j, _)| j.to_string()),
        production_accuracy: production.map(|(_, m)| m.accuracy),
        recall_drops,
    }
}
