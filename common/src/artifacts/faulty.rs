//! A store over memory that misbehaves as some object stores do, for tests.

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};

use futures::stream::BoxStream;
use object_store::{
    memory::InMemory, path::Path, CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMode,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};

/// An in-memory store with faults to switch on.
#[derive(Debug, Default)]
pub struct Faulty {
    inner: InMemory,
    /// The next create is kept but answered "already exists", as object_store answers a create
    /// retried after its reply was lost (the retry finds the object: 412).
    pub lose_create_reply: AtomicBool,
    /// Creates overwrite what is there, as a store that ignores `If-None-Match: *` does.
    pub ignore_create: AtomicBool,
    /// Creates are refused as not implemented (a bucket without conditional writes).
    pub refuse_create: AtomicBool,
}

impl std::fmt::Display for Faulty {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Faulty")
    }
}

#[async_trait::async_trait]
impl ObjectStore for Faulty {
    async fn put_opts(&self, location: &Path, payload: PutPayload, mut opts: PutOptions) -> Result<PutResult> {
        let create = matches!(opts.mode, PutMode::Create);
        if create && self.refuse_create.load(SeqCst) {
            return Err(object_store::Error::NotImplemented { operation: "put with If-None-Match".into(), implementer: "Faulty".into() });
        }
        if create && self.ignore_create.load(SeqCst) {
            opts.mode = PutMode::Overwrite;
        }
        let done = self.inner.put_opts(location, payload, opts).await?;
        if create && self.lose_create_reply.swap(false, SeqCst) {
            return Err(object_store::Error::AlreadyExists { path: location.to_string(), source: "the retry found it".into() });
        }
        Ok(done)
    }
    async fn put_multipart_opts(&self, location: &Path, opts: PutMultipartOptions) -> Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }
    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.inner.get_opts(location, options).await
    }
    fn delete_stream(&self, locations: BoxStream<'static, Result<Path>>) -> BoxStream<'static, Result<Path>> {
        self.inner.delete_stream(locations)
    }
    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }
    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }
    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}
