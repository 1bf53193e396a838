//! Latest wins: of the jobs of one type that share a coalescing key, only the newest runs.
//!
//! The control plane reads the `queued` event of every job with a `coalesce_key` (its own
//! queue on the events exchange, bound with [`COALESCE_ROUTING_KEY`], which only those
//! events carry, in a `BCC` header: other jobs cost no write here; one active consumer
//! across replicas). For each it keeps a create-once record `coalesce/<key id>/<submitted_at>-<job_id>`
//! in the artifact store, and every record but the newest (by `submitted_at`, then
//! `job_id`: the same answer whatever order two racing submitters' events arrive
//! in) gets a cancel marker `{"by": "coalesce", "reason": "superseded by <newest>"}`.
//! A worker checks that marker before it starts a job, as it does for any cancel,
//! and ends the job `superseded` with `result.superseded_by` (a worker one release
//! older ends it `cancelled`: it never runs either way). A job already running is
//! also sent a cancel request when its type's policy says `supersede_running`; it
//! then ends `cancelled`. The older record is deleted once its marker is written,
//! so a key keeps about one record per job type.
//!
//! The event is acked only after that is durable; a failure leaves it for redelivery
//! (writing a marker twice is harmless: markers are create-once).

use std::collections::BTreeMap;

use futures::StreamExt;
use lapin::{
    options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions},
    types::FieldTable,
    Channel,
};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use trainyard_common::{
    amqp::{confirm_channel, connect, publish_confirmed},
    artifacts::{keys, ArtifactStore},
    codec,
    control::CancelRequest,
    topology::{Topology, COALESCE_ROUTING_KEY},
    CommonError, JobEvent, JobSpec, JobStatus,
};

use crate::{config::JobTypePolicy, store::Store};

/// How the release before bound the coalescing queue (every job's `queued` event); unbound at start.
const LEGACY_BINDING: &str = "*.queued";

/// The folder of a key's records: a UUID v5 of the key (any key is a safe path).
pub fn key_dir(key: &str) -> String {
    format!("coalesce/{}/", uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, key.as_bytes()))
}

/// A job's record under its key: the name sorts as (`submitted_at`, `job_id`).
fn record_key(spec: &JobSpec, key: &str) -> String {
    format!("{}{:020}-{}.json", key_dir(key), spec.submitted_at.timestamp_micros().max(0), spec.job_id)
}

/// Where the newest job of a key stands ([`Coalescer::newest_state`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Newest {
    /// Queued or running (as far as the store knows).
    Pending,
    /// It ran and succeeded.
    Succeeded,
    /// It ended without a result, or is marked to.
    WillNotRun,
}

/// What a record holds.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    job_id: String,
    job_type: String,
}

/// Applies latest-wins to the `queued` events of jobs with a coalescing key.
#[derive(Debug, Clone)]
pub struct Coalescer {
    store: Store,
    artifacts: ArtifactStore,
    topology: Topology,
    url: String,
    policies: BTreeMap<String, JobTypePolicy>,
}

impl Coalescer {
    /// A coalescer writing markers to `artifacts`, reading job status from `store`.
    pub fn new(store: Store, artifacts: ArtifactStore, topology: Topology, url: &str, policies: BTreeMap<String, JobTypePolicy>) -> Self {
        Self { store, artifacts, topology, url: url.to_string(), policies }
    }

    /// The queue it consumes (bound to `<prefix>.events` with [`COALESCE_ROUTING_KEY`], which
    /// only the `queued` events of jobs with a coalescing key carry).
    pub fn queue_name(topology: &Topology) -> String {
        format!("{}.coalesce.control-plane", topology.prefix())
    }

    /// Runs until `shutdown`, reconnecting with backoff on broker trouble.
    pub async fn run(&self, shutdown: CancellationToken) {
        crate::recorder::run_reconnecting("coalescing", &shutdown, None, || self.session(&shutdown)).await
    }

    async fn session(&self, shutdown: &CancellationToken) -> Result<(), CommonError> {
        let conn = connect(&self.url, "trainyard-coalesce").await?;
        let ch = confirm_channel(&conn).await?;
        self.topology.declare_shared(&ch).await?;
        let queue = Self::queue_name(&self.topology);
        crate::recorder::declare_single_consumer_queue(&ch, &queue).await?;
        let exchange = self.topology.events_exchange();
        ch.queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            COALESCE_ROUTING_KEY.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(CommonError::amqp(format!("bind {queue} to {exchange}")))?;
        // The release before bound every job's `queued` event here: a fifth queue write per job.
        ch.queue_unbind(queue.as_str().into(), exchange.as_str().into(), LEGACY_BINDING.into(), FieldTable::default())
            .await
            .map_err(CommonError::amqp(format!("unbind {queue} from {exchange} ({LEGACY_BINDING})")))?;
        ch.basic_qos(1, BasicQosOptions::default()).await.map_err(CommonError::amqp("set prefetch"))?;
        let mut consumer = ch
            .basic_consume(queue.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await
            .map_err(CommonError::amqp(format!("consume {queue}")))?;
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => {
                    let _ = conn.close(200, "shutdown".into()).await;
                    return Ok(());
                }
                d = consumer.next() => d,
            };
            let d = match next {
                Some(Ok(d)) => d,
                Some(Err(e)) => return Err(CommonError::amqp(format!("consume {queue}"))(e)),
                None => return Err(CommonError::ConsumerEnded { queue }),
            };
            let ct = d.properties.content_type().as_ref().map(|s| s.as_str().to_string());
            // An event it cannot read is the recorder's business (it parks it); nothing to coalesce here.
            if let Ok(JobEvent { status: JobStatus::Queued, spec: Some(spec), run, .. }) =
                crate::recorder::decode_event(ct.as_deref(), &d.data)
            {
                if spec.coalesce_key.is_some() {
                    self.coalesce_run(&ch, &spec, run.unwrap_or(0)).await?;
                }
            }
            d.acker.ack(BasicAckOptions::default()).await.map_err(CommonError::amqp(format!("ack on {queue}")))?;
        }
    }

    /// Records `spec` under its key and supersedes every older record's job, except the newest
    /// job's own older records (one job queued twice: a `submit --idempotency-key` run again, a
    /// fire published twice; superseded by itself it would never run), and nothing at all when
    /// the newest job ended without a result or will not run ([`Self::newest_state`]). A record that
    /// cannot be read names no job: it is left where it is, logged, and passed over (never a jam).
    pub async fn coalesce(&self, ch: &Channel, spec: &JobSpec) -> Result<(), CommonError> {
        self.coalesce_run(ch, spec, 0).await
    }

    /// [`Self::coalesce`] for run `run` of the job (a dead-letter replay is run 1 and on).
    pub async fn coalesce_run(&self, ch: &Channel, spec: &JobSpec, run: u32) -> Result<(), CommonError> {
        let Some(key) = spec.coalesce_key.as_deref() else { return Ok(()) };
        let record = Record { job_id: spec.job_id.clone(), job_type: spec.job_type.clone() };
        self.artifacts.put_if_absent(&record_key(spec, key), codec::to_json(&record)?).await?;
        let mut names = self.artifacts.list(&key_dir(key)).await?;
        names.sort();
        let mut records = Vec::with_capacity(names.len());
        for name in names {
            match self.artifacts.get_json::<Record>(&name).await {
                // A key is the job type's own: a job of another type with the same key supersedes
                // nothing here, nor is it superseded (a newer evaluation ended an older training).
                Ok(Some(r)) if r.job_type != spec.job_type => {}
                Ok(Some(r)) => records.push((name, r)),
                Ok(None) => {}
                Err(CommonError::Codec(e)) => tracing::error!(record = %name, error = %e, key, "unreadable coalescing record: passed over"),
                Err(e) => return Err(e),
            }
        }
        let Some((_, newest)) = records.pop() else { return Ok(()) };
        let state = self.newest_state(&newest.job_id).await?;
        if state == Newest::WillNotRun {
            tracing::info!(job_id = %newest.job_id, key, "the newest job of the key will not run; superseding nothing");
            return Ok(());
        }
        for (older_key, older) in records {
            // An operator's replay of an older job after the newest succeeded was asked for by name.
            let replayed = state == Newest::Succeeded && run > 0 && older.job_id == spec.job_id;
            if older.job_id != newest.job_id && !replayed {
                self.supersede(ch, &older, &newest.job_id).await?;
            }
            self.artifacts.delete(&older_key).await?;
        }
        Ok(())
    }

    /// Where the newest job of a key stands. One that succeeded still supersedes: an older job
    /// whose `queued` event comes after that (its submitter was slow to publish it) would
    /// otherwise run after the newest, and its result (a model of older data) replace the
    /// newest's. One that ended without a result (failed, dead: perhaps never started;
    /// cancelled, superseded, or marked so) supersedes nothing, so that some job of the key runs.
    async fn newest_state(&self, job_id: &str) -> Result<Newest, CommonError> {
        let status = self.store.job(job_id).await.ok().flatten().map(|j| j.status);
        Ok(match status {
            Some(JobStatus::Succeeded) => Newest::Succeeded,
            Some(s) if s.is_terminal() => Newest::WillNotRun,
            _ if self.artifacts.exists(&keys::cancel_marker(job_id)).await? => Newest::WillNotRun,
            _ => Newest::Pending,
        })
    }

    async fn supersede(&self, ch: &Channel, older: &Record, newest: &str) -> Result<(), CommonError> {
        let status = self.store.job(&older.job_id).await.ok().flatten().map(|j| j.status);
        if status.is_some_and(JobStatus::is_terminal) {
            return Ok(());
        }
        let req = CancelRequest::superseded(&older.job_id, newest);
        // Create-once: a person's cancel marker, or an earlier supersede, stays as it was.
        self.artifacts.put_if_absent(&keys::cancel_marker(&older.job_id), codec::to_json(&req)?).await?;
        let running = matches!(status, Some(JobStatus::Started | JobStatus::Progress));
        let policy = self.policies.get(&older.job_type).cloned().unwrap_or_default();
        tracing::info!(job_id = %older.job_id, superseded_by = %newest, running, "job superseded");
        // Whatever the store says: it lags the workers (by hours after an outage), and a job it
        // still shows `queued` may be running; a worker not running it ignores the request.
        if policy.supersede_running {
            let props = lapin::BasicProperties::default().with_content_type(codec::JSON.into()).with_delivery_mode(2);
            publish_confirmed(ch, &self.topology.control_exchange(), "", &codec::to_json(&req)?, props, false).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_sort_by_submit_time_then_id() {
        let mut a = JobSpec::new("noop", "b", serde_json::json!({}), trainyard_common::Trigger::manual("t"));
        let mut b = a.clone();
        b.job_id = trainyard_common::job::new_job_id();
        a.submitted_at = b.submitted_at + chrono::Duration::milliseconds(1);
        assert!(record_key(&b, "k") < record_key(&a, "k"), "the later submit sorts last");
        assert_eq!(key_dir("k"), key_dir("k"));
        assert_ne!(key_dir("k"), key_dir("k2"));
    }
}
