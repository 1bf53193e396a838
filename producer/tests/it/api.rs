//! The control plane end to end: API auth and limits, the demand gauge, the report page.

use std::{net::SocketAddr, time::Duration};

use lapin::options::{BasicAckOptions, BasicGetOptions, QueuePurgeOptions};
use tokio_util::sync::CancellationToken;
use trainyard::{
    api::Tokens,
    config::ControlConfig,
    serve::{serve, ServeSettings},
    submit::Submitter,
};
use trainyard_common::{artifacts::ArtifactStore, event::event_seq, topology::Topology, JobEvent, JobStatus, WorkerInfo};

use crate::helpers::*;

pub struct Server {
    pub addr: SocketAddr,
    pub topo: Topology,
    pub stop: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
    pub artifacts_dir: tempfile::TempDir,
    pub db_url: String,
    _db_dir: tempfile::TempDir,
}

pub async fn start(types: &[&str], tokens: &str, body_limit: usize, config: ControlConfig) -> Server {
    let topo = topology();
    let db_dir = tempfile::tempdir().unwrap();
    let artifacts_dir = tempfile::tempdir().unwrap();
    let db_url = format!("sqlite://{}/ty.db", db_dir.path().display());
    let settings = ServeSettings {
        amqp_url: AMQP_URL.into(),
        topology: topo.clone(),
        database_url: db_url.clone(),
        artifacts: artifacts_dir.path().display().to_string(),
        job_types: types.iter().map(|s| s.to_string()).collect(),
        tokens: Tokens::parse(tokens).unwrap(),
        config,
        body_limit,
        demand_interval: Duration::from_millis(200),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move { serve(settings, listener, stop).await.unwrap() }
    });
    let http = reqwest::Client::new();
    eventually(20, "readyz", || async { http.get(format!("http://{addr}/readyz")).send().await.ok().filter(|r| r.status() == 200) }).await;
    Server { addr, topo, stop, task, artifacts_dir, db_url, _db_dir: db_dir }
}

impl Server {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
    pub async fn stop(self, types: &[&str]) {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
        cleanup(&self.topo, types).await;
    }
}

#[tokio::test]
async fn api_needs_a_token_with_the_right_scope_and_limits_bodies() {
    let server = start(&["noop"], "reader:read:r-tok,ci:submit:s-tok,root-tok", 4096, ControlConfig::default()).await;
    let http = reqwest::Client::new();
    let body = serde_json::json!({"job_type": "noop", "bot": "bot-a", "params": {"sleep_ms": 1}});
    let post = |tok: Option<&str>| {
        let mut r = http.post(server.url("/v1/jobs")).json(&body);
        if let Some(t) = tok {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    assert_eq!(post(None).await.unwrap().status(), 401);
    let wrong = post(Some("r-tok-nope")).await.unwrap();
    assert_eq!(wrong.status(), 401);
    assert_eq!(wrong.headers()["www-authenticate"], "Bearer");
    assert_eq!(post(Some("r-tok")).await.unwrap().status(), 403);
    let ok = post(Some("s-tok")).await.unwrap();
    assert_eq!(ok.status(), 201);
    let job: serde_json::Value = ok.json().await.unwrap();
    let id = job["job_id"].as_str().unwrap().to_string();
    assert_eq!(post(Some("root-tok")).await.unwrap().status(), 201);
    // Reading needs read scope; the submission is recorded with its token name.
    assert_eq!(http.get(server.url("/v1/jobs")).send().await.unwrap().status(), 401);
    let shown = eventually(20, "the job recorded", || async {
        let r = http.get(server.url(&format!("/v1/jobs/{id}"))).bearer_auth("r-tok").send().await.ok()?;
        (r.status() == 200).then_some(())?;
        r.json::<serde_json::Value>().await.ok()
    })
    .await;
    assert_eq!(shown["trigger"], serde_json::json!({"kind": "api", "source": "ci"}));
    assert_eq!(shown["status"], "queued");
    assert_eq!(shown["attempts"], 0);
    assert!(shown["events"].is_array());
    let list: Vec<serde_json::Value> =
        http.get(server.url("/v1/jobs?type=noop&bot=bot-a")).bearer_auth("r-tok").send().await.unwrap().json().await.unwrap();
    assert!(!list.is_empty());
    // Admin routes need admin.
    let replay =
        http.post(server.url("/v1/dlq/replay")).bearer_auth("s-tok").json(&serde_json::json!({"job_id": id})).send().await.unwrap();
    assert_eq!(replay.status(), 403);
    assert_eq!(http.get(server.url("/v1/nope")).bearer_auth("r-tok").send().await.unwrap().status(), 404);
    // Unknown job type: 400, not a silent drop.
    let bad = http
        .post(server.url("/v1/jobs"))
        .bearer_auth("s-tok")
        .json(&serde_json::json!({"job_type": "nope", "bot": "b"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    // Body limit.
    let big = serde_json::json!({"job_type": "noop", "bot": "b", "params": {"blob": "x".repeat(10_000)}});
    assert_eq!(http.post(server.url("/v1/jobs")).bearer_auth("s-tok").json(&big).send().await.unwrap().status(), 413);
    // Open endpoints.
    for path in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        assert_eq!(http.get(server.url(path)).send().await.unwrap().status(), 200, "{path}");
    }
    let openapi: serde_json::Value = http.get(server.url("/openapi.json")).send().await.unwrap().json().await.unwrap();
    assert!(openapi["paths"]["/v1/jobs"]["post"].is_object());
    let metrics = http.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains(r#"trainyard_http_requests_total{code="201",route="/v1/jobs"} 2"#), "{metrics}");
    server.stop(&["noop"]).await;
}

fn gauge(metrics: &str, name: &str, job_type: &str) -> Option<i64> {
    let prefix = format!("{name}{{job_type=\"{job_type}\"}} ");
    metrics.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse::<f64>().ok()).map(|v| v as i64)
}

#[tokio::test]
async fn demand_is_ready_plus_running() {
    let server = start(&["noop", "intent-train"], "t", 64 * 1024, ControlConfig::default()).await;
    let http = reqwest::Client::new();
    let metrics = || async { http.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap() };
    // Every known type is exported from start-up, at 0.
    let m = metrics().await;
    assert_eq!(gauge(&m, "trainyard_jobs_demand", "noop"), Some(0));
    assert_eq!(gauge(&m, "trainyard_jobs_demand", "intent-train"), Some(0));

    let submitter = Submitter::new(AMQP_URL, server.topo.clone()).unwrap();
    let specs: Vec<_> = (0..6).map(|i| spec("noop", &format!("bot-{i}"))).collect();
    for s in &specs {
        submitter.submit(s).await.unwrap();
    }
    // A "worker" takes one job and reports it started: 5 ready + 1 running.
    let (_conn, ch) = channel().await;
    let taken = eventually(10, "a job", || async {
        ch.basic_get(server.topo.jobs_queue("noop").into(), BasicGetOptions::default()).await.unwrap()
    })
    .await;
    let taken_spec: trainyard_common::JobSpec = trainyard_common::codec::decode(Some("application/msgpack"), &taken.delivery.data).unwrap();
    let mut started = JobEvent::new(&taken_spec, JobStatus::Started, 1, event_seq(1, 0, 0));
    started.worker = Some(WorkerInfo { id: "w-1".into(), attributes: [("node".to_string(), "n1".to_string())].into() });
    publish_event(&ch, &server.topo, &started).await;
    eventually(20, "demand 6", || async { (gauge(&metrics().await, "trainyard_jobs_demand", "noop") == Some(6)).then_some(()) }).await;
    let m = metrics().await;
    assert_eq!(gauge(&m, "trainyard_queue_ready", "noop"), Some(5));
    assert_eq!(gauge(&m, "trainyard_jobs_running_recorded", "noop"), Some(1));
    assert_eq!(gauge(&m, "trainyard_jobs_demand", "intent-train"), Some(0));

    // They finish: the running one succeeds, the queue drains.
    taken.delivery.acker.ack(BasicAckOptions::default()).await.unwrap();
    publish_event(&ch, &server.topo, &JobEvent::new(&taken_spec, JobStatus::Succeeded, 1, event_seq(1, 0, 1))).await;
    ch.queue_purge(server.topo.jobs_queue("noop").into(), QueuePurgeOptions::default()).await.unwrap();
    eventually(20, "demand 0", || async { (gauge(&metrics().await, "trainyard_jobs_demand", "noop") == Some(0)).then_some(()) }).await;
    server.stop(&["noop", "intent-train"]).await;
}

/// Finds Debian's Chromium.
fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| std::process::Command::new(b).arg("--version").output().is_ok_and(|o| o.status.success()))
}

#[tokio::test]
async fn report_page_renders_the_confusion_matrix_in_chromium() {
    let browser = chromium().expect("headless Chromium is needed for this test: apt-get install -y chromium");
    let server = start(&["intent-train"], "viewer:read:view-tok", 64 * 1024, ControlConfig::default()).await;
    let artifacts = ArtifactStore::open(server.artifacts_dir.path().to_str().unwrap()).unwrap();
    // A finished training job, as a worker leaves it.
    let spec = spec("intent-train", "banking");
    let (_conn, ch) = channel().await;
    publish_event(&ch, &server.topo, &JobEvent::queued(&spec)).await;
    let mut started = JobEvent::new(&spec, JobStatus::Started, 1, event_seq(1, 0, 0));
    started.worker = Some(WorkerInfo { id: "gpu-worker-7".into(), attributes: [("gpu".to_string(), "nvidia-l4".to_string())].into() });
    publish_event(&ch, &server.topo, &started).await;
    let mut progress = JobEvent::new(&spec, JobStatus::Progress, 1, event_seq(1, 0, 1));
    progress.progress = Some(serde_json::json!({"epoch": 3, "epochs": 3, "loss": 0.41, "val_accuracy": 0.91, "examples_per_s": 12000}));
    publish_event(&ch, &server.topo, &progress).await;
    let mut done = JobEvent::new(&spec, JobStatus::Succeeded, 1, event_seq(1, 0, 2));
    done.result = Some(
        serde_json::json!({"accuracy": 0.9, "promotion": {"passed": true, "promoted": true, "mode": "auto", "reasons": ["first model of the bot"]}}),
    );
    publish_event(&ch, &server.topo, &done).await;
    let job = &spec.job_id;
    artifacts
        .put_json(
            &format!("jobs/{job}/metrics.json"),
            &serde_json::json!({"accuracy": 0.9, "macro_f1": 0.88, "test_examples": 20,
                "per_class": {"balance": {"precision": 1.0, "recall": 0.9, "f1": 0.947, "support": 10}, "transfer": {"precision": 0.8, "recall": 0.9, "f1": 0.85, "support": 8}, "oos": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}}}),
        )
        .await
        .unwrap();
    artifacts
        .put_json(
            &format!("jobs/{job}/confusion_matrix.json"),
            &serde_json::json!({"labels": ["balance", "oos", "transfer"], "matrix": [[9, 0, 1], [0, 2, 0], [1, 0, 7]]}),
        )
        .await
        .unwrap();
    let store = trainyard::store::Store::open(&server.db_url).await.unwrap();
    eventually(20, "the job succeeded in the store", || async {
        store.job(job).await.unwrap().filter(|j| j.status == JobStatus::Succeeded)
    })
    .await;

    let profile = tempfile::tempdir().unwrap();
    let shot = profile.path().join("report.png");
    let url = server.url(&format!("/jobs/{job}#token=view-tok"));
    let common = [
        "--headless".to_string(),
        "--no-sandbox".into(),
        "--disable-gpu".into(),
        "--disable-dev-shm-usage".into(),
        "--disable-background-networking".into(),
        "--disable-component-update".into(),
        "--disable-sync".into(),
        "--no-first-run".into(),
        format!("--user-data-dir={}", profile.path().join("p").display()),
        "--virtual-time-budget=5000".into(),
    ];
    let dom = tokio::process::Command::new(browser).args(&common).arg("--dump-dom").arg(&url).output().await.unwrap();
    let html = String::from_utf8_lossy(&dom.stdout);
    assert!(html.contains("data-loaded=\"succeeded\""), "page did not load the job: {}\n{}", html, String::from_utf8_lossy(&dom.stderr));
    // 9 matrix cells, each with its labels and count.
    assert_eq!(html.matches("class=\"cell\"").count(), 9, "{html}");
    assert!(html.contains(r#"data-row="balance" data-col="transfer" data-count="1""#), "{html}");
    assert!(html.contains(r#"data-row="transfer" data-col="transfer" data-count="7""#));
    assert!(html.contains("gpu-worker-7") && html.contains("nvidia-l4"));
    assert!(html.contains("promoted to production"));
    assert!(html.contains("0.9470")); // per-class table
                                      // A screenshot for people (kept when TRAINYARD_KEEP_SCREENSHOT names a path).
    let out = tokio::process::Command::new(browser)
        .args(&common)
        .arg(format!("--screenshot={}", shot.display()))
        .arg("--window-size=1200,1400")
        .arg(&url)
        .output()
        .await
        .unwrap();
    assert!(shot.is_file(), "no screenshot: {}", String::from_utf8_lossy(&out.stderr));
    if let Ok(keep) = std::env::var("TRAINYARD_KEEP_SCREENSHOT") {
        std::fs::copy(&shot, keep).unwrap();
    }
    store.close().await;
    server.stop(&["intent-train"]).await;
}
