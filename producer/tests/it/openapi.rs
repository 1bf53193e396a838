//! The API document (`/openapi.json`, generated from the code) against the real router: every
//! response the document lists for every route is produced by a request below and its body is
//! checked against the document's schema (`$ref`s resolved into its components); every response
//! below has a documented status and content type; every method a route serves is documented.
//! That every path the router serves is documented, the router checks itself when it is built
//! (`api::doc::check_documented`), so this server would not have started otherwise.

use std::collections::BTreeSet;

use serde_json::{json, Value};
use trainyard::config::ControlConfig;
use trainyard_common::{event::event_seq, JobEvent, JobSpec, JobStatus};

use crate::{
    api::{start, Server},
    helpers::*,
};

/// One request and the status it should get.
pub struct Case {
    method: &'static str,
    route: &'static str,
    path: String,
    token: Option<&'static str>,
    body: Option<(&'static str, Vec<u8>)>,
    want: u16,
}

pub fn case(method: &'static str, route: &'static str, path: impl Into<String>, want: u16) -> Case {
    Case { method, route, path: path.into(), token: None, body: None, want }
}

impl Case {
    pub fn token(mut self, t: &'static str) -> Self {
        self.token = Some(t);
        self
    }
    pub fn json(mut self, v: Value) -> Self {
        self.body = Some(("application/json", v.to_string().into_bytes()));
        self
    }
    pub fn raw(mut self, content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        self.body = Some((content_type, body.into()));
        self
    }
}

/// The document, and what the requests produced.
struct Checker {
    doc: Value,
    http: reqwest::Client,
    produced: BTreeSet<(String, String, String)>,
    failures: Vec<String>,
}

impl Checker {
    /// Sends `c` and checks its answer against `c.want` and the document.
    async fn run(&mut self, server: &Server, c: Case) {
        let mut req = self.http.request(c.method.parse().unwrap(), server.url(&c.path));
        if let Some(t) = c.token {
            req = req.bearer_auth(t);
        }
        if let Some((ct, body)) = c.body {
            req = req.header("content-type", ct).body(body);
        }
        let what = format!("{} {}", c.method, c.path);
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return self.failures.push(format!("{what}: {e}")),
        };
        let status = resp.status().as_u16();
        let ct = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let body = resp.bytes().await.unwrap_or_default();
        if status != c.want {
            self.failures.push(format!("{what}: status {status}, wanted {} ({})", c.want, String::from_utf8_lossy(&body)));
        }
        self.produced.insert((c.route.to_string(), c.method.to_lowercase(), status.to_string()));
        if let Err(e) = self.check(c.route, c.method, status, &ct, &body) {
            self.failures.push(format!("{what} -> {status}: {e}"));
        }
    }

    fn check(&self, route: &str, method: &str, status: u16, ct: &str, body: &[u8]) -> Result<(), String> {
        let op = &self.doc["paths"][route][method.to_lowercase()];
        let resp = op["responses"].get(status.to_string()).ok_or("status not in the document")?;
        let Some(content) = resp.get("content").and_then(Value::as_object) else {
            return if body.is_empty() { Ok(()) } else { Err("a body where the document has none".into()) };
        };
        let media = ct.split(';').next().unwrap_or("").trim();
        let schema = &content.get(media).ok_or_else(|| format!("content type {ct:?} not in the document: {:?}", content.keys()))?["schema"];
        let instance = if media == "application/json" {
            serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?
        } else {
            Value::String(String::from_utf8_lossy(body).into_owned())
        };
        let root = json!({"components": self.doc["components"], "allOf": [schema]});
        let validator = jsonschema::validator_for(&root).map_err(|e| format!("bad schema {schema}: {e}"))?;
        let errors: Vec<String> = validator.iter_errors(&instance).map(|e| format!("{} at {}", e, e.instance_path())).collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "body does not match {schema}: {errors:?}\n{}",
                String::from_utf8_lossy(body).chars().take(600).collect::<String>()
            ))
        }
    }

    /// Every documented response that no request produced.
    fn not_produced(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (route, item) in self.doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                for status in op["responses"].as_object().unwrap().keys() {
                    if !self.produced.contains(&(route.clone(), method.clone(), status.clone())) {
                        out.push(format!("{} {route} {status}", method.to_uppercase()));
                    }
                }
            }
        }
        out
    }

    /// Every method a documented path serves (its `Allow` on a 405) must be documented.
    async fn check_methods(&mut self, server: &Server) {
        let paths = self.doc["paths"].as_object().unwrap().clone();
        for (route, item) in paths {
            let concrete = route.replace("{", "x").replace("}", "");
            let resp = self.http.request(reqwest::Method::TRACE, server.url(&concrete)).bearer_auth("a-tok").send().await.unwrap();
            if resp.status() != 405 {
                self.failures.push(format!("TRACE {concrete}: {} (wanted 405 with Allow)", resp.status()));
                continue;
            }
            let allow = resp.headers().get("allow").and_then(|v| v.to_str().ok()).unwrap_or("").to_lowercase();
            for m in allow.split(',').map(str::trim).filter(|m| !m.is_empty() && *m != "head") {
                if item.get(m).is_none() {
                    self.failures.push(format!("{route} serves {m}, which the document lacks"));
                }
            }
        }
    }
}

/// A yearly schedule and a trigger rule, so that their listings read the store.
fn config() -> ControlConfig {
    ControlConfig::parse(
        r#"
[[schedule]]
name = "yearly"
cron = "0 0 1 1 *"
job_type = "noop"
bot = "bot-s"

[[trigger]]
name = "on-data"
routing_key = "openapi.test.never"
job_type = "noop"
bot = "bot-t"
"#,
    )
    .unwrap()
}

/// Submits a job through the API and waits until the store has it; its spec.
async fn submitted(http: &reqwest::Client, server: &Server, bot: &str) -> JobSpec {
    submitted_body(http, server, json!({"job_type": "noop", "bot": bot})).await
}

/// Submits `body` through the API and waits until the store has the job; its spec.
async fn submitted_body(http: &reqwest::Client, server: &Server, body: Value) -> JobSpec {
    let r = http.post(server.url("/v1/jobs")).bearer_auth("s-tok").json(&body).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let id = r.json::<Value>().await.unwrap()["job_id"].as_str().unwrap().to_string();
    eventually(20, "the job recorded with its spec", || async {
        let r = http.get(server.url(&format!("/v1/jobs/{id}"))).bearer_auth("r-tok").send().await.ok()?;
        let v: Value = r.json().await.ok()?;
        serde_json::from_value::<JobSpec>(v.get("spec")?.clone()).ok()
    })
    .await
}

#[tokio::test]
async fn every_route_answers_what_the_generated_document_says() {
    let server = start(&["noop"], "reader:read:r-tok,ci:submit:s-tok,root:admin:a-tok", 4096, config()).await;
    let http = reqwest::Client::new();
    let doc: Value = http.get(server.url("/openapi.json")).send().await.unwrap().json().await.unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    // A queued job (a), and a succeeded one (b) with a model and a saved log.
    let a = submitted(&http, &server, "bot-a").await.job_id;
    let spec_b = submitted(&http, &server, "bot-b").await;
    let b = spec_b.job_id.clone();
    // A job submitted with an idempotency key: its key reused for other work is a 409.
    submitted_body(&http, &server, json!({"job_type": "noop", "bot": "bot-k", "idempotency_key": crate::openapi_cases::KEY})).await;
    let (_conn, ch) = channel().await;
    publish_event(&ch, &server.topo, &JobEvent::new(&spec_b, JobStatus::Succeeded, 1, event_seq(1, 0, 1))).await;
    eventually(20, "b succeeded", || async {
        let v: Value = http.get(server.url(&format!("/v1/jobs/{b}"))).bearer_auth("r-tok").send().await.ok()?.json().await.ok()?;
        (v["status"] == "succeeded").then_some(())
    })
    .await;
    let root = server.artifacts_dir.path();
    std::fs::create_dir_all(root.join(format!("jobs/{b}/model"))).unwrap();
    std::fs::write(root.join(format!("jobs/{b}/model/model.bin")), b"weights").unwrap();
    std::fs::write(root.join(format!("jobs/{b}/model/config.json")), b"{}").unwrap();
    std::fs::create_dir_all(root.join(format!("jobs/{b}/logs"))).unwrap();
    std::fs::write(root.join(format!("jobs/{b}/logs/attempt-1.log")), "epoch 1\n").unwrap();

    let mut k = Checker { doc, http: http.clone(), produced: BTreeSet::new(), failures: Vec::new() };
    // The check is not vacuous: a body without the documented fields, or of another type, is refused.
    assert!(k.check("/v1/jobs", "POST", 201, "application/json", br#"{"job_id": "x"}"#).is_err());
    assert!(k.check("/v1/jobs", "GET", 200, "application/json", br#"[{"job_id": 1}]"#).is_err());
    assert!(k.check("/v1/jobs", "GET", 404, "application/json", b"{}").is_err(), "an undocumented status");
    assert!(k.check("/v1/jobs", "POST", 401, "text/plain", b"no").is_err(), "an undocumented content type");
    for c in crate::openapi_cases::cases(&a, &b) {
        k.run(&server, c).await;
    }
    k.check_methods(&server).await;

    // Then the job store and the artifact store fail: the 503s.
    break_stores(&server).await;
    for c in crate::openapi_cases::unavailable(&a, &b) {
        k.run(&server, c).await;
    }
    let missing = k.not_produced();
    let dir = server.artifacts_dir.path();
    let _ = std::fs::remove_file(dir).and_then(|_| std::fs::create_dir(dir));
    assert!(k.failures.is_empty() && missing.is_empty(), "failures: {:#?}\ndocumented, never produced: {missing:#?}", k.failures);
    server.stop(&["noop"]).await;
}

/// Drops the job store's tables and puts a file where the artifact store's directory was.
async fn break_stores(server: &Server) {
    use sqlx::ConnectOptions;
    let opts: sqlx::sqlite::SqliteConnectOptions = server.db_url.parse().unwrap();
    let mut conn = opts.connect().await.unwrap();
    let tables: Vec<String> = sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    for t in tables {
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE \"{t}\""))).execute(&mut conn).await.unwrap();
    }
    let dir = server.artifacts_dir.path();
    std::fs::remove_dir_all(dir).unwrap();
    std::fs::write(dir, b"not a directory").unwrap();
}
