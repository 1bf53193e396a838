//! The console's live operations views in headless Chromium against a real control plane,
//! workers and RabbitMQ: the Schedules & triggers view of a schedule and a trigger rule that
//! fired (next and last fire, the last match arriving live), a running job's log lines
//! appearing in its view as the worker logs them, and the Queues view's consumers equal to the
//! workers consuming. Screenshots: `schedules`, `job-live-log`, `queues-consumers`.

use std::time::Duration;

use chrono::{DateTime, Datelike, TimeZone, Utc};
use lapin::{options::QueueDeclareOptions, types::FieldTable};
use serde_json::{json, Value};
use trainyard::{
    config::ControlConfig,
    scheduler::fire_job_id,
    store::{JobFilter, Store},
};
use trainyard_common::TriggerKind;

use crate::{
    browser::{Browser, ControlPlane},
    support::Env,
};

const TOKENS: &str = "ops:admin:admin-tok";

/// A yearly schedule that may fire one missed fire, and a rule firing on every dataset update.
const CONFIG: &str = r#"
[[schedule]]
name = "yearly"
cron = "0 0 1 1 *"
job_type = "noop"
bot = "sched-bot"
missed = "fire_once"

[[trigger]]
name = "dataset-updated"
routing_key = "bot.dataset_updated"
job_type = "noop"
bot = "{{bot}}"
debounce_s = 0
"#;

fn new_year(year: i32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(year, 1, 1, 0, 0, 0).unwrap()
}

/// Waits until `queue` exists with at least `n` consumers (a fresh channel per look: a passive
/// declare of a missing queue closes its channel); their number.
async fn consumed(env: &Env, queue: &str, n: u32) -> u32 {
    for _ in 0..200 {
        let ch = env.conn.create_channel().await.unwrap();
        let passive = QueueDeclareOptions { passive: true, ..Default::default() };
        if let Ok(q) = ch.queue_declare(queue.into(), passive, FieldTable::default()).await {
            let _ = ch.close(200, "done".into()).await;
            if q.consumer_count() >= n {
                return q.consumer_count();
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{queue} never had {n} consumers");
}

/// A JavaScript expression's value in the page.
async fn js(b: &Browser, script: &str) -> Value {
    b.client.execute(script, vec![]).await.unwrap()
}

#[tokio::test]
async fn console_shows_schedule_and_trigger_fires_live_logs_and_queue_consumers() {
    let env = Env::new(&["noop"]).await;
    let db = tempfile::tempdir().unwrap();
    let db_url = format!("sqlite://{}/cp.db", db.path().display());
    // The schedule last fired a year before its latest due time: with `fire_once`, the control
    // plane fires that missed one as it starts, so the fire time and its job id are known.
    let year = Utc::now().year();
    let (last_year, this_year, next_year) = (new_year(year - 1), new_year(year), new_year(year + 1));
    let store = Store::open(&db_url).await.unwrap();
    assert!(store.claim_schedule_fire_at("yearly", last_year, &fire_job_id("yearly", last_year), last_year).await.unwrap());
    store.mark_fire_published("yearly", last_year).await.unwrap();
    let config = ControlConfig::parse(CONFIG).unwrap();
    let cp = ControlPlane::start_with(&env, &db_url, TOKENS, None, config).await;
    let mut worker = env.worker_process("noop", &[]);
    let b = Browser::start().await;

    b.client.goto(&cp.url("/#token=admin-tok")).await.unwrap();
    b.wait_js("the live stream", 20, "return document.getElementById('live').className === 'on';").await;
    b.client.execute("window.noReload = true; return true;", vec![]).await.unwrap();

    // Schedules & triggers: the fire at start-up with its job, the next one; no match yet.
    b.click("nav a[data-view=schedules]").await;
    let row = r#"#schedules-table tr[data-schedule="yearly"]"#;
    let fired = fire_job_id("yearly", this_year);
    b.wait_js(
        "the schedule's fire at start-up",
        30,
        &format!(r#"const a = document.querySelector('{row} .last-job a'); return a && a.textContent === "{fired}";"#),
    )
    .await;
    assert_eq!(js(&b, &format!("return document.querySelector('{row} .last-fire').dataset.at;")).await, json!(this_year));
    assert_eq!(js(&b, &format!("return document.querySelector('{row} .next-fire').dataset.at;")).await, json!(next_year));
    let rule = r#"#triggers-table tr[data-rule="dataset-updated"]"#;
    assert_eq!(js(&b, &format!("return document.querySelector('{rule} .last-match').dataset.at;")).await, json!(""));

    // A dataset update fires the rule; its match shows up in the open view.
    let triggers = format!("{}.triggers.control-plane", env.topo.prefix());
    consumed(&env, &triggers, 1).await;
    let event = br#"{"bot": "trigger-bot"}"#;
    trainyard_common::amqp::publish_confirmed(
        &env.ch,
        &env.topo.triggers_exchange(),
        "bot.dataset_updated",
        event,
        Default::default(),
        false,
    )
    .await
    .unwrap();
    let filter = JobFilter { trigger: Some(TriggerKind::Event), ..Default::default() };
    let mut matched = Vec::new();
    for _ in 0..100 {
        matched = store.list_jobs(&filter).await.unwrap();
        if !matched.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let [job] = matched.as_slice() else { panic!("one job from the trigger, not {matched:?}") };
    assert_eq!(job.bot, "trigger-bot");
    b.wait_js(
        "the trigger's match, live",
        30,
        &format!(r#"const a = document.querySelector('{rule} .last-job a'); return a && a.textContent === "{}";"#, job.job_id),
    )
    .await;
    assert_eq!(js(&b, &format!("return document.querySelector('{rule} .last-match').dataset.at;")).await, json!(job.created_at));
    b.shot("schedules").await;

    // A running job's log lines appear in its open view as the worker logs them.
    let spec = env.spec("noop", json!({"sleep_ms": 120_000, "log_every_ms": 300}));
    env.submitter().submit(&spec).await.unwrap();
    let id = &spec.job_id;
    b.click("nav a[data-view=jobs]").await;
    let running = format!(
        r#"const r = document.querySelector('tr[data-job-id="{id}"]'); return r && ["started", "progress"].includes(r.dataset.status);"#
    );
    b.wait_js("the logging job running", 30, &running).await;
    b.click(&format!(r#"tr[data-job-id="{id}"] a"#)).await;
    let count = "(() => { const p = document.getElementById('live-log-text'); \
                 return p ? (p.textContent.match(/noop still sleeping/g) || []).length : 0; })()";
    let first = b.wait_js("live log lines", 30, &format!("return {count};")).await.as_u64().unwrap();
    b.wait_js("more live log lines", 30, &format!("return {count} >= {};", first + 3)).await;
    let status = js(&b, "return document.getElementById('status').textContent;").await;
    assert!(matches!(status.as_str(), Some("started" | "progress")), "the job still runs: {status}");
    assert_eq!(js(&b, "return window.noReload === true;").await, json!(true), "no page load happened");
    js(&b, "document.getElementById('live-log').scrollIntoView(); return true;").await;
    b.shot("job-live-log").await;

    // Queues: the consumers of the noop queue are the two workers.
    let in_process = env.spawn_worker(&["noop"], |_| {});
    let queue = env.topo.tier_queues("noop")[0].clone();
    assert_eq!(consumed(&env, &queue, 2).await, 2);
    b.click("nav a[data-view=queues]").await;
    let consumers = "(() => { const r = [...document.querySelectorAll('#queues-table tr')].find(r => r.cells[0].textContent === 'noop'); \
                     return r ? r.cells[4].textContent : null; })()";
    b.wait_js("two consumers", 30, &format!("return {consumers} === '2';")).await;
    b.shot("queues-consumers").await;

    b.quit().await;
    let _ = worker.kill();
    let _ = worker.wait();
    in_process.stop().await;
    store.close().await;
    cp.stop().await;
    env.cleanup().await;
}
