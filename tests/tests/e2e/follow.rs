//! `trainyard jobs logs ID --follow`, through the API (`--server`) and on the job store: a
//! running attempt's lines are printed as the worker logs them, before the job ends, each once
//! and in order, and at the end the output is what `trainyard jobs logs ID` prints (the saved log);
//! while the job runs, `jobs logs ID` through the API shows the running attempt's lines too.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use serde_json::json;
use trainyard::store::Store;
use trainyard_common::JobStatus;

use crate::{
    browser::ControlPlane,
    support::{bin, collect_until_terminal, wait_for, Env, Killed, URL},
};

const T: Duration = Duration::from_secs(60);
/// The noop job sleeps 6 s, logging a line every 250 ms: 23 lines.
const SLEEP_MS: u64 = 6000;
const EVERY_MS: u64 = 250;
const LINES: u64 = SLEEP_MS / EVERY_MS - 1;

/// A `trainyard` command for `env`: through the API of `server`, or on the store `db_url`.
fn trainyard(env: &Env, db_url: &str, server: Option<&str>, args: &[&str]) -> Command {
    let mut c = Command::new(bin("trainyard"));
    c.args(args)
        .env("TRAINYARD_PREFIX", env.topo.prefix())
        .env("TRAINYARD_AMQP_URL", URL)
        .env("TRAINYARD_ARTIFACTS", env.artifacts_dir.path())
        .env("TRAINYARD_DATABASE_URL", db_url)
        .env("RUST_LOG", "warn");
    if let Some(s) = server {
        c.args(["--server", s, "--token", "read-tok"]);
    }
    c
}

/// Follows a logging job from its start with `jobs logs --follow` and checks what it printed.
async fn follow_prints_the_running_attempts_lines_before_the_job_ends(through_api: bool) {
    let env = Env::new(&["noop"]).await;
    let db = tempfile::tempdir().unwrap();
    let db_url = format!("sqlite://{}/cp.db", db.path().display());
    let cp = ControlPlane::start(&env, &db_url, "viewer:read:read-tok", None).await;
    let server = through_api.then(|| cp.url(""));
    let spec = env.spec("noop", json!({"sleep_ms": SLEEP_MS, "log_every_ms": EVERY_MS}));
    let id = spec.job_id.clone();
    let mut watch = env.watch(&spec).await;
    // Queued with no worker yet: the follow is listening before the first line is logged (lines
    // logged before it listens are "not received live"; on a loaded machine that happened).
    env.submitter().submit(&spec).await.unwrap();
    let store = Store::open(&db_url).await.unwrap();
    let t0 = Instant::now();
    while store.job(&id).await.unwrap().is_none() {
        assert!(t0.elapsed() < T, "the job was never recorded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Each line of the follow's stdout, with when it came.
    let mut follow = Killed(
        trainyard(&env, &db_url, server.as_deref(), &["jobs", "logs", &id, "--follow"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut worker = env.worker_process("noop", &[]);
    wait_for(&mut watch, JobStatus::Started, T).await;
    let (tx, rx) = mpsc::channel();
    let stdout = follow.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let _ = tx.send((Instant::now(), line.unwrap()));
        }
    });
    let sleeping = |l: &str| l.contains("noop still sleeping");
    let mut lines = Vec::new();
    while lines.iter().filter(|(_, l): &&(Instant, String)| sleeping(l)).count() < 3 {
        lines.push(rx.recv_timeout(T).expect("no line from jobs logs --follow"));
    }
    if let Some(server) = &server {
        // While the job runs, `GET /v1/jobs/{id}/logs` has its live lines too.
        let now = trainyard(&env, &db_url, Some(server), &["jobs", "logs", &id]).output().unwrap();
        let now = String::from_utf8_lossy(&now.stdout);
        assert!(now.starts_with("==> attempt 1 (running: its lines so far) <==\n") && now.contains(" line=3 "), "{now}");
    }
    let events = collect_until_terminal(&mut watch, T).await;
    let ended = Instant::now();
    assert_eq!(events.last().unwrap().status, JobStatus::Succeeded);
    let mut stderr = follow.stderr.take().unwrap();
    let (status, stderr) = tokio::task::spawn_blocking(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut text).unwrap();
        (follow.wait().unwrap(), text)
    })
    .await
    .unwrap();
    assert!(status.success(), "jobs logs --follow: {status:?}: {stderr}");
    lines.extend(rx.iter());

    // Live: most of the lines were printed while the job ran.
    let early = lines.iter().filter(|(at, l)| *at < ended && sleeping(l)).count();
    assert!(early as u64 >= LINES / 2, "{early} of {LINES} lines printed before the job ended: {lines:?}");
    // Every line once, in order.
    let numbers: Vec<u64> = lines
        .iter()
        .filter(|(_, l)| sleeping(l))
        .map(|(_, l)| l.split(" line=").nth(1).and_then(|n| n.split(' ').next()).unwrap().parse().unwrap())
        .collect();
    assert_eq!(numbers, (1..=LINES).collect::<Vec<_>>());
    // The same as the saved log, as `jobs logs` prints it.
    let saved = trainyard(&env, &db_url, server.as_deref(), &["jobs", "logs", &id]).output().unwrap();
    assert!(saved.status.success(), "{}", String::from_utf8_lossy(&saved.stderr));
    let printed: String = lines.iter().map(|(_, l)| format!("{l}\n")).collect();
    assert_eq!(printed, String::from_utf8(saved.stdout).unwrap());
    assert!(printed.starts_with("==> attempt 1 <==\n"), "{printed}");

    let _ = worker.kill();
    let _ = worker.wait();
    store.close().await;
    cp.stop().await;
    env.cleanup().await;
}

// Several threads: the test waits for the follow's lines by blocking, and the control plane
// it follows runs in this process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_logs_follow_through_the_api_prints_live_lines_before_the_job_ends() {
    follow_prints_the_running_attempts_lines_before_the_job_ends(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_logs_follow_on_the_store_prints_live_lines_before_the_job_ends() {
    follow_prints_the_running_attempts_lines_before_the_job_ends(false).await;
}
