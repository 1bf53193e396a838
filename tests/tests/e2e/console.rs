//! The operators' console in headless Chromium against a real control plane, worker and RabbitMQ:
//! sign in, submit a noop and an intent job and watch them succeed without a reload, cancel a
//! running job, replay a dead letter, roll back and promote a model, survive a control-plane
//! restart; the Workers view shows the worker and the Audit view every action by the token's name;
//! a read-only token sees the job view but no action, and a forged request is refused.
//! Every view is saved as a screenshot under `target/console-screenshots/`.

use std::time::Duration;

use serde_json::json;
use trainyard::store::Store;
use trainyard_common::{amqp, event::event_seq, JobEvent, JobStatus, WorkerInfo};

use crate::{
    browser::{Browser, ControlPlane},
    intent::tiny_csv,
    support::Env,
};

const TOKENS: &str = "ops:admin:admin-tok,viewer:read:read-tok";

/// Submits a job through the console's form; its id.
async fn submit(b: &Browser, job_type: &str, bot: &str, params: &str) -> String {
    b.fill("#submit-form input[name=job_type]", job_type).await;
    b.fill("#submit-form input[name=bot]", bot).await;
    b.fill("#submit-form input[name=params]", params).await;
    b.client.execute("document.getElementById('message').replaceChildren(); return true;", vec![]).await.unwrap();
    b.click("#submit-job").await;
    let id =
        b.wait_js("the submitted job's id", 20, "const a = document.getElementById('submitted-job'); return a && a.textContent;").await;
    id.as_str().unwrap().to_string()
}

/// Opens a view by clicking its link (no page load).
async fn open(b: &Browser, css: &str) {
    b.click(css).await;
}

#[tokio::test]
async fn console_submits_cancels_replays_and_promotes_live_in_chromium() {
    let env = Env::new(&["noop", "intent-train"]).await;
    let db = tempfile::tempdir().unwrap();
    let db_url = format!("sqlite://{}/cp.db", db.path().display());
    let mut cp = ControlPlane::start(&env, &db_url, TOKENS, None).await;
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("tiny.csv"), tiny_csv()).unwrap();
    let data_dir = data.path().to_path_buf();
    let worker = env.spawn_worker(&["noop", "intent-train"], move |c| c.data_dir = data_dir);
    let b = Browser::start().await;

    // Sign in through the form.
    b.client.goto(&cp.url("/")).await.unwrap();
    b.wait_js("the sign-in form", 10, "return !document.getElementById('sign-in').hidden;").await;
    b.shot("sign-in").await;
    b.fill("#token-input", "admin-tok").await;
    b.click("#sign-in-button").await;
    b.wait_js("signed in", 10, "return document.getElementById('who').textContent === 'ops (admin)';").await;
    b.wait_js("the live stream", 10, "return document.getElementById('live').className === 'on';").await;
    // Nothing below reloads the page: this mark would be gone.
    b.client.execute("window.noReload = true; return true;", vec![]).await.unwrap();

    // A noop and an intent job submitted from the console reach `succeeded` in the open list.
    let noop = submit(&b, "noop", "console-bot", r#"{"sleep_ms": 300}"#).await;
    let intent = submit(&b, "intent-train", "console-bot", r#"{"dataset": "tiny.csv", "epochs": 3, "seed": 3}"#).await;
    b.wait_row(&noop, "succeeded", 60).await;
    b.wait_row(&intent, "succeeded", 240).await;
    b.shot("jobs").await;

    // The job view: metrics, curves, confusion matrix, promotion decision, worker.
    b.click(&format!(r#"tr[data-job-id="{intent}"] a"#)).await;
    b.wait_js(
        "the intent job's view",
        20,
        "return document.body.dataset.loaded === 'succeeded' && document.querySelectorAll('#cm-svg .cell').length;",
    )
    .await;
    let cells = b.client.execute("return document.querySelectorAll('#cm-svg .cell').length;", vec![]).await.unwrap();
    assert_eq!(cells, json!(16), "4 labels: a 4×4 confusion matrix");
    assert!(b.shown(".curve-loss").await && b.shown(".curve-val_accuracy").await, "loss and validation-accuracy curves");
    assert!(b.shown("#per-class-table").await);
    let promo = b.client.execute("return document.getElementById('promotion').textContent;", vec![]).await.unwrap();
    assert!(promo.as_str().unwrap().contains("promoted to production"), "{promo}");
    b.shot("job").await;

    // Cancel a running job from its view.
    b.click("nav a[data-view=jobs]").await;
    let long = submit(&b, "noop", "console-bot", r#"{"sleep_ms": 600000}"#).await;
    b.wait_js("the long job running", 60, &format!(r#"const r = document.querySelector('tr[data-job-id="{long}"]'); return r && ["started", "progress"].includes(r.dataset.status);"#)).await;
    b.click(&format!(r#"tr[data-job-id="{long}"] a"#)).await;
    b.click("#cancel-job").await;
    b.confirm().await;
    b.wait_js("the job cancelled in its open view", 60, "return document.body.dataset.loaded === 'cancelled';").await;

    // A dead letter: inspect its body (as text), replay it with a confirmation.
    b.click("nav a[data-view=jobs]").await;
    let dead = submit(&b, "noop", "console-bot", r#"{"fail": "permanent", "note": "<img src=x onerror=alert(1)>"}"#).await;
    b.wait_row(&dead, "dead", 60).await;
    open(&b, "nav a[data-view=dead-letters]").await;
    let row = format!(r#"tr[data-letter="{dead}"]"#);
    b.click(&format!("{row} button.inspect")).await;
    let body = b.wait_js("the letter's body", 10, "const p = document.querySelector('pre.body'); return p && p.textContent;").await;
    assert!(body.as_str().unwrap().contains("<img src=x onerror=alert(1)>"), "the body is shown escaped, as text: {body}");
    assert_eq!(b.client.execute("return document.querySelectorAll('pre.body img').length;", vec![]).await.unwrap(), json!(0));
    b.shot("dead-letters").await;
    b.click(&format!("{row} button.replay")).await;
    b.confirm().await;
    b.wait_js("replayed", 20, &format!("return document.getElementById('message').textContent === 'replayed {dead}';")).await;
    let store = Store::open(&db_url).await.unwrap();
    // The replay queued the job again, as a new run, and the worker took it (and refused it again).
    let mut statuses = Vec::new();
    for _ in 0..150 {
        statuses = store.events(&dead).await.unwrap().iter().map(|e| e.status).collect::<Vec<_>>();
        if statuses.iter().filter(|s| **s == JobStatus::Queued).count() >= 2 && statuses.last() == Some(&JobStatus::Dead) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(statuses.iter().filter(|s| **s == JobStatus::Queued).count(), 2, "queued again by the replay: {statuses:?}");

    // Models: roll the bot back, then promote the job again, each confirmed; the history shows both.
    open(&b, "nav a[data-view=models]").await;
    b.fill("#models-form input[name=bot]", "console-bot").await;
    b.click("#models-form button").await;
    b.wait_js(
        "production",
        20,
        &format!("const p = document.getElementById('production'); return p && p.textContent.includes('{intent}');"),
    )
    .await;
    b.click("#rollback").await;
    b.confirm().await;
    b.wait_js("rolled back", 20, "const p = document.getElementById('production'); return p && p.textContent === 'none';").await;
    b.fill("#promote-form input[name=job_id]", &intent).await;
    b.click("#promote-candidate").await;
    b.confirm().await;
    b.wait_js(
        "promoted again",
        20,
        &format!("const p = document.getElementById('production'); return p && p.textContent.includes('{intent}');"),
    )
    .await;
    let actions = b
        .client
        .execute("return [...document.querySelectorAll('#history-table tr td:nth-child(2)')].map(t => t.textContent);", vec![])
        .await
        .unwrap();
    assert_eq!(actions, json!(["promote", "rollback", "promote"]), "newest first");
    b.shot("models").await;

    // Queues: one row per job type, pushed by the stream.
    open(&b, "nav a[data-view=queues]").await;
    b.wait_js("the queues", 20, "return document.querySelectorAll('#queues-table tr').length === 3;").await;
    b.shot("queues").await;

    // Workers: the test's worker, live, from its heartbeats pushed by the stream.
    open(&b, "nav a[data-view=workers]").await;
    b.wait_js("the live worker", 20, "return document.querySelectorAll('#workers-table tbody tr[data-state=live]').length === 1;").await;
    let types =
        b.client.execute("return document.querySelector('#workers-table tbody tr td:nth-child(8)').textContent;", vec![]).await.unwrap();
    assert_eq!(types, json!("intent-train, noop"), "the worker's job types");
    b.shot("workers").await;

    // Audit: every action above by the token's name, newest first; filtered by action.
    open(&b, "nav a[data-view=audit]").await;
    b.wait_js("the audit trail", 20, "return document.querySelectorAll('#audit-table tbody tr').length === 8;").await;
    let trail = "return [...document.querySelectorAll('#audit-table tbody tr')].map(r => [r.querySelector('.actor').textContent, r.dataset.action, r.querySelector('.target').textContent]);";
    let ops = |action: &str, target: &str| json!(["ops", action, target]);
    let expected = json!([
        ops("promote", "console-bot"),
        ops("rollback", "console-bot"),
        ops("replay", &dead),
        ops("submit", &dead),
        ops("cancel", &long),
        ops("submit", &long),
        ops("submit", &intent),
        ops("submit", &noop)
    ]);
    assert_eq!(b.client.execute(trail, vec![]).await.unwrap(), expected, "the console's actions, newest first");
    b.shot("audit").await;
    b.client.execute("document.querySelector('#audit-filters select[name=action]').value = 'cancel'; return true;", vec![]).await.unwrap();
    b.click("#audit-filters button[type=submit]").await;
    b.wait_js("the cancel only", 10, "return document.querySelectorAll('#audit-table tbody tr').length === 1;").await;
    assert_eq!(b.client.execute(trail, vec![]).await.unwrap(), json!([ops("cancel", &long)]));
    b.click(&format!(r#"#audit-table a[href="/jobs/{long}"]"#)).await;
    b.wait_js("the cancelled job's view from its audit link", 20, "return document.body.dataset.loaded === 'cancelled';").await;

    // The control plane restarts; the open page reconnects and catches up without a reload.
    b.click("nav a[data-view=jobs]").await;
    b.wait_row(&noop, "succeeded", 20).await;
    let addr = cp.addr;
    cp.stop().await;
    let during = env.spec("noop", json!({}));
    env.submitter().submit(&during).await.unwrap();
    cp = ControlPlane::start(&env, &db_url, TOKENS, Some(addr)).await;
    b.wait_row(&during.job_id, "succeeded", 60).await;
    assert_eq!(b.client.execute("return window.noReload === true;", vec![]).await.unwrap(), json!(true), "no page load happened");

    // Pages of the job list (keyset, from the API): five jobs, two a page.
    b.client
        .execute(
            "const s = document.querySelector('#job-filters select[name=limit]'); s.add(new Option('2', '2')); s.value = '2'; return true;",
            vec![],
        )
        .await
        .unwrap();
    b.click("#job-filters button[type=submit]").await;
    b.wait_js(
        "the first page",
        10,
        "return document.querySelectorAll('#jobs-table tbody tr').length === 2 && !document.getElementById('jobs-older').hidden;",
    )
    .await;
    b.click("#jobs-older").await;
    b.wait_js("the second page", 10, "return document.querySelectorAll('#jobs-table tbody tr').length === 4;").await;
    b.click("#jobs-older").await;
    b.wait_js(
        "the last page",
        10,
        "return document.querySelectorAll('#jobs-table tbody tr').length === 5 && document.getElementById('jobs-older').hidden;",
    )
    .await;

    b.quit().await;
    worker.stop().await;
    store.close().await;
    cp.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn read_only_token_sees_the_job_view_but_no_action_and_a_forged_request_is_refused() {
    let env = Env::new(&["intent-train"]).await;
    let db = tempfile::tempdir().unwrap();
    let db_url = format!("sqlite://{}/cp.db", db.path().display());
    let cp = ControlPlane::start(&env, &db_url, TOKENS, None).await;
    let spec = env.spec("intent-train", json!({}));
    let job = spec.job_id.clone();
    // `/jobs/<id>#token=…` signs in and opens the job, and the token leaves the address bar. The
    // job is not recorded yet: the view says so, and the message goes when the job loads.
    let b = Browser::start().await;
    b.client.goto(&cp.url(&format!("/jobs/{job}#token=read-tok"))).await.unwrap();
    let error = "return document.getElementById('error').textContent;";
    let missing = b
        .wait_js("the job not found yet", 30, "const t = document.getElementById('error').textContent; return t.startsWith('404') && t;")
        .await;
    assert!(missing.as_str().unwrap().contains(&job), "{missing}");
    // Then a training job as a worker leaves it: metrics, confusion matrix and events.
    env.artifacts
        .put_json(
            &format!("jobs/{job}/metrics.json"),
            &json!({"accuracy": 0.9, "macro_f1": 0.88, "test_examples": 20,
                "per_class": {"balance": {"precision": 1.0, "recall": 0.9, "f1": 0.947, "support": 10}, "transfer": {"precision": 0.8, "recall": 0.9, "f1": 0.85, "support": 8}, "oos": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}}}),
        )
        .await
        .unwrap();
    env.artifacts
        .put_json(
            &format!("jobs/{job}/confusion_matrix.json"),
            &json!({"labels": ["balance", "oos", "transfer"], "matrix": [[9, 0, 1], [0, 2, 0], [1, 0, 7]]}),
        )
        .await
        .unwrap();

    amqp::publish_event(&env.ch, &env.topo, &JobEvent::queued(&spec)).await.unwrap();
    let mut started = JobEvent::new(&spec, JobStatus::Started, 1, event_seq(1, 0, 0));
    started.worker = Some(WorkerInfo { id: "gpu-worker-7".into(), attributes: [("gpu".to_string(), "nvidia-l4".to_string())].into() });
    amqp::publish_event(&env.ch, &env.topo, &started).await.unwrap();
    for epoch in 1..=3 {
        let mut p = JobEvent::new(&spec, JobStatus::Progress, 1, event_seq(1, 0, epoch));
        p.progress = Some(json!({"epoch": epoch, "epochs": 3, "loss": 1.0 / epoch as f64, "val_accuracy": 0.6 + 0.1 * epoch as f64}));
        amqp::publish_event(&env.ch, &env.topo, &p).await.unwrap();
    }
    let mut done = JobEvent::new(&spec, JobStatus::Succeeded, 1, event_seq(1, 0, 4));
    done.result = Some(
        json!({"accuracy": 0.9, "promotion": {"passed": true, "promoted": false, "mode": "manual", "reasons": ["manual promotion mode"]}}),
    );
    amqp::publish_event(&env.ch, &env.topo, &done).await.unwrap();
    b.wait_js("the job loaded", 30, "return document.body.dataset.loaded === 'succeeded';").await;
    assert_eq!(b.client.execute(error, vec![]).await.unwrap(), json!(""), "the 404 message is gone once the job loaded");
    let url = b.client.current_url().await.unwrap();
    assert!(!url.as_str().contains("read-tok") && url.fragment().is_none(), "{url}");
    assert_eq!(b.client.execute("return document.getElementById('who').textContent;", vec![]).await.unwrap(), json!("viewer (read)"));
    assert_eq!(b.client.execute("return document.querySelectorAll('#cm-svg .cell').length;", vec![]).await.unwrap(), json!(9));
    let cell = r#"#cm-svg .cell[data-row="balance"][data-col="transfer"][data-count="1"]"#;
    assert!(b.shown(cell).await);
    b.click(cell).await;
    let detail = b.client.execute("return document.getElementById('cm-detail').textContent;", vec![]).await.unwrap();
    assert!(detail.as_str().unwrap().starts_with("balance predicted as transfer: 1"), "{detail}");
    let text = b.client.execute("return document.body.innerText;", vec![]).await.unwrap();
    let text = text.as_str().unwrap();
    for want in ["gpu-worker-7", "nvidia-l4", "passed the gate (not promoted)", "0.9470", "transfer"] {
        assert!(text.contains(want), "{want} in {text}");
    }
    assert!(b.shown(".curve-loss").await);
    // Sortable per-class table: by f1, descending.
    b.click("#per-class-table th:nth-child(4)").await;
    let first =
        b.client.execute("return document.querySelector('#per-class-table tr:nth-child(2) td').textContent;", vec![]).await.unwrap();
    assert_eq!(first, json!("oos"));
    b.shot("job-read-only").await;

    // No action is offered to a read-only token, on any view.
    for css in ["#promote-job", "#cancel-job", "#retry-job", "#submit-job", "#dlq-replay-all", "#rollback", "#promote-form"] {
        assert!(!b.shown(css).await, "{css} is offered to a read-only token");
    }
    b.click("nav a[data-view=jobs]").await;
    b.wait_row(&job, "succeeded", 10).await;
    assert!(!b.shown("#submit-form").await);
    // A request forged in the page with the read token is refused by the API.
    let forged = b
        .client
        .execute_async(
            &format!(
                "const done = arguments[0]; fetch('/v1/models/promote/{job}', {{method: 'POST', headers: {{Authorization: 'Bearer read-tok'}}}}).then(r => done(r.status));"
            ),
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(forged, json!(403));
    b.quit().await;
    cp.stop().await;
    env.cleanup().await;
}
