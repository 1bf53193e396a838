//! Where a training or evaluation run reads and writes: the [`RunEnv`].
//!
//! The same pipeline serves the `intent-*` handlers (outputs under
//! `jobs/<job_id>/` of the artifact store) and the local CLI (outputs at the
//! top of a scratch directory). The pipeline runs on its own thread and reaches
//! the async artifact store through a runtime handle.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Instant,
};

use bytes::Bytes;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use trainyard_common::artifacts::ArtifactStore;

use super::device::DeviceSpec;
use crate::handler::{JobContext, JobError, Progress};

/// Everything a run needs from the outside.
#[derive(Debug, Clone)]
pub struct RunEnv {
    /// Where this run's outputs go.
    pub store: ArtifactStore,
    /// Key prefix of the outputs (`jobs/<id>`, or empty).
    pub prefix: String,
    /// Where bots' production pointers and models live (`None`: nowhere, e.g. a CLI run without a store).
    pub models: Option<ArtifactStore>,
    /// May the run change a bot's production model? (The CLI only reports.)
    pub apply_promotion: bool,
    /// Dataset root.
    pub data_dir: PathBuf,
    /// The job id.
    pub job_id: String,
    /// The bot.
    pub bot: String,
    /// Stop request.
    pub cancel: CancellationToken,
    /// Live progress.
    pub progress: Progress,
    /// The async runtime the store runs on.
    pub rt: tokio::runtime::Handle,
    /// Continue from a checkpoint under `prefix` when there is one.
    pub resume: bool,
    /// Stop (as if cancelled) once this epoch's checkpoint is saved: simulates a
    /// crash at a known point, for tests and drills. `None` normally.
    pub stop_after_epoch: Option<usize>,
    /// The worker's default device, for jobs whose `device` is `auto`.
    pub default_device: DeviceSpec,
    /// The worker's id (named in errors such as a CUDA job on a CPU-only worker).
    pub worker: String,
    log: Arc<Mutex<Vec<String>>>,
    started: Instant,
}

impl RunEnv {
    /// A run environment; `prefix` is where outputs go.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: ArtifactStore,
        prefix: impl Into<String>,
        models: Option<ArtifactStore>,
        data_dir: PathBuf,
        job_id: impl Into<String>,
        bot: impl Into<String>,
        cancel: CancellationToken,
        progress: Progress,
        rt: tokio::runtime::Handle,
    ) -> Self {
        Self {
            store,
            prefix: prefix.into(),
            models,
            apply_promotion: true,
            data_dir,
            job_id: job_id.into(),
            bot: bot.into(),
            cancel,
            progress,
            rt,
            resume: true,
            stop_after_epoch: None,
            default_device: DeviceSpec::Auto,
            worker: "local".into(),
            log: Arc::default(),
            started: Instant::now(),
        }
    }

    /// The environment of a job run by the worker runtime (must be called on the runtime).
    pub fn from_ctx(ctx: &JobContext) -> Self {
        let prefix = trainyard_common::artifacts::keys::job(&ctx.spec.job_id);
        let mut env = Self::new(
            ctx.artifacts.clone(),
            prefix,
            Some(ctx.artifacts.clone()),
            ctx.data_dir.clone(),
            ctx.spec.job_id.clone(),
            ctx.spec.bot.clone(),
            ctx.cancel.clone(),
            ctx.progress.clone(),
            tokio::runtime::Handle::current(),
        );
        env.worker = ctx.worker.id.clone();
        env
    }

    /// The full key of an output.
    pub fn key(&self, rel: &str) -> String {
        if self.prefix.is_empty() {
            rel.to_string()
        } else {
            format!("{}/{rel}", self.prefix)
        }
    }

    /// Seconds since the run started.
    pub fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Adds a line to the run's log (saved as `training.log`) and to tracing.
    pub fn log(&self, line: impl Into<String>) {
        let line = line.into();
        tracing::info!(job_id = %self.job_id, "{line}");
        let stamped = format!("[{:8.3}s] {line}", self.elapsed());
        self.log.lock().expect("log lock").push(stamped);
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        let mut s = self.log.lock().expect("log lock").join("\n");
        s.push('\n');
        s
    }

    /// Writes bytes at an output key (atomic).
    pub fn put(&self, rel: &str, bytes: impl Into<Bytes>) -> Result<String, JobError> {
        let key = self.key(rel);
        self.rt.block_on(self.store.put(&key, bytes)).map_err(|e| JobError::transient(e.to_string()))?;
        Ok(key)
    }

    /// Writes pretty JSON at an output key (atomic).
    pub fn put_json<T: Serialize>(&self, rel: &str, value: &T) -> Result<String, JobError> {
        let bytes = serde_json::to_vec_pretty(value).map_err(|e| JobError::permanent(format!("failed to encode {rel}: {e}")))?;
        self.put(rel, bytes)
    }

    /// Reads an output key of this run.
    pub fn get(&self, rel: &str) -> Result<Option<Bytes>, JobError> {
        self.rt.block_on(self.store.get(&self.key(rel))).map_err(|e| JobError::transient(e.to_string()))
    }
}
