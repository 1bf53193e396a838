//! `jobs logs --follow` through the API: waits for the job's next change on the live stream
//! (`GET /v1/stream?job=ID`, server-sent events) instead of asking again every few seconds.

use anyhow::Context;

/// Returns at the job's next change, or when the server ends the stream (it does within 30 s;
/// then the caller looks again and comes back). `last` keeps the stream's last event id, so a
/// change between two streams is not missed; the first stream also returns at its `hello`, so
/// that what changed before it opened is looked at.
pub async fn next_change(http: &reqwest::Client, base: &str, token: &str, job_id: &str, last: &mut Option<String>) -> anyhow::Result<()> {
    let mut req = http.get(format!("{base}/v1/stream")).query(&[("job", job_id)]).bearer_auth(token);
    if let Some(id) = last.as_deref() {
        req = req.header("last-event-id", id);
    }
    let mut resp = req.send().await.with_context(|| format!("failed to reach {base}"))?;
    if !resp.status().is_success() {
        anyhow::bail!("the live stream of {base} answered {}: {}", resp.status(), resp.text().await.unwrap_or_default());
    }
    let fresh = last.is_none();
    let mut buf = String::new();
    while let Some(chunk) = resp.chunk().await.context("the live stream broke off")? {
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            if let Some(id) = block.lines().find_map(|l| l.strip_prefix("id:")) {
                *last = Some(id.trim().to_string());
            }
            let event = block.lines().find_map(|l| l.strip_prefix("event:")).map(str::trim);
            if event == Some("job") || (fresh && event == Some("hello")) {
                return Ok(());
            }
        }
    }
    Ok(())
}
