//! The artifact store: models, checkpoints, metrics, logs, job outcomes.
//!
//! Backed by `object_store`: a local directory by default
//! (`TRAINYARD_ARTIFACTS=./.trainyard/artifacts`), an S3-compatible bucket in a
//! cluster (`s3://BUCKET/PREFIX`, configured by the usual `AWS_*` variables),
//! `memory://` for tests.
//! Every `put` is atomic (the local store writes a temporary file and renames).
//!
//! Layout (see [`keys`]): `jobs/<job_id>/…` for a job's outputs and
//! `bots/<bot>/…` for a bot's production pointer and promotion history.

use std::{path::PathBuf, sync::Arc};

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::{
    aws::{AmazonS3Builder, AmazonS3ConfigKey},
    local::LocalFileSystem,
    memory::InMemory,
    path::Path,
    prefix::PrefixStore,
    ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
};
use serde::{de::DeserializeOwned, Serialize};

use crate::error::CommonError;

/// Where a job's and a bot's artifacts live.
pub mod keys {
    /// Prefix of everything a job wrote.
    pub fn job(job_id: &str) -> String {
        format!("jobs/{job_id}")
    }
    /// The recorded outcome of a job: its presence means "done, do not run again".
    /// Outside the job's own prefix, in 256 shards by the id's last two characters,
    /// so that recording it never creates a directory per job on a local disk.
    pub fn outcome(job_id: &str) -> String {
        let shard = job_id.get(job_id.len().saturating_sub(2)..).unwrap_or("_");
        format!("outcomes/{shard}/{job_id}.json")
    }
    /// Where stores written before outcomes moved to [`outcome`] kept them; only read.
    pub fn legacy_outcome(job_id: &str) -> String {
        format!("jobs/{job_id}/outcome.json")
    }
    /// The log of one attempt of a job.
    pub fn attempt_log(job_id: &str, attempt: u32) -> String {
        format!("jobs/{job_id}/logs/attempt-{attempt}.log")
    }
    /// Present when a job was asked to be cancelled (JSON [`CancelRequest`](crate::control::CancelRequest)).
    pub fn cancel_marker(job_id: &str) -> String {
        format!("jobs/{job_id}/cancel.json")
    }
    /// The production pointer of a bot.
    pub fn production(bot: &str) -> String {
        format!("bots/{bot}/production.json")
    }
    /// The promotion history of a bot as one JSON document, as stores written before
    /// [`promotion_record`] kept it; only read (its records come first).
    pub fn promotions(bot: &str) -> String {
        format!("bots/{bot}/promotions.json")
    }
    /// Prefix of a bot's promotion records, one object per change.
    pub fn promotion_records(bot: &str) -> String {
        format!("bots/{bot}/history")
    }
    /// The `seq`-th promotion record of a bot, written once (zero-padded, so keys sort as numbers).
    pub fn promotion_record(bot: &str, seq: u64) -> String {
        format!("bots/{bot}/history/{seq:010}.json")
    }
}

/// At start-up: refuses a store that does not keep create-once writes
/// ([`ArtifactStore::check_create_once`]); a store that cannot be reached now is only logged
/// (an outage must not keep workers or the control plane from starting: their store
/// operations wait for it job by job).
pub async fn refuse_unfit(store: &ArtifactStore) -> Result<(), CommonError> {
    match store.check_create_once().await {
        Err(e @ CommonError::Config { .. }) => Err(e),
        Err(e) => {
            tracing::warn!(error = %e, "could not check that the artifact store keeps create-once writes; going on");
            Ok(())
        }
        Ok(()) => Ok(()),
    }
}

/// What is recorded of a job before it runs ([`ArtifactStore::job_records`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRecords {
    /// The key of its outcome record, if it has one.
    pub outcome: Option<String>,
    /// Is a cancel marker there?
    pub cancel_marker: bool,
}

/// A handle on the artifact store. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ArtifactStore {
    inner: Arc<dyn ObjectStore>,
    local_root: Option<PathBuf>,
    /// Creates the local store's records in batches (Linux; started on the first record).
    #[cfg(target_os = "linux")]
    committer: Arc<std::sync::OnceLock<commit::Committer>>,
}

impl ArtifactStore {
    /// Opens a store from a location: a directory path, `file://DIR`, `s3://BUCKET[/PREFIX]`
    /// (settings from the environment's `AWS_*` variables) or `memory://`.
    pub fn open(location: &str) -> Result<Self, CommonError> {
        Self::open_with(location, std::env::vars())
    }

    /// [`open`](Self::open) with the `AWS_*` settings of an S3 store taken from `vars`
    /// (`AWS_ENDPOINT`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_ALLOW_HTTP`, …; empty ones are ignored).
    pub fn open_with(location: &str, vars: impl IntoIterator<Item = (String, String)>) -> Result<Self, CommonError> {
        if location == "memory://" {
            return Ok(Self::new(Arc::new(InMemory::new()), None));
        }
        if location.starts_with("s3://") {
            return Self::open_s3(location, vars);
        }
        let dir = location.strip_prefix("file://").unwrap_or(location);
        if dir.contains("://") {
            return Err(CommonError::Config {
                name: "TRAINYARD_ARTIFACTS".into(),
                reason: format!("{location:?}: use a directory, file://DIR, s3://BUCKET[/PREFIX] or memory://"),
            });
        }
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir).map_err(|e| CommonError::Config {
            name: "TRAINYARD_ARTIFACTS".into(),
            reason: format!("failed to create directory {}: {e}", dir.display()),
        })?;
        let root = dir.canonicalize().unwrap_or(dir);
        let fs = LocalFileSystem::new_with_prefix(&root).map_err(|source| CommonError::Artifacts {
            what: "open",
            path: root.display().to_string(),
            source,
        })?;
        // Every write synced (file and directory) before it returns, as the fast path's:
        // a big outcome record, a checkpoint or a model survives a machine crash once written.
        Ok(Self::new(Arc::new(fs.with_fsync(true)), Some(root)))
    }

    fn open_s3(location: &str, vars: impl IntoIterator<Item = (String, String)>) -> Result<Self, CommonError> {
        let invalid =
            |reason: String| CommonError::Config { name: "TRAINYARD_ARTIFACTS".into(), reason: format!("{location:?}: {reason}") };
        let url = url::Url::parse(location).map_err(|e| invalid(e.to_string()))?;
        if url.host_str().is_none_or(str::is_empty) {
            return Err(invalid("no bucket: use s3://BUCKET[/PREFIX]".into()));
        }
        // The k8s config sets `AWS_ENDPOINT: ""` for AWS itself: an empty setting means "not set".
        let builder = vars
            .into_iter()
            .filter(|(k, v)| k.starts_with("AWS_") && !v.is_empty())
            .filter_map(|(k, v)| k.to_ascii_lowercase().parse::<AmazonS3ConfigKey>().ok().map(|key| (key, v)))
            .fold(AmazonS3Builder::new(), |b, (key, v)| b.with_config(key, v))
            .with_url(location);
        let s3 = builder.build().map_err(|source| CommonError::Artifacts { what: "open", path: location.into(), source })?;
        let prefix = url.path().trim_matches('/');
        let inner: Arc<dyn ObjectStore> = if prefix.is_empty() { Arc::new(s3) } else { Arc::new(PrefixStore::new(s3, prefix)) };
        Ok(Self::new(inner, None))
    }

    /// A store over any `object_store` implementation (no local fast paths): for
    /// backends `open` does not name, and for tests that wrap one (to inject faults).
    pub fn from_object_store(inner: Arc<dyn ObjectStore>) -> Self {
        Self::new(inner, None)
    }

    fn new(inner: Arc<dyn ObjectStore>, local_root: Option<PathBuf>) -> Self {
        Self {
            inner,
            local_root,
            #[cfg(target_os = "linux")]
            committer: Arc::default(),
        }
    }

    /// Opens the store named by `TRAINYARD_ARTIFACTS`.
    pub fn from_env() -> Result<Self, CommonError> {
        Self::open(&crate::config::artifacts())
    }

    /// The local directory behind the store, when it is one.
    pub fn local_root(&self) -> Option<&std::path::Path> {
        self.local_root.as_deref()
    }

    /// Writes `bytes` at `key`, atomically.
    pub async fn put(&self, key: &str, bytes: impl Into<Bytes>) -> Result<(), CommonError> {
        self.inner.put(&Path::from(key), PutPayload::from(bytes.into())).await.map(|_| ()).map_err(|source| CommonError::Artifacts {
            what: "write",
            path: key.into(),
            source,
        })
    }

    /// Writes `bytes` at `key` only if nothing is there yet; `false` when
    /// something already was. This is how a job's outcome is recorded once. On a local
    /// directory a small record is on disk when this returns (file and directory synced),
    /// so a machine crash cannot take it back.
    pub async fn put_if_absent(&self, key: &str, bytes: impl Into<Bytes>) -> Result<bool, CommonError> {
        let bytes = bytes.into();
        if let Some(path) = self.local_path(key).filter(|_| bytes.len() <= local::SMALL) {
            return self.create_local(path, bytes).await.map_err(|e| local::error("create", key, e));
        }
        let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
        match self.inner.put_opts(&Path::from(key), PutPayload::from(bytes), opts).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(source) => Err(CommonError::Artifacts { what: "create", path: key.into(), source }),
        }
    }

    /// A small create-once record on the local directory, in the committer's next batch.
    #[cfg(target_os = "linux")]
    async fn create_local(&self, path: PathBuf, bytes: Bytes) -> std::io::Result<bool> {
        let committer = match self.committer.get() {
            Some(c) => c,
            // Two racing first records may start two threads: the one not kept ends at once.
            None => {
                let started = commit::Committer::start()?;
                self.committer.get_or_init(|| started)
            }
        };
        committer.create(path, bytes).await
    }

    /// A small create-once record on the local directory, synced on its own (two flushes;
    /// on the blocking pool, not on a runtime thread).
    #[cfg(not(target_os = "linux"))]
    async fn create_local(&self, path: PathBuf, bytes: Bytes) -> std::io::Result<bool> {
        let created = tokio::task::spawn_blocking(move || local::create(&path, &bytes)).await;
        created.unwrap_or_else(|e| Err(std::io::Error::other(e)))
    }

    /// Checks, with a probe object written twice and deleted, that the store refuses a create-once
    /// write to a key that exists (`PUT` with `If-None-Match: *` on S3). Outcome records (a job
    /// run once), promotion records and coalescing records rest on it: a store that ignores it
    /// (some S3 look-alikes) overwrites them without a word, and a job is recorded
    /// twice or a promotion lost. Such a store, or one that answers conditional writes "not
    /// implemented", is a `Config` error naming it; any other error is the store's (it may be
    /// down: the caller decides). A local directory is not probed: its creates are this
    /// crate's own (`link`, which fails on an existing name).
    pub async fn check_create_once(&self) -> Result<(), CommonError> {
        if self.local_root.is_some() {
            return Ok(());
        }
        let key = format!("probes/create-once/{}.json", uuid::Uuid::now_v7());
        let unfit = |why: String| CommonError::Config {
            name: "TRAINYARD_ARTIFACTS".into(),
            reason: format!(
                "the artifact store {why}: trainyard records each job's outcome, each promotion and each coalescing \
                 record with a create-once write (If-None-Match: *) and needs a store that refuses one to a key that \
                 exists, as AWS S3 does"
            ),
        };
        let unsupported = |e: CommonError| if e.store_cannot_do() { unfit(format!("does not do create-once writes ({e})")) } else { e };
        let first = self.put_if_absent(&key, "{\"probe\": 1}").await.map_err(unsupported)?;
        let second = self.put_if_absent(&key, "{\"probe\": 2}").await.map_err(unsupported);
        if let Err(e) = self.delete(&key).await {
            tracing::warn!(key, error = %e, "could not delete the artifact store's probe object");
        }
        match (first, second?) {
            (true, false) => Ok(()),
            _ => Err(unfit(format!("wrote over the object at {key} with a create-once write"))),
        }
    }

    /// What is recorded of a job before a worker runs it: the key of its outcome, if it has
    /// one (also where older stores kept it), and whether a cancel marker waits for it. Two
    /// `stat`s on a local directory for a job that has neither: no outcome record, no
    /// directory of the job (which would hold an older store's outcome and the marker).
    pub async fn job_records(&self, job_id: &str) -> Result<JobRecords, CommonError> {
        let key = keys::outcome(job_id);
        let recorded = self.exists(&key).await?;
        if !self.may_hold(&keys::job(job_id)).await? {
            return Ok(JobRecords { outcome: recorded.then_some(key), cancel_marker: false });
        }
        let legacy = keys::legacy_outcome(job_id);
        let outcome = if recorded { Some(key) } else { self.exists(&legacy).await?.then_some(legacy) };
        Ok(JobRecords { outcome, cancel_marker: self.exists(&keys::cancel_marker(job_id)).await? })
    }

    /// `false` when nothing is stored under `prefix`; `true` when something may be
    /// (a local directory that exists, even an empty one). On a local directory this
    /// is one `stat`, so the worker's hot path can skip its look-ups for a fresh job.
    pub async fn may_hold(&self, prefix: &str) -> Result<bool, CommonError> {
        if let Some(path) = self.local_path(prefix) {
            return match std::fs::symlink_metadata(path) {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
                Err(e) => Err(local::error("stat", prefix, e)),
            };
        }
        let p = Path::from(prefix);
        let first = self.inner.list(Some(&p)).try_next().await;
        first.map(|o| o.is_some()).map_err(|source| CommonError::Artifacts { what: "list", path: prefix.into(), source })
    }

    /// The file behind `key` in a local store, for keys made of plain characters
    /// (which `object_store` maps to the same relative path).
    fn local_path(&self, key: &str) -> Option<PathBuf> {
        let root = self.local_root.as_ref()?;
        let plain = !key.is_empty()
            && key.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
            && key.split('/').all(|part| !part.is_empty() && part != "." && part != "..");
        plain.then(|| root.join(key))
    }

    /// Reads `key`; `None` when absent.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, CommonError> {
        match self.inner.get(&Path::from(key)).await {
            Ok(r) => r.bytes().await.map(Some).map_err(|source| CommonError::Artifacts { what: "read", path: key.into(), source }),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(source) => Err(CommonError::Artifacts { what: "read", path: key.into(), source }),
        }
    }

    /// Is there an object at `key`? One `stat` on a local directory.
    pub async fn exists(&self, key: &str) -> Result<bool, CommonError> {
        if let Some(path) = self.local_path(key) {
            return match std::fs::metadata(path) {
                Ok(m) => Ok(m.is_file()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
                Err(e) => Err(local::error("stat", key, e)),
            };
        }
        match self.inner.head(&Path::from(key)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(source) => Err(CommonError::Artifacts { what: "stat", path: key.into(), source }),
        }
    }

    /// Lists the keys under `prefix`, sorted.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>, CommonError> {
        let p = Path::from(prefix);
        let mut keys: Vec<String> =
            self.inner.list(Some(&p)).map_ok(|m| m.location.to_string()).try_collect().await.map_err(|source| CommonError::Artifacts {
                what: "list",
                path: prefix.into(),
                source,
            })?;
        keys.sort();
        Ok(keys)
    }

    /// Deletes `key` (absent is fine).
    pub async fn delete(&self, key: &str) -> Result<(), CommonError> {
        match self.inner.delete(&Path::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(source) => Err(CommonError::Artifacts { what: "delete", path: key.into(), source }),
        }
    }

    /// Writes `value` as pretty JSON.
    pub async fn put_json<T: Serialize>(&self, key: &str, value: &T) -> Result<(), CommonError> {
        let bytes = serde_json::to_vec_pretty(value).map_err(|e| crate::error::CodecError::Encode(e.to_string()))?;
        self.put(key, bytes).await
    }

    /// Reads JSON at `key`; `None` when absent.
    pub async fn get_json<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, CommonError> {
        match self.get(key).await? {
            None => Ok(None),
            Some(b) => serde_json::from_slice(&b).map(Some).map_err(|e| crate::error::CodecError::Json(format!("{key}: {e}")).into()),
        }
    }
}

#[cfg(target_os = "linux")]
mod commit;
#[cfg(test)]
pub(crate) mod faulty;
mod local;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_round_trip_and_listing() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(dir.path().to_str().unwrap()).unwrap();
        assert_eq!(store.get("jobs/x/metrics.json").await.unwrap(), None);
        store.put_json("jobs/x/metrics.json", &serde_json::json!({"ok": true})).await.unwrap();
        store.put("jobs/x/logs/attempt-1.log", "hello").await.unwrap();
        assert!(store.exists("jobs/x/metrics.json").await.unwrap());
        assert!(!store.exists("jobs/x/logs").await.unwrap(), "a directory is not an object");
        let v: serde_json::Value = store.get_json("jobs/x/metrics.json").await.unwrap().unwrap();
        assert_eq!(v["ok"], true);
        assert_eq!(store.list("jobs/x").await.unwrap(), vec!["jobs/x/logs/attempt-1.log", "jobs/x/metrics.json"]);
        assert!(dir.path().join("jobs/x/metrics.json").is_file());
        assert!(ArtifactStore::open("gs://bucket").is_err());
        assert!(ArtifactStore::open("s3:///no-bucket").is_err());
    }

    /// The same create-once semantics on every path: the local fast path (small
    /// payloads), `object_store`'s own create (large ones, odd keys) and memory.
    #[tokio::test]
    async fn put_if_absent_creates_once_on_every_path() {
        let dir = tempfile::tempdir().unwrap();
        let local = ArtifactStore::open(dir.path().to_str().unwrap()).unwrap();
        let memory = ArtifactStore::open("memory://").unwrap();
        let big = vec![b'x'; local::SMALL + 1];
        for store in [&local, &memory] {
            for (key, first) in
                [("outcomes/ab/small.json", b"1".to_vec()), ("outcomes/ab/big.json", big.clone()), ("odd key/a b.json", b"3".to_vec())]
            {
                assert!(store.put_if_absent(key, first.clone()).await.unwrap(), "{key}");
                assert!(!store.put_if_absent(key, "second").await.unwrap(), "{key}");
                assert_eq!(store.get(key).await.unwrap().unwrap(), first, "{key}");
            }
        }
        // The fast path cleans up its staged files: only the objects are there.
        let mut names: Vec<String> =
            std::fs::read_dir(dir.path().join("outcomes/ab")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(names, ["big.json", "small.json"]);
        // What the fast path does not take (a big record, an odd key, a checkpoint) goes to
        // `object_store`, which must sync it too: without that a machine crash could take
        // back an outcome the broker was told of.
        assert!(format!("{:?}", local.inner).contains("fsync: true"), "{:?}", local.inner);
    }

    /// A store that overwrites on a create-once write, or refuses it as not implemented, is
    /// refused by name; one that keeps create-once passes and is left without the probe object.
    #[tokio::test]
    async fn a_store_that_ignores_create_once_writes_is_found_out() {
        use std::sync::{atomic::Ordering::SeqCst, Arc};
        let faulty = Arc::new(faulty::Faulty::default());
        let store = ArtifactStore::from_object_store(faulty.clone());
        store.check_create_once().await.expect("a store that keeps create-once passes");
        assert!(store.list("probes").await.unwrap().is_empty(), "the probe object is deleted");
        faulty.ignore_create.store(true, SeqCst);
        let err = store.check_create_once().await.expect_err("a store that overwrites is refused").to_string();
        assert!(refuse_unfit(&store).await.is_err(), "refused at start-up");
        assert!(err.contains("TRAINYARD_ARTIFACTS") && err.contains("wrote over the object") && err.contains("If-None-Match"), "{err}");
        faulty.ignore_create.store(false, SeqCst);
        faulty.refuse_create.store(true, SeqCst);
        let err = store.check_create_once().await.expect_err("a store without conditional writes is refused").to_string();
        assert!(err.contains("does not do create-once writes") && err.contains("not yet implemented"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        ArtifactStore::open(dir.path().to_str().unwrap()).unwrap().check_create_once().await.unwrap();
        assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "a local directory is not probed");
        ArtifactStore::open("memory://").unwrap().check_create_once().await.unwrap();
    }

    #[tokio::test]
    async fn job_records_finds_new_and_legacy_outcomes_and_cancel_markers_and_may_hold_sees_prefixes() {
        let dir = tempfile::tempdir().unwrap();
        for location in [dir.path().display().to_string(), "memory://".to_string()] {
            let store = ArtifactStore::open(&location).unwrap();
            let (new, old, none) = ("0193-new-a1", "0193-old-b2", "0193-none-c3");
            assert_eq!(keys::outcome(new), "outcomes/a1/0193-new-a1.json");
            assert!(!store.may_hold(&keys::job(new)).await.unwrap(), "{location}");
            store.put_if_absent(&keys::outcome(new), "{}").await.unwrap();
            store.put(&keys::legacy_outcome(old), "{}").await.unwrap();
            store.put(&keys::cancel_marker(none), "{}").await.unwrap();
            assert!(store.may_hold(&keys::job(old)).await.unwrap() && store.may_hold(&keys::job(none)).await.unwrap());
            assert!(!store.may_hold(&keys::job(new)).await.unwrap(), "the outcome is outside the job's prefix ({location})");
            let records = |outcome: Option<String>, cancel_marker| JobRecords { outcome, cancel_marker };
            assert_eq!(store.job_records(new).await.unwrap(), records(Some(keys::outcome(new)), false));
            assert_eq!(store.job_records(old).await.unwrap(), records(Some(keys::legacy_outcome(old)), false), "{location}");
            assert_eq!(store.job_records(none).await.unwrap(), records(None, true), "{location}");
        }
    }
}
