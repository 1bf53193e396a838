//! The models that run wholly on a burn device: [`DenseBag`] (the bag of n-grams,
//! its embedding table a burn parameter) and [`ConvNet`] (the word-order model).
//!
//! Both read a batch as fixed-width ids and weights ([`super::seq::Padded`]): the
//! only data that travels to the device per batch.
//!
//! ```text
//! DenseBag:  bag = Σ_k w_k · E[id_k]                      (n × hidden)
//!            logits = Head(bag)                            (as the sparse path)
//! ConvNet:   x_t  = Σ_s w_ts · E[id_ts]                   (n × tokens × dim: word + subwords)
//!            c_k  = max_t relu(Σ_{j<k} x_{t+j} · W_kj + b_k)   for each width k
//!            logits = dropout([c_1 c_2 …]) · W_out + b_out
//! ```

use burn::{
    module::{Module, Param},
    record::{Record, Recorder, RecorderError},
    tensor::{backend::Backend, Distribution, Int, Tensor, TensorData},
};
use rand::{rngs::StdRng, Rng};

use super::model::{tensor2, BytesRecorder, Head, RecordError};

/// A model trained by [`super::device_train`].
pub trait DeviceNet<B: Backend>: Module<B> {
    /// Logits (`n × labels`) of a batch: `ids` (`n × width`, flattened) and `w` (`n × width`).
    /// `dropout` > 0 only in training.
    fn logits(&self, ids: Tensor<B, 1, Int>, w: Tensor<B, 2>, dropout: f32) -> Tensor<B, 2>;
}

/// A dropout mask (`shape`), scaled by `1 / keep`, drawn on the device.
fn dropout_mask<B: Backend, const D: usize>(shape: [usize; D], p: f32, device: &B::Device) -> Tensor<B, D> {
    let keep = 1.0 - f64::from(p);
    Tensor::<B, D>::random(shape, Distribution::Bernoulli(keep), device).div_scalar(keep)
}

/// Σ over each row's slots of weight × table row: `n × width` → `n × dim`.
fn weighted_lookup<B: Backend>(table: Tensor<B, 2>, ids: Tensor<B, 1, Int>, w: Tensor<B, 2>) -> Tensor<B, 3> {
    let [n, width] = w.dims();
    let [_, dim] = table.dims();
    let rows = table.select(0, ids).reshape([n, width, dim]);
    rows * w.unsqueeze_dim::<3>(2)
}

fn uniform(n: usize, k: f32, rng: &mut StdRng) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-k..k)).collect()
}

fn zeros1<B: Backend>(n: usize, device: &B::Device) -> Param<Tensor<B, 1>> {
    Param::from_tensor(Tensor::zeros([n], device))
}

/// Encodes a module's record.
pub fn record_bytes<B: Backend, M: Module<B>>(m: M) -> Result<Vec<u8>, RecordError> {
    BytesRecorder::default().record(m.into_record(), ()).map_err(|e| RecordError { what: "encode", reason: e.to_string() })
}

/// Loads bytes written by [`record_bytes`] into `skeleton` (a module of the expected shape).
pub fn load_bytes<B: Backend, M: Module<B>>(skeleton: M, bytes: Vec<u8>, device: &B::Device) -> Result<M, RecordError> {
    Ok(skeleton.load_record(load_record::<B, M::Record>(bytes, device)?))
}

/// Reads a burn record (a module's or an optimizer's) from bytes written by burn's bytes
/// recorder. That recorder panics on bytes it cannot decode: here they are an error.
pub fn load_record<B: Backend, R: Record<B>>(bytes: Vec<u8>, device: &B::Device) -> Result<R, RecordError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Recorder::<B>::load::<R>(&BytesRecorder::default(), bytes, device)))
        .map_err(|_| RecordError { what: "decode", reason: "corrupt or incompatible record".into() })?
        .map_err(|e: RecorderError| RecordError { what: "decode", reason: e.to_string() })
}

/// The bag of n-grams with its table on the device (row 0: padding).
#[derive(Module, Debug)]
pub struct DenseBag<B: Backend> {
    /// `(features + 1) × hidden`.
    pub table: Param<Tensor<B, 2>>,
    /// Everything after the bag, shared with the sparse path.
    pub head: Head<B>,
}

impl<B: Backend> DenseBag<B> {
    /// Initialised exactly as the sparse path: the same RNG draws, table then head.
    pub fn init(features: usize, hidden: usize, labels: usize, rng: &mut StdRng, device: &B::Device) -> Self {
        let scale = (3.0 / hidden as f32).sqrt() * 0.1;
        let mut t = vec![0.0; hidden];
        t.extend(uniform(features * hidden, scale, rng));
        let table = Param::from_tensor(tensor2(t, features + 1, hidden, device));
        Self { table, head: Head::init(hidden, labels, rng, device) }
    }

    /// The table without its padding row, row-major (`features × hidden`), for the model files.
    pub fn table_rows(&self) -> Vec<f32> {
        let [rows, hidden] = self.table.val().dims();
        super::model::to_vec(self.table.val().slice([1..rows, 0..hidden]))
    }
}

impl<B: Backend> DeviceNet<B> for DenseBag<B> {
    fn logits(&self, ids: Tensor<B, 1, Int>, w: Tensor<B, 2>, dropout: f32) -> Tensor<B, 2> {
        let bag = weighted_lookup(self.table.val(), ids, w).sum_dim(1);
        let [n, _, hidden] = bag.dims();
        let bag = bag.reshape([n, hidden]);
        let mask = (dropout > 0.0).then(|| dropout_mask([n, hidden], dropout, &bag.device()));
        self.head.forward(bag, mask)
    }
}

/// Shape of a [`ConvNet`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvShape {
    /// Rows of the embedding table (units + padding).
    pub vocab: usize,
    /// Embedding width.
    pub dim: usize,
    /// Filters per width.
    pub filters: usize,
    /// Positions per utterance.
    pub tokens: usize,
    /// Slots per position.
    pub subwords: usize,
    /// Output labels.
    pub labels: usize,
}

/// Convolution widths (in tokens) of the word-order model.
pub const CONV_WIDTHS: [usize; 3] = [1, 2, 3];

/// The word-order model: token embeddings from words and subwords, convolutions of
/// widths [`CONV_WIDTHS`] with max-pooling over positions, a linear output.
#[derive(Module, Debug)]
pub struct ConvNet<B: Backend> {
    /// `vocab × dim` (row 0: padding).
    pub table: Param<Tensor<B, 2>>,
    /// One `(width · dim) × filters` weight per width.
    pub conv_weight: Vec<Param<Tensor<B, 2>>>,
    /// One `filters` bias per width.
    pub conv_bias: Vec<Param<Tensor<B, 1>>>,
    /// `(widths · filters) × labels`.
    pub out_weight: Param<Tensor<B, 2>>,
    /// `labels`.
    pub out_bias: Param<Tensor<B, 1>>,
    /// Positions per utterance.
    pub tokens: usize,
    /// Slots per position.
    pub subwords: usize,
}

impl<B: Backend> ConvNet<B> {
    /// A model initialised from `rng` (uniform, burn Linear's ±1/√fan_in for the layers).
    pub fn init(s: ConvShape, rng: &mut StdRng, device: &B::Device) -> Self {
        let table = tensor2(uniform(s.vocab * s.dim, 0.1, rng), s.vocab, s.dim, device);
        let conv_weight = CONV_WIDTHS
            .iter()
            .map(|&k| {
                let fan_in = k * s.dim;
                Param::from_tensor(tensor2(uniform(fan_in * s.filters, 1.0 / (fan_in as f32).sqrt(), rng), fan_in, s.filters, device))
            })
            .collect();
        let conv_bias = CONV_WIDTHS.iter().map(|_| zeros1(s.filters, device)).collect();
        let feat = CONV_WIDTHS.len() * s.filters;
        let out_weight = tensor2(uniform(feat * s.labels, 1.0 / (feat as f32).sqrt(), rng), feat, s.labels, device);
        Self {
            table: Param::from_tensor(table),
            conv_weight,
            conv_bias,
            out_weight: Param::from_tensor(out_weight),
            out_bias: zeros1(s.labels, device),
            tokens: s.tokens,
            subwords: s.subwords,
        }
    }

    /// A zero model of this shape, to load a record into.
    pub fn skeleton(s: ConvShape, device: &B::Device) -> Self {
        let feat = CONV_WIDTHS.len() * s.filters;
        Self {
            table: Param::from_tensor(Tensor::zeros([s.vocab, s.dim], device)),
            conv_weight: CONV_WIDTHS.iter().map(|&k| Param::from_tensor(Tensor::zeros([k * s.dim, s.filters], device))).collect(),
            conv_bias: CONV_WIDTHS.iter().map(|_| zeros1(s.filters, device)).collect(),
            out_weight: Param::from_tensor(Tensor::zeros([feat, s.labels], device)),
            out_bias: zeros1(s.labels, device),
            tokens: s.tokens,
            subwords: s.subwords,
        }
    }

    /// The shape of this model.
    pub fn shape(&self) -> ConvShape {
        let [vocab, dim] = self.table.val().dims();
        let [feat, labels] = self.out_weight.val().dims();
        ConvShape { vocab, dim, filters: feat / CONV_WIDTHS.len(), tokens: self.tokens, subwords: self.subwords, labels }
    }
}

impl<B: Backend> DeviceNet<B> for ConvNet<B> {
    fn logits(&self, ids: Tensor<B, 1, Int>, w: Tensor<B, 2>, dropout: f32) -> Tensor<B, 2> {
        let [n, width] = w.dims();
        // A batch may come trimmed to fewer positions than `tokens` (see `Padded::gather`).
        let s = self.subwords;
        let l = width / s;
        let w = w.reshape([n, l, s]);
        // A position holds a token when any of its slots has weight (`n × l × 1`).
        let mask = w.clone().sum_dim(2).greater_elem(0.0).float();
        let x = weighted_lookup(self.table.val(), ids, w.reshape([n * l, s])).sum_dim(1);
        let [_, _, dim] = x.dims();
        let x = x.reshape([n, l, dim]);
        let mut pooled = Vec::with_capacity(CONV_WIDTHS.len());
        for ((&k, wk), bk) in CONV_WIDTHS.iter().zip(&self.conv_weight).zip(&self.conv_bias) {
            let out_len = l + 1 - k;
            // im2col by shifted slices: window t is positions t..t+k, concatenated.
            let cols: Vec<Tensor<B, 3>> = (0..k).map(|j| x.clone().slice([0..n, j..j + out_len, 0..dim])).collect();
            let cols = Tensor::cat(cols, 2).reshape([n * out_len, k * dim]);
            let [_, filters] = wk.val().dims();
            let h = (cols.matmul(wk.val()) + bk.val().unsqueeze::<2>()).reshape([n, out_len, filters]);
            // Windows starting on padding are zeroed (relu ≥ 0, so they never win the max).
            let valid = mask.clone().slice([0..n, 0..out_len, 0..1]);
            let h = burn::tensor::activation::relu(h) * valid;
            pooled.push(h.max_dim(1).reshape([n, filters]));
        }
        let mut feat = Tensor::cat(pooled, 1);
        if dropout > 0.0 {
            let dims = feat.dims();
            feat = feat * dropout_mask(dims, dropout, &self.out_weight.val().device());
        }
        feat.matmul(self.out_weight.val()) + self.out_bias.val().unsqueeze::<2>()
    }
}

/// Ids and weights as device tensors.
pub fn batch_tensors<B: Backend>(ids: Vec<i32>, w: Vec<f32>, rows: usize, device: &B::Device) -> (Tensor<B, 1, Int>, Tensor<B, 2>) {
    let width = w.len() / rows.max(1);
    let n = ids.len();
    (Tensor::from_data(TensorData::new(ids, [n]), device), tensor2(w, rows, width, device))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use rand::SeedableRng;

    type B = NdArray;

    #[test]
    fn dense_bag_matches_a_weighted_sum_of_rows() {
        let dev = Default::default();
        let mut rng = StdRng::seed_from_u64(1);
        let net = DenseBag::<B>::init(3, 2, 2, &mut rng, &dev);
        let t = net.table_rows();
        assert_eq!(t.len(), 6);
        // Ids 2 and 3 (features 1 and 2) with weights .5 and 2 — against the sparse formula.
        let (ids, w) = batch_tensors::<B>(vec![2, 3], vec![0.5, 2.0], 1, &dev);
        let got = super::super::model::to_vec(net.logits(ids, w, 0.0));
        let bag = [0.5 * t[2] + 2.0 * t[4], 0.5 * t[3] + 2.0 * t[5]];
        let want = net.head.probabilities(bag.to_vec(), 1, 2, &dev);
        let sm: Vec<f32> = {
            let m = got.iter().cloned().fold(f32::MIN, f32::max);
            let e: Vec<f32> = got.iter().map(|v| (v - m).exp()).collect();
            let s: f32 = e.iter().sum();
            e.iter().map(|v| v / s).collect()
        };
        assert!(sm.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-5), "{sm:?} vs {want:?}");
    }

    #[test]
    fn conv_sees_word_order_and_ignores_padding() {
        let dev = Default::default();
        let mut rng = StdRng::seed_from_u64(2);
        let s = ConvShape { vocab: 5, dim: 4, filters: 3, tokens: 4, subwords: 1, labels: 2 };
        let net = ConvNet::<B>::init(s, &mut rng, &dev);
        let run = |ids: Vec<i32>| {
            let w = ids.iter().map(|&i| if i > 0 { 1.0 } else { 0.0 }).collect();
            let (i, w) = batch_tensors::<B>(ids, w, 1, &dev);
            super::super::model::to_vec(net.logits(i, w, 0.0))
        };
        let ab = run(vec![1, 2, 0, 0]);
        let ba = run(vec![2, 1, 0, 0]);
        assert_ne!(ab, ba, "width-2 and -3 filters see the order");
        assert_eq!(net.shape(), s);
        let bytes = record_bytes(net.clone()).unwrap();
        let back = load_bytes(ConvNet::<B>::skeleton(s, &dev), bytes, &dev).unwrap();
        assert_eq!(super::super::model::to_vec(back.out_weight.val()), super::super::model::to_vec(net.out_weight.val()));
    }
}
