//! The live log lines of running attempts, from the workers ([`trainyard_common::livelog`]).
//!
//! Each control-plane replica consumes the logs exchange from an exclusive, auto-delete queue of
//! its own ([`crate::fanout`]) and keeps, per job, the latest attempt's recent text in memory
//! ([`LiveLogs`], at most [`KEEP_BYTES`] a job, forgotten [`FORGET_AFTER`] after its last line);
//! `GET /v1/stream?job=ID` pushes it as `log` events. Nothing is written to the job store: the
//! attempt's whole log is saved in the artifact store when it ends (`GET /v1/jobs/{id}/logs`).
//! A replica that started while an attempt ran shows its lines from then on.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::Duration,
};

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use trainyard_common::{
    livelog::{self, LogChunk},
    topology::Topology,
};

/// Most bytes of live text kept per job (the newest).
pub const KEEP_BYTES: usize = 256 * 1024;
/// A job's live text is forgotten this long after its last chunk.
pub const FORGET_AFTER: Duration = Duration::from_secs(600);

/// Live log text of a job's latest attempt, from byte `offset` of that attempt's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LiveText {
    /// The attempt.
    pub attempt: u32,
    /// Byte offset of `text` in the attempt's log.
    pub offset: u64,
    /// The lines.
    pub text: String,
    /// The worker running it.
    pub worker: String,
    /// The making of the attempt's log on that worker ([`LogChunk::making`]).
    pub making: u64,
}

impl LiveText {
    /// Whether `c` continues this text's log: the same attempt, worker and making.
    fn same_log(&self, c: &LogChunk) -> bool {
        self.attempt == c.attempt && self.worker == c.worker && self.making == c.making
    }
    /// The offset after `text`.
    pub fn end(&self) -> u64 {
        self.offset + self.text.len() as u64
    }
}

/// How far a reader has shown a job's live text: its log (attempt, worker, making) and the
/// offset after the text shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shown {
    /// The attempt.
    pub attempt: u32,
    /// The worker of its log.
    pub worker: String,
    /// The making of its log there.
    pub making: u64,
    /// The offset after the text shown.
    pub end: u64,
}

impl Shown {
    /// What a reader has shown once it showed `text`.
    pub fn of(text: &LiveText) -> Self {
        Self { attempt: text.attempt, worker: text.worker.clone(), making: text.making, end: text.end() }
    }
}

/// What is held of one job: its latest attempt's text and when it last grew.
type Held = (LiveText, DateTime<Utc>);

/// The live text of running attempts, by job id.
#[derive(Debug, Clone, Default)]
pub struct LiveLogs {
    table: Arc<RwLock<Table>>,
}

/// The jobs held, and when those idle for [`FORGET_AFTER`] were last looked for.
#[derive(Debug, Default)]
struct Table {
    jobs: HashMap<String, Held>,
    swept: Option<DateTime<Utc>>,
}

/// How often the table is swept of idle jobs (a sweep reads every job held: once per chunk
/// was a scan of all running jobs for each line any of them logged).
const SWEEP_EVERY: chrono::Duration = chrono::Duration::seconds(10);

impl LiveLogs {
    /// Adds a chunk received at `now`. A chunk of a newer attempt, of the same attempt from
    /// another worker or another making on the same one (redelivered: its log starts again
    /// there), or one after a gap (chunks lost) starts the job's text again; overlapping text is
    /// added once; a chunk of an older attempt, or of an older making on the same worker, is
    /// ignored.
    pub fn record(&self, c: LogChunk, now: DateTime<Utc>) {
        let Ok(mut table) = self.table.write() else { return };
        if table.swept.is_none_or(|at| now - at >= SWEEP_EVERY) {
            let forget = chrono::Duration::from_std(FORGET_AFTER).unwrap_or_default();
            table.jobs.retain(|_, (_, at)| now - *at < forget);
            table.swept = Some(now);
        }
        let jobs = &mut table.jobs;
        match jobs.get_mut(&c.job_id) {
            Some((held, _)) if held.attempt > c.attempt => {}
            Some((held, _)) if held.attempt == c.attempt && held.worker == c.worker && held.making > c.making => {}
            Some((held, at)) if held.same_log(&c) && c.offset <= held.end() => {
                let skip = (held.end() - c.offset) as usize;
                if skip < c.text.len() && c.text.is_char_boundary(skip) {
                    held.text.push_str(&c.text[skip..]);
                    *at = now;
                }
                trim(held);
            }
            _ => {
                let mut held = LiveText { attempt: c.attempt, offset: c.offset, text: c.text, worker: c.worker, making: c.making };
                trim(&mut held);
                jobs.insert(c.job_id, (held, now));
            }
        }
    }

    /// The live text of `job_id` after `after` (the [`Shown::of`] the text a reader has): all
    /// of it for another attempt, worker or making, or an offset no longer held; `None` when
    /// nothing is new.
    pub fn since(&self, job_id: &str, after: Option<&Shown>) -> Option<LiveText> {
        let table = self.table.read().ok()?;
        let (held, _) = table.jobs.get(job_id)?;
        let from = match after {
            Some(s) if s.attempt == held.attempt && s.worker == held.worker && s.making == held.making && s.end >= held.offset => s.end,
            _ => held.offset,
        };
        let skip = usize::try_from(from - held.offset).ok()?;
        if skip >= held.text.len() || !held.text.is_char_boundary(skip) {
            return None;
        }
        Some(LiveText { offset: from, text: held.text[skip..].to_string(), ..held.clone() })
    }

    /// Consumes the logs exchange into the table until `shutdown`, reconnecting when lost
    /// (not counted in `trainyard_amqp_reconnects_total`, which counts the recorder's and the
    /// trigger listener's: one outage counted once per consumer set off its alert too soon).
    pub async fn run(&self, url: &str, topology: &Topology, shutdown: CancellationToken) {
        crate::fanout::run("live-logs", url, &livelog::exchange(topology), None, shutdown, |body| {
            match serde_json::from_slice::<LogChunk>(body) {
                Ok(c) => self.record(c, Utc::now()),
                Err(e) => tracing::warn!(error = %e, "ignored a message on the logs exchange that is not a log chunk"),
            }
        })
        .await
    }
}

/// Keeps the newest [`KEEP_BYTES`] of `held`, cut at a character boundary.
fn trim(held: &mut LiveText) {
    if held.text.len() <= KEEP_BYTES {
        return;
    }
    let mut cut = held.text.len() - KEEP_BYTES;
    while !held.text.is_char_boundary(cut) {
        cut += 1;
    }
    held.text.drain(..cut);
    held.offset += cut as u64;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(attempt: u32, offset: u64, text: &str) -> LogChunk {
        LogChunk { job_id: "j".into(), attempt, offset, text: text.into(), worker: "w".into(), making: 0 }
    }

    fn text(t: Option<LiveText>) -> Option<(u32, u64, String)> {
        t.map(|t| (t.attempt, t.offset, t.text))
    }

    #[test]
    fn chunks_join_once_in_order_and_a_reader_gets_only_what_is_new() {
        let logs = LiveLogs::default();
        let now = Utc::now();
        logs.record(chunk(1, 0, "one\n"), now);
        logs.record(chunk(1, 4, "two\n"), now);
        logs.record(chunk(1, 4, "two\n"), now); // A duplicate adds nothing.
        assert_eq!(text(logs.since("j", None)), Some((1, 0, "one\ntwo\n".into())));
        assert_eq!(text(logs.since("j", Some(&shown(1, "w", 4)))), Some((1, 4, "two\n".into())));
        assert_eq!(logs.since("j", Some(&shown(1, "w", 8))), None, "nothing new");
        // A newer attempt starts again; an older attempt's late chunk is ignored.
        logs.record(chunk(2, 0, "retry\n"), now);
        logs.record(chunk(1, 8, "late\n"), now);
        assert_eq!(text(logs.since("j", Some(&shown(1, "w", 8)))), Some((2, 0, "retry\n".into())));
        // A gap (lost chunks) starts the text at the chunk after it.
        logs.record(chunk(2, 100, "after a gap\n"), now);
        assert_eq!(text(logs.since("j", None)), Some((2, 100, "after a gap\n".into())));
        assert_eq!(logs.since("other", None), None);
        // Redelivered to another worker, the attempt's log starts again there: all of it is new.
        logs.record(LogChunk { worker: "w2".into(), ..chunk(2, 0, "again\n") }, now);
        logs.record(LogChunk { worker: "w2".into(), ..chunk(2, 6, "more\n") }, now);
        let held = logs.since("j", Some(&shown(2, "w", 112))).unwrap();
        assert_eq!((held.offset, held.text.as_str(), held.worker.as_str()), (0, "again\nmore\n", "w2"));
        // Delivered again to the same worker (a new making): it starts again there too, and a
        // late chunk of the making before is ignored.
        let seen = Shown::of(&held);
        logs.record(LogChunk { worker: "w2".into(), making: 1, ..chunk(2, 0, "anew\n") }, now);
        logs.record(LogChunk { worker: "w2".into(), ..chunk(2, 11, "old\n") }, now);
        assert_eq!(text(logs.since("j", Some(&seen))), Some((2, 0, "anew\n".into())));
    }

    fn shown(attempt: u32, worker: &str, end: u64) -> Shown {
        Shown { attempt, worker: worker.into(), making: 0, end }
    }

    #[test]
    fn only_the_newest_bytes_are_kept_and_idle_jobs_are_forgotten() {
        let logs = LiveLogs::default();
        let now = Utc::now();
        let line = "é".repeat(KEEP_BYTES / 2 + 10);
        logs.record(chunk(1, 0, &line), now);
        let held = logs.since("j", None).unwrap();
        assert!(held.text.len() <= KEEP_BYTES && held.offset > 0, "{} bytes from {}", held.text.len(), held.offset);
        assert_eq!(held.end(), line.len() as u64);
        let later = now + chrono::Duration::from_std(FORGET_AFTER).unwrap() + chrono::Duration::seconds(1);
        logs.record(LogChunk { job_id: "k".into(), ..chunk(1, 0, "x\n") }, later);
        assert_eq!(logs.since("j", None), None, "forgotten");
    }
}
