//! Rows held out of the training data: the test rows by content, the validation rows by seed.

use std::collections::BTreeMap;

use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use sha2::{Digest, Sha256};

use super::Example;

/// Splits off the test rows of `examples` by their content: a row is held out when the hash of
/// its label and text falls in the lowest `fraction` of the hash range. The same row is held
/// out, or kept, in every job on any version of the data, whatever the job's seed and whatever
/// else the file holds; so the promotion gate does not score a production model, trained on an
/// earlier version of the data, on rows it trained on (a seeded shuffle drew most of them
/// again), and equal rows never land on both sides. One exception: a label all of whose rows
/// fall in the holdout keeps them all for training (a label with one row, one time in five at
/// 20 %), and once rows of it fall outside, those rows are test rows.
pub fn content_holdout(examples: Vec<Example>, fraction: f64) -> (Vec<Example>, Vec<Example>) {
    let (mut keep, mut held) = (Vec::new(), Vec::new());
    for (_, group) in by_label(examples) {
        let (test, train): (Vec<Example>, Vec<Example>) = group.into_iter().partition(|e| position(e) < fraction);
        if train.is_empty() {
            keep.extend(test);
        } else {
            held.extend(test);
            keep.extend(train);
        }
    }
    (keep, held)
}

/// Where a row falls in [0, 1): the first 8 bytes of the SHA-256 of its label and text.
fn position(e: &Example) -> f64 {
    let digest = Sha256::new().chain_update(e.label.as_bytes()).chain_update([0x1f]).chain_update(e.text.as_bytes()).finalize();
    let top = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"));
    (top >> 11) as f64 / (1u64 << 53) as f64
}

/// Splits off about `fraction` of each label (shuffled with `seed`); a label keeps at least one
/// training example.
pub fn stratified_holdout(examples: Vec<Example>, fraction: f64, seed: u64) -> (Vec<Example>, Vec<Example>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut keep, mut held) = (Vec::new(), Vec::new());
    for (_, mut group) in by_label(examples) {
        group.shuffle(&mut rng);
        let n = group.len();
        let k = ((n as f64 * fraction).round() as usize).min(n.saturating_sub(1));
        held.extend(group.drain(..k));
        keep.extend(group);
    }
    (keep, held)
}

fn by_label(examples: Vec<Example>) -> BTreeMap<String, Vec<Example>> {
    let mut by_label: BTreeMap<String, Vec<Example>> = BTreeMap::new();
    for e in examples {
        by_label.entry(e.label.clone()).or_default().push(e);
    }
    by_label
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn rows(range: std::ops::Range<usize>, label: &str) -> Vec<Example> {
        range.map(|i| Example::new(format!("{label} utterance {i}"), label)).collect()
    }

    #[test]
    fn the_validation_holdout_is_stratified_and_follows_the_seed() {
        let ex: Vec<Example> = (0..100).map(|i| Example::new(format!("t{i}"), if i % 4 == 0 { "a" } else { "b" })).collect();
        let (k1, h1) = stratified_holdout(ex.clone(), 0.2, 7);
        let (k2, h2) = stratified_holdout(ex.clone(), 0.2, 7);
        assert_eq!((&h1, &k1), (&h2, &k2));
        assert_eq!(h1.iter().filter(|e| e.label == "a").count(), 5);
        assert_eq!(h1.iter().filter(|e| e.label == "b").count(), 15);
        assert_eq!(k1.len(), 80);
        assert_ne!(stratified_holdout(ex, 0.2, 8).1, h1, "another seed draws other rows");
    }

    /// The promotion gate scores the production model on the candidate's test rows: a row the
    /// production model trained on (an earlier version of the data) must not be one of them.
    #[test]
    fn a_test_row_of_grown_data_was_never_a_training_row_of_the_data_before() {
        let before: Vec<Example> = [rows(0..300, "a"), rows(0..40, "b"), rows(0..7, "c")].concat();
        let grown: Vec<Example> = [before.clone(), rows(300..420, "a"), rows(40..45, "b"), rows(0..30, "d")].concat();
        let (trained, _) = content_holdout(before.clone(), 0.2);
        let (_, tested) = content_holdout(grown, 0.2);
        let trained: BTreeSet<_> = trained.iter().map(|e| &e.text).collect();
        let leaked: Vec<_> = tested.iter().filter(|e| trained.contains(&e.text)).collect();
        assert!(leaked.is_empty(), "{} test rows were training rows before: {leaked:?}", leaked.len());
        // About the fraction of each label, the same rows whatever the order.
        let (keep, held) = content_holdout(before.clone(), 0.2);
        assert_eq!(keep.len() + held.len(), before.len());
        let a = held.iter().filter(|e| e.label == "a").count();
        assert!((35..=85).contains(&a), "{a} of 300 held out");
        let mut reversed = before;
        reversed.reverse();
        let again: BTreeSet<_> = content_holdout(reversed, 0.2).1.into_iter().map(|e| e.text).collect();
        assert_eq!(again, held.iter().map(|e| e.text.clone()).collect());
    }

    /// A label that grows a row at a time: a row kept for training never becomes a test row
    /// (a rule that held out each label's lowest-hash row moved a trained row into the test set
    /// when a one-row label got a second), and a label keeps rows to train on.
    #[test]
    fn a_growing_label_never_moves_a_trained_row_into_the_test_rows_and_equal_rows_stay_together() {
        for label in ["c", "x", "y", "z"] {
            let mut trained = BTreeSet::new();
            for n in 1..40 {
                let (keep, held) = content_holdout(rows(0..n, label), 0.2);
                assert!(!keep.is_empty(), "{label} with {n} rows keeps rows to train on");
                let moved: Vec<_> = held.iter().filter(|e| trained.contains(&e.text)).collect();
                // Only rows of a label that had been held back whole may move (documented).
                let whole_before = rows(0..n - 1, label).iter().all(|e| position(e) < 0.2);
                assert!(moved.is_empty() || whole_before, "{label}, {n} rows: trained rows now tested: {moved:?}");
                trained = keep.into_iter().map(|e| e.text).collect();
            }
        }
        let twins: Vec<Example> = [rows(0..20, "y"), rows(0..20, "y")].concat();
        let (keep, held) = content_holdout(twins, 0.2);
        let kept: BTreeSet<_> = keep.iter().map(|e| &e.text).collect();
        assert!(held.iter().all(|e| !kept.contains(&e.text)), "a row and its copy on both sides");
        assert!(!held.is_empty());
    }
}
