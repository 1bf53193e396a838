//! Captures every log line of a job attempt, so the runtime can save it in the
//! artifact store (`jobs/<id>/logs/attempt-<n>.log`) and `jobs logs` works
//! after the pod is gone.
//!
//! The runtime runs each attempt inside a span named `job` with fields
//! `job_id`, `job_type`, `bot` and `attempt`; [`JobLogLayer`] appends every
//! event inside such a span to that attempt's buffer. Code on other threads
//! (training) enters the span it was given to be captured too.

use std::{
    collections::HashMap,
    fmt::Write as _,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use tracing::{
    field::{Field, Visit},
    span, Event, Subscriber,
};
use tracing_subscriber::{layer::Context, registry::LookupSpan, Layer};

/// Most bytes kept per attempt; the lines after it are dropped, with one note saying so.
const MAX_LOG_BYTES: usize = 4 * 1024 * 1024;

/// The line that ends a log that reached [`MAX_LOG_BYTES`].
const CAPPED: &str = "[trainyard: this attempt's log reached 4 MiB; its later lines are not kept]\n";

/// What was captured for one attempt.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Captured {
    /// The lines.
    pub text: String,
    /// Does it hold a line worth keeping: one from the job's own code, or a warning or error?
    /// A log of only the runtime's routine lines repeats the job's events and is not saved.
    pub notable: bool,
}

/// Shared buffers of running attempts, keyed by `job_id/attempt`, each with the number of its
/// making: a buffer taken and made again under the same key (the same attempt delivered again
/// to this worker) is a new text, which [`JobLogs::unsent`] sends from its start.
#[derive(Debug, Clone, Default)]
pub struct JobLogs {
    buffers: Arc<Mutex<HashMap<String, (u64, Captured)>>>,
    made: Arc<AtomicU64>,
}

/// New text of a running attempt's buffer, as [`JobLogs::unsent`] finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsent {
    /// The job.
    pub job_id: String,
    /// The attempt.
    pub attempt: u32,
    /// The number of the buffer's making (a new one starts again at offset 0).
    pub making: u64,
    /// Byte offset of `text` in the buffer.
    pub offset: usize,
    /// The new text.
    pub text: String,
}

/// What [`JobLogs::unsent`] has sent of each buffer: its making and the bytes sent.
#[derive(Debug, Default)]
pub struct Sent(HashMap<String, (u64, usize)>);

impl JobLogs {
    /// The key of an attempt.
    pub fn key(job_id: &str, attempt: u32) -> String {
        format!("{job_id}/{attempt}")
    }

    /// Removes and returns what was captured for an attempt.
    pub fn take(&self, key: &str) -> Captured {
        self.buffers.lock().map(|mut b| b.remove(key)).ok().flatten().map(|(_, c)| c).unwrap_or_default()
    }

    /// The text of running attempts not yet in `sent` (bytes sent so far, by key), at most
    /// `max` bytes per attempt (cut at a character boundary). Advances `sent`, and forgets the
    /// attempts whose buffer was taken.
    pub fn unsent(&self, sent: &mut Sent, max: usize) -> Vec<Unsent> {
        let Ok(buffers) = self.buffers.lock() else { return Vec::new() };
        // A buffer taken, or taken and made again since: its offset means nothing now.
        sent.0.retain(|k, (made, _)| buffers.get(k).is_some_and(|(m, _)| m == made));
        let mut out = Vec::new();
        for (key, (made, captured)) in buffers.iter() {
            let from = sent.0.get(key).map_or(0, |(_, n)| *n);
            let text = &captured.text;
            let mut end = text.len().min(from + max);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            let Some((job_id, attempt)) = key.rsplit_once('/').and_then(|(j, a)| Some((j, a.parse::<u32>().ok()?))) else { continue };
            if end > from {
                let text = text[from..end].to_string();
                out.push(Unsent { job_id: job_id.to_string(), attempt, making: *made, offset: from, text });
                sent.0.insert(key.clone(), (*made, end));
            }
        }
        out
    }

    fn append(&self, key: &str, line: &str, notable: bool) {
        if let Ok(mut b) = self.buffers.lock() {
            let (_, buf) = b.entry(key.to_string()).or_insert_with(|| (self.made.fetch_add(1, Ordering::Relaxed), Captured::default()));
            // Capped: nothing after the note.
            if buf.text.ends_with(CAPPED) {
                return;
            }
            if buf.text.len() + line.len() <= MAX_LOG_BYTES {
                buf.text.push_str(line);
                buf.notable |= notable;
            } else {
                buf.text.push_str(CAPPED);
            }
        }
    }

    /// The layer that feeds these buffers.
    pub fn layer(&self) -> JobLogLayer {
        JobLogLayer { logs: self.clone() }
    }
}

/// A `tracing` layer writing events inside `job` spans to [`JobLogs`].
#[derive(Debug, Clone)]
pub struct JobLogLayer {
    logs: JobLogs,
}

struct JobKey(String);

#[derive(Default)]
struct KeyVisitor {
    job_id: Option<String>,
    attempt: Option<u64>,
}

impl Visit for KeyVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "job_id" {
            self.job_id = Some(value.to_string());
        }
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        if field.name() == "attempt" {
            self.attempt = Some(value);
        }
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        if field.name() == "attempt" {
            self.attempt = u64::try_from(value).ok();
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "job_id" {
            self.job_id = Some(format!("{value:?}").trim_matches('"').to_string());
        }
    }
}

struct LineVisitor(String);

impl Visit for LineVisitor {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, " {value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            let _ = write!(self.0, " {value}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
}

impl<S> Layer<S> for JobLogLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        if attrs.metadata().name() != "job" {
            return;
        }
        let mut v = KeyVisitor::default();
        attrs.record(&mut v);
        if let (Some(job_id), Some(attempt), Some(span)) = (v.job_id, v.attempt, ctx.span(id)) {
            span.extensions_mut().insert(JobKey(JobLogs::key(&job_id, attempt as u32)));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let Some(scope) = ctx.event_scope(event) else { return };
        for span in scope {
            if let Some(JobKey(key)) = span.extensions().get::<JobKey>() {
                let meta = event.metadata();
                let mut line = LineVisitor(format!("{} {:>5} {}:", chrono::Utc::now().to_rfc3339(), meta.level(), meta.target()));
                event.record(&mut line);
                line.0.push('\n');
                let notable = *meta.level() <= tracing::Level::WARN || !meta.target().starts_with(super::TARGET);
                self.logs.append(key, &line.0, notable);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::prelude::*;

    #[test]
    fn captures_events_inside_job_spans_only() {
        let logs = JobLogs::default();
        let subscriber = tracing_subscriber::registry().with(logs.layer());
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("outside");
            let span = tracing::info_span!("job", job_id = "j1", job_type = "noop", bot = "b", attempt = 2u32);
            let _g = span.enter();
            tracing::info!(epoch = 3, "trained");
            let inner = tracing::info_span!("inner");
            let _i = inner.enter();
            tracing::warn!("nested");
        });
        let got = logs.take(&JobLogs::key("j1", 2));
        let text = &got.text;
        assert!(text.contains("trained") && text.contains("epoch=3"), "{text}");
        assert!(text.contains("nested"), "{text}");
        assert!(!text.contains("outside"), "{text}");
        assert!(got.notable, "lines from job code are worth saving");
        assert_eq!(logs.take(&JobLogs::key("j1", 2)), Captured::default());
    }

    /// `unsent` as (job id, attempt, offset, text).
    fn unsent(logs: &JobLogs, sent: &mut Sent, max: usize) -> Vec<(String, u32, usize, String)> {
        logs.unsent(sent, max).into_iter().map(|u| (u.job_id, u.attempt, u.offset, u.text)).collect()
    }

    #[test]
    fn unsent_text_comes_once_in_order_and_finished_attempts_are_forgotten() {
        let logs = JobLogs::default();
        let mut sent = Sent::default();
        logs.append("j1/1", "a line\n", true);
        assert_eq!(unsent(&logs, &mut sent, 1024), vec![("j1".to_string(), 1, 0, "a line\n".to_string())]);
        assert!(logs.unsent(&mut sent, 1024).is_empty(), "nothing new");
        logs.append("j1/1", "é and more\n", true);
        // Cut at a character boundary: 'é' is two bytes, so 1 byte gives nothing, 2 give it.
        assert!(logs.unsent(&mut sent, 1).is_empty());
        assert_eq!(unsent(&logs, &mut sent, 2), vec![("j1".to_string(), 1, 7, "é".to_string())]);
        assert_eq!(unsent(&logs, &mut sent, 1024), vec![("j1".to_string(), 1, 9, " and more\n".to_string())]);
        logs.take("j1/1");
        assert!(logs.unsent(&mut sent, 1024).is_empty());
        assert!(sent.0.is_empty(), "a taken attempt is forgotten");
    }

    /// A buffer taken and made again under the same key between two rounds (the same attempt
    /// delivered again to this worker) is sent from its start: its lines were skipped while it
    /// was shorter than the old offset, and an offset inside one of its characters panicked
    /// while the lock was held, which poisoned it and ended every job log of the worker.
    #[test]
    fn a_buffer_made_again_under_its_key_is_sent_from_its_start() {
        let logs = JobLogs::default();
        let mut sent = Sent::default();
        logs.append("j1/1", "ab\n", true);
        let first = logs.unsent(&mut sent, 1024);
        assert_eq!(first.len(), 1);
        logs.take("j1/1");
        logs.append("j1/1", "éééé\n", true);
        let again = logs.unsent(&mut sent, 1024);
        assert_eq!(again.iter().map(|u| (u.offset, u.text.as_str())).collect::<Vec<_>>(), [(0, "éééé\n")]);
        assert!(again[0].making > first[0].making, "a new making, which readers start again from");
        logs.append("j1/1", "more\n", true);
        assert_eq!(unsent(&logs, &mut sent, 1024), vec![("j1".to_string(), 1, 9, "more\n".to_string())]);
        assert!(logs.buffers.lock().is_ok(), "the lock is not poisoned");
    }

    #[test]
    fn a_log_past_its_cap_ends_with_one_note() {
        let logs = JobLogs::default();
        let line = "x".repeat(1024 * 1024);
        for _ in 0..6 {
            logs.append("j1/1", &line, true);
        }
        // A short line after the cap is not kept either: the note ends the log.
        logs.append("j1/1", "short\n", true);
        let text = logs.take("j1/1").text;
        assert_eq!(text.len(), 4 * line.len() + CAPPED.len());
        assert!(text.ends_with(CAPPED));
    }

    #[test]
    fn routine_runtime_lines_alone_are_not_notable() {
        let logs = JobLogs::default();
        let subscriber = tracing_subscriber::registry().with(logs.layer());
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("job", job_id = "j2", job_type = "noop", bot = "b", attempt = 1u32);
            let _g = span.enter();
            tracing::info!(target: "trainyard_worker::runtime::process", "job started");
        });
        let got = logs.take(&JobLogs::key("j2", 1));
        assert!(got.text.contains("job started"), "{}", got.text);
        assert!(!got.notable);
        tracing::subscriber::with_default(tracing_subscriber::registry().with(logs.layer()), || {
            let span = tracing::info_span!("job", job_id = "j2", job_type = "noop", bot = "b", attempt = 2u32);
            let _g = span.enter();
            tracing::warn!(target: "trainyard_worker::runtime::process", "attempt failed; retry scheduled");
        });
        assert!(logs.take(&JobLogs::key("j2", 2)).notable, "warnings are always worth saving");
    }
}
