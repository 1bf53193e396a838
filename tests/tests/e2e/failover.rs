//! Several broker addresses (`TRAINYARD_AMQP_URL` holding URLs separated by whitespace,
//! the nodes of a cluster): the worker and the CLI connect past a dead one. Each
//! connection starts at a random address, so the jobs below meet the dead one first
//! about half the time; the leader-kill chaos run (`scripts/chaos.sh --cluster`)
//! shows the failover of live sessions when a node stops.

use std::process::{Command, Stdio};

use crate::support::{bin, Env, Killed, CONSUMER_TIMEOUT_S, URL};

#[tokio::test]
async fn a_worker_and_the_cli_fail_over_past_a_dead_broker_address() {
    let env = Env::new(&["noop"]).await;
    let urls = format!("amqp://guest:guest@127.0.0.1:1/%2f\n{URL}");
    let mut worker = Killed(
        Command::new(bin("trainyard-worker"))
            .args(["run", "--types", "noop", "--log-format", "text"])
            .env("TRAINYARD_PREFIX", env.topo.prefix())
            .env("TRAINYARD_ARTIFACTS", env.artifacts_dir.path())
            .env("TRAINYARD_AMQP_URL", &urls)
            .env("TRAINYARD_CONSUMER_TIMEOUT_S", CONSUMER_TIMEOUT_S.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start trainyard-worker"),
    );
    for i in 0..4 {
        let (prefix, urls) = (env.topo.prefix().to_string(), urls.clone());
        let out = tokio::task::spawn_blocking(move || {
            Command::new(bin("trainyard"))
                .args(["submit", "noop", "--bot", "failover", "--param", "sleep_ms=10", "--wait", "--json", "--wait-timeout", "60"])
                .env("TRAINYARD_PREFIX", prefix)
                .env("TRAINYARD_AMQP_URL", urls)
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "job {i}: exit {:?}: {stdout} {}", out.status, String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(v["status"], "succeeded", "job {i}: {v}");
    }
    let _ = Command::new("kill").args(["-TERM", &worker.id().to_string()]).status();
    assert!(worker.wait().unwrap().success(), "the worker exits 0 on SIGTERM");
    env.cleanup().await;
}
