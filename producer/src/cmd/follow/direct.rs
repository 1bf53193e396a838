//! `jobs logs --follow` on the job store (no `--server`): the job's events and its running
//! attempt's new text come from the broker, through a fleeting queue of this command's own
//! ([`trainyard::fanout::run_with`]: exclusive, auto-delete) bound to the logs exchange and to
//! the events of the job's type; saved logs come from the artifact store. Each time the queue
//! is bound (again), the job is read from the store, so what happened before is not missed.
//! While the broker cannot be reached, it says so on stderr and reads the store every 2 s
//! (saved logs only) until the queue is bound.

use std::{io::Write, time::Duration};

use anyhow::Context;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use trainyard::{
    fanout::{self, Bind, Link},
    ops::Ops,
};
use trainyard_common::{artifacts::keys, codec, livelog, JobEvent, JobStatus};

use super::{Follow, Piece, SavedLogs};

/// How often the store is read while the broker cannot be reached.
const FALLBACK_EVERY: Duration = Duration::from_secs(2);
/// How often the store is read while the queue is bound: a final event published before the
/// queue was bound, and recorded only after the store was read then (the recorder batches, and
/// lags while it catches up), comes from no other source.
const BOUND_LOOK_EVERY: Duration = Duration::from_secs(5);

/// What the fleeting queue hears about the job.
enum Heard {
    Link(Link),
    State(JobStatus, u32),
    Piece(Piece),
}

/// A job in the job store and the artifact store.
pub(in crate::cmd) struct Direct<'a> {
    pub ops: &'a Ops,
    pub url: &'a str,
    pub job_id: &'a str,
}

impl SavedLogs for &Direct<'_> {
    async fn saved(&self, attempt: u32) -> anyhow::Result<Option<String>> {
        let bytes = self.ops.artifacts.get(&keys::attempt_log(self.job_id, attempt)).await?;
        Ok(bytes.map(|b| String::from_utf8_lossy(&b).into_owned()))
    }
}

impl Direct<'_> {
    /// Follows the job until it is finished (or `only`, an attempt, has ended), printing on stdout.
    pub async fn follow(&self, only: Option<u32>) -> anyhow::Result<()> {
        let mut f = Follow::new(self, std::io::stdout(), only);
        let job = self.job().await?;
        if f.state(job.status, job.attempts).await? {
            return Ok(());
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let topo = self.ops.topology();
        let binds = vec![
            Bind::fanout(&livelog::exchange(topo)),
            Bind { exchange: topo.events_exchange(), routing_key: format!("{}.#", job.job_type), declare_fanout: false },
        ];
        let consumer = tokio::spawn(listen(self.url.to_string(), binds, self.job_id.to_string(), tx, stop.clone()));
        let result = self.heed(&mut f, rx).await;
        stop.cancel();
        let _ = consumer.await;
        result
    }

    async fn job(&self) -> anyhow::Result<trainyard::store::JobRow> {
        self.ops.store.job(self.job_id).await?.with_context(|| format!("no job {:?} in the job store", self.job_id))
    }

    /// Reads the job from the store into `f`; true when it is finished.
    async fn look<W: Write>(&self, f: &mut Follow<&Self, W>) -> anyhow::Result<bool> {
        let job = self.job().await?;
        f.state(job.status, job.attempts).await
    }

    /// Handles what the queue hears until the job is finished.
    async fn heed<W: Write>(&self, f: &mut Follow<&Self, W>, mut rx: mpsc::UnboundedReceiver<Heard>) -> anyhow::Result<()> {
        let (mut bound, mut said) = (false, false);
        let mut look_at = tokio::time::Instant::now() + FALLBACK_EVERY;
        loop {
            let heard = match tokio::time::timeout_at(look_at, rx.recv()).await {
                Ok(heard) => heard,
                Err(_) => {
                    if !bound && !said {
                        eprintln!("cannot reach the broker: reading the job store every {FALLBACK_EVERY:?} instead (saved logs only) until it answers");
                        said = true;
                    }
                    look_at = tokio::time::Instant::now() + if bound { BOUND_LOOK_EVERY } else { FALLBACK_EVERY };
                    // A store that cannot answer now (a failover) is asked again at the next look.
                    match self.look(f).await {
                        Ok(true) => return Ok(()),
                        Ok(false) => {}
                        Err(e) => eprintln!("could not read the job from the store ({e:#}); trying again"),
                    }
                    continue;
                }
            };
            let finished = match heard.context("the broker listener stopped")? {
                Heard::Link(Link::Bound) => {
                    if std::mem::take(&mut said) {
                        eprintln!("the broker answers again: following the live log");
                    }
                    bound = true;
                    look_at = tokio::time::Instant::now() + BOUND_LOOK_EVERY;
                    self.look(f).await?
                }
                Heard::Link(Link::Lost) => {
                    bound = false;
                    look_at = tokio::time::Instant::now() + FALLBACK_EVERY;
                    false
                }
                Heard::State(status, attempt) => f.state(status, attempt).await?,
                Heard::Piece(p) => {
                    f.piece(p).await?;
                    false
                }
            };
            if finished {
                return Ok(());
            }
        }
    }
}

/// Consumes the fleeting queue until `stop`, passing on what concerns `job_id`.
async fn listen(url: String, binds: Vec<Bind>, job_id: String, tx: mpsc::UnboundedSender<Heard>, stop: CancellationToken) {
    let logs = binds[0].exchange.clone();
    let link = |l| {
        let _ = tx.send(Heard::Link(l));
    };
    let handle = |d: &lapin::message::Delivery| {
        let heard = if d.exchange.as_str() == logs {
            serde_json::from_slice::<livelog::LogChunk>(&d.data)
                .ok()
                .filter(|c| c.job_id == job_id)
                .map(|c| Heard::Piece(Piece { attempt: c.attempt, offset: c.offset, text: c.text, worker: c.worker, making: c.making }))
        } else {
            let ct = d.properties.content_type().as_ref().map(|c| c.as_str());
            codec::decode::<JobEvent>(ct, &d.data).ok().filter(|e| e.job_id == job_id).map(|e| Heard::State(e.status, e.attempt))
        };
        if let Some(h) = heard {
            let _ = tx.send(h);
        }
    };
    fanout::run_with("follow-logs", &url, &binds, None, stop, link, handle).await;
}

#[cfg(test)]
mod tests {
    use trainyard::store::Store;
    use trainyard_common::{artifacts::ArtifactStore, topology::Topology, JobSpec, Trigger, TriggerKind};

    use super::*;

    /// A job whose final event was published before the queue was bound, and recorded after
    /// the store was read then, is seen finished at a later read of the store: the follow
    /// waited for the broker alone, forever.
    #[tokio::test]
    async fn a_final_event_recorded_after_the_bind_ends_the_follow() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("sqlite://{}/t.db", dir.path().display())).await.unwrap();
        let artifacts = ArtifactStore::open("memory://").unwrap();
        let ops = Ops::new(store.clone(), artifacts, "amqp://127.0.0.1:1/%2f", Topology::new("t")).unwrap();
        let spec = JobSpec::new("noop", "bot", serde_json::json!({}), Trigger { kind: TriggerKind::Manual, source: "t".into() });
        store.record_event(&JobEvent::queued(&spec)).await.unwrap();
        store.record_event(&JobEvent::new(&spec, JobStatus::Started, 1, 1)).await.unwrap();
        let direct = Direct { ops: &ops, url: "amqp://127.0.0.1:1/%2f", job_id: &spec.job_id };
        let mut f = Follow::new(&direct, Vec::new(), None);
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(Heard::Link(Link::Bound)).unwrap();
        let late = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            store.record_event(&JobEvent::new(&spec, JobStatus::Succeeded, 1, 2)).await.unwrap();
        };
        let (followed, ()) = tokio::join!(tokio::time::timeout(Duration::from_secs(10), direct.heed(&mut f, rx)), late);
        followed.expect("the follow ends once the store has the final event").unwrap();
        drop(tx);
    }
}
