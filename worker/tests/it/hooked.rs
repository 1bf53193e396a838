//! An in-memory artifact store with hooks on its puts, gets and deletes: a test's way to act at an
//! exact point of a run (ask for a stop as a checkpoint is saved, change production while a
//! gate reads it) or to fail a read.

use std::{fmt, sync::Arc};

use async_trait::async_trait;
use futures::{future::BoxFuture, stream::BoxStream, FutureExt, StreamExt};
use object_store::{
    memory::InMemory, path::Path, CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use trainyard_common::artifacts::ArtifactStore;

type PutHook = Box<dyn Fn(&str, &[u8]) + Send + Sync>;
type GetHook = Box<dyn Fn(&str) -> BoxFuture<'static, object_store::Result<()>> + Send + Sync>;
type DeleteHook = Arc<dyn Fn(&str) + Send + Sync>;

/// The store; [`Hooked::store`] gives the artifact store over it.
pub struct Hooked {
    inner: Arc<InMemory>,
    on_put: PutHook,
    on_get: GetHook,
    on_delete: DeleteHook,
}

impl Hooked {
    /// A store whose hooks do nothing.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(InMemory::new()),
            on_put: Box::new(|_, _| ()),
            on_get: Box::new(|_| async { Ok(()) }.boxed()),
            on_delete: Arc::new(|_| ()),
        }
    }

    /// Calls `f` with each put's key and bytes, before the put.
    pub fn on_put(self, f: impl Fn(&str, &[u8]) + Send + Sync + 'static) -> Self {
        Self { on_put: Box::new(f), ..self }
    }

    /// Runs what `f` returns for each get's key before the get; its error fails the get.
    pub fn on_get(self, f: impl Fn(&str) -> BoxFuture<'static, object_store::Result<()>> + Send + Sync + 'static) -> Self {
        Self { on_get: Box::new(f), ..self }
    }

    /// Calls `f` with each deleted key.
    pub fn on_delete(self, f: impl Fn(&str) + Send + Sync + 'static) -> Self {
        Self { on_delete: Arc::new(f), ..self }
    }

    /// The same memory without the hooks (what a hook writes through).
    pub fn plain(&self) -> ArtifactStore {
        ArtifactStore::from_object_store(self.inner.clone())
    }

    /// The artifact store over this one, hooks and all.
    pub fn store(self) -> ArtifactStore {
        ArtifactStore::from_object_store(Arc::new(self))
    }
}

impl fmt::Debug for Hooked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Hooked")
    }
}

impl fmt::Display for Hooked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Hooked")
    }
}

#[async_trait]
impl ObjectStore for Hooked {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> object_store::Result<PutResult> {
        let bytes: Vec<u8> = payload.iter().flat_map(|b| b.to_vec()).collect();
        (self.on_put)(location.as_ref(), &bytes);
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(&self, location: &Path, opts: PutMultipartOptions) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> object_store::Result<GetResult> {
        (self.on_get)(location.as_ref()).await?;
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(&self, locations: BoxStream<'static, object_store::Result<Path>>) -> BoxStream<'static, object_store::Result<Path>> {
        let hook = self.on_delete.clone();
        self.inner.delete_stream(locations.map(move |p| p.inspect(|p| hook(p.as_ref()))).boxed())
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
