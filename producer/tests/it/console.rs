//! The console's page, its session cookie and the live stream, over HTTP (the browser tests are in
//! `tests/tests/e2e/console.rs`).

use std::time::Duration;

use trainyard::config::ControlConfig;
use trainyard_common::{event::event_seq, JobEvent, JobStatus};

use crate::{api::start, helpers::*};

/// Reads a stream's body until `until` holds for what came so far, or it ends, or `secs` pass.
async fn read_stream(mut resp: reqwest::Response, secs: u64, until: impl Fn(&str) -> bool) -> String {
    let mut text = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(secs), async {
        while let Ok(Some(chunk)) = resp.chunk().await {
            text.push_str(&String::from_utf8_lossy(&chunk));
            if until(&text) {
                break;
            }
        }
    })
    .await;
    text
}

/// The id of the first event named `name` in a stream's text.
fn event_id(text: &str, name: &str) -> Option<String> {
    let block = text.split("\n\n").find(|b| b.lines().any(|l| l == format!("event: {name}")))?;
    block.lines().find_map(|l| l.strip_prefix("id: ")).map(str::to_string)
}

#[tokio::test]
async fn the_console_page_and_its_assets_are_served_at_the_root_and_for_a_job() {
    let server = start(&["noop"], "viewer:read:v-tok", 64 * 1024, ControlConfig::default()).await;
    let http = reqwest::Client::new();
    for path in ["/", "/jobs/some-job-id"] {
        let page = http.get(server.url(path)).send().await.unwrap();
        assert_eq!(page.status(), 200, "{path}");
        let html = page.text().await.unwrap();
        // The sign-in form is in the page itself, not a prompt.
        assert!(html.contains(r#"<form id="sign-in""#) && html.contains(r#"id="token-input""#), "{html}");
        assert!(!html.contains("window.prompt"));
    }
    for asset in ["app.js", "jobs.js", "job.js", "admin.js", "console.css"] {
        let r = http.get(server.url(&format!("/console/{asset}"))).send().await.unwrap();
        assert_eq!(r.status(), 200, "{asset}");
        assert!(r.headers()[reqwest::header::CONTENT_TYPE].to_str().unwrap().starts_with(if asset.ends_with(".js") {
            "text/javascript"
        } else {
            "text/css"
        }));
    }
    assert_eq!(http.get(server.url("/console/nope.js")).send().await.unwrap().status(), 404);
    // The stream is in the API document, as an event stream.
    let doc: serde_json::Value = http.get(server.url("/openapi.json")).send().await.unwrap().json().await.unwrap();
    assert!(doc["paths"]["/v1/stream"]["get"]["responses"]["200"]["content"]["text/event-stream"].is_object(), "{doc}");
    server.stop(&["noop"]).await;
}

#[tokio::test]
async fn the_stream_needs_a_token_or_a_session_cookie_and_never_the_token_in_the_url() {
    let server = start(&["noop"], "viewer:read:v-tok,ops:admin:a-tok", 64 * 1024, ControlConfig::default()).await;
    let http = reqwest::Client::new();
    let stream = || http.get(server.url("/v1/stream?max_s=1"));
    assert_eq!(stream().send().await.unwrap().status(), 401);
    assert_eq!(
        http.get(server.url("/v1/stream?max_s=1&token=v-tok")).send().await.unwrap().status(),
        401,
        "a token in the URL is not accepted"
    );
    assert_eq!(stream().header("cookie", "trainyard_stream=dmlld2Vy.99999999999.Zm9yZ2Vk").send().await.unwrap().status(), 401);
    assert_eq!(http.post(server.url("/v1/session")).bearer_auth("wrong").send().await.unwrap().status(), 401);

    // Signing in answers who the token is and sets a cookie valid only for the stream.
    let session = http.post(server.url("/v1/session")).bearer_auth("v-tok").send().await.unwrap();
    assert_eq!(session.status(), 200);
    let set_cookie = session.headers()[reqwest::header::SET_COOKIE].to_str().unwrap().to_string();
    assert!(
        set_cookie.contains("Path=/v1/stream") && set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Strict"),
        "{set_cookie}"
    );
    assert!(!set_cookie.contains("v-tok"), "the cookie never carries the token: {set_cookie}");
    let who: serde_json::Value = session.json().await.unwrap();
    assert_eq!(who, serde_json::json!({"name": "viewer", "scope": "read"}));
    let cookie = set_cookie.split(';').next().unwrap().to_string();
    let ok = stream().header("cookie", &cookie).send().await.unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.headers()[reqwest::header::CONTENT_TYPE], "text/event-stream");
    // The cookie does not open the rest of the API.
    assert_eq!(http.get(server.url("/v1/jobs")).header("cookie", &cookie).send().await.unwrap().status(), 401);

    // Bad queries and cursors are refused with a JSON error.
    for (q, last) in [("max_s=31", None), ("max_s=0", None), ("nope=1", None), ("", Some("not-a-number"))] {
        let mut r = http.get(server.url(&format!("/v1/stream?{q}"))).bearer_auth("v-tok");
        if let Some(l) = last {
            r = r.header("last-event-id", l);
        }
        let r = r.send().await.unwrap();
        assert_eq!(r.status(), 400, "{q} {last:?}");
        assert!(r.json::<serde_json::Value>().await.unwrap()["error"].is_string());
    }
    server.stop(&["noop"]).await;
}

#[tokio::test]
async fn the_stream_pushes_job_changes_ends_in_time_and_catches_up_from_last_event_id() {
    let server = start(&["noop"], "viewer:read:v-tok", 64 * 1024, ControlConfig::default()).await;
    let http = reqwest::Client::new();
    let (_conn, ch) = channel().await;
    let store = trainyard::store::Store::open(&server.db_url).await.unwrap();

    // A fresh stream says hello with the feed's head, then pushes the job as the recorder records it.
    let started = std::time::Instant::now();
    let resp = http.get(server.url("/v1/stream?max_s=3")).bearer_auth("v-tok").send().await.unwrap();
    let first = spec("noop", "bot-live");
    let publish = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        publish_event(&ch, &server.topo, &JobEvent::queued(&first)).await;
    };
    let (text, ()) = tokio::join!(read_stream(resp, 10, |_| false), publish);
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(6), "the stream ends after max_s: {elapsed:?}");
    let hello = event_id(&text, "hello").unwrap_or_else(|| panic!("no hello: {text}"));
    assert!(text.contains("retry: 1000"), "{text}");
    assert!(text.contains(&first.job_id) && text.contains("\"status\":\"queued\""), "the change was pushed: {text}");
    assert!(!text.contains("\"spec\""), "rows go out without their spec: {text}");
    assert!(text.contains("event: queues") && text.contains("\"noop\":{"), "the queues' figures are pushed: {text}");
    let queues: serde_json::Value = http.get(server.url("/v1/queues")).bearer_auth("v-tok").send().await.unwrap().json().await.unwrap();
    assert!(queues["noop"]["ready"].is_number() && queues["noop"]["demand"].is_number(), "{queues}");

    // While nobody listens, the job changes; a client that comes back with its last id catches up.
    let mut done = JobEvent::new(&first, JobStatus::Succeeded, 1, 1);
    done.result = Some(serde_json::json!({"ok": true}));
    publish_event(&ch, &server.topo, &done).await;
    eventually(20, "succeeded recorded", || async { store.job(&first.job_id).await.unwrap().filter(|j| j.status == JobStatus::Succeeded) })
        .await;
    let fresh = http.get(server.url("/v1/stream?max_s=1")).bearer_auth("v-tok").send().await.unwrap();
    let fresh = read_stream(fresh, 5, |_| false).await;
    assert!(!fresh.contains(&first.job_id), "a fresh stream starts at the head: {fresh}");
    let resumed = http.get(server.url("/v1/stream?max_s=2")).bearer_auth("v-tok").header("last-event-id", &hello).send().await.unwrap();
    let resumed = read_stream(resumed, 5, |t| t.contains(r#""status":"succeeded""#)).await;
    assert!(resumed.contains("event: resume"), "{resumed}");
    assert!(resumed.contains(&first.job_id) && resumed.contains("\"status\":\"succeeded\""), "caught up: {resumed}");

    // `job=` narrows the stream to one job.
    let other = spec("noop", "bot-other");
    publish_event(&ch, &server.topo, &JobEvent::queued(&other)).await;
    eventually(20, "other recorded", || async { store.job(&other.job_id).await.unwrap() }).await;
    let only = http
        .get(server.url(&format!("/v1/stream?max_s=1&job={}", first.job_id)))
        .bearer_auth("v-tok")
        .header("last-event-id", &hello)
        .send()
        .await
        .unwrap();
    let only = read_stream(only, 5, |_| false).await;
    assert!(only.contains(&first.job_id) && !only.contains(&other.job_id), "{only}");
    server.stop(&["noop"]).await;
}

#[tokio::test]
async fn jobs_logs_follow_through_the_api_waits_on_the_live_stream() {
    let server = start(&["noop"], "ops:admin:a-tok", 64 * 1024, ControlConfig::default()).await;
    let (_conn, ch) = channel().await;
    let store = trainyard::store::Store::open(&server.db_url).await.unwrap();
    let artifacts = trainyard_common::artifacts::ArtifactStore::open(server.artifacts_dir.path().to_str().unwrap()).unwrap();
    let job = spec("noop", "bot-logs");
    publish_event(&ch, &server.topo, &JobEvent::queued(&job)).await;
    publish_event(&ch, &server.topo, &JobEvent::new(&job, JobStatus::Started, 1, event_seq(1, 0, 0))).await;
    eventually(20, "started", || async { store.job(&job.job_id).await.unwrap().filter(|j| j.status == JobStatus::Started) }).await;

    let follow = tokio::process::Command::new(env!("CARGO_BIN_EXE_trainyard"))
        .args(["jobs", "logs", &job.job_id, "--follow", "--server", &server.url(""), "--token", "a-tok"])
        .env_remove("TRAINYARD_SERVER")
        .env_remove("TRAINYARD_TOKEN")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The attempt ends: its log is saved, then its final event recorded.
    artifacts.put(&format!("jobs/{}/logs/attempt-1.log", job.job_id), "epoch 1 done\nall good\n").await.unwrap();
    publish_event(&ch, &server.topo, &JobEvent::new(&job, JobStatus::Succeeded, 1, event_seq(1, 0, 1))).await;
    let out = tokio::time::timeout(Duration::from_secs(20), follow.wait_with_output()).await.expect("--follow ends with the job").unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "==> attempt 1 <==\nepoch 1 done\nall good\n");
    // It followed the job on the live stream, not by asking again and again.
    let metrics = reqwest::get(server.url("/metrics")).await.unwrap().text().await.unwrap();
    let streams = metrics.lines().filter(|l| l.starts_with("trainyard_http_requests_total") && l.contains(r#"route="/v1/stream""#)).count();
    assert!(streams >= 1, "no /v1/stream request: {metrics}");
    store.close().await;
    server.stop(&["noop"]).await;
}

/// The change feed behind the stream, on both backends: jobs changed after a cursor, oldest change first.
async fn change_feed_on(url: &str) {
    let store = trainyard::store::Store::open(url).await.unwrap();
    assert_eq!(store.feed_head().await.unwrap(), 0, "an empty store");
    let (a, b) = (spec("noop", "bot-a"), spec("noop", "bot-b"));
    store.record_event(&JobEvent::queued(&a)).await.unwrap();
    let after_a = store.feed_head().await.unwrap();
    assert!(after_a > 0);
    tokio::time::sleep(Duration::from_millis(5)).await;
    store.record_event(&JobEvent::queued(&b)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    store.record_event(&JobEvent::new(&a, JobStatus::Succeeded, 1, event_seq(1, 0, 0))).await.unwrap();
    let all = store.changed_since(0, 100).await.unwrap();
    let order: Vec<(&str, JobStatus)> = all.iter().map(|c| (c.job.job_id.as_str(), c.job.status)).collect();
    assert_eq!(
        order,
        vec![(b.job_id.as_str(), JobStatus::Queued), (a.job_id.as_str(), JobStatus::Succeeded)],
        "one row a job, by its latest change"
    );
    assert!(all[0].cursor < all[1].cursor && all[1].cursor == store.feed_head().await.unwrap());
    let later = store.changed_since(all[0].cursor, 100).await.unwrap();
    assert_eq!(later.len(), 1);
    assert_eq!(later[0].job.job_id, a.job_id);
    assert!(store.changed_since(all[1].cursor, 100).await.unwrap().is_empty());
    assert_eq!(store.changed_since(0, 1).await.unwrap().len(), 1, "limit");
    store.close().await;
}

#[tokio::test]
async fn the_change_feed_lists_jobs_changed_after_a_cursor_on_sqlite_and_postgres() {
    on_sqlite_and_postgres(|url| async move { change_feed_on(&url).await }).await;
}

/// A recorder batch is stamped with one recording time: 250 jobs recorded in one batch all
/// reach a stream that was open before them. (A page of the feed holds 200: a page full of one
/// cursor moved the cursor past it, and the other 50 were never pushed.)
#[tokio::test]
async fn the_stream_pushes_every_job_of_a_batch_larger_than_its_page() {
    let server = start(&["noop"], "viewer:read:v-tok", 64 * 1024, ControlConfig::default()).await;
    let http = reqwest::Client::new();
    let store = trainyard::store::Store::open(&server.db_url).await.unwrap();
    let jobs: Vec<_> = (0..250).map(|i| spec("noop", &format!("bot-batch-{i}"))).collect();
    let resp = http.get(server.url("/v1/stream?max_s=4")).bearer_auth("v-tok").send().await.unwrap();
    let record = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        store.record_events(&jobs.iter().map(JobEvent::queued).collect::<Vec<_>>()).await.unwrap();
    };
    let all_in = |t: &str| jobs.iter().all(|j| t.contains(&j.job_id));
    let (text, ()) = tokio::join!(read_stream(resp, 10, all_in), record);
    let missing = jobs.iter().filter(|j| !text.contains(&j.job_id)).count();
    assert_eq!(missing, 0, "jobs of the batch never pushed");
    store.close().await;
    server.stop(&["noop"]).await;
}

/// A page of the change feed that ends among the jobs of one recorder batch (a batch shares
/// its stamp) sends none of them until the next poll reads them all: sent with the batch's
/// id, a browser that reconnected after them resumed past the batch's other jobs, and those
/// never reached it.
#[tokio::test]
async fn a_stream_resumed_after_a_page_that_ended_inside_a_batch_misses_none_of_it() {
    let server = start(&["noop"], "viewer:read:v-tok", 64 * 1024, ControlConfig::default()).await;
    let http = reqwest::Client::new();
    let store = trainyard::store::Store::open(&server.db_url).await.unwrap();
    let head = store.feed_head().await.unwrap().to_string();
    let lone = spec("noop", "bot-lone");
    store.record_events(&[JobEvent::queued(&lone)]).await.unwrap();
    let batch: Vec<_> = (0..250).map(|i| spec("noop", &format!("bot-page-{i}"))).collect();
    store.record_events(&batch.iter().map(JobEvent::queued).collect::<Vec<_>>()).await.unwrap();
    let open = |last: String| http.get(server.url("/v1/stream?max_s=5")).bearer_auth("v-tok").header("last-event-id", last).send();
    // The first poll's events, then the connection drops before the next poll (one tick later).
    let mut resp = open(head).await.unwrap();
    let mut first = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(Some(chunk)) = resp.chunk().await {
            first.push_str(&String::from_utf8_lossy(&chunk));
            if first.contains("event: job") {
                break;
            }
        }
    })
    .await;
    let _ = tokio::time::timeout(Duration::from_millis(150), async {
        while let Ok(Some(chunk)) = resp.chunk().await {
            first.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await;
    drop(resp);
    assert!(first.contains(&lone.job_id), "the first poll sent the lone job: {first}");
    let last = first.lines().filter_map(|l| l.strip_prefix("id: ")).next_back().unwrap().to_string();
    let all = std::iter::once(&lone).chain(&batch);
    let all_in = |t: &str| batch.iter().all(|j| t.contains(&j.job_id) || first.contains(&j.job_id));
    let again = read_stream(open(last).await.unwrap(), 10, all_in).await;
    let missing = all.filter(|j| !first.contains(&j.job_id) && !again.contains(&j.job_id)).count();
    assert_eq!(missing, 0, "jobs of the batch never reached the resumed stream");
    store.close().await;
    server.stop(&["noop"]).await;
}

/// The change feed shows a job whose recording committed after a later-started one: a
/// transaction that waits (here a trigger sleeps in its event insert) used to commit a smaller
/// `recorded_at` than the one a reader had already moved its cursor past, and the live stream
/// never showed that job. Events are stamped in commit order now, on PostgreSQL as on SQLite.
#[tokio::test]
async fn the_feed_shows_a_job_whose_recording_committed_late() {
    let pg = PgSchema::new().await;
    let store = trainyard::store::Store::open(&pg.url).await.unwrap();
    let (slow, fast) = (spec("noop", "bot-slow"), spec("noop", "bot-fast"));
    for sql in [
        format!(
            "CREATE FUNCTION slow() RETURNS trigger AS $$ BEGIN IF NEW.job_id = '{}' THEN PERFORM pg_sleep(2); END IF; \
             RETURN NEW; END $$ LANGUAGE plpgsql",
            slow.job_id
        ),
        "CREATE TRIGGER slow BEFORE INSERT ON job_events FOR EACH ROW EXECUTE FUNCTION slow()".into(),
    ] {
        store.execute_raw(&sql).await.unwrap();
    }
    let cursor = store.feed_head().await.unwrap();
    let slow_write = tokio::spawn({
        let (store, event) = (store.clone(), JobEvent::queued(&slow));
        async move { store.record_event(&event).await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    store.record_event(&JobEvent::queued(&fast)).await.unwrap();
    // A reader tails the feed as the console's stream does, from the cursor it has seen.
    let mut seen = Vec::new();
    let mut at = cursor;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline && seen.len() < 2 {
        for c in store.changed_since(at, 200).await.unwrap() {
            at = at.max(c.cursor);
            seen.push(c.job.job_id);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(slow_write.await.unwrap(), "the slow job's event is recorded");
    for c in store.changed_since(at, 200).await.unwrap() {
        seen.push(c.job.job_id);
    }
    seen.sort();
    let mut want = vec![slow.job_id.clone(), fast.job_id.clone()];
    want.sort();
    assert_eq!(seen, want, "each job once, the slow one too");
    store.close().await;
    pg.drop().await;
}
