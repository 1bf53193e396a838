//! Worker and CLI processes: SIGKILL and SIGTERM mid-job, `submit --wait --json`,
//! an unroutable submit's exit code.

use std::{process::Command, time::Duration};

use serde_json::json;
use trainyard_common::JobStatus;

use crate::support::{bin, collect_until_terminal, wait_for, Env, URL};

const T: Duration = Duration::from_secs(60);

fn signal(child: &std::process::Child, sig: &str) {
    let ok = Command::new("kill").args([sig, &child.id().to_string()]).status().unwrap().success();
    assert!(ok, "kill {sig} failed");
}

/// Runs the `trainyard` CLI against this environment's topology.
async fn cli(env: &Env, args: &[&str]) -> std::process::Output {
    let prefix = env.topo.prefix().to_string();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        Command::new(bin("trainyard")).args(&args).env("TRAINYARD_PREFIX", prefix).env("TRAINYARD_AMQP_URL", URL).output().unwrap()
    })
    .await
    .unwrap()
}

/// A worker killed with SIGKILL mid-job loses nothing: the broker redelivers
/// the job and a second worker completes it.
#[tokio::test]
async fn sigkill_mid_job_is_redelivered_and_completed_by_another_worker() {
    let env = Env::new(&["noop"]).await;
    let mut first = env.worker_process("noop", &[]);
    let spec = env.spec("noop", json!({"sleep_ms": 3000}));
    let sub = env.submitter();
    let mut watch = sub.watch(&spec).await.unwrap();
    sub.submit(&spec).await.unwrap();
    let started = wait_for(&mut watch, JobStatus::Started, T).await;
    let first_worker = started.last().unwrap().worker.clone().unwrap().id;
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();
    let mut second = env.worker_process("noop", &[]);
    let events = collect_until_terminal(&mut watch, T).await;
    let done = events.last().unwrap();
    assert_eq!(done.status, JobStatus::Succeeded);
    assert_ne!(done.worker.as_ref().unwrap().id, first_worker, "completed by the second worker");
    assert_eq!(done.attempt, 1, "a crash is not a failed attempt");
    let restarted = events.iter().find(|e| e.status == JobStatus::Started).unwrap();
    assert_eq!(restarted.progress.as_ref().unwrap()["redelivery"], 1);
    signal(&second, "-TERM");
    assert!(second.wait().unwrap().success(), "SIGTERM exits 0");
    env.cleanup().await;
}

/// SIGTERM mid-job: the worker stops consuming, the job outlives the grace
/// period, is requeued (not lost, not failed) and the worker exits 0. Its `/metrics` answers
/// through the grace period (the drain is what a last scrape should see).
#[tokio::test]
async fn sigterm_mid_job_requeues_it_and_exits_zero() {
    let env = Env::new(&["noop"]).await;
    let port = crate::series::free_port();
    let mut first = env.worker_process("noop", &["--grace-period", "3", "--metrics-addr", &format!("127.0.0.1:{port}")]);
    let spec = env.spec("noop", json!({"sleep_ms": 8000}));
    let sub = env.submitter();
    let mut watch = sub.watch(&spec).await.unwrap();
    sub.submit(&spec).await.unwrap();
    wait_for(&mut watch, JobStatus::Started, T).await;
    signal(&first, "-TERM");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let draining = crate::series::http(port, "GET", "/metrics", None).await;
    let running = "trainyard_jobs_running{job_type=\"noop\"} 1";
    assert!(draining.as_ref().is_some_and(|(s, b)| *s == 200 && b.contains(running)), "/metrics in the grace period: {draining:?}");
    let status = tokio::task::spawn_blocking(move || first.wait().unwrap()).await.unwrap();
    assert!(status.success(), "worker exit status {status:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(env.ready(&env.topo.jobs_queue("noop")).await, 1, "the job is back in its queue");
    let mut second = env.worker_process("noop", &[]);
    let events = collect_until_terminal(&mut watch, T).await;
    let done = events.last().unwrap();
    assert_eq!(done.status, JobStatus::Succeeded);
    assert_eq!(done.attempt, 1);
    assert!(!events.iter().any(|e| matches!(e.status, JobStatus::Retrying | JobStatus::Failed)));
    signal(&second, "-TERM");
    assert!(second.wait().unwrap().success());
    env.cleanup().await;
}

/// `trainyard submit noop --bot x --wait --json` prints the final status as JSON.
#[tokio::test]
async fn cli_submit_wait_json_reports_success() {
    let env = Env::new(&["noop"]).await;
    let mut worker = env.worker_process("noop", &[]);
    let out = cli(&env, &["submit", "noop", "--bot", "x", "--param", "sleep_ms=20", "--wait", "--json", "--wait-timeout", "60"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "exit {:?}: {stdout} {}", out.status, String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["status"], "succeeded");
    assert_eq!(v["attempts"], 1);
    assert!(uuid::Uuid::parse_str(v["job_id"].as_str().unwrap()).is_ok());
    signal(&worker, "-TERM");
    worker.wait().unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn cli_submit_of_an_unknown_job_type_fails_clearly() {
    let env = Env::new(&[]).await;
    let out = cli(&env, &["submit", "no-such-type", "--bot", "x"]).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no queue is bound") && stderr.contains("no-such-type"), "{stderr}");
    assert!(out.stdout.is_empty(), "no job id printed for a job that was not queued");
    env.cleanup().await;
}

/// A worker process saves an attempt's log only when it holds more than the
/// runtime's routine lines: a plain noop success saves none, a failed attempt
/// (its warning) saves one.
#[tokio::test]
async fn attempt_logs_are_saved_only_when_they_say_more_than_the_events() {
    let env = Env::new(&["noop"]).await;
    let mut worker = env.worker_process("noop", &[]);
    let plain = env.spec("noop", json!({"sleep_ms": 5}));
    assert_eq!(env.run_job(&plain, T).await.last().unwrap().status, JobStatus::Succeeded);
    let mut flaky = env.spec("noop", json!({"fail": "transient", "fail_until": 2}));
    flaky.max_attempts = 2;
    assert_eq!(env.run_job(&flaky, T).await.last().unwrap().status, JobStatus::Succeeded);
    let log = trainyard_common::artifacts::keys::attempt_log;
    assert!(env.artifacts.exists(&trainyard_common::artifacts::keys::outcome(&plain.job_id)).await.unwrap());
    assert!(!env.artifacts.exists(&log(&plain.job_id, 1)).await.unwrap(), "a routine success saves no attempt log");
    let failed = env.artifacts.get(&log(&flaky.job_id, 1)).await.unwrap().expect("the failed attempt's log is saved");
    assert!(String::from_utf8_lossy(&failed).contains("retry scheduled"), "{}", String::from_utf8_lossy(&failed));
    signal(&worker, "-TERM");
    worker.wait().unwrap();
    env.cleanup().await;
}

/// A worker whose default device its build cannot use (`--device cuda` on a CPU-only build)
/// would fail every training job that names no device: it refuses to start, saying why. So
/// does a log format it does not know (it meant JSON before), and a consumer timeout of 0 (every
/// job would be refused as too long).
#[test]
fn a_worker_refuses_a_default_device_or_log_format_it_cannot_use() {
    for (args, says) in [
        (&["--device", "cuda"][..], "cuda"),
        (&["--log-format", "txt"][..], "txt"),
        (&["--consumer-timeout-s", "0"][..], "consumer-timeout-s"),
        (&["--heartbeat-s", "0"][..], "--heartbeat-s"),
        (&["--heartbeat-s", "11"][..], "--heartbeat-s"),
        (&["--concurrency", "0"][..], "--concurrency"),
    ] {
        // The workspace's test build is CPU-only; a worker that starts anyway is stopped, and fails the test.
        let mut child = Command::new(bin("trainyard-worker"))
            .args(["run", "--types", "noop", "--amqp-url", URL, "--prefix", "t-never-started"])
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}
