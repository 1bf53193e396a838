//! A training thread whose stop was asked for once its networks are trained (a cancel, or a
//! timeout the runtime has recorded) does not go on to evaluate, write or promote its model.

use serde_json::json;
use tokio_util::sync::CancellationToken;
use trainyard_common::{models, ErrorKind};
use trainyard_worker::{handler::JobHandler, intent::IntentTrain};

use crate::{
    hooked::Hooked,
    intent::{ctx, fixture, params, spec, Fixture},
};

/// A store that asks the job to stop when the checkpoint of epoch `epoch` is saved: the
/// training loop has no step left to look at the request, and the run waits for that save
/// before it evaluates, so the request is there, every time, when training ends.
fn stop_at_checkpoint(epoch: u64, stop: CancellationToken) -> Hooked {
    Hooked::new().on_put(move |key, bytes| {
        if key.ends_with("checkpoints/latest.json") {
            let meta: serde_json::Value = serde_json::from_slice(bytes).expect("checkpoint metadata is JSON");
            if meta["epoch"] == epoch {
                stop.cancel();
            }
        }
    })
}

/// A stop asked for as the last epoch's checkpoint is saved ends the job `cancelled` before its
/// model is evaluated: nothing written under `model/`, nothing promoted (the run used to go on
/// to write the model and promote it, though the runtime had already ended the job).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_asked_after_the_last_epoch_ends_the_run_before_its_model_is_written() {
    let stop = CancellationToken::new();
    let store = stop_at_checkpoint(3, stop.clone()).store();
    let f = Fixture { store, ..fixture() };
    let (mut c, _progress) = ctx(&f, spec("stopped", "intent-train", "bank", params(json!({"epochs": 3}))), 0);
    c.cancel = stop;
    let err = IntentTrain::default().run(c).await.expect_err("the stop is heard");
    assert_eq!(err.kind, ErrorKind::Cancelled, "{}", err.message);
    assert!(err.message.contains("stopped before evaluating the model"), "{}", err.message);
    assert!(f.store.exists("jobs/stopped/checkpoints/latest.ckpt").await.unwrap(), "the last epoch's checkpoint is kept");
    assert!(!f.store.exists("jobs/stopped/model/config.json").await.unwrap(), "no model written");
    assert!(!f.store.exists("jobs/stopped/metrics.json").await.unwrap(), "no evaluation");
    assert!(models::production(&f.store, "bank").await.unwrap().is_none(), "nothing promoted");
}
