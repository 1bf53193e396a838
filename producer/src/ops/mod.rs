//! Job-management operations shared by the CLI (talking to the store and the
//! broker directly) and the HTTP API: submit, show, logs, cancel, retry,
//! dead-letter list/replay (`replay`), models.

mod replay;

use serde::{Deserialize, Serialize};
use trainyard_common::{
    amqp::{confirm_channel, connect, publish_confirmed},
    artifacts::{keys, ArtifactStore},
    codec,
    control::CancelRequest,
    models::{self, ProductionEntry, PromotionHistory},
    topology::Topology,
    CommonError, JobEvent, JobSpec, JobStatus, Trigger,
};

use crate::{
    audit::AuditRecord,
    store::{AuditFilter, JobFilter, JobRow, Store, StoreError},
    submit::Submitter,
};

/// Errors of job-management operations, each with its HTTP meaning.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// No such job, bot or letter.
    #[error("{0}")]
    NotFound(String),
    /// Not possible in the current state.
    #[error("{0}")]
    Conflict(String),
    /// Bad input.
    #[error("{0}")]
    BadRequest(String),
    /// Store trouble.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Broker or artifact trouble.
    #[error(transparent)]
    Common(#[from] CommonError),
    /// A request over many items that failed partway: the ones done before the failure
    /// stay done (a replay of `all` that lost its broker after some letters).
    #[error("{source} (done before it: {})", done.join(", "))]
    Partial {
        /// The items done before the failure.
        done: Vec<String>,
        /// The failure.
        source: Box<OpsError>,
    },
}

/// What [`Ops::submit`] did.
#[derive(Debug, Clone)]
pub struct Submission {
    /// The job.
    pub spec: JobSpec,
    /// Its status in the store when its idempotency key named a job the store already had:
    /// nothing was published. `None`: published now, `queued`.
    pub known: Option<JobStatus>,
}

/// A job as shown by `jobs show` and `GET /v1/jobs/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobDetail {
    /// The job row.
    #[serde(flatten)]
    pub job: JobRow,
    /// Every event, in order.
    pub events: Vec<JobEvent>,
    /// Test metrics of a training job (`jobs/<id>/metrics.json`).
    pub metrics: Option<serde_json::Value>,
    /// Confusion matrix of a training job (`jobs/<id>/confusion_matrix.json`).
    pub confusion_matrix: Option<serde_json::Value>,
    /// The recorded outcome (`outcomes/<last two characters of the id>/<id>.json`).
    pub outcome: Option<serde_json::Value>,
    /// Attempts whose log is saved.
    pub logs: Vec<u32>,
    /// The bot's production model now (to judge the promotion decision).
    pub production: Option<ProductionEntry>,
    /// What the artifact store failed to give (the fields above it could not fill are
    /// `null` because of it, not because the job has no such output).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifacts_error: Option<String>,
}

/// A bot's models: production and history.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BotModels {
    /// The bot.
    pub bot: String,
    /// The model serving it.
    pub production: Option<ProductionEntry>,
    /// Every promotion and rollback, oldest first.
    pub history: PromotionHistory,
}

pub use replay::ReplayRequest;

/// The operations, over a store, an artifact store and the broker.
#[derive(Debug, Clone)]
pub struct Ops {
    /// The job store.
    pub store: Store,
    /// The artifact store.
    pub artifacts: ArtifactStore,
    /// Publishes jobs and events.
    pub submitter: Submitter,
    /// Admission snapshots (in `trainyard serve`): bots' usage against their limit and share.
    pub admission: Option<crate::admission::board::AdmissionBoard>,
    url: String,
}

impl Ops {
    /// Operations on `store`, `artifacts` and the broker at `url`.
    pub fn new(store: Store, artifacts: ArtifactStore, url: &str, topology: Topology) -> Result<Self, OpsError> {
        Ok(Self { store, artifacts, submitter: Submitter::new(url, topology)?, admission: None, url: url.to_string() })
    }

    /// The topology in use.
    pub fn topology(&self) -> &Topology {
        self.submitter.topology()
    }

    /// Submits `spec` (validated). A job whose idempotency key names a job the store already
    /// has (the same work) is not published again: that job is answered, whatever its state.
    /// Its job message was confirmed before its first event, so the store knowing it means it
    /// was queued; a second copy would run the same job twice at once while the first is
    /// queued or running, and again as run 0 once it failed.
    pub async fn submit(&self, spec: JobSpec) -> Result<Submission, OpsError> {
        self.submit_traced(spec, None).await
    }

    /// [`Self::submit`] continuing a caller's W3C trace ([`Submitter::submit_traced`]).
    pub async fn submit_traced(&self, spec: JobSpec, traceparent: Option<&str>) -> Result<Submission, OpsError> {
        spec.validate().map_err(|e| OpsError::BadRequest(e.to_string()))?;
        if let Some(key) = &spec.idempotency_key {
            if let Some(known) = self.known_job(key, &spec).await? {
                return Ok(Submission { spec, known: Some(known.status) });
            }
        }
        self.submitter.submit_traced(&spec, traceparent).await.map_err(|e| match e {
            CommonError::Unroutable { .. } => OpsError::BadRequest(e.to_string()),
            other => other.into(),
        })?;
        let detail = serde_json::json!({"job_type": spec.job_type, "bot": spec.bot, "trigger": spec.trigger.kind});
        self.audit(&spec.trigger.source, "submit", &spec.job_id, Some(detail)).await?;
        Ok(Submission { spec, known: None })
    }

    /// The job an idempotency key names, when the store has it; refuses the key when that job
    /// is other work (a 409): the job stands for its first request, and the new values would
    /// be dropped without a word. The job store knows a job once its `queued` event is
    /// recorded (within a fraction of a second): a second submit within that lag is published.
    async fn known_job(&self, key: &str, spec: &JobSpec) -> Result<Option<JobRow>, OpsError> {
        let Some(job) = self.store.job(&spec.job_id).await? else { return Ok(None) };
        match &job.spec {
            Some(first) if !first.same_work(spec) => Err(OpsError::Conflict(format!(
                "idempotency key {key:?} was used for job {} with a different job type, bot or params ({} for bot {}): \
                 use a new key for new work",
                spec.job_id, first.job_type, first.bot
            ))),
            _ => Ok(Some(job)),
        }
    }

    /// Keeps an operator action in the audit trail: on the events stream (confirmed: the
    /// recorder records it from there, and `store rebuild` restores it), and in the store at
    /// once so that the trail shows it without waiting for the recorder. The action is done by
    /// then: either copy alone keeps the record, and its failure is only logged (an error here
    /// used to answer a failure for a job already queued, whose client then submitted it
    /// again). Only when neither takes it is an error answered.
    async fn audit(&self, by: &str, action: &str, target: &str, detail: Option<serde_json::Value>) -> Result<(), OpsError> {
        let record = AuditRecord::new(by, action, target, detail);
        let published = self.submitter.publish_audit(&record).await;
        let stored = self.store.record_audit(std::slice::from_ref(&record)).await;
        match (published, stored) {
            (Ok(()), Ok(())) => Ok(()),
            (Ok(()), Err(e)) => {
                tracing::warn!(error = %e, action, target, "the audit record is on the events stream; the store will have it from the recorder");
                Ok(())
            }
            (Err(e), Ok(())) => {
                tracing::error!(error = %e, action, target, "the audit record is in the store but not on the events stream: a rebuild will lack it");
                Ok(())
            }
            (Err(e), Err(stored)) => {
                tracing::error!(error = %stored, action, target, "the store refuses the audit record too");
                Err(e.into())
            }
        }
    }

    /// The audit trail, newest first.
    pub async fn audit_trail(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>, OpsError> {
        // 0 (the default when absent) means 100.
        if filter.limit != 0 {
            crate::store::check_limit(filter.limit).map_err(OpsError::BadRequest)?;
        }
        // A misspelt action would list nothing, which reads as "nobody did it".
        if let Some(a) = filter.action.as_deref().filter(|a| !crate::audit::ACTIONS.contains(a)) {
            return Err(OpsError::BadRequest(format!("unknown action {a:?}: one of {}", crate::audit::ACTIONS.join(", "))));
        }
        Ok(self.store.audit(filter).await?)
    }

    /// Jobs matching `filter`; listed by bot, its queued jobs carry their queue position and
    /// each job of a type with admission its bot's usage of that type.
    pub async fn list(&self, filter: &JobFilter) -> Result<Vec<JobRow>, OpsError> {
        filter.check().map_err(OpsError::BadRequest)?;
        let mut jobs = self.store.list_jobs(filter).await?;
        if let Some(bot) = &filter.bot {
            let positions = self.store.queue_positions(&jobs).await?;
            let usage = self.bot_usage(bot);
            for j in &mut jobs {
                j.queue_position = positions.get(&j.job_id).copied();
                j.bot_usage = usage.get(&j.job_type).cloned();
            }
        }
        Ok(jobs)
    }

    /// A bot's usage of every job type with admission, against its limit and share (empty
    /// outside `trainyard serve` or when no admitter published a snapshot lately).
    pub fn bot_usage(&self, bot: &str) -> std::collections::BTreeMap<String, crate::admission::state::BotUsage> {
        self.admission.as_ref().map(|b| b.bot(bot)).unwrap_or_default()
    }

    async fn job(&self, job_id: &str) -> Result<JobRow, OpsError> {
        self.store.job(job_id).await?.ok_or_else(|| OpsError::NotFound(format!("no job {job_id:?} in the job store")))
    }

    /// Everything about one job.
    pub async fn show(&self, job_id: &str) -> Result<JobDetail, OpsError> {
        let job = self.job(job_id).await?;
        let events = self.store.events(job_id).await?;
        // The job row and its events come from the job store; what the artifact store cannot
        // give is reported in `artifacts_error`, never passed off as a missing output.
        let mut errors: Vec<String> = Vec::new();
        let mut keep = |r: Result<Option<serde_json::Value>, CommonError>| {
            r.unwrap_or_else(|e| {
                errors.push(e.to_string());
                None
            })
        };
        let metrics = keep(self.artifacts.get_json(&models::metrics_key(job_id)).await);
        let confusion_matrix = keep(self.artifacts.get_json(&format!("{}/confusion_matrix.json", keys::job(job_id))).await);
        let outcome = match self.artifacts.job_records(job_id).await.map(|r| r.outcome) {
            Ok(Some(key)) => keep(self.artifacts.get_json(&key).await),
            Ok(None) => None,
            Err(e) => keep(Err(e)),
        };
        let production = match models::production(&self.artifacts, &job.bot).await {
            Ok(p) => p,
            Err(e) => {
                errors.push(e.to_string());
                None
            }
        };
        let logs = match self.log_attempts(job_id).await {
            Ok(l) => l,
            Err(e) => {
                errors.push(e.to_string());
                Vec::new()
            }
        };
        Ok(JobDetail {
            metrics,
            confusion_matrix,
            outcome,
            production,
            logs,
            events,
            job,
            artifacts_error: (!errors.is_empty()).then(|| errors.join("; ")),
        })
    }

    /// The attempts of a job that have a saved log.
    pub async fn log_attempts(&self, job_id: &str) -> Result<Vec<u32>, OpsError> {
        let mut attempts: Vec<u32> = self
            .artifacts
            .list(&format!("{}/logs", keys::job(job_id)))
            .await?
            .iter()
            .filter_map(|k| k.rsplit('/').next()?.strip_prefix("attempt-")?.strip_suffix(".log")?.parse().ok())
            .collect();
        attempts.sort_unstable();
        Ok(attempts)
    }

    /// The saved log of one attempt, or of all of them (with a header line each).
    pub async fn logs(&self, job_id: &str, attempt: Option<u32>) -> Result<String, OpsError> {
        let attempts = match attempt {
            Some(a) => vec![a],
            None => self.log_attempts(job_id).await?,
        };
        if attempts.is_empty() {
            return Err(OpsError::NotFound(format!(
                "no saved log for job {job_id}: an attempt that logged only the runtime's routine lines saves none \
                 (its events, in `jobs show {job_id}`, say the same)"
            )));
        }
        let mut out = String::new();
        for a in attempts {
            let Some(bytes) = self.artifacts.get(&keys::attempt_log(job_id, a)).await? else {
                return Err(OpsError::NotFound(format!("no saved log for attempt {a} of job {job_id}")));
            };
            if attempt.is_none() {
                out.push_str(&format!("==> attempt {a} <==\n"));
            }
            out.push_str(&String::from_utf8_lossy(&bytes));
        }
        Ok(out)
    }

    /// Asks the workers to cancel a job: a cancel marker in the artifact store
    /// (for a job still queued) and a control message (for a running one).
    pub async fn cancel(&self, job_id: &str, by: &str, reason: &str) -> Result<CancelRequest, OpsError> {
        // A job the recorder has not stored yet can be cancelled; an id no job can have cannot.
        if uuid::Uuid::parse_str(job_id).is_err() {
            return Err(OpsError::BadRequest(format!("{job_id:?} is not a job id (a UUID): nothing was cancelled")));
        }
        if let Some(job) = self.store.job(job_id).await? {
            if job.status.is_terminal() {
                return Err(OpsError::Conflict(format!("job {job_id} is already {}", job.status)));
            }
        }
        let req = CancelRequest { job_id: job_id.to_string(), by: by.to_string(), reason: reason.to_string() };
        self.artifacts.put_json(&keys::cancel_marker(job_id), &req).await?;
        let body = codec::to_json(&req).map_err(CommonError::from)?;
        let conn = connect(&self.url, "trainyard-cancel").await?;
        let ch = confirm_channel(&conn).await?;
        let props = lapin::BasicProperties::default().with_content_type(codec::JSON.into()).with_delivery_mode(2);
        let res = publish_confirmed(&ch, &self.topology().control_exchange(), "", &body, props, false).await;
        let _ = conn.close(200, "done".into()).await;
        res?;
        self.audit(by, "cancel", job_id, (!reason.is_empty()).then(|| serde_json::json!({"reason": reason}))).await?;
        Ok(req)
    }

    /// Submits a finished job again as a new job: the same type, bot, params, attempts,
    /// timeout, priority tier and coalescing key. While the job's last retry has not finished,
    /// a retry answers that one (`known`), publishing nothing: a request sent twice (a client
    /// that retries, a double click) made two jobs. The new job's id stands for the job and the
    /// number of retries before it, so two requests at once publish one job id (both copies
    /// within the recorder's lag are published, as for any idempotency key). A retry that never
    /// finishes (cancel it) keeps answering.
    pub async fn retry(&self, job_id: &str, by: &str, kind: trainyard_common::TriggerKind) -> Result<Submission, OpsError> {
        let job = self.job(job_id).await?;
        if !job.status.is_terminal() {
            return Err(OpsError::Conflict(format!("job {job_id} is {}; only a finished job can be retried", job.status)));
        }
        let Some(old) = job.spec else {
            return Err(OpsError::Conflict(format!("job {job_id} has no recorded spec (its queued event is missing)")));
        };
        let retry = |n: usize| {
            let mut spec =
                JobSpec::new(&old.job_type, &old.bot, old.params.clone(), Trigger { kind, source: format!("{by} (retry of {job_id})") });
            spec.max_attempts = old.max_attempts;
            spec.timeout_s = old.timeout_s;
            spec.priority = old.priority;
            spec.coalesce_key = old.coalesce_key.clone();
            spec.set_idempotency_key(&format!("retry {n} of job {job_id}")).map(|()| spec).map_err(OpsError::BadRequest)
        };
        let filter = AuditFilter { action: Some("retry".into()), target: Some(job_id.into()), limit: 10_000, ..Default::default() };
        let earlier = self.store.audit(&filter).await?;
        let last = earlier.first().and_then(|r| Some((r.at, r.detail.as_ref()?.get("new_job_id")?.as_str()?)));
        if let Some((at, last_id)) = last {
            // The job the record names, as recorded, else as the retry made it.
            let named = |spec: Option<JobSpec>| -> Result<JobSpec, OpsError> {
                let mut spec = spec.map_or_else(|| retry(0), Ok)?;
                spec.job_id = last_id.to_string();
                Ok(spec)
            };
            match self.store.job(last_id).await? {
                Some(row) if !row.status.is_terminal() => return Ok(Submission { spec: named(row.spec)?, known: Some(row.status) }),
                // Published and audited, not recorded yet (the recorder's lag).
                None if chrono::Utc::now() - at < chrono::TimeDelta::minutes(10) => {
                    return Ok(Submission { spec: named(None)?, known: Some(JobStatus::Queued) });
                }
                _ => {}
            }
        }
        // A number whose job has finished (its audit record was lost) is passed over.
        let mut n = earlier.len();
        let submitted = loop {
            let submitted = self.submit(retry(n)?).await?;
            match submitted.known {
                Some(status) if status.is_terminal() && n < earlier.len() + 100 => n += 1,
                _ => break submitted,
            }
        };
        // A job found known and running is another request's retry, which audits it.
        if submitted.known.is_none() {
            self.audit(by, "retry", job_id, Some(serde_json::json!({"new_job_id": submitted.spec.job_id}))).await?;
        }
        Ok(submitted)
    }

    /// A bot's production model and history.
    pub async fn models(&self, bot: &str) -> Result<BotModels, OpsError> {
        Ok(BotModels {
            bot: bot.to_string(),
            production: models::production(&self.artifacts, bot).await?,
            history: models::history(&self.artifacts, bot).await?,
        })
    }

    /// Makes the model job `job_id` trained the production model of its bot: only a job that
    /// succeeded (a running one's model may be half written; a failed one's is not the result
    /// it reported). Returns the entry and whether this call made it production (`false`: it
    /// already was; the audit record says so).
    pub async fn promote(&self, job_id: &str, by: &str) -> Result<(ProductionEntry, bool), OpsError> {
        let job = self.job(job_id).await?;
        if job.status != JobStatus::Succeeded {
            return Err(OpsError::Conflict(format!("job {job_id} is {}; only a job that succeeded can be promoted", job.status)));
        }
        let (entry, made) =
            models::promote_job(&self.artifacts, &job.bot, job_id, &format!("promoted by hand by {by}")).await.map_err(|e| match e {
                e @ CommonError::ModelMissing { .. } => OpsError::Conflict(e.to_string()),
                other => other.into(),
            })?;
        let detail = match made {
            true => serde_json::json!({"job_id": job_id}),
            false => serde_json::json!({"job_id": job_id, "already_production": true}),
        };
        self.audit(by, "promote", &job.bot, Some(detail)).await?;
        Ok((entry, made))
    }

    /// Restores the bot's previous production model; with `from`, only while that model (a job
    /// id) is the production one (409 otherwise).
    pub async fn rollback(&self, bot: &str, by: &str, from: Option<&str>) -> Result<Option<ProductionEntry>, OpsError> {
        let entry = models::rollback(&self.artifacts, bot, &format!("rolled back by {by}"), from).await.map_err(|e| match e {
            e @ (CommonError::NoProductionModel { .. } | CommonError::ProductionMoved { .. }) => OpsError::Conflict(e.to_string()),
            other => other.into(),
        })?;
        let detail = entry.as_ref().map(|e| serde_json::json!({"job_id": e.job_id}));
        self.audit(by, "rollback", bot, detail).await?;
        Ok(entry)
    }
}
