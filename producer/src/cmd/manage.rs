//! `trainyard jobs`: job management, through the store and the broker directly, or through
//! the API with `--server URL --token T`; the connection the other management commands share.

use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use trainyard::{
    ops::Ops,
    store::{JobCursor, JobFilter, Store},
};
use trainyard_common::{artifacts::ArtifactStore, topology::Topology, JobStatus, TriggerKind};

/// Where reads and actions go.
#[derive(Debug, Clone, Args)]
pub struct Target {
    /// Job store (`sqlite://PATH`, created when missing, or `postgres://…`).
    #[arg(long, global = true, env = "TRAINYARD_DATABASE_URL", default_value = trainyard::store::DEFAULT_DATABASE_URL, hide_env_values = true)]
    pub database_url: String,
    /// Artifact store (directory, `file://DIR` or `memory://`).
    #[arg(long, global = true, env = "TRAINYARD_ARTIFACTS", default_value = trainyard_common::config::DEFAULT_ARTIFACTS)]
    pub artifacts: String,
    /// Talk to a control plane's API instead (e.g. `http://127.0.0.1:8080`).
    #[arg(long, global = true, env = "TRAINYARD_SERVER")]
    pub server: Option<String>,
    /// API token for `--server`.
    #[arg(long, global = true, env = "TRAINYARD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print JSON on stdout (an object, or an array for lists).
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum JobsCmd {
    /// List jobs, newest first.
    List {
        /// Only this status.
        #[arg(long)]
        status: Option<JobStatus>,
        /// Only this job type.
        #[arg(long = "type")]
        job_type: Option<String>,
        /// Only this bot.
        #[arg(long)]
        bot: Option<String>,
        /// Only jobs triggered this way (manual, schedule, event, api).
        #[arg(long, value_parser = parse_trigger)]
        trigger: Option<TriggerKind>,
        /// Only jobs created since (RFC 3339, or a duration like `2h`, `30m`, `7d`).
        #[arg(long)]
        since: Option<String>,
        /// Only jobs created before (RFC 3339, or a duration back from now).
        #[arg(long)]
        until: Option<String>,
        /// Only jobs whose id starts with this.
        #[arg(long)]
        search: Option<String>,
        /// The next page: the cursor printed after a full page (`next page: --before …`).
        #[arg(long)]
        before: Option<JobCursor>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Everything about one job: status, attempts, events, metrics, confusion matrix.
    Show { id: String },
    /// The saved logs of a job's attempts.
    Logs {
        id: String,
        /// One attempt only.
        #[arg(long)]
        attempt: Option<u32>,
        /// Keep printing the log as it is written until the job is finished: the running attempt's
        /// lines live, then the rest of each attempt's saved log.
        #[arg(long)]
        follow: bool,
    },
    /// Cancel a queued or running job.
    Cancel {
        id: String,
        /// Why (recorded).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Submit a finished job again, as a new job (same type, bot, params, tier and coalescing key).
    Retry { id: String },
}

pub(super) enum Conn {
    Direct(Ops),
    Remote { base: String, token: String, http: reqwest::Client },
}

pub(super) fn who() -> String {
    std::env::var("USER").unwrap_or_else(|_| "cli".into())
}

pub(super) async fn open(t: &Target, url: &str, topology: Topology) -> anyhow::Result<Conn> {
    if let Some(server) = &t.server {
        let token = t.token.clone().context("--server needs --token (or TRAINYARD_TOKEN)")?;
        return Ok(Conn::Remote { base: server.trim_end_matches('/').to_string(), token, http: reqwest::Client::new() });
    }
    let store = Store::open(&t.database_url).await?;
    let artifacts = ArtifactStore::open(&t.artifacts)?;
    Ok(Conn::Direct(Ops::new(store, artifacts, url, topology)?))
}

impl Conn {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> anyhow::Result<reqwest::Response> {
        let Conn::Remote { base, token, http } = self else { unreachable!("remote call on a direct connection") };
        let mut req = http.request(method, format!("{base}/v1{path}")).bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.with_context(|| format!("failed to reach {base}"))?;
        if !resp.status().is_success() {
            let code = resp.status();
            let text = resp.text().await.unwrap_or_default();
            let msg = serde_json::from_str::<Value>(&text).ok().and_then(|v| v["error"].as_str().map(String::from)).unwrap_or(text);
            bail!("{code}: {msg}");
        }
        Ok(resp)
    }
    pub(super) async fn get(&self, path: &str) -> anyhow::Result<Value> {
        Ok(self.call(reqwest::Method::GET, path, None).await?.json().await?)
    }
    /// A page: its JSON and its `X-Next-Cursor`, when there is a next one.
    pub(super) async fn get_paged(&self, path: &str) -> anyhow::Result<(Value, Option<String>)> {
        let resp = self.call(reqwest::Method::GET, path, None).await?;
        let next = resp.headers().get("x-next-cursor").and_then(|h| h.to_str().ok()).map(String::from);
        Ok((resp.json().await?, next))
    }
    pub(super) async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        Ok(self.call(reqwest::Method::POST, path, Some(body)).await?.json().await?)
    }
}

/// One page of `jobs list` as JSON, and the cursor of the next page when this one is full.
async fn list_page(conn: &Conn, f: &JobFilter) -> anyhow::Result<(Value, Option<String>)> {
    if let Conn::Direct(ops) = conn {
        let jobs = ops.list(f).await?;
        let next = f.next_cursor(&jobs).map(|c| c.to_string());
        return Ok((serde_json::to_value(jobs)?, next));
    }
    let time = |t: Option<chrono::DateTime<chrono::Utc>>| t.map(|x| x.to_rfc3339_opts(chrono::SecondsFormat::Micros, true));
    let pairs = [
        ("status", f.status.map(|s| s.to_string())),
        ("type", f.job_type.clone()),
        ("bot", f.bot.clone()),
        ("trigger", f.trigger.map(|k| k.to_string())),
        ("since", time(f.since)),
        ("until", time(f.until)),
        ("q", f.id_prefix.clone()),
        ("before", f.before.as_ref().map(JobCursor::to_string)),
        ("limit", Some(f.limit.to_string())),
    ];
    let mut url = reqwest::Url::parse("http://query/").expect("a constant URL");
    url.query_pairs_mut().extend_pairs(pairs.iter().filter_map(|(k, v)| Some((k, v.as_ref()?))));
    conn.get_paged(&format!("/jobs?{}", url.query().unwrap_or(""))).await
}

/// `x` encoded as one URL path segment (or query value): `/`, `?`, `#`, `&`, `%` and the
/// like cannot change which route or parameter the control plane sees.
pub(super) fn seg(x: &str) -> String {
    let mut u = reqwest::Url::parse("http://x/").expect("a constant URL");
    u.path_segments_mut().expect("a base URL").push(x);
    u.path()[1..].replace('&', "%26").replace('=', "%3D")
}

/// `--trigger`: one of the trigger kinds.
fn parse_trigger(s: &str) -> Result<TriggerKind, String> {
    match serde_json::from_value::<TriggerKind>(Value::String(s.to_string())) {
        Ok(TriggerKind::Unknown) | Err(_) => Err(format!("unknown trigger {s:?} (expected manual, schedule, event or api)")),
        Ok(k) => Ok(k),
    }
}

/// `--since` / `--until` (`flag`): RFC 3339 or a duration back from now (`30m`, `2h`, `7d`).
fn parse_since(flag: &str, s: &str) -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.into());
    }
    let expected = || format!("{flag} {s:?}: expected RFC 3339 or a duration like 30m, 2h, 7d");
    let Some(unit) = s.chars().last() else { bail!(expected()) };
    // Unsigned: `-2h` would be two hours ahead, and a `--since` in the future lists nothing.
    let n: u64 = s[..s.len() - unit.len_utf8()].parse().with_context(expected)?;
    let n = i64::try_from(n).with_context(|| format!("{flag} {s:?}: too far back"))?;
    let per = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86400,
        _ => bail!("{flag} {s:?}: unit must be s, m, h or d"),
    };
    n.checked_mul(per)
        .and_then(chrono::TimeDelta::try_seconds)
        .and_then(|back| chrono::Utc::now().checked_sub_signed(back))
        .with_context(|| format!("{flag} {s:?}: too far back"))
}

pub(super) fn print(json_out: bool, v: &Value, human: impl FnOnce(&Value)) {
    if json_out {
        println!("{v}");
    } else {
        human(v);
    }
}

pub(super) fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// Under a `--bot` listing: the bot's usage of each type with admission (running against its
/// limit, waiting, weight and share), from the rows' `bot_usage`.
fn print_bot_usage(v: &Value) {
    let mut seen = std::collections::BTreeSet::new();
    for j in v.as_array().into_iter().flatten() {
        let u = &j["bot_usage"];
        if u.is_object() && seen.insert(s(&j["job_type"])) {
            let limit = u["limit"].as_u64().map_or("no limit".to_string(), |l| format!("limit {l}"));
            println!(
                "bot {} on {}: {} running ({limit}), {} waiting, weight {}, share {:.0}%",
                s(&j["bot"]),
                s(&j["job_type"]),
                s(&u["running"]),
                s(&u["waiting"]),
                s(&u["weight"]),
                u["share"].as_f64().unwrap_or(0.0) * 100.0
            );
        }
    }
}

pub async fn jobs(t: Target, url: &str, topology: Topology, cmd: JobsCmd) -> anyhow::Result<ExitCode> {
    let conn = open(&t, url, topology).await?;
    match cmd {
        JobsCmd::List { status, job_type, bot, trigger, since, until, search, before, limit } => {
            let since = since.as_deref().map(|x| parse_since("--since", x)).transpose()?;
            let until = until.as_deref().map(|x| parse_since("--until", x)).transpose()?;
            let filter = JobFilter { status, job_type, bot, trigger, since, until, id_prefix: search, before, limit };
            let (v, next) = list_page(&conn, &filter).await?;
            if let Some(c) = next {
                eprintln!("next page: --before {c}");
            }
            print(t.json, &v, |v| {
                println!(
                    "{:<36}  {:<10}  {:<13}  {:<16}  {:<6}  {:>3}  {:>5}  CREATED",
                    "JOB_ID", "STATUS", "TYPE", "BOT", "PRIO", "ATT", "POS"
                );
                for j in v.as_array().into_iter().flatten() {
                    println!(
                        "{:<36}  {:<10}  {:<13}  {:<16}  {:<6}  {:>3}  {:>5}  {}",
                        s(&j["job_id"]),
                        s(&j["status"]),
                        s(&j["job_type"]),
                        s(&j["bot"]),
                        s(&j["priority"]),
                        s(&j["attempts"]),
                        s(&j["queue_position"]),
                        s(&j["created_at"])
                    );
                }
                print_bot_usage(v);
            });
        }
        JobsCmd::Show { id } => {
            let v = match &conn {
                Conn::Direct(ops) => serde_json::to_value(ops.show(&id).await?)?,
                Conn::Remote { .. } => conn.get(&format!("/jobs/{}", seg(&id))).await?,
            };
            print(t.json, &v, show_human);
        }
        JobsCmd::Logs { id, attempt, follow } => return logs(&conn, url, &id, attempt, follow).await,
        JobsCmd::Cancel { id, reason } => {
            let v = match &conn {
                Conn::Direct(ops) => serde_json::to_value(ops.cancel(&id, &who(), &reason).await?)?,
                Conn::Remote { .. } => conn.post(&format!("/jobs/{}/cancel", seg(&id)), json!({"reason": reason})).await?,
            };
            print(t.json, &v, |_| println!("cancel requested for {id}"));
        }
        JobsCmd::Retry { id } => {
            let v = match &conn {
                Conn::Direct(ops) => {
                    let done = ops.retry(&id, &who(), TriggerKind::Manual).await?;
                    let (spec, status) = (done.spec, done.known.unwrap_or(trainyard_common::JobStatus::Queued));
                    json!({"job_id": spec.job_id, "retry_of": id, "job_type": spec.job_type, "bot": spec.bot, "status": status})
                }
                Conn::Remote { .. } => conn.post(&format!("/jobs/{}/retry", seg(&id)), json!({})).await?,
            };
            print(t.json, &v, |v| println!("{}", s(&v["job_id"])));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn show_human(v: &Value) {
    println!("job       {}  ({} for bot {})", s(&v["job_id"]), s(&v["job_type"]), s(&v["bot"]));
    println!("status    {}  attempts {}  run {}", s(&v["status"]), s(&v["attempts"]), s(&v["run"]));
    println!("trigger   {} {}", s(&v["trigger"]["kind"]), s(&v["trigger"]["source"]));
    println!("created   {}  started {}  finished {}", s(&v["created_at"]), s(&v["started_at"]), s(&v["finished_at"]));
    if !v["worker"].is_null() {
        let attrs = v["worker"]["attributes"]
            .as_object()
            .map(|a| a.iter().map(|(k, val)| format!("{k}={}", val.as_str().unwrap_or_default())).collect::<Vec<_>>().join(" "));
        println!("worker    {} {}", s(&v["worker"]["id"]), attrs.unwrap_or_default());
    }
    if !v["progress"].is_null() {
        println!("progress  {}", v["progress"]);
    }
    if !v["error"].is_null() {
        println!("error     {}: {}", s(&v["error"]["kind"]), s(&v["error"]["message"]));
    }
    if let Some(d) = v["result"]["device"].as_str() {
        println!("device    {d}  model {}", v["result"]["model_kind"].as_str().unwrap_or("bag"));
    }
    if let Some(m) = v["metrics"].as_object() {
        println!("metrics   accuracy {}  macro_f1 {}", s(&m["accuracy"].clone()), s(&m["macro_f1"].clone()));
    }
    if let Some(p) = v["result"].get("promotion") {
        println!("promotion {}", p);
    }
    println!("events:");
    for e in v["events"].as_array().into_iter().flatten() {
        let worker = e["worker"]["id"].as_str().map(|w| format!(" on {w}")).unwrap_or_default();
        println!("  {}  {:<9} attempt {}{worker}", s(&e["at"]), s(&e["status"]), s(&e["attempt"]));
    }
}

async fn logs(conn: &Conn, url: &str, id: &str, attempt: Option<u32>, follow: bool) -> anyhow::Result<ExitCode> {
    use super::follow::{api::Api, direct::Direct};
    match (conn, follow) {
        (Conn::Direct(ops), false) => print!("{}", ops.logs(id, attempt).await?),
        (Conn::Remote { .. }, false) => {
            let q = attempt.map(|a| format!("?attempt={a}")).unwrap_or_default();
            print!("{}", conn.call(reqwest::Method::GET, &format!("/jobs/{}/logs{q}", seg(id)), None).await?.text().await?);
        }
        // Live: the running attempt's lines as the worker logs them, then the rest of its saved log.
        (Conn::Direct(ops), true) => Direct { ops, url, job_id: id }.follow(attempt).await?,
        (Conn::Remote { base, token, http }, true) => Api { http, base, token, job_id: id }.follow(attempt).await?,
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_rfc3339_or_a_duration_and_refuses_the_rest_without_panicking() {
        let t = parse_since("--since", "2026-12-01T10:00:00Z").unwrap();
        assert_eq!(t.to_rfc3339(), "2026-12-01T10:00:00+00:00");
        let back = chrono::Utc::now() - parse_since("--since", "2h").unwrap();
        assert!((7190..=7210).contains(&back.num_seconds()), "{back}");
        for (bad, says) in [
            ("2µ", "unit must be"),
            ("", "expected RFC 3339"),
            ("h", "expected RFC 3339"),
            ("5w", "unit must be"),
            ("10000000000000s", "too far back"),
            ("9999999999999999s", "too far back"),
            ("999999999999999d", "too far back"),
            ("18446744073709551615s", "too far back"),
            ("-2h", "expected RFC 3339"),
        ] {
            let e = parse_since("--since", bad).unwrap_err().to_string();
            assert!(e.contains("--since") && e.contains(says), "{bad:?}: {e}");
        }
    }

    #[test]
    fn a_path_segment_cannot_change_the_route_or_add_a_parameter() {
        assert_eq!(seg("0b9f-1"), "0b9f-1");
        assert_eq!(seg("abc#x"), "abc%23x");
        assert_eq!(seg("a?b/c"), "a%3Fb%2Fc");
        assert_eq!(seg("x&bot=y"), "x%26bot%3Dy");
    }
}
