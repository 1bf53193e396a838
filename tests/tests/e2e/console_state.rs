//! What the console keeps on screen, in headless Chromium against a real control plane and
//! RabbitMQ: a job view shows nothing of the job shown before it; a redelivered attempt's live
//! log starts again; the job list keeps a change the stream brought while its page loaded; one
//! click submits one job; `superseded` can be filtered; and a control plane that cannot answer
//! a sign-in for a while (a rollout) keeps the token and the view instead of signing out.

use std::time::Duration;

use serde_json::json;
use trainyard_common::{amqp, event::event_seq, JobEvent, JobStatus, WorkerInfo};

use crate::{
    browser::{Browser, ControlPlane},
    support::Env,
};

const TOKENS: &str = "ops:admin:admin-tok";

/// Runs a script in the page; its value.
async fn js(b: &Browser, script: &str) -> serde_json::Value {
    b.client.execute(script, vec![]).await.unwrap()
}

#[tokio::test]
async fn console_shows_only_the_job_on_screen_and_keeps_its_token_through_an_outage() {
    let env = Env::new(&["noop", "intent-train"]).await;
    let db = tempfile::tempdir().unwrap();
    let db_url = format!("sqlite://{}/cp.db", db.path().display());
    let cp = ControlPlane::start(&env, &db_url, TOKENS, None).await;
    let b = Browser::start().await;
    b.client.goto(&cp.url("/#token=admin-tok")).await.unwrap();
    b.wait_js("the live stream", 20, "return document.getElementById('live').className === 'on';").await;
    let options = "return [...document.querySelectorAll('#job-filters select[name=status] option')].map(o => o.textContent);";
    assert!(js(&b, options).await.as_array().unwrap().contains(&json!("superseded")), "the status filter offers superseded");

    // Two clicks while the first submit is answered submit one job (no worker runs: it stays queued).
    b.fill("#submit-form input[name=job_type]", "noop").await;
    b.fill("#submit-form input[name=bot]", "bot-double").await;
    js(&b, "const s = document.getElementById('submit-job'); s.click(); s.click(); return true;").await;
    b.wait_js("the submitted job", 20, "const a = document.getElementById('submitted-job'); return a && a.textContent;").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(env.ready(&env.topo.jobs_queue("noop")).await, 1, "one click, one job");

    // A trained job's view, then a queued job's: none of the first job's parts stay.
    let trained = env.spec("intent-train", json!({}));
    let job = &trained.job_id;
    env.artifacts
        .put_json(
            &format!("jobs/{job}/metrics.json"),
            &json!({"accuracy": 0.9, "macro_f1": 0.88, "test_examples": 20,
            "per_class": {"balance": {"precision": 1.0, "recall": 0.9, "f1": 0.947, "support": 10}}}),
        )
        .await
        .unwrap();
    env.artifacts
        .put_json(&format!("jobs/{job}/confusion_matrix.json"), &json!({"labels": ["balance", "oos"], "matrix": [[9, 1], [0, 2]]}))
        .await
        .unwrap();
    amqp::publish_event(&env.ch, &env.topo, &JobEvent::queued(&trained)).await.unwrap();
    let mut started = JobEvent::new(&trained, JobStatus::Started, 1, event_seq(1, 0, 0));
    started.worker = Some(WorkerInfo { id: "gpu-worker-9".into(), attributes: Default::default() });
    amqp::publish_event(&env.ch, &env.topo, &started).await.unwrap();
    let mut done = JobEvent::new(&trained, JobStatus::Succeeded, 1, event_seq(1, 0, 1));
    done.result = Some(json!({"accuracy": 0.9}));
    amqp::publish_event(&env.ch, &env.topo, &done).await.unwrap();
    let queued = env.spec("noop", json!({}));
    env.submitter().submit(&queued).await.unwrap();
    js(&b, &format!("Console.go('/jobs/{job}'); return true;")).await;
    b.wait_js("the trained job", 30, "return document.body.dataset.loaded === 'succeeded';").await;
    b.click(r#"#cm-svg .cell[data-row="balance"][data-col="oos"]"#).await;
    let parts = "return ['metrics', 'per-class', 'worker', 'cm-detail'].map(id => document.getElementById(id).textContent);";
    let before = js(&b, parts).await;
    assert!(before[0].as_str().unwrap().contains("0.9") && before[2].as_str().unwrap().contains("gpu-worker-9"), "{before}");
    assert!(before[3].as_str().unwrap().starts_with("balance predicted as oos"), "{before}");
    js(&b, &format!("Console.go('/jobs/{}'); return true;", queued.job_id)).await;
    b.wait_js("the queued job", 30, "return document.body.dataset.loaded === 'queued';").await;
    assert_eq!(js(&b, parts).await, json!(["–", "–", "–", ""]), "nothing of the trained job stays on the queued job's view");

    // The same attempt redelivered to another worker: its live text starts again.
    let live = "const v = Console.views.job; \
        v.addLive({attempt: 2, offset: 0, text: 'x'.repeat(100) + '\\n', worker: 'w1'}); \
        v.addLive({attempt: 2, offset: 0, text: 'again\\n', worker: 'w2'}); \
        return document.getElementById('live-log-text').textContent;";
    assert_eq!(js(&b, live).await, json!("again\n"), "the redelivered attempt's lines are shown alone");
    // Delivered again to the same worker: a new making of its log, which starts again too.
    let anew = "const v = Console.views.job; \
        v.addLive({attempt: 2, offset: 0, text: 'anew\\n', worker: 'w2', making: 1}); \
        v.addLive({attempt: 2, offset: 6, text: 'late\\n', worker: 'w2', making: 0}); \
        return document.getElementById('live-log-text').textContent;";
    assert_eq!(js(&b, anew).await, json!("anew\n"), "the same worker's new log is shown alone");

    // The job list: a change the stream brings while the page is on its way is not undone by it.
    js(&b, "Console.go('/'); return true;").await;
    b.wait_row(&queued.job_id, "queued", 20).await;
    js(
        &b,
        "window.realFetch = window.realFetch || window.fetch; \
         window.fetch = (u, o) => String(u).startsWith('/v1/jobs?') \
           ? window.realFetch(u, o).then(r => new Promise(ok => setTimeout(() => ok(r), 2500))) : window.realFetch(u, o); \
         document.querySelector('#job-filters button[type=submit]').click(); return true;",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut finished = JobEvent::new(&queued, JobStatus::Succeeded, 1, event_seq(1, 0, 1));
    finished.result = Some(json!({"ok": true}));
    amqp::publish_event(&env.ch, &env.topo, &finished).await.unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    js(&b, "window.fetch = window.realFetch; return true;").await;
    b.wait_row(&queued.job_id, "succeeded", 5).await;

    // The control plane answers sign-ins with 502 for a while: the token and the view stay, and
    // the console signs in again once it answers.
    js(
        &b,
        "window.fetch = (u, o) => String(u) === '/v1/session' && o && o.method === 'POST' \
           ? Promise.resolve(new Response('{\"error\": \"bad gateway\"}', {status: 502})) : window.realFetch(u, o); \
         Console.source.close(); Console.source.onerror(); return true;",
    )
    .await;
    b.wait_js("the retry message", 10, "return document.getElementById('error').textContent.endsWith('trying again');").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let kept = "return [sessionStorage.getItem('trainyard-token'), document.getElementById('sign-in').hidden, \
        document.getElementById('view-jobs').hidden];";
    assert_eq!(js(&b, kept).await, json!(["admin-tok", true, false]), "still signed in, on the jobs view");
    js(&b, "window.fetch = window.realFetch; return true;").await;
    b.wait_js(
        "signed in again",
        20,
        "return document.getElementById('live').className === 'on' && !document.getElementById('error').textContent;",
    )
    .await;
    b.shot("console-state").await;

    // A sign-in answered after a sign-out is dropped: answered late, it signed the old token
    // back in. Here the stream ends, the sign-in again takes 1.5 s, and the user signs out meanwhile.
    js(
        &b,
        "window.fetch = (u, o) => String(u) === '/v1/session' && o && o.method === 'POST' \
           ? new Promise(ok => setTimeout(() => ok(window.realFetch(u, o)), 1500)) : window.realFetch(u, o); \
         Console.source.close(); Console.source.onerror(); return true;",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    b.click("#sign-out").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let out = "return [sessionStorage.getItem('trainyard-token'), document.getElementById('sign-in').hidden];";
    assert_eq!(js(&b, out).await, json!([null, false]), "signed out, and it stays so");
    b.quit().await;
    cp.stop().await;
    env.cleanup().await;
}
