//! Test metrics: accuracy, macro-F1, per-class precision/recall/F1/support, the
//! confusion matrix and its top confusions, and for data with an out-of-scope
//! label the in-scope accuracy and OOS recall of Larson et al. (2019).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Precision, recall, F1 and support of one label.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassMetrics {
    /// Of the examples predicted as this label, the share that are.
    pub precision: f64,
    /// Of the examples of this label, the share predicted as it.
    pub recall: f64,
    /// Harmonic mean of the two.
    pub f1: f64,
    /// Test examples of this label.
    pub support: usize,
}

/// One off-diagonal cell of the confusion matrix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confusion {
    /// The true label.
    pub label: String,
    /// What was predicted instead.
    pub predicted: String,
    /// How often.
    pub count: usize,
}

/// `metrics.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Share of all test examples predicted right.
    pub accuracy: f64,
    /// Unweighted mean F1 over the labels present in the test set or the predictions.
    pub macro_f1: f64,
    /// Per label.
    pub per_class: BTreeMap<String, ClassMetrics>,
    /// Over in-scope test examples only; predicting the OOS label for one is an error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_scope_accuracy: Option<f64>,
    /// Share of OOS test examples predicted OOS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oos_recall: Option<f64>,
    /// Test examples.
    pub test_examples: usize,
    /// The most frequent confusions, most frequent first.
    pub top_confusions: Vec<Confusion>,
    /// The device the model was trained on (`cpu`, `cuda:N`); absent for evaluations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// The model kind (`bag`, `conv`, `bag+conv`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

/// `confusion_matrix.json`: `matrix[i][j]` = test examples of `labels[i]` predicted as `labels[j]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfusionMatrix {
    /// Row and column labels, sorted.
    pub labels: Vec<String>,
    /// Counts, rows = true label, columns = predicted label.
    pub matrix: Vec<Vec<usize>>,
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// Computes the metrics and the confusion matrix from true and predicted labels.
/// `oos_label`: the out-of-scope label when the data has one (then `in_scope_accuracy`
/// is reported, and `oos_recall` when the test set has OOS examples).
pub fn evaluate(truth: &[String], predicted: &[String], oos_label: Option<&str>, top_k: usize) -> (Metrics, ConfusionMatrix) {
    assert_eq!(truth.len(), predicted.len(), "one prediction per test example");
    let mut labels: Vec<String> = truth.iter().chain(predicted).cloned().collect();
    labels.sort();
    labels.dedup();
    let pos: BTreeMap<&str, usize> = labels.iter().enumerate().map(|(i, l)| (l.as_str(), i)).collect();
    let n = labels.len();
    let mut matrix = vec![vec![0usize; n]; n];
    for (t, p) in truth.iter().zip(predicted) {
        matrix[pos[t.as_str()]][pos[p.as_str()]] += 1;
    }
    let mut per_class = BTreeMap::new();
    let mut f1_sum = 0.0;
    let mut correct = 0;
    for (i, l) in labels.iter().enumerate() {
        let tp = matrix[i][i];
        correct += tp;
        let support: usize = matrix[i].iter().sum();
        let predicted_as: usize = matrix.iter().map(|r| r[i]).sum();
        let (precision, recall) = (ratio(tp, predicted_as), ratio(tp, support));
        let f1 = if precision + recall > 0.0 { 2.0 * precision * recall / (precision + recall) } else { 0.0 };
        f1_sum += f1;
        per_class.insert(l.clone(), ClassMetrics { precision, recall, f1, support });
    }
    let (mut in_scope_accuracy, mut oos_recall) = (None, None);
    if let Some(oos) = oos_label {
        let (mut ins, mut ins_ok, mut o, mut o_ok) = (0, 0, 0, 0);
        for (t, p) in truth.iter().zip(predicted) {
            if t == oos {
                o += 1;
                o_ok += usize::from(p == oos);
            } else {
                ins += 1;
                ins_ok += usize::from(p == t);
            }
        }
        in_scope_accuracy = Some(ratio(ins_ok, ins));
        oos_recall = (o > 0).then(|| ratio(o_ok, o));
    }
    let mut confusions: Vec<Confusion> = Vec::new();
    for (i, row) in matrix.iter().enumerate() {
        for (j, &c) in row.iter().enumerate() {
            if i != j && c > 0 {
                confusions.push(Confusion { label: labels[i].clone(), predicted: labels[j].clone(), count: c });
            }
        }
    }
    confusions.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.label.cmp(&b.label)).then_with(|| a.predicted.cmp(&b.predicted)));
    confusions.truncate(top_k);
    let metrics = Metrics {
        accuracy: ratio(correct, truth.len()),
        macro_f1: if n == 0 { 0.0 } else { f1_sum / n as f64 },
        per_class,
        in_scope_accuracy,
        oos_recall,
        test_examples: truth.len(),
        top_confusions: confusions,
        device: None,
        model: None,
    };
    (metrics, ConfusionMatrix { labels, matrix })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn hand_computed_example() {
        let truth = s(&["a", "a", "b", "b", "oos", "oos"]);
        let pred = s(&["a", "oos", "b", "a", "oos", "b"]);
        let (m, cm) = evaluate(&truth, &pred, Some("oos"), 10);
        assert!((m.accuracy - 3.0 / 6.0).abs() < 1e-12);
        assert_eq!(m.in_scope_accuracy, Some(0.5));
        assert_eq!(m.oos_recall, Some(0.5));
        let a = &m.per_class["a"];
        assert_eq!((a.precision, a.recall, a.support), (0.5, 0.5, 2));
        assert!((m.macro_f1 - 0.5).abs() < 1e-12);
        assert_eq!(cm.labels, s(&["a", "b", "oos"]));
        assert_eq!(cm.matrix, vec![vec![1, 0, 1], vec![1, 1, 0], vec![0, 1, 1]]);
        assert_eq!(m.top_confusions.len(), 3);
        let json = serde_json::to_value(&m).unwrap();
        for k in ["accuracy", "macro_f1", "per_class", "in_scope_accuracy", "oos_recall"] {
            assert!(json.get(k).is_some(), "{k}");
        }
        let (m2, _) = evaluate(&s(&["a", "b"]), &s(&["a", "b"]), Some("oos"), 10);
        assert_eq!((m2.accuracy, m2.in_scope_accuracy, m2.oos_recall), (1.0, Some(1.0), None));
        let (m3, _) = evaluate(&s(&["a", "b"]), &s(&["a", "b"]), None, 10);
        assert_eq!(m3.in_scope_accuracy, None);
    }
}
