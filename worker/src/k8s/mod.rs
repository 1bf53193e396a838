//! Kubernetes integration of the worker: busy-aware scale-down and node attributes.
//!
//! Everything here is optional and best effort. It switches itself on only when
//! the downward API gives the pod its identity (`POD_NAME` and `POD_NAMESPACE`,
//! see `k8s/base/workers/`); on a laptop every entry point is a no-op. No error
//! of the Kubernetes API ever reaches job processing: it is logged with
//! `tracing::warn!` and retried later.
//!
//! - **Busy-aware scale-down**: [`PodCostReporter`] watches the number of jobs
//!   running on this worker (a `tokio::sync::watch` channel the runtime writes)
//!   and merge-patches its own pod's `controller.kubernetes.io/pod-deletion-cost`
//!   annotation: [`PodCostConfig::busy_cost`] while at least one job runs,
//!   [`PodCostConfig::idle_cost`] when idle. When an HPA or KEDA lowers the
//!   replica count, the ReplicaSet controller deletes the pods with the lowest
//!   cost first, so idle workers go and busy ones keep training. It patches only
//!   when the busy/idle level changes, waits [`PodCostConfig::idle_delay`] before
//!   reporting idle (a worker that takes its next job at once is not patched
//!   twice), and retries a failed patch on the next change or after
//!   [`PodCostConfig::retry_after`], whichever comes first.
//! - **Worker attributes**: [`worker_attributes`] returns `node` (from
//!   `NODE_NAME`) and, from the Node's labels, `gpu` (model), `gpu_count`,
//!   `instance_type` and `zone` where present. These go into every event's
//!   `worker.attributes`.
//!
//! RBAC needed (see `k8s/base/rbac.yaml`): `get`, `patch` on `pods` in the
//! worker's namespace; `get` on `nodes` (a ClusterRole).
//!
//! # Use from the runtime
//! ```no_run
//! # async fn demo() {
//! let (running_tx, running_rx) = tokio::sync::watch::channel(0usize);
//! // Once at start-up; empty off Kubernetes (or just `node` when only NODE_NAME is set).
//! let attributes = trainyard_worker::k8s::attributes_from_env().await;
//! // None off Kubernetes; otherwise a task that ends when `running_tx` is dropped.
//! let reporter = trainyard_worker::k8s::spawn_from_env(running_rx).await;
//! // Whenever a job starts or ends (never blocks, never fails in a way that matters):
//! running_tx.send_replace(1);
//! # drop((attributes, reporter));
//! # }
//! ```

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{
    api::{Patch, PatchParams},
    Api, Client, ResourceExt,
};
use tokio::{sync::watch, task::JoinHandle, time::Instant};

/// The annotation the ReplicaSet controller reads to pick pods to delete on scale-down.
pub const POD_DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";
/// Field manager named in our patches (visible in the pod's `managedFields`).
pub const FIELD_MANAGER: &str = "trainyard-worker";
/// Env: deletion cost while a job runs (an int32; default 10000).
pub const ENV_BUSY_COST: &str = "TRAINYARD_POD_COST_BUSY";
/// Env: deletion cost while idle (an int32; default 0).
pub const ENV_IDLE_COST: &str = "TRAINYARD_POD_COST_IDLE";
/// Node labels that name the GPU model, in order of preference: NVIDIA GPU
/// feature discovery (GPU operator), then GKE, then EKS.
pub const GPU_MODEL_LABELS: &[&str] = &["nvidia.com/gpu.product", "cloud.google.com/gke-accelerator", "k8s.amazonaws.com/accelerator"];
/// How long one API call may take before it counts as failed.
const API_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings of the [`PodCostReporter`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodCostConfig {
    /// Deletion cost while at least one job runs.
    pub busy_cost: i32,
    /// Deletion cost while no job runs.
    pub idle_cost: i32,
    /// How long the worker must stay idle before the idle cost is reported.
    pub idle_delay: Duration,
    /// When a failed patch is retried if nothing changes before.
    pub retry_after: Duration,
}

impl Default for PodCostConfig {
    fn default() -> Self {
        Self { busy_cost: 10_000, idle_cost: 0, idle_delay: Duration::from_secs(5), retry_after: Duration::from_secs(30) }
    }
}

impl PodCostConfig {
    /// Defaults, with [`ENV_BUSY_COST`] and [`ENV_IDLE_COST`] applied through `lookup`
    /// (an invalid value is logged and ignored).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Self {
        let mut config = Self::default();
        for (name, slot) in [(ENV_BUSY_COST, &mut config.busy_cost), (ENV_IDLE_COST, &mut config.idle_cost)] {
            if let Some(raw) = lookup(name).filter(|v| !v.trim().is_empty()) {
                match raw.trim().parse::<i32>() {
                    Ok(v) => *slot = v,
                    Err(e) => tracing::warn!(%name, value = %raw, error = %e, "ignoring invalid pod deletion cost"),
                }
            }
        }
        config
    }
}

/// This pod's identity, from the downward API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodIdentity {
    /// `POD_NAME`.
    pub name: String,
    /// `POD_NAMESPACE`.
    pub namespace: String,
    /// `NODE_NAME`, when set.
    pub node: Option<String>,
}

impl PodIdentity {
    /// Reads `POD_NAME`, `POD_NAMESPACE` and `NODE_NAME` through `lookup`;
    /// `None` unless both pod variables are set and non-empty.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Option<Self> {
        let get = |k: &str| lookup(k).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        Some(Self { name: get("POD_NAME")?, namespace: get("POD_NAMESPACE")?, node: get("NODE_NAME") })
    }

    /// [`PodIdentity::from_lookup`] on the process environment.
    pub fn from_env() -> Option<Self> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }
}

/// Keeps this pod's deletion cost in line with its number of running jobs.
#[derive(Clone)]
pub struct PodCostReporter {
    pods: Api<Pod>,
    pod: String,
    config: PodCostConfig,
}

impl std::fmt::Debug for PodCostReporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodCostReporter").field("pod", &self.pod).field("config", &self.config).finish_non_exhaustive()
    }
}

impl PodCostReporter {
    /// A reporter for pod `pod` in `namespace`.
    pub fn new(client: Client, namespace: &str, pod: &str, config: PodCostConfig) -> Self {
        Self { pods: Api::namespaced(client, namespace), pod: pod.to_string(), config }
    }

    /// A reporter for this pod, from the environment; `None` off Kubernetes or
    /// when no in-cluster client can be made (logged).
    pub async fn from_env() -> Option<Self> {
        let id = PodIdentity::from_env()?;
        let client = client_or_warn().await?;
        Some(Self::new(client, &id.namespace, &id.name, PodCostConfig::from_lookup(|k| std::env::var(k).ok())))
    }

    /// Patches the annotation whenever the busy/idle level of `running` changes;
    /// returns when the sender is dropped. Never fails: API errors are logged
    /// and retried on the next change or after `retry_after`.
    pub async fn run(self, mut running: watch::Receiver<usize>) {
        let PodCostConfig { busy_cost, idle_cost, idle_delay, retry_after } = self.config;
        // The cost the pod has, as far as we know (`None`: unknown, e.g. after a failure).
        let mut applied: Option<i32> = None;
        let mut idle_since: Option<Instant> = None;
        // A failed patch: its cost and when to try it again if nothing changes before.
        let mut retry: Option<(i32, Instant)> = None;
        loop {
            let now = Instant::now();
            let desired = if *running.borrow_and_update() > 0 { busy_cost } else { idle_cost };
            if desired == busy_cost {
                idle_since = None;
            }
            let due = if applied == Some(desired) {
                None
            } else if let Some((_, at)) = retry.filter(|(cost, _)| *cost == desired) {
                Some(at)
            } else if applied == Some(busy_cost) {
                // Going idle: only once idle for `idle_delay`, so back-to-back jobs cost no patches.
                Some(*idle_since.get_or_insert(now) + idle_delay)
            } else {
                Some(now)
            };
            if due.is_some_and(|at| at <= now) {
                match self.patch(desired).await {
                    Ok(()) => {
                        tracing::debug!(pod = %self.pod, cost = desired, "pod deletion cost updated");
                        applied = Some(desired);
                        retry = None;
                    }
                    Err(error) => {
                        tracing::warn!(pod = %self.pod, cost = desired, %error, "failed to update pod deletion cost; will retry");
                        applied = None;
                        retry = Some((desired, Instant::now() + retry_after));
                    }
                }
                continue;
            }
            tokio::select! {
                changed = running.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    // A change retries a failed patch at once.
                    retry = None;
                }
                _ = sleep_until(due) => {}
            }
        }
    }

    /// One merge patch of the annotation.
    async fn patch(&self, cost: i32) -> Result<(), PatchError> {
        let body = serde_json::json!({ "metadata": { "annotations": { POD_DELETION_COST: cost.to_string() } } });
        let params = PatchParams { field_manager: Some(FIELD_MANAGER.to_string()), ..PatchParams::default() };
        match tokio::time::timeout(API_TIMEOUT, self.pods.patch(&self.pod, &params, &Patch::Merge(&body))).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(PatchError::Api(e)),
            Err(_) => Err(PatchError::Timeout(API_TIMEOUT)),
        }
    }
}

/// Why one patch failed (logged, never returned to callers).
#[derive(Debug, thiserror::Error)]
enum PatchError {
    #[error("failed to patch pod: {0}")]
    Api(#[source] kube::Error),
    #[error("failed to patch pod: no answer within {0:?}")]
    Timeout(Duration),
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn client_or_warn() -> Option<Client> {
    // kube's TLS takes rustls' process default provider; with two providers compiled in and
    // none installed rustls would panic. Installing fails harmlessly when one is already set.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    match Client::try_default().await {
        Ok(client) => Some(client),
        Err(error) => {
            tracing::warn!(%error, "failed to create a Kubernetes client; pod deletion cost and node attributes are off");
            None
        }
    }
}

/// Attributes from a Node's labels: `gpu`, `gpu_count`, `instance_type`, `zone` where present.
pub fn node_label_attributes(labels: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut attrs = BTreeMap::new();
    let nonempty = |k: &str| labels.get(k).filter(|v| !v.is_empty()).cloned();
    if let Some(gpu) = GPU_MODEL_LABELS.iter().find_map(|k| nonempty(k)) {
        attrs.insert("gpu".to_string(), gpu);
    }
    for (attr, label) in [
        ("gpu_count", "nvidia.com/gpu.count"),
        ("instance_type", "node.kubernetes.io/instance-type"),
        ("zone", "topology.kubernetes.io/zone"),
    ] {
        if let Some(v) = nonempty(label) {
            attrs.insert(attr.to_string(), v);
        }
    }
    attrs
}

/// How many times [`worker_attributes`] asks for the Node when the API fails in a way another
/// try may not (a server error, no answer), and the pause before each try again (doubling).
const NODE_TRIES: u32 = 3;
const NODE_RETRY_PAUSE: Duration = Duration::from_secs(1);

/// `node` = `node_name`, plus [`node_label_attributes`] of that Node; on an API error (logged)
/// just `node`. The attributes are read once, at start, and go into every event of the
/// worker's life: a server error, 408, 429 or no answer is tried again ([`NODE_TRIES`] in all;
/// a worker started while the API server restarted reported no `gpu` for its whole life);
/// another answer of the 4xx class (403: the ClusterRole is missing; 404: an unknown node) is not.
pub async fn worker_attributes(client: Client, node_name: &str) -> BTreeMap<String, String> {
    let mut attrs = BTreeMap::from([("node".to_string(), node_name.to_string())]);
    let nodes: Api<Node> = Api::all(client);
    let mut pause = NODE_RETRY_PAUSE;
    for attempt in 1..=NODE_TRIES {
        match tokio::time::timeout(API_TIMEOUT, nodes.get(node_name)).await {
            Ok(Ok(node)) => {
                attrs.extend(node_label_attributes(node.labels()));
                return attrs;
            }
            Ok(Err(kube::Error::Api(status))) if status.code < 500 && !matches!(status.code, 408 | 429) => {
                tracing::warn!(node = %node_name, error = %status, "failed to read node labels; reporting the node name only");
                return attrs;
            }
            Ok(Err(error)) => tracing::warn!(node = %node_name, %error, attempt, "failed to read node labels"),
            Err(_) => tracing::warn!(node = %node_name, attempt, "no answer reading node labels"),
        }
        if attempt < NODE_TRIES {
            tokio::time::sleep(pause).await;
            pause *= 2;
        }
    }
    tracing::warn!(node = %node_name, tries = NODE_TRIES, "reporting the node name only");
    attrs
}

/// Worker attributes from the environment: empty without `NODE_NAME`; just
/// `node` off Kubernetes; with the Node's labels in a pod.
pub async fn attributes_from_env() -> BTreeMap<String, String> {
    let Some(node) = std::env::var("NODE_NAME").ok().filter(|v| !v.trim().is_empty()) else {
        return BTreeMap::new();
    };
    if PodIdentity::from_env().is_none() {
        return BTreeMap::from([("node".to_string(), node)]);
    }
    match client_or_warn().await {
        Some(client) => worker_attributes(client, &node).await,
        None => BTreeMap::from([("node".to_string(), node)]),
    }
}

/// Spawns a [`PodCostReporter`] for this pod fed by `running` (jobs running
/// now); `None` off Kubernetes. The task ends when the sender is dropped.
pub async fn spawn_from_env(running: watch::Receiver<usize>) -> Option<JoinHandle<()>> {
    let reporter = PodCostReporter::from_env().await?;
    tracing::info!(pod = %reporter.pod, busy = reporter.config.busy_cost, idle = reporter.config.idle_cost, "reporting pod deletion cost");
    Some(tokio::spawn(reporter.run(running)))
}

#[cfg(test)]
mod tests;
