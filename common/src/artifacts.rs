//! The artifact store: models, checkpoints, metrics, logs, job outcomes.
//!
//! Backed by `object_store`: a local directory by default
//! (`TRAINYARD_ARTIFACTS=./.trainyard/artifacts`), `memory://` for tests.
//! Every `put` is atomic (the local store writes a temporary file and renames).
//!
//! Layout (see [`keys`]): `jobs/<job_id>/…` for a job's outputs and
//! `bots/<bot>/…` for a bot's production pointer and promotion history.

use std::{path::PathBuf, sync::Arc};

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::{local::LocalFileSystem, memory::InMemory, path::Path, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{de::DeserializeOwned, Serialize};

use crate::error::CommonError;

/// Where a job's and a bot's artifacts live.
pub mod keys {
    /// Prefix of everything a job wrote.
    pub fn job(job_id: &str) -> String {
        format!("jobs/{job_id}")
    }
    /// The recorded outcome of a job: its presence means "done, do not run again".
    pub fn outcome(job_id: &str) -> String {
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
    /// The promotion history of a bot (one JSON document, appended to).
    pub fn promotions(bot: &str) -> String {
        format!("bots/{bot}/promotions.json")
    }
}

/// A handle on the artifact store. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ArtifactStore {
    inner: Arc<dyn ObjectStore>,
    local_root: Option<PathBuf>,
}

impl ArtifactStore {
    /// Opens a store from a location: a directory path, `file://DIR` or `memory://`.
    pub fn open(location: &str) -> Result<Self, CommonError> {
        if location == "memory://" {
            return Ok(Self { inner: Arc::new(InMemory::new()), local_root: None });
        }
        let dir = location.strip_prefix("file://").unwrap_or(location);
        if dir.contains("://") {
            return Err(CommonError::Config {
                name: "TRAINYARD_ARTIFACTS".into(),
                reason: format!("{location:?}: only a directory, file://DIR or memory:// is supported by this build"),
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
        Ok(Self { inner: Arc::new(fs), local_root: Some(root) })
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
    /// something already was. This is how a job's outcome is recorded once.
    pub async fn put_if_absent(&self, key: &str, bytes: impl Into<Bytes>) -> Result<bool, CommonError> {
        let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
        match self.inner.put_opts(&Path::from(key), PutPayload::from(bytes.into()), opts).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(source) => Err(CommonError::Artifacts { what: "create", path: key.into(), source }),
        }
    }

    /// Reads `key`; `None` when absent.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, CommonError> {
        match self.inner.get(&Path::from(key)).await {
            Ok(r) => r.bytes().await.map(Some).map_err(|source| CommonError::Artifacts { what: "read", path: key.into(), source }),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(source) => Err(CommonError::Artifacts { what: "read", path: key.into(), source }),
        }
    }

    /// Is there an object at `key`?
    pub async fn exists(&self, key: &str) -> Result<bool, CommonError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_round_trip_and_listing() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(dir.path().to_str().unwrap()).unwrap();
        assert_eq!(store.get("jobs/x/outcome.json").await.unwrap(), None);
        store.put_json(&keys::outcome("x"), &serde_json::json!({"ok": true})).await.unwrap();
        store.put("jobs/x/logs/attempt-1.log", "hello").await.unwrap();
        assert!(store.exists(&keys::outcome("x")).await.unwrap());
        let v: serde_json::Value = store.get_json(&keys::outcome("x")).await.unwrap().unwrap();
        assert_eq!(v["ok"], true);
        assert_eq!(store.list("jobs/x").await.unwrap(), vec!["jobs/x/logs/attempt-1.log", "jobs/x/outcome.json"]);
        assert!(dir.path().join("jobs/x/outcome.json").is_file());
        assert!(ArtifactStore::open("s3://bucket").is_err());
        assert!(store.put_if_absent("jobs/y/outcome.json", "1").await.unwrap());
        assert!(!store.put_if_absent("jobs/y/outcome.json", "2").await.unwrap());
        assert_eq!(store.get("jobs/y/outcome.json").await.unwrap().unwrap(), "1");
    }
}
