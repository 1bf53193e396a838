//! `jobs logs --follow` through the API: the job's stream (`GET /v1/stream?job=ID`, server-sent
//! events) carries its changes (`job`) and its running attempt's new text (`log`); saved logs
//! come from `GET /v1/jobs/{id}/logs?attempt=N`. The server ends a stream within 30 s; it is
//! opened again with `Last-Event-ID`, so no change is missed, and the `log` text it sends again
//! is printed once ([`Follow::piece`]). Only when the stream cannot be opened or breaks off does
//! the follow look at the job every 2 s until it opens again.

use std::{io::Write, time::Duration};

use anyhow::{bail, Context};
use reqwest::StatusCode;

use super::{row_state, Follow, SavedLogs};

/// How long to wait before looking again when the stream broke off.
const AGAIN: Duration = Duration::from_secs(2);

/// A job on a control plane's API.
pub(in crate::cmd) struct Api<'a> {
    pub http: &'a reqwest::Client,
    pub base: &'a str,
    pub token: &'a str,
    pub job_id: &'a str,
}

impl SavedLogs for &Api<'_> {
    async fn saved(&self, attempt: u32) -> anyhow::Result<Option<String>> {
        let url = format!("{}/v1/jobs/{}/logs", self.base, self.job_id);
        let resp = self.http.get(url).query(&[("attempt", attempt)]).bearer_auth(self.token).send().await;
        let resp = resp.with_context(|| format!("failed to reach {}", self.base))?;
        match resp.status() {
            StatusCode::NOT_FOUND => Ok(None),
            s if s.is_success() => Ok(Some(resp.text().await?)),
            s => bail!("the saved log of attempt {attempt}: {s}: {}", resp.text().await.unwrap_or_default()),
        }
    }
}

impl Api<'_> {
    /// Follows the job until it is finished (or `only`, an attempt, has ended), printing on stdout.
    pub async fn follow(&self, only: Option<u32>) -> anyhow::Result<()> {
        let mut f = Follow::new(self, std::io::stdout(), only);
        if self.look(&mut f).await? {
            return Ok(());
        }
        let mut last = None;
        loop {
            match self.stream(&mut f, &mut last).await {
                Ok(true) => return Ok(()),
                Ok(false) => {} // The server ended the stream (it does within 30 s): open it again.
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "the job's live stream failed; looking again in {AGAIN:?}");
                    tokio::time::sleep(AGAIN).await;
                    match self.look(&mut f).await {
                        Ok(true) => return Ok(()),
                        Ok(false) => {}
                        Err(e) => tracing::warn!(error = %format!("{e:#}"), "could not look at the job"),
                    }
                }
            }
        }
    }

    /// Reads the job (`GET /v1/jobs/{id}`) into `f`; true when it is finished.
    async fn look<W: Write>(&self, f: &mut Follow<&Self, W>) -> anyhow::Result<bool> {
        let url = format!("{}/v1/jobs/{}", self.base, self.job_id);
        let resp = self.http.get(url).bearer_auth(self.token).send().await.with_context(|| format!("failed to reach {}", self.base))?;
        if !resp.status().is_success() {
            bail!("{}: {}", resp.status(), resp.text().await.unwrap_or_default());
        }
        let row: serde_json::Value = resp.json().await.context("the job is not JSON")?;
        let Some((status, attempt)) = row_state(&row) else { return Ok(false) };
        f.state(status, attempt).await
    }

    /// One stream of the job, until the server ends it (false) or the job is finished (true).
    async fn stream<W: Write>(&self, f: &mut Follow<&Self, W>, last: &mut Option<String>) -> anyhow::Result<bool> {
        let mut req = self.http.get(format!("{}/v1/stream", self.base)).query(&[("job", self.job_id)]).bearer_auth(self.token);
        if let Some(id) = last.as_deref() {
            req = req.header("last-event-id", id);
        }
        let mut resp = req.send().await.with_context(|| format!("failed to reach {}", self.base))?;
        if !resp.status().is_success() {
            bail!("the live stream of {} answered {}: {}", self.base, resp.status(), resp.text().await.unwrap_or_default());
        }
        let mut buf = Vec::new();
        while let Some(chunk) = resp.chunk().await.context("the live stream broke off")? {
            buf.extend_from_slice(&chunk);
            while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = buf.drain(..end + 2).collect();
                let event = Event::parse(&String::from_utf8_lossy(&block));
                if let Some(id) = event.id {
                    *last = Some(id);
                }
                let finished = match event.name.as_str() {
                    // The stream opened: what changed before it is in the job row.
                    "hello" | "resume" => self.look(f).await?,
                    "job" => {
                        let row: serde_json::Value = serde_json::from_str(&event.data).context("a `job` event that is not JSON")?;
                        match row_state(&row) {
                            Some((status, attempt)) => f.state(status, attempt).await?,
                            None => false,
                        }
                    }
                    "log" => {
                        f.piece(serde_json::from_str(&event.data).context("a `log` event that is not a log piece")?).await?;
                        false
                    }
                    "error" => bail!("the live stream reported an error: {}", event.data),
                    _ => false,
                };
                if finished {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }
}

/// One server-sent event: its name, id and data (`data` lines joined with newlines).
#[derive(Debug, Default, PartialEq, Eq)]
struct Event {
    name: String,
    id: Option<String>,
    data: String,
}

impl Event {
    fn parse(block: &str) -> Self {
        let mut e = Event::default();
        let mut data = Vec::new();
        for line in block.lines() {
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => e.name = value.to_string(),
                "id" => e.id = Some(value.to_string()),
                "data" => data.push(value),
                _ => {}
            }
        }
        e.data = data.join("\n");
        if e.name.is_empty() {
            e.name = "message".into();
        }
        e
    }
}

#[cfg(test)]
mod tests {
    use super::Event;

    #[test]
    fn server_sent_events_are_read_by_their_fields() {
        let e = Event::parse("event: log\nid: 7\ndata: {\"a\": 1}\ndata:two\n: a comment\n\n");
        assert_eq!(e, Event { name: "log".into(), id: Some("7".into()), data: "{\"a\": 1}\ntwo".into() });
        assert_eq!(Event::parse("data: x\n").name, "message");
    }
}
