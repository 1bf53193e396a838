//! Fixed-width id rows for the device models: token sequences for the word-order
//! model ([`SeqFeaturizer`]) and padded TF-IDF rows for the bag's device path
//! ([`Padded::from_csr`]).
//!
//! A [`Padded`] matrix has `width` slots per row: an id (0 = padding, a row of the
//! table that no gradient reaches usefully because its weight is 0) and a weight.
//! Fixed widths keep every batch the same shape, so a GPU compiles its kernels once
//! and only the batch's ids and weights travel to the device.
//!
//! The word-order model sees `max_tokens` positions of `subwords` slots each: the
//! word itself (when seen in training), then its character 3- and 4-grams inside
//! `<` `>` boundaries (fastText's subwords), weighted to a mean. A word never seen
//! in training still gets a vector from its n-grams.

use std::collections::HashMap;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::features::{fnv, tokens, Csr};

/// Rows of ids and weights, `width` slots each, row-major. Slots come in units of
/// `unit` (a token's subwords, or 1), and a batch keeps at least `min_units` of them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Padded {
    /// Slots per row.
    pub width: usize,
    /// Slots per unit (a batch is trimmed by whole units).
    pub unit: usize,
    /// Units a trimmed batch keeps at least.
    pub min_units: usize,
    /// Ids (`rows × width`), 0 = padding.
    pub ids: Vec<i32>,
    /// Weights (`rows × width`), 0 for padding.
    pub w: Vec<f32>,
}

impl Padded {
    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.ids.len().checked_div(self.width).unwrap_or(0)
    }

    /// The ids and weights of `batch`'s rows, in batch order, without the trailing units
    /// that are padding in every row of the batch (short utterances cost no work).
    pub fn gather(&self, batch: &[usize]) -> (Vec<i32>, Vec<f32>) {
        let unit = self.unit.max(1);
        let used = batch
            .iter()
            .map(|&r| {
                let row = &self.w[r * self.width..(r + 1) * self.width];
                row.iter().rposition(|&w| w != 0.0).map_or(0, |i| i / unit + 1)
            })
            .max()
            .unwrap_or(0);
        let keep = (used.max(self.min_units) * unit).min(self.width);
        let mut ids = Vec::with_capacity(batch.len() * keep);
        let mut w = Vec::with_capacity(batch.len() * keep);
        for &r in batch {
            ids.extend_from_slice(&self.ids[r * self.width..r * self.width + keep]);
            w.extend_from_slice(&self.w[r * self.width..r * self.width + keep]);
        }
        (ids, w)
    }

    /// TF-IDF rows as padded rows: feature `j` becomes id `j + 1`; `width` is the
    /// longest row (at least 1). No row is truncated.
    pub fn from_csr(x: &Csr) -> Self {
        Self::from_csr_width(x, x.longest_row())
    }

    /// As [`from_csr`](Self::from_csr) with a given width; longer rows keep their `width` largest weights.
    pub fn from_csr_width(x: &Csr, width: usize) -> Self {
        let mut out = Self { width, unit: 1, min_units: 1, ids: vec![0; x.rows() * width], w: vec![0.0; x.rows() * width] };
        for r in 0..x.rows() {
            let (idx, val) = x.row(r);
            let mut order: Vec<usize> = (0..idx.len()).collect();
            if idx.len() > width {
                order.sort_by(|&a, &b| val[b].abs().total_cmp(&val[a].abs()));
                order.truncate(width);
            }
            for (slot, &k) in order.iter().enumerate() {
                out.ids[r * width + slot] = idx[k] as i32 + 1;
                out.w[r * width + slot] = val[k];
            }
        }
        out
    }
}

/// Settings of the token sequences.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeqConfig {
    /// Positions per utterance (longer ones are cut).
    pub max_tokens: usize,
    /// Slots per position: the word and up to `subwords - 1` character n-grams.
    pub subwords: usize,
    /// Minimum number of training utterances a word or n-gram must occur in.
    pub min_df: usize,
}

/// A fitted sequence featurizer: the vocabulary of words and character n-grams.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SeqFeaturizer {
    /// The settings.
    pub config: SeqConfig,
    /// Hash of each unit; unit `i` has id `i + 1`.
    pub hashes: Vec<u64>,
    #[serde(skip)]
    index: HashMap<u64, i32>,
}

/// The units of one token: its word hash, then its character 3- and 4-grams.
fn units(token: &str) -> Vec<u64> {
    let mut out = vec![fnv(b'w', &[token.as_bytes()])];
    let chars: Vec<char> = std::iter::once('<').chain(token.chars()).chain(std::iter::once('>')).collect();
    for n in 3..=4 {
        for w in chars.windows(n) {
            let s: String = w.iter().collect();
            out.push(fnv(b'c', &[s.as_bytes()]));
        }
    }
    out
}

impl SeqFeaturizer {
    /// Fits the vocabulary on training texts.
    pub fn fit(config: SeqConfig, texts: &[&str]) -> Self {
        let per_doc: Vec<Vec<u64>> = texts
            .par_iter()
            .map(|t| {
                let mut u: Vec<u64> = tokens(t).iter().flat_map(|tok| units(tok)).collect();
                u.sort_unstable();
                u.dedup();
                u
            })
            .collect();
        let mut df: HashMap<u64, u32> = HashMap::new();
        for u in per_doc.iter().flatten() {
            *df.entry(*u).or_default() += 1;
        }
        let mut hashes: Vec<u64> = df.into_iter().filter(|(_, c)| *c as usize >= config.min_df).map(|(h, _)| h).collect();
        hashes.sort_unstable();
        let mut f = Self { config, hashes, index: HashMap::new() };
        f.build_index();
        f
    }

    /// Rebuilds the hash → id map (after deserialising).
    pub fn build_index(&mut self) {
        self.index = self.hashes.iter().enumerate().map(|(i, h)| (*h, i as i32 + 1)).collect();
    }

    /// Rows of the embedding table: the units and the padding row.
    pub fn vocab(&self) -> usize {
        self.hashes.len() + 1
    }

    /// Slots per utterance.
    pub fn width(&self) -> usize {
        self.config.max_tokens * self.config.subwords
    }

    /// One utterance: `max_tokens × subwords` ids and weights (each position's known units weighted to a mean).
    fn row(&self, text: &str) -> (Vec<i32>, Vec<f32>) {
        let (l, s) = (self.config.max_tokens, self.config.subwords);
        let mut ids = vec![0i32; l * s];
        let mut w = vec![0f32; l * s];
        let toks = tokens(text);
        let known = toks
            .iter()
            .map(|t| units(t).into_iter().filter_map(|u| self.index.get(&u).copied()).take(s).collect::<Vec<i32>>())
            .filter(|u| !u.is_empty());
        for (pos, u) in known.take(l).enumerate() {
            let weight = 1.0 / u.len() as f32;
            for (k, id) in u.into_iter().enumerate() {
                ids[pos * s + k] = id;
                w[pos * s + k] = weight;
            }
        }
        (ids, w)
    }

    /// The padded rows of `texts` (computed in parallel, order kept).
    pub fn transform(&self, texts: &[&str]) -> Padded {
        let rows: Vec<(Vec<i32>, Vec<f32>)> = texts.par_iter().map(|t| self.row(t)).collect();
        let mut out = Padded {
            width: self.width(),
            unit: self.config.subwords,
            min_units: super::nets::CONV_WIDTHS.iter().copied().max().unwrap_or(1),
            ids: Vec::with_capacity(rows.len() * self.width()),
            w: Vec::new(),
        };
        out.w.reserve(rows.len() * self.width());
        for (i, w) in rows {
            out.ids.extend(i);
            out.w.extend(w);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SeqConfig {
        SeqConfig { max_tokens: 4, subwords: 5, min_df: 1 }
    }

    #[test]
    fn sequences_keep_word_order_and_pad() {
        let f = SeqFeaturizer::fit(cfg(), &["book a flight", "flight book"]);
        let a = f.transform(&["book flight"]);
        let b = f.transform(&["flight book"]);
        assert_eq!(a.width, 20);
        // Two tokens used, but a batch keeps at least the widest convolution's 3 positions.
        assert_eq!(a.gather(&[0]).0.len(), 15);
        assert_ne!(a.ids, b.ids, "order must matter");
        // Position 0 of one is position 1 of the other.
        assert_eq!(a.ids[0..5], b.ids[5..10]);
        // Mean weights per position, padding after the second token.
        let s: f32 = a.w[0..5].iter().sum();
        assert!((s - 1.0).abs() < 1e-6);
        assert!(a.ids[10..].iter().all(|&i| i == 0) && a.w[10..].iter().all(|&w| w == 0.0));
        // A word unseen in training still gets its known n-grams ("<bo" from "book").
        let c = f.transform(&["boom"]);
        assert!(c.ids[0] > 0, "{:?}", &c.ids[..5]);
        assert!(f.transform(&["zzz qqq"]).ids.iter().all(|&i| i == 0));
        let mut back: SeqFeaturizer = serde_json::from_str(&serde_json::to_string(&f).unwrap()).unwrap();
        back.build_index();
        assert_eq!(back.transform(&["book flight"]), a);
    }

    #[test]
    fn padded_csr_rows() {
        let x = Csr { indptr: vec![0, 2, 3], indices: vec![0, 2, 1], values: vec![0.6, 0.8, 1.0] };
        let p = Padded::from_csr(&x);
        assert_eq!((p.width, p.rows()), (2, 2));
        assert_eq!(p.ids, vec![1, 3, 2, 0]);
        assert_eq!(p.w, vec![0.6, 0.8, 1.0, 0.0]);
        let cut = Padded::from_csr_width(&x, 1);
        assert_eq!(cut.ids, vec![3, 2], "keeps the largest weight");
        assert_eq!(p.gather(&[1, 0]), (vec![2, 0, 1, 3], vec![1.0, 0.0, 0.6, 0.8]));
        assert_eq!(p.gather(&[1]), (vec![2], vec![1.0]), "trailing padding of the whole batch is dropped");
    }
}
