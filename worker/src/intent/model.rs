//! The burn modules: [`Head`] (trained with burn autodiff and Adam) and
//! [`IntentNet`], the whole model as one burn record (embedding table + head).
//!
//! ```text
//! bag = x · E              (sparse TF-IDF × embedding table, see `sparse`)
//! h   = dropout(relu(bag + b1))
//! y   = h · W2 + b2        (logits over the labels)
//! ```

use burn::{
    module::{Module, Param},
    record::{BinBytesRecorder, FullPrecisionSettings, Recorder},
    tensor::{activation, backend::Backend, Int, Tensor, TensorData},
};
use rand::{rngs::StdRng, Rng};

/// Everything after the embedding bag.
#[derive(Module, Debug)]
pub struct Head<B: Backend> {
    /// Bias of the hidden layer (`hidden`).
    pub hidden_bias: Param<Tensor<B, 1>>,
    /// Output weights (`hidden × labels`).
    pub out_weight: Param<Tensor<B, 2>>,
    /// Output bias (`labels`).
    pub out_bias: Param<Tensor<B, 1>>,
}

/// The whole model as saved: embedding table and head.
#[derive(Module, Debug)]
pub struct IntentNet<B: Backend> {
    /// The embedding table (`features × hidden`).
    pub embedding: Param<Tensor<B, 2>>,
    /// The rest.
    pub head: Head<B>,
}

fn tensor1<B: Backend>(v: Vec<f32>, device: &B::Device) -> Tensor<B, 1> {
    let n = v.len();
    Tensor::from_data(TensorData::new(v, [n]), device)
}

/// A `rows × cols` tensor from row-major data.
pub fn tensor2<B: Backend>(v: Vec<f32>, rows: usize, cols: usize, device: &B::Device) -> Tensor<B, 2> {
    Tensor::from_data(TensorData::new(v, [rows, cols]), device)
}

/// Row-major `f32` data of a tensor.
pub fn to_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().expect("f32 tensor data")
}

impl<B: Backend> Head<B> {
    /// A head initialised from `rng` (uniform ±1/√hidden, as burn's Linear; zero biases).
    pub fn init(hidden: usize, labels: usize, rng: &mut StdRng, device: &B::Device) -> Self {
        let k = 1.0 / (hidden as f32).sqrt();
        let w: Vec<f32> = (0..hidden * labels).map(|_| rng.random_range(-k..k)).collect();
        Self {
            hidden_bias: Param::from_tensor(tensor1(vec![0.0; hidden], device)),
            out_weight: Param::from_tensor(tensor2(w, hidden, labels, device)),
            out_bias: Param::from_tensor(tensor1(vec![0.0; labels], device)),
        }
    }

    /// Logits from the bag output (`batch × hidden`); `mask` is the (scaled) dropout mask, if training.
    pub fn forward(&self, bag: Tensor<B, 2>, mask: Option<Tensor<B, 2>>) -> Tensor<B, 2> {
        let h = activation::relu(bag + self.hidden_bias.val().unsqueeze::<2>());
        let h = match mask {
            Some(m) => h * m,
            None => h,
        };
        h.matmul(self.out_weight.val()) + self.out_bias.val().unsqueeze::<2>()
    }

    /// Mean cross-entropy of `logits` against `targets` (label indices), with label
    /// smoothing `smoothing` (0: plain cross-entropy).
    pub fn loss(logits: Tensor<B, 2>, targets: &[i64], smoothing: f32, device: &B::Device) -> Tensor<B, 1> {
        let n = targets.len();
        let t = Tensor::<B, 1, Int>::from_data(TensorData::new(targets.to_vec(), [n]), device).reshape([n, 1]);
        let logp = activation::log_softmax(logits, 1);
        let nll = logp.clone().gather(1, t).mean().neg();
        if smoothing > 0.0 {
            let uniform = logp.mean().neg();
            nll.mul_scalar(1.0 - smoothing) + uniform.mul_scalar(smoothing)
        } else {
            nll
        }
    }

    /// Class probabilities (`batch × labels`) as plain rows.
    pub fn probabilities(&self, bag: Vec<f32>, rows: usize, hidden: usize, device: &B::Device) -> Vec<f32> {
        let logits = self.forward(tensor2(bag, rows, hidden, device), None);
        to_vec(activation::softmax(logits, 1))
    }
}

/// The burn recorder of models and checkpoints: bincode, full precision, in memory.
pub type BytesRecorder = BinBytesRecorder<FullPrecisionSettings>;

/// Errors of (de)serialising burn records.
#[derive(Debug, thiserror::Error)]
#[error("failed to {what} a burn record: {reason}")]
pub struct RecordError {
    /// Encode or decode.
    pub what: &'static str,
    /// The cause.
    pub reason: String,
}

impl<B: Backend> IntentNet<B> {
    /// Assembles a model from a table (`features × hidden`, row-major) and a head.
    pub fn new(embedding: Vec<f32>, features: usize, hidden: usize, head: Head<B>, device: &B::Device) -> Self {
        Self { embedding: Param::from_tensor(tensor2(embedding, features, hidden, device)), head }
    }

    /// The model as bytes (a burn record).
    pub fn to_bytes(self) -> Result<Vec<u8>, RecordError> {
        BytesRecorder::default().record(self.into_record(), ()).map_err(|e| RecordError { what: "encode", reason: e.to_string() })
    }

    /// A model of the given shape loaded from bytes written by [`to_bytes`](Self::to_bytes).
    pub fn from_bytes(bytes: Vec<u8>, features: usize, hidden: usize, labels: usize, device: &B::Device) -> Result<Self, RecordError> {
        let skeleton = Self {
            embedding: Param::from_tensor(Tensor::zeros([features, hidden], device)),
            head: Head {
                hidden_bias: Param::from_tensor(Tensor::zeros([hidden], device)),
                out_weight: Param::from_tensor(Tensor::zeros([hidden, labels], device)),
                out_bias: Param::from_tensor(Tensor::zeros([labels], device)),
            },
        };
        let net = super::nets::load_bytes(skeleton, bytes, device)?;
        let [f, h] = net.embedding.val().dims();
        let [h2, l] = net.head.out_weight.val().dims();
        if (f, h, h2, l) != (features, hidden, hidden, labels) {
            return Err(RecordError {
                what: "decode",
                reason: format!("shape {f}×{h}, head {h2}×{l} does not match the config ({features}×{hidden}, {labels} labels)"),
            });
        }
        Ok(net)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use rand::SeedableRng;

    type B = NdArray;

    #[test]
    fn record_round_trip_and_shape_check() {
        let dev = Default::default();
        let mut rng = StdRng::seed_from_u64(3);
        let head = Head::<B>::init(4, 3, &mut rng, &dev);
        let net = IntentNet::new((0..20).map(|i| i as f32).collect(), 5, 4, head, &dev);
        let w = to_vec(net.head.out_weight.val());
        let bytes = net.to_bytes().unwrap();
        let back = IntentNet::<B>::from_bytes(bytes.clone(), 5, 4, 3, &dev).unwrap();
        assert_eq!(to_vec(back.head.out_weight.val()), w);
        assert_eq!(to_vec(back.embedding.val())[7], 7.0);
        assert!(IntentNet::<B>::from_bytes(bytes, 5, 4, 7, &dev).is_err());
        assert!(IntentNet::<B>::from_bytes(vec![1, 2, 3], 5, 4, 3, &dev).is_err());
    }

    #[test]
    fn loss_is_cross_entropy() {
        let dev = Default::default();
        let logits = tensor2::<B>(vec![0.0, 0.0, 10.0, 0.0], 2, 2, &dev);
        let l: f32 = to_vec(Head::<B>::loss(logits.clone(), &[0, 0], 0.0, &dev))[0];
        let expect = (2f32.ln() + (1.0 + (-10f32).exp()).ln()) / 2.0;
        assert!((l - expect).abs() < 1e-4, "{l} vs {expect}");
        // Smoothing 1/2 with two classes: half the NLL plus half the mean of -log p over classes.
        let ls: f32 = to_vec(Head::<B>::loss(logits, &[0, 0], 0.5, &dev))[0];
        let uniform = (2f32.ln() + (10.0 + (1.0 + (-10f32).exp()).ln() + (1.0 + (-10f32).exp()).ln()) / 2.0) / 2.0;
        assert!((ls - (0.5 * expect + 0.5 * uniform)).abs() < 1e-4, "{ls}");
    }
}
