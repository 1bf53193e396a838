//! Rows held out of the training data: the test rows by content, the validation rows by seed.

use std::collections::BTreeMap;

use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use sha2::{Digest, Sha256};

use super::Example;

/// Splits off the test rows of `examples` by their content: a row is held out when the hash of
/// its label and text falls in the lowest `fraction` of the hash range. The same row is held
/// out, or kept, in every job on any version of the data, whatever the job's seed and whatever
/// else the file holds; so the promotion gate never scores a production model, trained on an
/// earlier version of the data, on rows it trained on (a seeded shuffle drew most of them
/// again), and equal rows never land on both sides. A label with two rows or more holds out at
/// least its lowest-hash rows and keeps at least its highest-hash ones (that last rule alone
/// can move a row of a label that grows from a handful of rows).
pub fn content_holdout(examples: Vec<Example>, fraction: f64) -> (Vec<Example>, Vec<Example>) {
    let (mut keep, mut held) = (Vec::new(), Vec::new());
    for (_, group) in by_label(examples) {
        let mut hashed: Vec<(f64, Example)> = group.into_iter().map(|e| (position(&e), e)).collect();
        hashed.sort_by(|a, b| a.0.total_cmp(&b.0));
        let n = hashed.len();
        let mut cut = hashed.partition_point(|(h, _)| *h < fraction);
        if n >= 2 && cut == 0 {
            let lowest = hashed[0].0;
            cut = hashed.partition_point(|(h, _)| *h <= lowest);
        }
        if cut == n {
            let highest = hashed[n - 1].0;
            cut = hashed.partition_point(|(h, _)| *h < highest);
        }
        let rest = hashed.split_off(cut);
        held.extend(hashed.into_iter().map(|(_, e)| e));
        keep.extend(rest.into_iter().map(|(_, e)| e));
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

    #[test]
    fn a_small_label_holds_out_one_row_and_keeps_one_and_equal_rows_stay_together() {
        for n in 2..12 {
            let (keep, held) = content_holdout(rows(0..n, "x"), 0.2);
            assert!(!keep.is_empty() && !held.is_empty(), "{n} rows: {} kept, {} held", keep.len(), held.len());
        }
        let (keep, held) = content_holdout(rows(0..1, "x"), 0.2);
        assert_eq!((keep.len(), held.len()), (1, 0), "a single row is kept for training");
        let twins: Vec<Example> = [rows(0..20, "y"), rows(0..20, "y")].concat();
        let (keep, held) = content_holdout(twins, 0.2);
        let kept: BTreeSet<_> = keep.iter().map(|e| &e.text).collect();
        assert!(held.iter().all(|e| !kept.contains(&e.text)), "a row and its copy on both sides");
        assert!(!held.is_empty());
    }
}
