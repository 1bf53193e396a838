//! How big a network a job may ask for. A job whose networks, their training state and their
//! data (the bag's padded device rows, the word-order model's token rows) would not fit the
//! worker is a permanent error naming the parameters to change: it used to be an out-of-memory
//! kill, redelivered until the broker dead-lettered it as a crash loop. The estimates are upper bounds of the same order as what training holds.

use super::params::Hyper;
use crate::handler::JobError;

/// The most memory one network's weights, training state and data may take: half of the
/// intent-train pod's 12 GiB limit.
pub const MAX_NET_BYTES: u64 = 6 << 30;

/// Bytes per trained weight: the weights, two Adam moments, the best epoch's copy and a
/// checkpoint, 4 bytes each, with room for the gradient and the encoding.
const BYTES_PER_WEIGHT: u64 = 32;

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// The most labels a job may have: its confusion matrix (`labels × labels` counts, kept,
/// written as JSON and drawn) is the bound; 2,000 labels make 4 million cells. A conversational
/// bot has tens to hundreds of intents (CLINC150: 151).
pub const MAX_LABELS: usize = 2_000;

/// Refuses more than [`MAX_LABELS`] labels in `what` (the training rows, or the labels an
/// evaluation meets): the matrix of 20,000 took gigabytes and its drawing panicked.
pub fn check_labels(labels: usize, what: &str) -> Result<(), JobError> {
    if labels > MAX_LABELS {
        return Err(JobError::permanent(format!(
            "{what} {labels} labels, over the {MAX_LABELS} a job allows (its confusion matrix is labels × labels): check \
             the label column, or split the bot's intents"
        )));
    }
    Ok(())
}

/// Refuses a bag with no features (it would "train" a constant) or one too big for the worker:
/// its table (`features × hidden`) and head (`hidden × labels`).
pub fn check_bag(features: usize, labels: usize, h: &Hyper) -> Result<(), JobError> {
    if features == 0 {
        return Err(JobError::permanent(format!(
            "the training texts give no features (min_df {}): lower min_df, or check that the texts have letters or digits",
            h.min_df
        )));
    }
    let bytes = (features + labels) as u64 * h.hidden as u64 * BYTES_PER_WEIGHT;
    if bytes > MAX_NET_BYTES {
        return Err(JobError::permanent(format!(
            "the bag would need about {:.1} GiB (({features} features + {labels} labels) × hidden {} × {BYTES_PER_WEIGHT} \
             bytes), over the {} GiB a worker allows: lower hidden, raise min_df or narrow the n-gram ranges (word_ngrams \
             {}, char {}..={})",
            gib(bytes),
            h.hidden,
            MAX_NET_BYTES >> 30,
            h.word_ngrams,
            h.char_ngram_min,
            h.char_ngram_max
        )));
    }
    Ok(())
}

/// Refuses the bag's device-path rows when they would not fit: that path pads every row to the
/// longest one's `width` features (an id and a weight each), so one long utterance sizes them all.
pub fn check_padded_rows(rows: usize, width: usize, h: &Hyper) -> Result<(), JobError> {
    let bytes = rows as u64 * width as u64 * 8;
    if bytes > MAX_NET_BYTES {
        return Err(JobError::permanent(format!(
            "the bag's rows would need about {:.1} GiB on the device ({rows} rows padded to the longest one's {width} \
             features × 8 bytes), over the {} GiB a worker allows: shorten the longest utterances, raise min_df ({}) or \
             narrow the n-gram ranges (word_ngrams {}, char {}..={})",
            gib(bytes),
            MAX_NET_BYTES >> 30,
            h.min_df,
            h.word_ngrams,
            h.char_ngram_min,
            h.char_ngram_max
        )));
    }
    Ok(())
}

/// Refuses a word-order model too big for the worker: its weights (`vocab × conv_dim` table,
/// convolutions, output), one batch's activations with their gradients, and the token rows of
/// `examples` utterances (an id and a weight per slot).
pub fn check_conv(vocab: usize, labels: usize, examples: usize, subwords: usize, h: &Hyper) -> Result<(), JobError> {
    if vocab <= 1 {
        // Only the padding slot: every utterance would be the same row of zeros.
        return Err(JobError::permanent(format!(
            "the training texts give the word-order model no words or subwords (min_df {}): lower min_df, or check that \
             the texts have letters or digits",
            h.min_df
        )));
    }
    let (dim, filters, tokens) = (h.conv_dim as u64, h.conv_filters as u64, h.max_tokens as u64);
    let weights = vocab as u64 * dim + 6 * dim * filters + 3 * filters * labels as u64;
    // Per position: the looked-up slots, the summed embedding, the three widths' windows
    // (1 + 2 + 3 embeddings) and their filters; ×3 for the backward pass.
    let per_position = subwords as u64 * dim + 7 * dim + 3 * filters;
    let activations = h.batch_size as u64 * tokens * per_position * 4 * 3;
    let rows = examples as u64 * tokens * subwords as u64 * 8;
    let bytes = weights * BYTES_PER_WEIGHT + activations + rows;
    if bytes > MAX_NET_BYTES {
        return Err(JobError::permanent(format!(
            "the word-order model would need about {:.1} GiB (weights {:.1}, a batch's activations {:.1}, token rows {:.1}), \
             over the {} GiB a worker allows: lower conv_dim ({}), conv_filters ({}), batch_size ({}) or max_tokens ({}), or \
             raise min_df ({}; {vocab} words and subwords)",
            gib(bytes),
            gib(weights * BYTES_PER_WEIGHT),
            gib(activations),
            gib(rows),
            MAX_NET_BYTES >> 30,
            h.conv_dim,
            h.conv_filters,
            h.batch_size,
            h.max_tokens,
            h.min_df
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// More labels than a confusion matrix can hold, and a word-order model with no words, are
    /// permanent errors naming what to change.
    #[test]
    fn too_many_labels_or_no_words_are_refused() {
        check_labels(MAX_LABELS, "the training rows have").expect("the limit itself");
        let e = check_labels(20_000, "the training rows have").unwrap_err();
        assert_eq!(e.kind, trainyard_common::ErrorKind::Permanent);
        assert!(e.message.contains("the training rows have 20000 labels, over the 2000"), "{}", e.message);
        let h = Hyper::default();
        let e = check_conv(1, 10, 100, 8, &h).unwrap_err();
        assert!(e.message.contains("no words or subwords") && e.message.contains("min_df"), "{}", e.message);
        check_conv(2, 10, 100, 8, &h).expect("one word is something to learn from");
    }

    /// A bag too big for the worker, or with no features, is a permanent error naming what to
    /// change (it was an out-of-memory kill, or a model that predicts one label).
    #[test]
    fn a_bag_too_big_or_without_features_is_refused() {
        let h = |hidden| Hyper { hidden, ..Hyper::default() };
        check_bag(32_036, 151, &h(256)).expect("CLINC150's bag at the default hidden size");
        check_bag(49_000, 151, &h(4096)).expect("within 6 GiB");
        let big = check_bag(190_462, 151, &h(4096)).unwrap_err();
        assert!(big.message.contains("lower hidden") && big.message.contains("23.3 GiB"), "{}", big.message);
        // Labels count too: a million distinct labels is a head of a million rows.
        let labels = check_bag(1_000, 1_000_000, &h(256)).unwrap_err();
        assert!(labels.message.contains("1000000 labels"), "{}", labels.message);
        let none = check_bag(0, 151, &h(256)).unwrap_err();
        assert!(none.message.contains("no features") && none.message.contains("min_df"), "{}", none.message);
        assert!([big.kind, labels.kind, none.kind].iter().all(|k| *k == trainyard_common::ErrorKind::Permanent));
    }

    /// A million rows padded to a long utterance's features do not fit the device path.
    #[test]
    fn device_rows_padded_too_wide_are_refused() {
        check_padded_rows(18_000, 600, &Hyper::default()).expect("CLINC150's rows");
        let e = check_padded_rows(1_000_000, 9_000, &Hyper::default()).unwrap_err();
        assert!(
            e.message.contains("1000000 rows padded to the longest one's 9000 features") && e.message.contains("67.1 GiB"),
            "{}",
            e.message
        );
    }

    /// The widest word-order model the parameters allow does not fit; CLINC150's does.
    #[test]
    fn a_word_order_model_too_big_is_refused_naming_its_parameters() {
        check_conv(20_000, 151, 22_500, 8, &Hyper::default()).expect("CLINC150's conv at the defaults");
        let widest = Hyper { conv_dim: 1024, conv_filters: 2048, batch_size: 4096, max_tokens: 256, ..Hyper::default() };
        let e = check_conv(20_000, 151, 22_500, 8, &widest).unwrap_err();
        assert_eq!(e.kind, trainyard_common::ErrorKind::Permanent);
        for p in ["conv_dim (1024)", "batch_size (4096)", "max_tokens (256)", "activations"] {
            assert!(e.message.contains(p), "{p}: {}", e.message);
        }
        // Ten million utterances of 256 tokens are 160 GiB of token rows alone.
        let rows = check_conv(1_000, 2, 10_000_000, 8, &Hyper { max_tokens: 256, ..Hyper::default() }).unwrap_err();
        assert!(rows.message.contains("token rows 152.6"), "{}", rows.message);
    }
}
