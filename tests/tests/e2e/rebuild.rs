//! `store rebuild` reproduces the store exactly, and runs are filed by the number the
//! events carry, never by comparing clocks.
//!
//! A control plane (`trainyard serve`, with a schedule and a trigger rule) and a worker run
//! as processes and make a history: retries, a dead letter replayed to success, a cancel,
//! a scheduled fire, an event trigger, a trained model promoted by hand. The store is then
//! rebuilt from the events stream into a fresh database, and `jobs list --json` and
//! `jobs show --json` of every job and the audit trail must read the same from both, on
//! SQLite and PostgreSQL.

use std::{path::Path, process::Command, time::Duration};

use chrono::{Timelike, Utc};
use serde_json::{json, Value};
use trainyard_common::JobStatus;

use crate::{
    series::{free_port, http, until, TOKEN},
    support::{bin, Env, Killed, PgSchema, URL},
};

/// Runs the `trainyard` CLI on `database` (direct access); its stdout as JSON.
async fn cli_json(env: &Env, database: &str, args: &[&str]) -> Value {
    let mut cmd = Command::new(bin("trainyard"));
    cmd.args(args)
        .env("TRAINYARD_PREFIX", env.topo.prefix())
        .env("TRAINYARD_AMQP_URL", URL)
        .env("TRAINYARD_DATABASE_URL", database)
        .env("TRAINYARD_ARTIFACTS", env.artifacts_dir.path())
        .env_remove("TRAINYARD_SERVER");
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap()).await.unwrap();
    assert!(out.status.success(), "trainyard {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("trainyard {args:?} printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// `POST` through the API; the reply's JSON.
async fn post(api: u16, path: &str, body: Value) -> Value {
    let (status, reply) = http(api, "POST", path, Some(&body)).await.expect("the API answers");
    assert!((200..300).contains(&status), "POST {path}: {status} {reply}");
    serde_json::from_str(&reply).unwrap()
}

async fn submit(api: u16, job_type: &str, bot: &str, params: Value) -> String {
    post(api, "/v1/jobs", json!({"job_type": job_type, "bot": bot, "params": params})).await["job_id"].as_str().unwrap().to_string()
}

/// Polls `f` every 250 ms until it gives `Some`; panics after 3 minutes.
async fn poll<T, F: std::future::Future<Output = Option<T>>>(what: &str, mut f: impl FnMut() -> F) -> T {
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `GET` through the API, as JSON.
async fn get(api: u16, path: &str) -> Option<Value> {
    let (200, body) = http(api, "GET", path, None).await? else { return None };
    serde_json::from_str(&body).ok()
}

/// The job as the API shows it, once `check` holds for its row.
async fn wait_job(api: u16, id: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let path = format!("/v1/jobs/{id}");
    poll(&format!("job {id} {what}"), || async { get(api, &path).await.filter(|v| check(v)) }).await
}

fn status_is(status: &'static str) -> impl Fn(&Value) -> bool {
    move |job| job["status"] == status
}

/// A cron expression (seconds first) that fires once, `ahead` from now.
fn once_in(ahead: Duration) -> String {
    let t = Utc::now() + ahead;
    format!("{} {} {} * * *", t.second(), t.minute(), t.hour())
}

fn config(dir: &Path) -> std::path::PathBuf {
    let file = dir.join("control.toml");
    let text = format!(
        r#"job_types = ["noop", "intent-train"]

[[schedule]]
name = "rebuild-once"
cron = "{}"
job_type = "noop"
bot = "scheduled-bot"

[[trigger]]
name = "dataset-updated"
routing_key = "bot.dataset_updated"
job_type = "noop"
bot = "{{{{bot}}}}"
debounce_s = 1
"#,
        once_in(Duration::from_secs(8))
    );
    std::fs::write(&file, text).unwrap();
    file
}

/// Makes the history through a control plane on `live`, rebuilds into `fresh`, compares.
async fn history_then_rebuild(live: &str, fresh: &str) {
    let env = Env::new(&["noop", "intent-train"]).await;
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    std::fs::write(dirs.0.path().join("tiny.csv"), crate::intent::tiny_csv()).unwrap();
    let api = free_port();
    let common = |c: &mut Command| env.quiet_process(c, dirs.0.path());
    let mut serve = Command::new(bin("trainyard"));
    serve.args(["serve", "--listen", &format!("127.0.0.1:{api}"), "--types", "noop,intent-train"]);
    serve.arg("--config").arg(config(dirs.1.path()));
    serve.env("TRAINYARD_DATABASE_URL", live).env("TRAINYARD_API_TOKENS", format!("tests:admin:{TOKEN}"));
    common(&mut serve);
    let mut worker = Command::new(bin("trainyard-worker"));
    worker.args(["run", "--types", "noop,intent-train", "--concurrency", "2"]).env("TRAINYARD_RETRY_BASE_MS", "200");
    common(&mut worker);
    let serve = Killed(serve.spawn().expect("start trainyard serve"));
    let worker = Killed(worker.spawn().expect("start trainyard-worker"));
    until("control plane /readyz", || async { http(api, "GET", "/readyz", None).await.is_some_and(|(s, _)| s == 200) }).await;

    // Retries, then success.
    let retried = submit(api, "noop", "retry-bot", json!({"fail": "transient", "fail_until": 2})).await;
    // Dead in run 0; replayed once the fault is gone (run 1), then succeeds.
    let dead = submit(api, "noop", "dead-bot", json!({"fail": "permanent", "fail_until_run": 1})).await;
    // Cancelled while it runs.
    let long = submit(api, "noop", "cancel-bot", json!({"sleep_ms": 120_000})).await;
    // A trained model, promoted by hand.
    let model = submit(api, "intent-train", "model-bot", json!({"dataset": "tiny.csv", "epochs": 2, "seed": 3})).await;
    // An event trigger.
    let trigger = br#"{"bot": "trigger-bot"}"#;
    trainyard_common::amqp::publish_confirmed(
        &env.ch,
        &env.topo.triggers_exchange(),
        "bot.dataset_updated",
        trigger,
        Default::default(),
        false,
    )
    .await
    .unwrap();

    wait_job(api, &dead, "to be dead", status_is("dead")).await;
    wait_job(api, &long, "to start", status_is("started")).await;
    post(api, &format!("/v1/jobs/{long}/cancel"), json!({"reason": "rebuild test"})).await;
    let replayed = post(api, "/v1/dlq/replay", json!({"job_id": dead})).await;
    assert_eq!(replayed["replayed"], json!([dead]), "{replayed}");
    let shown = wait_job(api, &dead, "to succeed in its second run", |j| j["status"] == "succeeded" && j["run"] == 1).await;
    let runs: Vec<(u64, &str)> =
        shown["events"].as_array().unwrap().iter().map(|e| (e["run"].as_u64().unwrap_or(0), e["status"].as_str().unwrap())).collect();
    assert!(runs.contains(&(0, "dead")) && runs.contains(&(1, "queued")) && runs.contains(&(1, "succeeded")), "{runs:?}");
    wait_job(api, &model, "to succeed", status_is("succeeded")).await;
    post(api, &format!("/v1/models/promote/{model}"), json!({})).await;
    wait_job(api, &retried, "to succeed", |j| j["status"] == "succeeded" && j["attempts"] == 2).await;
    wait_job(api, &long, "to be cancelled", status_is("cancelled")).await;

    // Every job finished, the scheduled and the triggered one included.
    poll("the scheduled and triggered jobs to finish", || async {
        let jobs = get(api, "/v1/jobs?limit=100").await?.as_array().cloned()?;
        let kinds: Vec<&str> = jobs.iter().filter_map(|j| j["trigger"]["kind"].as_str()).collect();
        let done =
            kinds.contains(&"schedule") && kinds.contains(&"event") && jobs.len() == 6 && jobs.iter().all(|j| is_final(&j["status"]));
        done.then_some(())
    })
    .await;
    drop(worker);
    drop(serve);

    let report = cli_json(&env, fresh, &["store", "rebuild", "--json", "--idle", "2"]).await;
    assert_eq!(report["skipped"], 0, "{report}");
    let list = ["jobs", "list", "--json", "--limit", "100"];
    let (a, b) = (cli_json(&env, live, &list).await, cli_json(&env, fresh, &list).await);
    assert_eq!(a.as_array().unwrap().len(), 6, "{a}");
    assert_eq!(a, b, "jobs list --json differs after a rebuild");
    // The audit trail too: every action through the API, by the token's name.
    let trail = ["audit", "--json", "--limit", "100"];
    let (audit, rebuilt) = (cli_json(&env, live, &trail).await, cli_json(&env, fresh, &trail).await);
    assert_eq!(audit, rebuilt, "the audit trail differs after a rebuild");
    let done: Vec<(&str, &str, &str)> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["actor"].as_str().unwrap(), r["action"].as_str().unwrap(), r["target"].as_str().unwrap()))
        .collect();
    for want in
        [("tests", "submit", dead.as_str()), ("tests", "cancel", &long), ("tests", "replay", &dead), ("tests", "promote", "model-bot")]
    {
        assert!(done.contains(&want), "{want:?} not in the audit trail {done:?}");
    }
    for row in a.as_array().unwrap() {
        let id = row["job_id"].as_str().unwrap();
        let show = ["jobs", "show", "--json", id];
        let (a, b) = (cli_json(&env, live, &show).await, cli_json(&env, fresh, &show).await);
        assert_eq!(a, b, "jobs show --json {id} differs after a rebuild");
    }
    env.cleanup().await;
}

fn is_final(status: &Value) -> bool {
    status.as_str().and_then(|s| s.parse::<JobStatus>().ok()).is_some_and(JobStatus::is_terminal)
}

#[tokio::test]
async fn store_rebuild_reproduces_a_history_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let (live, fresh) = (format!("sqlite://{}/live.db", dir.path().display()), format!("sqlite://{}/fresh.db", dir.path().display()));
    history_then_rebuild(&live, &fresh).await;
}

#[tokio::test]
async fn store_rebuild_reproduces_a_history_on_postgres() {
    let (live, fresh) = (PgSchema::new().await, PgSchema::new().await);
    history_then_rebuild(&live.url, &fresh.url).await;
    live.drop().await;
    fresh.drop().await;
}
