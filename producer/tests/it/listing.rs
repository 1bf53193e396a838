//! `jobs list` at scale: keyset pages, each filter, and the cursor over HTTP.

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, TimeDelta, Utc};
use trainyard::{
    config::ControlConfig,
    store::{JobCursor, JobFilter, JobRow, Store},
};
use trainyard_common::{JobEvent, JobSpec, JobStatus, Trigger, TriggerKind};

use crate::{api::start, helpers::*};

/// `n` jobs, submitted one second apart back from `base` in groups of three sharing a
/// time (ties broken by job id), over 3 types, 4 bots and the 4 trigger kinds; every
/// fifth one succeeded. Returns their specs.
async fn seed(store: &Store, n: usize, base: DateTime<Utc>) -> Vec<JobSpec> {
    let kinds = [TriggerKind::Manual, TriggerKind::Schedule, TriggerKind::Event, TriggerKind::Api];
    let mut specs = Vec::new();
    let mut events = Vec::new();
    for i in 0..n {
        let mut s = JobSpec::new(
            ["noop", "intent", "eval"][i % 3],
            format!("bot-{}", i % 4),
            serde_json::json!({}),
            Trigger { kind: kinds[i % 4], source: "it".into() },
        );
        s.submitted_at = base - TimeDelta::seconds((i / 3) as i64);
        events.push(JobEvent::queued(&s));
        if i % 5 == 0 {
            events.push(JobEvent::new(&s, JobStatus::Succeeded, 1, 1));
        }
        specs.push(s);
    }
    store.record_events(&events).await.unwrap();
    specs
}

/// Walks every page of `filter`, `page` at a time, calling `between` after each page.
async fn walk<F: AsyncFnMut()>(store: &Store, filter: JobFilter, page: i64, mut between: F) -> Vec<JobRow> {
    let mut all = Vec::new();
    let mut f = JobFilter { limit: page, ..filter };
    loop {
        let rows = store.list_jobs(&f).await.unwrap();
        let full = rows.len() as i64 == page;
        f.before = rows.last().map(JobCursor::after);
        all.extend(rows);
        if !full {
            return all;
        }
        between().await;
    }
}

async fn pages_and_filters(store: Store) {
    assert!(store.is_empty().await.unwrap(), "a new store is empty");
    let base = Utc::now() - TimeDelta::hours(1);
    let specs = seed(&store, 120, base).await;
    assert!(!store.is_empty().await.unwrap(), "a store with jobs is not empty");
    // New jobs arrive while the pages are read: the walk still sees each old job once.
    let mut added = 0;
    let seen = walk(&store, JobFilter::default(), 7, async || {
        added += 1;
        let s = spec("noop", "bot-late");
        store.record_events(&[JobEvent::queued(&s)]).await.unwrap();
    })
    .await;
    assert!(added >= 17, "{added} pages");
    let ids: Vec<&str> = seen.iter().map(|j| j.job_id.as_str()).collect();
    let unique: BTreeSet<&str> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "a job listed twice");
    let old: BTreeSet<&str> = specs.iter().map(|s| s.job_id.as_str()).collect();
    assert!(old.is_subset(&unique), "{} old jobs missed", old.difference(&unique).count());
    let keys: Vec<(DateTime<Utc>, &str)> = seen.iter().map(|j| (j.created_at, j.job_id.as_str())).collect();
    assert!(keys.windows(2).all(|w| w[0] > w[1]), "pages out of order");

    // Each filter, against the same predicate applied to the seeded specs.
    let by_id: HashMap<&str, &JobSpec> = specs.iter().map(|s| (s.job_id.as_str(), s)).collect();
    let expect = |pred: &dyn Fn(usize, &JobSpec) -> bool| -> BTreeSet<String> {
        specs.iter().enumerate().filter(|(i, s)| pred(*i, s)).map(|(_, s)| s.job_id.clone()).collect()
    };
    let only_old = |rows: Vec<JobRow>| -> BTreeSet<String> {
        rows.into_iter().filter(|j| by_id.contains_key(j.job_id.as_str())).map(|j| j.job_id).collect()
    };
    let prefix = specs[42].job_id[..3].to_string();
    let cases: Vec<(&str, JobFilter, BTreeSet<String>)> = vec![
        ("status", JobFilter { status: Some(JobStatus::Succeeded), ..Default::default() }, expect(&|i, _| i % 5 == 0)),
        ("type", JobFilter { job_type: Some("intent".into()), ..Default::default() }, expect(&|i, _| i % 3 == 1)),
        ("bot", JobFilter { bot: Some("bot-2".into()), ..Default::default() }, expect(&|i, _| i % 4 == 2)),
        ("trigger", JobFilter { trigger: Some(TriggerKind::Schedule), ..Default::default() }, expect(&|i, _| i % 4 == 1)),
        (
            "since+until",
            JobFilter { since: Some(base - TimeDelta::seconds(20)), until: Some(base - TimeDelta::seconds(5)), ..Default::default() },
            expect(&|i, _| (18..=62).contains(&i)),
        ),
        ("id prefix", JobFilter { id_prefix: Some(prefix.clone()), ..Default::default() }, expect(&|_, s| s.job_id.starts_with(&prefix))),
        (
            "status+bot",
            JobFilter { status: Some(JobStatus::Queued), bot: Some("bot-1".into()), ..Default::default() },
            expect(&|i, _| i % 4 == 1 && i % 5 != 0),
        ),
    ];
    for (what, filter, want) in cases {
        assert!(!want.is_empty(), "{what}: nothing to find");
        let got = only_old(walk(&store, filter, 4, async || {}).await);
        assert_eq!(got, want, "filter {what}");
    }
}

#[tokio::test]
async fn pages_walk_every_job_once_and_each_filter_narrows_on_sqlite() {
    let (store, _dir, _) = sqlite_store().await;
    pages_and_filters(store).await;
}

#[tokio::test]
async fn pages_walk_every_job_once_and_each_filter_narrows_on_postgres() {
    let schema = PgSchema::new().await;
    let store = Store::open(&schema.url).await.unwrap();
    pages_and_filters(store.clone()).await;
    store.close().await;
    schema.drop().await;
}

#[tokio::test]
async fn http_job_list_pages_with_the_next_cursor_header_and_refuses_a_bad_cursor() {
    let server = start(&["noop"], "reader:read:r-tok", 4096, ControlConfig::default()).await;
    let store = Store::open(&server.db_url).await.unwrap();
    let specs = seed(&store, 9, Utc::now()).await;
    let http = reqwest::Client::new();
    let get = |q: String| http.get(server.url(&format!("/v1/jobs?{q}"))).bearer_auth("r-tok").send();
    let mut seen = Vec::new();
    let mut query = "bot=bot-1&limit=1".to_string();
    loop {
        let resp = get(query.clone()).await.unwrap();
        assert_eq!(resp.status(), 200);
        let next = resp.headers().get("x-next-cursor").map(|h| h.to_str().unwrap().to_string());
        let page: Vec<JobRow> = resp.json().await.unwrap();
        seen.extend(page.into_iter().map(|j| j.job_id));
        let Some(c) = next else { break };
        query = format!("bot=bot-1&limit=1&before={c}");
    }
    let want: Vec<String> = specs.iter().enumerate().filter(|(i, _)| i % 4 == 1).map(|(_, s)| s.job_id.clone()).collect();
    assert_eq!(seen.iter().collect::<BTreeSet<_>>(), want.iter().collect::<BTreeSet<_>>());
    assert_eq!(seen.len(), want.len());
    let q = &specs[3].job_id[..8];
    let found: Vec<JobRow> = get(format!("q={q}&trigger=api")).await.unwrap().json().await.unwrap();
    assert!(found.iter().any(|j| j.job_id == specs[3].job_id), "search by id prefix");
    for bad in ["nonsense", "12:", "x:abc"] {
        let resp = get(format!("before={bad}")).await.unwrap();
        assert_eq!(resp.status(), 400, "cursor {bad:?}");
        let body: serde_json::Value = resp.json().await.unwrap();
        assert!(body["error"].as_str().unwrap().contains("bad cursor"), "{body}");
    }
    store.close().await;
    server.stop(&["noop"]).await;
}

/// An audit record's actor, action and target come back as they were given and are found by
/// them, on both backends: they are stored escaped (a NUL, which PostgreSQL refuses in text,
/// as `\0`, and so the backslash as `\\`), and a filter was compared with the stored form, so
/// an actor `CORP\alice` was listed as `CORP\\alice` and never found by its name.
async fn audit_text_round_trips_on(url: &str) {
    let store = trainyard::store::Store::open(url).await.unwrap();
    let record = trainyard::audit::AuditRecord::new("CORP\\alice", "cancel", "job\0with\\0nul", None);
    store.record_audit(std::slice::from_ref(&record)).await.unwrap();
    let filter = trainyard::store::AuditFilter { actor: Some("CORP\\alice".into()), ..Default::default() };
    let found = store.audit(&filter).await.unwrap();
    assert_eq!(found.iter().map(|r| (r.actor.as_str(), r.target.as_str())).collect::<Vec<_>>(), [("CORP\\alice", "job\0with\\0nul")]);
    let by_target = trainyard::store::AuditFilter { target: Some("job\0with\\0nul".into()), ..Default::default() };
    assert_eq!(store.audit(&by_target).await.unwrap().len(), 1);
    store.close().await;
}

#[tokio::test]
async fn audit_records_come_back_as_given_and_are_found_by_them_on_sqlite_and_postgres() {
    on_sqlite_and_postgres(|url| async move { audit_text_round_trips_on(&url).await }).await;
}
