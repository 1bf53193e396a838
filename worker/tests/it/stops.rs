//! A training thread whose stop was asked for once its networks are trained (a cancel, or a
//! timeout the runtime has recorded) does not go on to evaluate, write or promote its model.

use std::{fmt, sync::Arc};

use async_trait::async_trait;
use futures::stream::BoxStream;
use object_store::{
    memory::InMemory, path::Path, CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use trainyard_common::{artifacts::ArtifactStore, models, ErrorKind};
use trainyard_worker::{handler::JobHandler, intent::IntentTrain};

use crate::intent::{ctx, fixture, params, spec, Fixture};

/// An in-memory store that asks the job to stop when the checkpoint of epoch `epoch` is saved:
/// the training loop has no step left to look at the request, and the run waits for that save
/// before it evaluates, so the request is there, every time, when training ends.
#[derive(Debug)]
struct StopAtCheckpoint {
    inner: InMemory,
    epoch: u64,
    stop: CancellationToken,
}

impl fmt::Display for StopAtCheckpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StopAtCheckpoint")
    }
}

#[async_trait]
impl ObjectStore for StopAtCheckpoint {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> object_store::Result<PutResult> {
        if location.as_ref().ends_with("checkpoints/latest.json") {
            let bytes: Vec<u8> = payload.iter().flat_map(|b| b.to_vec()).collect();
            let meta: serde_json::Value = serde_json::from_slice(&bytes).expect("checkpoint metadata is JSON");
            if meta["epoch"] == self.epoch {
                self.stop.cancel();
            }
        }
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(&self, location: &Path, opts: PutMultipartOptions) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> object_store::Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(&self, locations: BoxStream<'static, object_store::Result<Path>>) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

/// A stop asked for as the last epoch's checkpoint is saved ends the job `cancelled` before its
/// model is evaluated: nothing written under `model/`, nothing promoted (the run used to go on
/// to write the model and promote it, though the runtime had already ended the job).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_asked_after_the_last_epoch_ends_the_run_before_its_model_is_written() {
    let stop = CancellationToken::new();
    let store = ArtifactStore::from_object_store(Arc::new(StopAtCheckpoint { inner: InMemory::new(), epoch: 3, stop: stop.clone() }));
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
