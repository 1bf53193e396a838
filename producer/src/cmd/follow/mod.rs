//! `jobs logs --follow`: a job's log as it is written, not only when an attempt ends.
//!
//! Workers publish the new text of a running attempt every 500 ms with its byte offset in the
//! attempt's log ([`trainyard_common::livelog`]); [`api`] gets it as the `log` events of
//! `GET /v1/stream?job=ID`, [`direct`] from the logs exchange. [`Follow`] joins the pieces by
//! (attempt, offset) as the console does: text already printed is skipped, a gap is marked with
//! one line. When an attempt ends, its saved log (the record, written by the worker right after
//! the attempt's outcome) is read and only what it holds beyond the live text printed for that
//! attempt is printed ([`rest`]). With every attempt seen live from its first byte, the output
//! is the same as `jobs logs` prints at the end: a `==> attempt N <==` line before each attempt
//! (none with `--attempt N`), then its log.

use std::{io::Write, time::Duration};

use serde::Deserialize;
use trainyard_common::JobStatus;

pub(super) mod api;
pub(super) mod direct;

/// How long an attempt that has just ended may take to save its log. The worker saves it right
/// after the attempt's outcome is published; an attempt that logged only the runtime's routine
/// lines saves none, so this is waited for at the end of such an attempt.
const SAVED_WAIT: Duration = Duration::from_secs(3);
/// How often the saved log is looked for meanwhile.
const SAVED_LOOK: Duration = Duration::from_millis(200);

/// New text of a running attempt: a `log` event of the API's stream, or a chunk of the logs exchange.
#[derive(Debug, Clone, Deserialize)]
pub(super) struct Piece {
    pub attempt: u32,
    /// Byte offset of `text` in the attempt's log.
    pub offset: u64,
    pub text: String,
    /// The worker running the attempt.
    #[serde(default)]
    pub worker: String,
    /// The making of the attempt's log on that worker: a new one starts again at offset 0.
    #[serde(default)]
    pub making: u64,
}

/// Where the saved logs of the job's attempts are read.
pub(super) trait SavedLogs {
    /// The saved log of `attempt`; `None` while there is none.
    fn saved(&self, attempt: u32) -> impl std::future::Future<Output = anyhow::Result<Option<String>>>;
}

/// The live text of one attempt printed since the last gap: `text` is its log from byte `from`.
#[derive(Debug)]
struct Live {
    attempt: u32,
    worker: String,
    making: u64,
    from: u64,
    text: String,
}

impl Live {
    fn end(&self) -> u64 {
        self.from + self.text.len() as u64
    }
}

/// What a follow has printed, and of which attempts.
pub(super) struct Follow<S, W> {
    saved: S,
    out: W,
    /// `--attempt N`: that attempt only, without header lines.
    only: Option<u32>,
    live: Option<Live>,
    /// The attempts up to this one have ended and their saved log was printed.
    ended: u32,
    /// The highest attempt whose header line was printed.
    headed: u32,
    /// Whether an attempt that ends now may still be saving its log (not at the first look).
    wait: bool,
}

impl<S: SavedLogs, W: Write> Follow<S, W> {
    pub fn new(saved: S, out: W, only: Option<u32>) -> Self {
        Self { saved, out, only, live: None, ended: 0, headed: 0, wait: false }
    }

    /// The job's status and latest attempt (a job row's `attempts`, an event's `attempt`): prints
    /// the rest of each attempt this says ended. True when there is nothing more to follow.
    pub async fn state(&mut self, status: JobStatus, attempt: u32) -> anyhow::Result<bool> {
        let ended = if status.is_terminal() || status == JobStatus::Retrying { attempt } else { attempt.saturating_sub(1) };
        self.end_up_to(ended).await?;
        self.wait = true;
        Ok(status.is_terminal() || self.only.is_some_and(|a| a <= self.ended))
    }

    /// Prints what `p` holds that was not printed yet.
    pub async fn piece(&mut self, p: Piece) -> anyhow::Result<()> {
        let older = self.live.as_ref().is_some_and(|l| l.attempt > p.attempt);
        if self.only.is_some_and(|a| a != p.attempt) || p.attempt <= self.ended || older {
            return Ok(()); // Another attempt, or a late chunk of one that ended.
        }
        // A newer attempt runs: the earlier ones ended.
        self.end_up_to(p.attempt.saturating_sub(1)).await?;
        let same = |l: &Live| l.attempt == p.attempt && l.worker == p.worker;
        if self.live.as_ref().is_some_and(|l| same(l) && l.making > p.making) {
            return Ok(()); // A late chunk of the log before the attempt was delivered again.
        }
        if !self.live.as_ref().is_some_and(|l| same(l) && l.making == p.making) {
            self.head(p.attempt)?;
            if self.live.as_ref().is_some_and(|l| l.attempt == p.attempt) {
                // The attempt was redelivered (to another worker, or to this one again): its log starts again there.
                writeln!(self.out, "--- attempt {} continues on worker {} ---", p.attempt, p.worker)?;
            }
            self.live = Some(Live { attempt: p.attempt, worker: p.worker.clone(), making: p.making, from: 0, text: String::new() });
        }
        let Some(live) = self.live.as_mut() else { return Ok(()) };
        if p.offset > live.end() {
            writeln!(self.out, "[… {} bytes of attempt {} were not received live …]", p.offset - live.end(), p.attempt)?;
            live.from = p.offset;
            live.text.clear();
        }
        let skip = usize::try_from(live.end() - p.offset).unwrap_or(usize::MAX);
        if skip < p.text.len() && p.text.is_char_boundary(skip) {
            let new = &p.text[skip..];
            self.out.write_all(new.as_bytes())?;
            self.out.flush()?;
            live.text.push_str(new);
        }
        Ok(())
    }

    fn head(&mut self, attempt: u32) -> std::io::Result<()> {
        if self.only.is_none() && self.headed < attempt {
            writeln!(self.out, "==> attempt {attempt} <==")?;
            self.headed = attempt;
        }
        Ok(())
    }

    async fn end_up_to(&mut self, ended: u32) -> anyhow::Result<()> {
        while self.ended < ended {
            let attempt = self.ended + 1;
            if self.only.is_none_or(|a| a == attempt) {
                self.end(attempt).await?;
            }
            self.ended = attempt;
        }
        Ok(())
    }

    /// Prints the rest of an attempt that ended, from its saved log.
    async fn end(&mut self, attempt: u32) -> anyhow::Result<()> {
        let live = self.live.take_if(|l| l.attempt == attempt);
        let Some(saved) = self.saved_log(attempt).await? else { return Ok(()) };
        let tail = match rest(&saved, live.as_ref()) {
            Some(tail) => tail,
            None => {
                writeln!(self.out, "--- the saved log of attempt {attempt} differs from the live lines above; here it is whole ---")?;
                &saved
            }
        };
        if !tail.is_empty() {
            self.head(attempt)?;
            self.out.write_all(tail.as_bytes())?;
            self.out.flush()?;
        }
        Ok(())
    }

    async fn saved_log(&self, attempt: u32) -> anyhow::Result<Option<String>> {
        let deadline = tokio::time::Instant::now() + if self.wait { SAVED_WAIT } else { Duration::ZERO };
        loop {
            if let Some(text) = self.saved.saved(attempt).await? {
                return Ok(Some(text));
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(SAVED_LOOK).await;
        }
    }
}

/// What the saved log of an attempt holds beyond the live text printed for it: what follows that
/// text at its offset; or, when the text is not there, after its last occurrence (a redelivered
/// attempt's saved log holds the earlier run first; the lines carry timestamps, so they do not
/// repeat). `None` when the saved log does not hold that text at all.
fn rest<'a>(saved: &'a str, live: Option<&Live>) -> Option<&'a str> {
    let Some(live) = live else { return Some(saved) };
    let from = usize::try_from(live.from).unwrap_or(usize::MAX);
    let at = match saved.get(from..from.saturating_add(live.text.len())) {
        Some(s) if s == live.text => from,
        _ => saved.rfind(&live.text)?,
    };
    saved.get(at + live.text.len()..)
}

/// Reads a job's status and attempt from a job row (`status`, `attempts`); `None` for a status
/// this release does not know.
fn row_state(row: &serde_json::Value) -> Option<(JobStatus, u32)> {
    let status = row["status"].as_str()?.parse().ok()?;
    Some((status, u32::try_from(row["attempts"].as_u64()?).ok()?))
}

#[cfg(test)]
mod tests;
