//! Text features: word uni/bigrams and character n-grams, TF-IDF weighted and L2-normalised.
//!
//! Each n-gram is hashed (64-bit FNV-1a, stable across builds and platforms) and
//! looked up in a vocabulary fitted on the training set (features seen in at
//! least `min_df` training utterances). The result is a sparse matrix in CSR
//! form that feeds the embedding bag ([`super::sparse`]).

use std::collections::HashMap;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Which n-grams to extract.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureConfig {
    /// Word n-grams up to this order.
    pub word_ngrams: usize,
    /// Smallest character n-gram (0: none).
    pub char_min: usize,
    /// Largest character n-gram.
    pub char_max: usize,
    /// Minimum document frequency in training.
    pub min_df: usize,
    /// Absent: one L2 norm over all n-grams. A number: word and character n-grams are
    /// L2-normalised apart (so the many character n-grams cannot drown the words),
    /// characters scaled by this weight, then the whole row is normalised again.
    #[serde(default)]
    pub char_weight: Option<f32>,
}

/// A fitted featurizer: configuration, vocabulary (feature hashes in index order) and IDF weights.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Featurizer {
    /// The n-gram configuration.
    pub config: FeatureConfig,
    /// Feature hash of each index.
    pub hashes: Vec<u64>,
    /// IDF of each index.
    pub idf: Vec<f32>,
    #[serde(skip)]
    index: HashMap<u64, u32>,
}

/// A sparse row-major matrix (compressed sparse rows).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Csr {
    /// Row `i` spans `indptr[i]..indptr[i + 1]` of `indices` and `values`.
    pub indptr: Vec<usize>,
    /// Column (feature) indices.
    pub indices: Vec<u32>,
    /// Values.
    pub values: Vec<f32>,
}

impl Csr {
    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.indptr.len().saturating_sub(1)
    }
    /// Columns and values of row `i`.
    pub fn row(&self, i: usize) -> (&[u32], &[f32]) {
        let (a, b) = (self.indptr[i], self.indptr[i + 1]);
        (&self.indices[a..b], &self.values[a..b])
    }

    /// Features in the longest row (at least 1: the width of a padded row).
    pub fn longest_row(&self) -> usize {
        (0..self.rows()).map(|r| self.row(r).0.len()).max().unwrap_or(0).max(1)
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

pub(crate) fn fnv(kind: u8, parts: &[&[u8]]) -> u64 {
    let mut h = FNV_OFFSET;
    let mut eat = |b: u8| {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    };
    eat(kind);
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            eat(0);
        }
        p.iter().for_each(|b| eat(*b));
    }
    h
}

/// Lower-cased alphanumeric tokens (apostrophes dropped: "what's" → "whats").
pub fn tokens(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for c in text.chars().flat_map(char::to_lowercase) {
        if c.is_alphanumeric() {
            cur.push(c);
        } else if c == '\'' || c == '’' {
            continue;
        } else if !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

impl FeatureConfig {
    /// Hashes of every n-gram of `text`, with repeats.
    pub fn grams(&self, text: &str) -> Vec<u64> {
        self.grams_split(text).0
    }

    /// Hashes of every n-gram of `text`, with repeats: the word n-grams first, then the
    /// character n-grams, and how many word n-grams there are.
    pub fn grams_split(&self, text: &str) -> (Vec<u64>, usize) {
        let toks = tokens(text);
        let mut out = Vec::with_capacity(toks.len() * 24);
        for n in 1..=self.word_ngrams {
            for w in toks.windows(n) {
                let parts: Vec<&[u8]> = w.iter().map(|t| t.as_bytes()).collect();
                out.push(fnv(b'0' + n as u8, &parts));
            }
        }
        let words = out.len();
        if self.char_min > 0 {
            for t in &toks {
                let chars: Vec<char> = std::iter::once('<').chain(t.chars()).chain(std::iter::once('>')).collect();
                for n in self.char_min..=self.char_max.min(chars.len()) {
                    for w in chars.windows(n) {
                        let s: String = w.iter().collect();
                        out.push(fnv(b'c', &[s.as_bytes()]));
                    }
                }
            }
        }
        (out, words)
    }
}

fn normalise(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

impl Featurizer {
    /// Fits the vocabulary and IDF on training texts.
    pub fn fit(config: FeatureConfig, texts: &[&str]) -> Self {
        let per_doc: Vec<Vec<u64>> = texts
            .par_iter()
            .map(|t| {
                let mut g = config.grams(t);
                g.sort_unstable();
                g.dedup();
                g
            })
            .collect();
        let mut df: HashMap<u64, u32> = HashMap::new();
        for g in &per_doc {
            for h in g {
                *df.entry(*h).or_default() += 1;
            }
        }
        let mut kept: Vec<(u64, u32)> = df.into_iter().filter(|(_, c)| *c as usize >= config.min_df).collect();
        kept.sort_unstable();
        let n = texts.len() as f32;
        let hashes: Vec<u64> = kept.iter().map(|(h, _)| *h).collect();
        let idf = kept.iter().map(|(_, c)| ((1.0 + n) / (1.0 + *c as f32)).ln() + 1.0).collect();
        let mut f = Self { config, hashes, idf, index: HashMap::new() };
        f.build_index();
        f
    }

    /// Rebuilds the hash → index map (after deserialising).
    pub fn build_index(&mut self) {
        self.index = self.hashes.iter().enumerate().map(|(i, h)| (*h, i as u32)).collect();
    }

    /// Number of features.
    pub fn dim(&self) -> usize {
        self.hashes.len()
    }

    /// The TF-IDF vector of one text: sorted indices and L2-normalised weights.
    pub fn vector(&self, text: &str) -> (Vec<u32>, Vec<f32>) {
        let (grams, words) = self.config.grams_split(text);
        let ids = |g: &[u64]| -> Vec<u32> { g.iter().filter_map(|h| self.index.get(h).copied()).collect() };
        let Some(w) = self.config.char_weight else { return self.tfidf(ids(&grams), 1.0) };
        let (mut idx, mut val) = self.tfidf(ids(&grams[..words]), 1.0);
        let (ci, cv) = self.tfidf(ids(&grams[words..]), w);
        idx.extend(ci);
        val.extend(cv);
        // Word and character hashes differ (kind byte), so no index repeats: just sort.
        let mut pairs: Vec<(u32, f32)> = idx.into_iter().zip(val).collect();
        pairs.sort_unstable_by_key(|p| p.0);
        let (idx, mut val): (Vec<u32>, Vec<f32>) = pairs.into_iter().unzip();
        normalise(&mut val);
        (idx, val)
    }

    /// Sorted unique indices of `ids` and their sublinear TF × IDF weights, L2-normalised and scaled by `scale`.
    fn tfidf(&self, mut ids: Vec<u32>, scale: f32) -> (Vec<u32>, Vec<f32>) {
        ids.sort_unstable();
        let mut idx = Vec::new();
        let mut val = Vec::new();
        for run in ids.chunk_by(|a, b| a == b) {
            let tf = 1.0 + (run.len() as f32).ln();
            idx.push(run[0]);
            val.push(tf * self.idf[run[0] as usize]);
        }
        normalise(&mut val);
        val.iter_mut().for_each(|v| *v *= scale);
        (idx, val)
    }

    /// The TF-IDF matrix of `texts`, one row each (computed in parallel, order kept).
    pub fn transform(&self, texts: &[&str]) -> Csr {
        let rows: Vec<(Vec<u32>, Vec<f32>)> = texts.par_iter().map(|t| self.vector(t)).collect();
        let mut m = Csr { indptr: Vec::with_capacity(rows.len() + 1), ..Csr::default() };
        m.indptr.push(0);
        for (i, v) in rows {
            m.indices.extend(i);
            m.values.extend(v);
            m.indptr.push(m.indices.len());
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> FeatureConfig {
        FeatureConfig { word_ngrams: 2, char_min: 2, char_max: 4, min_df: 1, char_weight: None }
    }

    #[test]
    fn tokens_and_grams() {
        assert_eq!(tokens("What's my  BALANCE? ok"), vec!["whats", "my", "balance", "ok"]);
        let g = cfg().grams("hi you");
        // 2 unigrams + 1 bigram + "<hi>": 3+2+1 + "<you>": 4+3+2
        assert_eq!(g.len(), 2 + 1 + 6 + 9);
        assert_eq!(fnv(b'1', &[b"a"]), fnv(b'1', &[b"a"]));
        assert_ne!(fnv(b'2', &[b"ab", b"c"]), fnv(b'2', &[b"a", b"bc"]));
    }

    #[test]
    fn group_norm_balances_words_against_characters() {
        let texts = ["check my balance", "transfer money", "my balance please"];
        let f = Featurizer::fit(FeatureConfig { char_weight: Some(0.5), ..cfg() }, &texts);
        let (grams, words) = f.config.grams_split("my balance");
        let (idx, val) = f.vector("my balance");
        assert!((val.iter().map(|v| v * v).sum::<f32>() - 1.0).abs() < 1e-5);
        assert!(idx.windows(2).all(|w| w[0] < w[1]));
        let word_hashes = &grams[..words];
        let (mut w2, mut c2) = (0.0f32, 0.0f32);
        for (&i, &v) in idx.iter().zip(&val) {
            if word_hashes.contains(&f.hashes[i as usize]) {
                w2 += v * v;
            } else {
                c2 += v * v;
            }
        }
        assert!(w2 > 0.0 && c2 > 0.0);
        assert!(((c2 / w2).sqrt() - 0.5).abs() < 1e-4, "char/word norm ratio {}", (c2 / w2).sqrt());
    }

    #[test]
    fn tfidf_rows_are_normalised_and_unknowns_dropped() {
        let f = Featurizer::fit(cfg(), &["check my balance", "transfer money", "my balance please"]);
        let m = f.transform(&["my balance", "zzzz qqqq", ""]);
        assert_eq!(m.rows(), 3);
        let (i0, v0) = m.row(0);
        assert!(!i0.is_empty());
        assert!((v0.iter().map(|v| v * v).sum::<f32>() - 1.0).abs() < 1e-5);
        assert!(i0.windows(2).all(|w| w[0] < w[1]));
        assert!(m.row(2).0.is_empty());
        let mut again: Featurizer = serde_json::from_str(&serde_json::to_string(&f).unwrap()).unwrap();
        again.build_index();
        assert_eq!(again.transform(&["my balance"]).row(0), m.row(0));
    }
}
