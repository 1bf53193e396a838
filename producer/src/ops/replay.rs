//! Dead letters: listed, and replayed as a new run of their job.

use chrono::Utc;
use lapin::{
    message::Delivery,
    options::{BasicAckOptions, BasicGetOptions},
    types::FieldTable,
    Channel,
};
use serde::{Deserialize, Serialize};
use trainyard_common::{
    amqp::{confirm_channel, connect, lasting_properties, publish_confirmed},
    codec, headers, CommonError, JobEvent, JobSpec,
};

use super::{Ops, OpsError};
use crate::store::{DeadLetter, JobCursor};

/// What to replay from the dead-letter queues.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    /// One job.
    pub job_id: Option<String>,
    /// Every replayable dead letter of this job type (with `all`).
    pub job_type: Option<String>,
    /// Replay all of `job_type`.
    #[serde(default)]
    pub all: bool,
}

impl Ops {
    /// A page of the dead letters not replayed yet, newest first, and the cursor of the next
    /// page when this one is full ([`Store::dead_letters_page`](crate::store::Store::dead_letters_page)).
    pub async fn dead_letters(
        &self,
        job_type: Option<&str>,
        before: Option<&JobCursor>,
        limit: i64,
    ) -> Result<(Vec<DeadLetter>, Option<JobCursor>), OpsError> {
        crate::store::check_limit(limit).map_err(OpsError::BadRequest)?;
        let page = self.store.dead_letters_page(job_type, before, limit).await?;
        let next = page.last().filter(|_| page.len() as i64 >= limit).map(JobCursor::after_letter);
        Ok((page, next))
    }

    /// Republishes dead letters to the work exchange with a fresh attempt
    /// count, each acked off its dead queue only after the broker confirmed
    /// the republish; records a new run of the job and its `queued` event.
    pub async fn replay(&self, req: &ReplayRequest, by: &str) -> Result<Vec<String>, OpsError> {
        let job_type = self.replay_job_type(req).await?;
        let queue = self.topology().dead_queue(&job_type);
        let conn = connect(&self.url, "trainyard-replay").await?;
        let result = async {
            dead_queue_exists(&conn, &queue).await?;
            let ch = confirm_channel(&conn).await?;
            let mut replayed = Vec::new();
            // A failure after some letters of `all` names them: they stay replayed.
            let partly = |replayed: &Vec<String>, e: OpsError| match replayed.is_empty() {
                true => e,
                false => OpsError::Partial { done: replayed.clone(), source: Box::new(e) },
            };
            loop {
                let got = ch.basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false }).await;
                let msg = match got.map_err(CommonError::amqp(format!("get from {queue}"))) {
                    Ok(Some(msg)) => msg,
                    Ok(None) => break,
                    Err(e) => return Err(partly(&replayed, e.into())),
                };
                // A letter not taken stays unacked here, and goes back to its queue when the
                // channel closes.
                let Some((id, spec)) = wanted(req, &msg.delivery) else { continue };
                if let Err(e) = self.replay_letter(&ch, &msg.delivery, &id, &spec, by).await {
                    return Err(partly(&replayed, e));
                }
                replayed.push(id);
                if req.job_id.is_some() {
                    break;
                }
            }
            Ok::<_, OpsError>(replayed)
        }
        .await;
        let _ = conn.close(200, "done".into()).await;
        let replayed = result?;
        if let (Some(id), true) = (&req.job_id, replayed.is_empty()) {
            return Err(OpsError::NotFound(format!("job {id} is not in {queue}")));
        }
        Ok(replayed)
    }

    /// The job type whose dead-letter queue a request names: the job's (from the store, or
    /// the list of dead letters when the store has no row), or the one given with `all`.
    async fn replay_job_type(&self, req: &ReplayRequest) -> Result<String, OpsError> {
        match (&req.job_id, &req.job_type, req.all) {
            (Some(_), _, true) => Err(OpsError::BadRequest("give a job id or `all` with a job type, not both".into())),
            (Some(id), _, _) => match self.store.job(id).await? {
                Some(j) => Ok(j.job_type),
                None => self
                    .store
                    .dead_letters(None)
                    .await?
                    .into_iter()
                    .find(|d| d.job_id.as_deref() == Some(id))
                    .map(|d| d.job_type)
                    .ok_or_else(|| OpsError::NotFound(format!("no dead letter of job {id:?}"))),
            },
            (None, Some(t), true) => Ok(t.clone()),
            _ => Err(OpsError::BadRequest("give a job id, or `all` with a job type (CLI: --all --type T)".into())),
        }
    }

    /// Starts one letter's job again as its next run: the run's `queued` event goes to the
    /// events stream, then the job to its work queue (both confirmed), and only then is the
    /// letter acked off its dead queue; the store notes the run and the replay is audited.
    ///
    /// Until the ack a failure answers an error and the letter goes back to its queue when the
    /// channel closes. After it nothing is answered but logged: the caller would replay again
    /// and find nothing in the queue. The event goes first so that whatever the store and a
    /// rebuild file of the run comes from the stream; if the job's publish then fails, the
    /// stream holds a `queued` run that never ran (seen in `jobs show`), and a replay again
    /// starts the same run number or the next one.
    async fn replay_letter(&self, ch: &Channel, d: &Delivery, id: &str, spec: &JobSpec, by: &str) -> Result<(), OpsError> {
        let hdrs = d.properties.headers().as_ref();
        // The next run: one past the letter's and the store's (a rebuild files each run's
        // events by the number they carry, never by comparing clocks).
        let known = self.store.job(id).await?.map_or(0, |j| j.run);
        let run = known.max(headers::run(hdrs)) + 1;
        let mut fresh = fresh_headers(hdrs);
        headers::set_int(&mut fresh, headers::ATTEMPT, 1);
        headers::set_int(&mut fresh, headers::RUN, i64::from(run));
        headers::set_str(&mut fresh, headers::REPLAYED, format!("{} by {by}", Utc::now().to_rfc3339()));
        let props = lasting_properties(&d.properties).with_headers(fresh).with_delivery_mode(2);
        let mut queued = JobEvent::queued(spec);
        (queued.at, queued.run) = (Utc::now(), Some(run));
        self.submitter.publish_event(ch, &queued).await?;
        let key = trainyard_common::topology::jobs_routing_key(&spec.job_type, spec.priority);
        publish_confirmed(ch, &self.topology().jobs_exchange(), &key, &d.data, props, true).await?;
        d.acker.ack(BasicAckOptions::default()).await.map_err(CommonError::amqp("ack a replayed dead letter"))?;
        if let Err(e) = self.note_replay(id, &queued).await {
            tracing::warn!(job_id = %id, error = %e, "replayed, but the store did not note it: the recorder files the new run from \
                the events stream; the letter may still list, and replaying it answers that it is not in its queue");
        }
        if let Err(e) = self.audit(by, "replay", id, Some(serde_json::json!({"run": run}))).await {
            tracing::error!(job_id = %id, run, by, error = %e, "replayed, but its audit record was not kept");
        }
        tracing::info!(job_id = %id, by, "dead letter replayed");
        Ok(())
    }

    /// Files a replay's `queued` event in the store (the recorder's copy from the stream is a
    /// duplicate) and marks the letter replayed.
    async fn note_replay(&self, id: &str, queued: &JobEvent) -> Result<(), OpsError> {
        let marked = self.store.mark_replayed(id, queued.at).await;
        self.store.record_event(queued).await?;
        Ok(marked?)
    }
}

/// The job id and spec of a letter the request asks for; `None` for any other, and for
/// poison without a job id or a readable spec (left in the queue).
fn wanted(req: &ReplayRequest, d: &Delivery) -> Option<(String, JobSpec)> {
    let ct = d.properties.content_type().as_ref().map(|s| s.as_str());
    let spec: JobSpec = codec::decode(ct, &d.data).ok()?;
    let id = spec.job_id.clone();
    req.job_id.as_ref().is_none_or(|want| *want == id).then_some((id, spec))
}

/// A letter's headers without its death history and delivery count.
fn fresh_headers(hdrs: Option<&FieldTable>) -> FieldTable {
    let mut fresh = FieldTable::default();
    // The next run's deliveries count from none.
    for (k, v) in headers::without_delivery_counts(hdrs).inner() {
        let k = k.as_str();
        let dead =
            k == headers::X_DEATH || k.starts_with("x-trainyard-dead") || k.starts_with("x-first-death") || k.starts_with("x-last-death");
        if !dead {
            fresh.insert(k.into(), v.clone());
        }
    }
    fresh
}

/// Whether the dead-letter queue `queue` exists (a passive declare, on a channel of its own
/// that the broker closes when it does not): a job type no worker has declared has none, and
/// replaying it is a caller's mistake (404), not a broker failure.
async fn dead_queue_exists(conn: &lapin::Connection, queue: &str) -> Result<(), OpsError> {
    let ch = conn.create_channel().await.map_err(CommonError::amqp("open a channel"))?;
    let passive = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
    match ch.queue_declare(queue.into(), passive, Default::default()).await {
        Ok(_) => {
            let _ = ch.close(200, "done".into()).await;
            Ok(())
        }
        Err(e) if matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 404) => {
            Err(OpsError::NotFound(format!("no dead-letter queue {queue}: no worker of that job type has declared it (a typo?)")))
        }
        Err(e) => Err(CommonError::amqp(format!("look up {queue}"))(e).into()),
    }
}
