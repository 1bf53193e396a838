//! The control plane end to end: API auth and limits, the demand gauge (the console's browser tests
//! are in `tests/tests/e2e/console.rs`).

use std::{net::SocketAddr, time::Duration};

use lapin::options::{BasicAckOptions, BasicGetOptions, QueuePurgeOptions};
use tokio_util::sync::CancellationToken;
use trainyard::{
    api::Tokens,
    config::ControlConfig,
    serve::{serve, ServeSettings},
    submit::Submitter,
};
use trainyard_common::{event::event_seq, topology::Topology, JobEvent, JobStatus, WorkerInfo};

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
    start_on(None, types, tokens, body_limit, config).await
}

/// [`start`] on the store at `db_url` (a SQLite file of its own when `None`).
pub async fn start_on(db_url: Option<&str>, types: &[&str], tokens: &str, body_limit: usize, config: ControlConfig) -> Server {
    let topo = topology();
    let db_dir = tempfile::tempdir().unwrap();
    let artifacts_dir = tempfile::tempdir().unwrap();
    let db_url = db_url.map_or_else(|| format!("sqlite://{}/ty.db", db_dir.path().display()), str::to_string);
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
        consumer_timeout: Duration::from_secs(trainyard_common::job::DEFAULT_CONSUMER_TIMEOUT_S),
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

/// A caller's W3C `traceparent` goes on with the job it submits: the message carries the caller's
/// trace id under a span of its own (the worker logs that trace id with every line of the job);
/// without one, with an invalid one or with two, the job starts a trace of its own.
#[tokio::test]
async fn a_submit_continues_the_callers_trace() {
    let server = start(&["noop"], "s-tok", 64 * 1024, ControlConfig::default()).await;
    let http = reqwest::Client::new();
    let (_conn, ch) = channel().await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller = format!("00-{trace}-00f067aa0ba902b7-01");
    let twice = [caller.as_str(), caller.as_str()];
    let cases: [(&[&str], bool); 4] = [(&[caller.as_str()], true), (&[], false), (&["00-nonsense-01"], false), (&twice, false)];
    for (sent, same_trace) in cases {
        let mut r = http.post(server.url("/v1/jobs")).bearer_auth("s-tok").json(&serde_json::json!({"job_type": "noop", "bot": "traced"}));
        // Sent twice, it is no trace context (W3C): a trace of the job's own.
        for tp in sent {
            r = r.header("traceparent", *tp);
        }
        assert_eq!(r.send().await.unwrap().status(), 201);
        let got = eventually(10, "the job", || async {
            ch.basic_get(server.topo.jobs_queue("noop").into(), BasicGetOptions::default()).await.unwrap()
        })
        .await;
        got.delivery.acker.ack(BasicAckOptions::default()).await.unwrap();
        let hdrs = got.delivery.properties.headers().as_ref();
        let tp = trainyard_common::headers::string(hdrs, "traceparent").expect("every job carries a traceparent");
        let id = trainyard_common::headers::trace_id(hdrs).unwrap_or_else(|| panic!("a valid traceparent: {tp}"));
        assert_eq!(id == trace, same_trace, "sent {sent:?}, the job carries {tp}");
        assert_ne!(tp, caller, "a span of its own");
    }
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
    // Demand is 6 both before the gauges see the take (6 ready + 0 running) and after it
    // (5 + 1): wait for the second, on one scrape.
    let m = eventually(20, "5 ready + 1 running", || async {
        let m = metrics().await;
        (gauge(&m, "trainyard_queue_ready", "noop") == Some(5) && gauge(&m, "trainyard_jobs_running_recorded", "noop") == Some(1))
            .then_some(m)
    })
    .await;
    assert_eq!(gauge(&m, "trainyard_jobs_demand", "noop"), Some(6));
    assert_eq!(gauge(&m, "trainyard_jobs_demand", "intent-train"), Some(0));

    // They finish: the running one succeeds, the queue drains.
    taken.delivery.acker.ack(BasicAckOptions::default()).await.unwrap();
    publish_event(&ch, &server.topo, &JobEvent::new(&taken_spec, JobStatus::Succeeded, 1, event_seq(1, 0, 1))).await;
    ch.queue_purge(server.topo.jobs_queue("noop").into(), QueuePurgeOptions::default()).await.unwrap();
    eventually(20, "demand 0", || async { (gauge(&metrics().await, "trainyard_jobs_demand", "noop") == Some(0)).then_some(()) }).await;
    server.stop(&["noop", "intent-train"]).await;
}

/// Jobs a worker holds and has not started (a busy worker's prefetch on each priority tier)
/// count in the demand: the broker counts them neither ready nor running, and the demand
/// showed only the ready ones, so nothing scaled out for the held ones. Workers say how many
/// in their heartbeats; a worker that says goodbye no longer counts.
#[tokio::test]
async fn demand_counts_the_jobs_live_workers_hold_but_have_not_started() {
    let server = start(&["noop"], "t", 64 * 1024, ControlConfig::default()).await;
    let http = reqwest::Client::new();
    let metrics = || async { http.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap() };
    let submitter = Submitter::new(AMQP_URL, server.topo.clone()).unwrap();
    submitter.submit(&spec("noop", "bot-ready")).await.unwrap();
    let (_conn, ch) = channel().await;
    let beat = |goodbye: bool| trainyard_common::heartbeat::Heartbeat {
        worker: WorkerInfo { id: "w-holding".into(), attributes: Default::default() },
        job_types: vec!["noop".into()],
        slots: 1,
        slots_in_use: 1,
        waiting: [("noop".to_string(), 2)].into(),
        interval_s: 5,
        sent_at: chrono::Utc::now(),
        goodbye,
        ..Default::default()
    };
    let send = |goodbye: bool| {
        let (ch, exchange, body) = (ch.clone(), server.topo.heartbeats_exchange(), serde_json::to_vec(&beat(goodbye)).unwrap());
        async move {
            ch.basic_publish(exchange.as_str().into(), "".into(), Default::default(), &body, Default::default()).await.unwrap();
        }
    };
    // The heartbeat goes again at each look: the control plane's heartbeat consumer may bind its
    // queue after the first one (a worker beats every few seconds anyway).
    trainyard_common::heartbeat::declare_exchange(&ch, &server.topo).await.unwrap();
    let demand = |want: i64, goodbye: Option<bool>| {
        let (metrics, send) = (&metrics, &send);
        async move {
            eventually(20, &format!("a demand of {want}"), || async {
                if let Some(goodbye) = goodbye {
                    send(goodbye).await;
                }
                (gauge(&metrics().await, "trainyard_jobs_demand", "noop") == Some(want)).then_some(())
            })
            .await
        }
    };
    demand(1, None).await;
    demand(3, Some(false)).await; // 1 ready + 2 held by the worker
    demand(1, Some(true)).await;
    server.stop(&["noop"]).await;
}

/// A NUL character in a path or a query is a caller's mistake, refused with a 400 before any
/// handler. PostgreSQL refuses NUL in text, so `GET /v1/jobs/%00` or `?bot=%00` answered 503,
/// a store failure, logged as an error and counted against the 5xx alerts.
#[tokio::test]
async fn a_nul_in_a_path_or_query_is_a_bad_request_on_postgres() {
    let pg = PgSchema::new().await;
    let server = start_on(Some(&pg.url), &["noop"], "reader:read:r-tok,ci:submit:s-tok", 4096, ControlConfig::default()).await;
    let http = reqwest::Client::new();
    let get = |path: &str| http.get(server.url(path)).bearer_auth("r-tok").send();
    for path in
        ["/v1/jobs/%00", "/v1/jobs/a%00b/events", "/v1/jobs?bot=%00", "/v1/jobs?type=noop%00", "/v1/audit?actor=x%00", "/v1/dlq?type=%00"]
    {
        let r = get(path).await.unwrap();
        assert_eq!(r.status(), 400, "{path}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert!(body["error"].as_str().is_some_and(|e| e.contains("NUL")), "{path}: {body}");
    }
    let r = http.post(server.url("/v1/jobs/%00/retry")).bearer_auth("s-tok").send().await.unwrap();
    assert_eq!(r.status(), 400);
    // The token is checked first.
    assert_eq!(http.get(server.url("/v1/jobs/%00")).send().await.unwrap().status(), 401);
    // The same requests without the NUL are answered as ever.
    assert_eq!(get("/v1/jobs?bot=x").await.unwrap().status(), 200);
    assert_eq!(get("/v1/jobs/ab/events").await.unwrap().status(), 404);
    server.stop(&["noop"]).await;
    pg.drop().await;
}

/// When the demand cannot be measured (here a type's dead-letter queue is gone, so its depth
/// cannot be read), `trainyard_jobs_demand` is removed until it can, so that KEDA falls back
/// and the missing-signal alert fires: it went on exporting what it said before the failure.
#[tokio::test]
async fn a_demand_that_cannot_be_measured_is_removed_not_kept() {
    let server = start(&["noop"], "t", 64 * 1024, ControlConfig::default()).await;
    let http = reqwest::Client::new();
    let demand = || async {
        let m = http.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
        gauge(&m, "trainyard_jobs_demand", "noop")
    };
    assert_eq!(demand().await, Some(0));
    let (_conn, ch) = channel().await;
    // Deleted again until the removal is seen: the control plane's admission session declares
    // its type's queues when it connects, which on a loaded machine can come after the delete.
    eventually(20, "the demand removed", || async {
        ch.queue_delete(server.topo.dead_queue("noop").into(), Default::default()).await.unwrap();
        for _ in 0..10 {
            if demand().await.is_none() {
                return Some(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        None
    })
    .await;
    server.topo.declare_job_type(&ch, "noop").await.unwrap();
    eventually(20, "the demand back", || async { (demand().await == Some(0)).then_some(()) }).await;
    server.stop(&["noop"]).await;
}
