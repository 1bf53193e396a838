//! The series a control plane and a worker really export, as the dashboard, the alert
//! rules and the autoscalers see them.
//!
//! Runs `trainyard serve` (with a schedule and a trigger rule) and `trainyard-worker run` as
//! processes, submits a noop and an intent-train job through the HTTP API, publishes one poison
//! message and one trigger event, lets the schedule fire, then scrapes
//! both `/metrics` and lists every series (name and label names) in
//! `k8s/components/monitoring/series.txt`. `scripts/validate-k8s.sh` checks every query of
//! `k8s/` against that file offline. This test fails when the file is out of date; to
//! rewrite it: `TRAINYARD_UPDATE_SERIES=1 cargo nextest run -p trainyard-tests series::`.

use std::{
    collections::BTreeSet,
    ffi::OsStr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use lapin::BasicProperties;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{bin, Env, Killed};

pub(crate) const TOKEN: &str = "series-test-token";
const WITHIN: Duration = Duration::from_secs(180);

/// The committed list of series.
fn series_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../k8s/components/monitoring/series.txt")
}

/// A free port on localhost (bound, read, released).
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One HTTP/1.1 request with `Connection: close`: (status, body).
pub(crate) async fn http(port: u16, method: &str, path: &str, body: Option<&Value>) -> Option<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{payload}",
        payload.len()
    );
    s.write_all(req.as_bytes()).await.ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.ok()?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_string() };
    Some((status, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// `/metrics` of the process on `port`.
async fn scrape(port: u16) -> String {
    http(port, "GET", "/metrics", None).await.map(|(_, b)| b).unwrap_or_default()
}

/// Polls `check` every 250 ms until it holds or [`WITHIN`] passes.
pub(crate) async fn until<F: std::future::Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < WITHIN, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `component metric label,label` for every sample line of a Prometheus text exposition.
fn series(component: &str, text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let (name, labels) = match line.split_once('{') {
            Some((name, rest)) => {
                let inner = &rest[..rest.rfind('}').unwrap()];
                let mut names: Vec<&str> = inner.split(',').filter_map(|kv| kv.split_once('=').map(|(k, _)| k.trim())).collect();
                names.sort_unstable();
                (name, names.join(","))
            }
            None => (line.split_whitespace().next().unwrap(), "-".to_string()),
        };
        out.insert(format!("{component} {name} {labels}"));
    }
    out
}

/// A quiet `trainyard serve` of `env` (see [`Env::quiet_process`]) listening on `port`, on the
/// store `db`, with the admin token [`TOKEN`] and `args` after `serve --listen …`.
pub(crate) fn spawn_serve(env: &Env, db: &str, data: &Path, port: u16, args: &[&OsStr]) -> Killed {
    let mut c = Command::new(bin("trainyard"));
    c.args(["serve", "--listen", &format!("127.0.0.1:{port}")]).args(args);
    env.quiet_process(&mut c, data);
    c.env("TRAINYARD_DATABASE_URL", db).env("TRAINYARD_API_TOKENS", format!("tests:admin:{TOKEN}"));
    Killed(c.spawn().expect("start trainyard serve"))
}

#[tokio::test]
async fn exported_series_match_the_committed_list() {
    let env = Env::new(&["noop", "intent-train"]).await;
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    std::fs::write(dirs.0.path().join("tiny.csv"), crate::intent::tiny_csv()).unwrap();
    let (api, metrics) = (free_port(), free_port());
    let common = |c: &mut Command| env.quiet_process(c, dirs.0.path());
    // A schedule and a trigger rule: their counters have a series once each has fired.
    let config = dirs.0.path().join("control.toml");
    let toml = "[[schedule]]\nname = 'series-every-second'\ncron = '* * * * * *'\njob_type = 'noop'\nbot = 'series-sched'\n\n\
                [[trigger]]\nname = 'series-rule'\nrouting_key = 'series.fired'\njob_type = 'noop'\nbot = '{{bot}}'\ndebounce_s = 0\n";
    std::fs::write(&config, toml).unwrap();
    let mut serve = Command::new(bin("trainyard"));
    serve.args(["serve", "--listen", &format!("127.0.0.1:{api}"), "--types", "noop,intent-train"]).arg("--config").arg(&config);
    serve.env("TRAINYARD_DATABASE_URL", format!("sqlite://{}/store.db", dirs.1.path().display()));
    serve.env("TRAINYARD_API_TOKENS", format!("tests:admin:{TOKEN}"));
    common(&mut serve);
    let mut worker = Command::new(bin("trainyard-worker"));
    worker.args(["run", "--types", "noop,intent-train", "--metrics-addr", &format!("127.0.0.1:{metrics}"), "--log-format", "text"]);
    common(&mut worker);
    let _serve = Killed(serve.spawn().expect("start trainyard serve"));
    let _worker = Killed(worker.spawn().expect("start trainyard-worker"));
    for (port, who) in [(api, "control plane"), (metrics, "worker")] {
        until(&format!("{who} /readyz"), || async move { http(port, "GET", "/readyz", None).await.is_some_and(|(s, _)| s == 200) }).await;
    }

    let mut ids = Vec::new();
    for (job_type, params) in [("noop", json!({})), ("intent-train", json!({"dataset": "tiny.csv", "epochs": 2, "seed": 3}))] {
        let body = json!({"job_type": job_type, "bot": "series-bot", "params": params});
        let (status, reply) = http(api, "POST", "/v1/jobs", Some(&body)).await.expect("submit");
        assert_eq!(status, 201, "{reply}");
        ids.push(serde_json::from_str::<Value>(&reply).unwrap()["job_id"].as_str().unwrap().to_string());
    }
    env.publish_raw("noop", b"not a job", BasicProperties::default().with_content_type("application/json".into())).await;
    for id in &ids {
        let path = format!("/v1/jobs/{id}");
        until(&format!("job {id} to succeed"), || {
            let path = path.clone();
            async move { http(api, "GET", &path, None).await.is_some_and(|(_, b)| b.contains("\"status\":\"succeeded\"")) }
        })
        .await;
    }
    // Series that appear with the first poison message, dead letter and store refresh.
    until(
        "the poison message in the worker's metrics",
        || async move { scrape(metrics).await.contains("trainyard_poison_messages_total{") },
    )
    .await;
    until("dead letters and jobs by status in the control plane's metrics", || async move {
        let m = scrape(api).await;
        m.contains("trainyard_dead_letters_total{")
            && m.contains("trainyard_jobs_by_status{")
            && m.contains("trainyard_jobs_finished_total{")
            && m.contains("trainyard_schedule_fires_total{")
    })
    .await;
    // The trigger queue is bound once the listener is up: publish until the rule has fired.
    let triggers = env.topo.triggers_exchange();
    until("a trigger event in the control plane's metrics", || {
        let (ch, triggers) = (env.ch.clone(), triggers.clone());
        async move {
            let props = BasicProperties::default().with_content_type("application/json".into());
            let body = br#"{"bot": "series-trigger"}"#;
            ch.basic_publish(triggers.as_str().into(), "series.fired".into(), Default::default(), body, props)
                .await
                .unwrap()
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
            scrape(api).await.contains("trainyard_trigger_events_total{")
        }
    })
    .await;

    // The training's gate decision reached the control plane's counter (a first model is promoted).
    let control = scrape(api).await;
    assert!(control.contains("trainyard_promotions_total{status=\"promoted\"} 1\n"), "{control}");
    let mut all = series("control-plane", &control);
    all.extend(series("worker", &scrape(metrics).await));
    let mut text = String::from(
        "# Every series `trainyard serve` (control-plane) and `trainyard-worker run` (worker) export after a noop\n\
         # job, an intent-train job, a poison message, a schedule fire and a trigger event: component, name, label\n\
         # names (- for none).\n\
         # Written by tests/tests/e2e/series.rs (TRAINYARD_UPDATE_SERIES=1 rewrites it; the test fails when it\n\
         # differs); read by scripts/validate_k8s_promql.py, which checks every query in k8s/ against it.\n",
    );
    for line in &all {
        text.push_str(line);
        text.push('\n');
    }
    let path = series_file();
    if std::env::var("TRAINYARD_UPDATE_SERIES").as_deref() == Ok("1") {
        std::fs::write(&path, &text).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    let (old, new): (BTreeSet<&str>, BTreeSet<&str>) = (committed.lines().collect(), text.lines().collect());
    assert!(
        old == new,
        "{} is out of date; rewrite it with TRAINYARD_UPDATE_SERIES=1.\n  only exported: {:?}\n  only in the file: {:?}",
        path.display(),
        new.difference(&old).collect::<Vec<_>>(),
        old.difference(&new).collect::<Vec<_>>()
    );
    drop((_serve, _worker));
    env.cleanup().await;
}
