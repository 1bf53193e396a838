//! `store`: a job store with N jobs (about 5 events each) across 10,000 bots, filled
//! through the store's own recording path, then timed: `jobs list` with each documented
//! filter, the demand query, and a filtered page over HTTP from `trainyard serve`.
//!
//! The fill is the recorder's write path without the broker: `Store::record_events` in
//! batches of the recorder's size ([`trainyard::recorder::BATCH`]), one batch at a time as
//! the recorder writes them, so its events/s is the recorder's sustained store throughput.

use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use trainyard::{
    api::Tokens,
    config::ControlConfig,
    serve::{serve, ServeError, ServeSettings},
    store::{JobCursor, JobFilter, Store},
};
use trainyard_common::{event::event_seq, topology::Topology, JobEvent, JobSpec, JobStatus, Trigger, TriggerKind};

const BOTS: usize = 10_000;
const TYPES: usize = 10;
/// Jobs are spread over this many days back from now.
const DAYS: i64 = 30;
/// Queries per filter (the store) and requests (HTTP).
const QUERIES: usize = 40;
const REQUESTS: usize = 100;
const PAGE: i64 = 50;

fn job_type(i: usize) -> String {
    format!("type-{}", i % TYPES)
}

fn bot(i: usize) -> String {
    format!("bot-{:05}", i % BOTS)
}

/// The events a recorder receives for job `i` of `n` (0 the newest): the newest 0.2 % are
/// still queued or running (the demand), the rest finished: 90 % succeeded, 10 % failed,
/// after a start and two progress reports.
fn job_events(i: usize, n: usize, now: DateTime<Utc>) -> Vec<JobEvent> {
    let kinds = [TriggerKind::Manual, TriggerKind::Schedule, TriggerKind::Event, TriggerKind::Api];
    let mut spec = JobSpec::new(job_type(i), bot(i * 7919), json!({}), Trigger { kind: kinds[i % 4], source: "bench".into() });
    spec.submitted_at = now - TimeDelta::microseconds((i as i64) * DAYS * 86_400_000_000 / n as i64);
    let at = |s: i64| spec.submitted_at + TimeDelta::seconds(s);
    let mut events = vec![JobEvent::queued(&spec)];
    let in_flight = i < n / 500;
    if in_flight && i.is_multiple_of(2) {
        return events;
    }
    let mut ev = |status, n: u32, secs, f: &dyn Fn(&mut JobEvent)| {
        let mut e = JobEvent::new(&spec, status, 1, event_seq(1, 0, n));
        e.at = at(secs);
        f(&mut e);
        events.push(e);
    };
    ev(JobStatus::Started, 0, 1, &|_| {});
    ev(JobStatus::Progress, 1, 30, &|e| e.progress = Some(json!({"epoch": 1, "loss": 0.9})));
    if in_flight {
        return events;
    }
    ev(JobStatus::Progress, 2, 60, &|e| e.progress = Some(json!({"epoch": 2, "loss": 0.5})));
    let status = if i % 10 == 3 { JobStatus::Failed } else { JobStatus::Succeeded };
    ev(status, 3, 90, &|e| e.result = (status == JobStatus::Succeeded).then(|| json!({"accuracy": 0.9})));
    events
}

/// Fills `store` with `n` jobs; returns (events, seconds). With `analyze`, statistics are
/// refreshed every 100,000 jobs, as autovacuum does on PostgreSQL after 10 % growth (this
/// machine runs PostgreSQL with autovacuum off: without statistics the recorder's reads of
/// `job_events` turn into sequential scans and the fill slows down with every row).
async fn fill(store: &Store, n: usize, analyze: bool) -> anyhow::Result<(usize, f64)> {
    let now = Utc::now();
    let t0 = Instant::now();
    let (mut batch, mut total) = (Vec::with_capacity(trainyard::recorder::BATCH), 0);
    for i in (0..n).rev() {
        let evs = job_events(i, n, now);
        if batch.len() + evs.len() > trainyard::recorder::BATCH {
            store.record_events(&batch).await?;
            total += batch.len();
            batch.clear();
        }
        batch.extend(evs);
        if i % 100_000 == 0 {
            if analyze {
                store.execute_raw("ANALYZE").await?;
            }
            eprintln!("store: {} of {n} jobs recorded, {:.0} events/s", n - i, total as f64 / t0.elapsed().as_secs_f64());
        }
    }
    store.record_events(&batch).await?;
    Ok((total + batch.len(), t0.elapsed().as_secs_f64()))
}

fn p95_ms(mut v: Vec<Duration>) -> f64 {
    v.sort();
    let i = ((v.len() as f64 * 0.95).ceil() as usize).clamp(1, v.len()) - 1;
    v[i].as_secs_f64() * 1000.0
}

/// The documented filters of `jobs list`, each with values drawn at random.
fn filter(name: &str, rng: &mut StdRng, now: DateTime<Utc>) -> JobFilter {
    let f = JobFilter { limit: PAGE, ..Default::default() };
    let day = now - TimeDelta::days(rng.random_range(1..DAYS));
    match name {
        "status" => JobFilter { status: Some(JobStatus::Failed), ..f },
        "status_queued" => JobFilter { status: Some(JobStatus::Queued), ..f },
        "type" => JobFilter { job_type: Some(job_type(rng.random_range(0..TYPES))), ..f },
        "bot" => JobFilter { bot: Some(bot(rng.random_range(0..BOTS))), ..f },
        "trigger" => JobFilter { trigger: Some(TriggerKind::Schedule), ..f },
        "since_until" => JobFilter { since: Some(day - TimeDelta::days(1)), until: Some(day), ..f },
        "search" => JobFilter { id_prefix: Some(format!("{:03x}", rng.random_range(0..0x1000))), ..f },
        "type_status" => JobFilter { job_type: Some(job_type(rng.random_range(0..TYPES))), status: Some(JobStatus::Failed), ..f },
        "bot_status" => JobFilter { bot: Some(bot(rng.random_range(0..BOTS))), status: Some(JobStatus::Succeeded), ..f },
        "next_page" => JobFilter { before: Some(JobCursor { created_at: trainyard::store::micros(day), job_id: "~".into() }), ..f },
        _ => f,
    }
}

const FILTERS: &[&str] =
    &["none", "status", "status_queued", "type", "bot", "trigger", "since_until", "search", "type_status", "bot_status", "next_page"];

/// p95 of each filter and of the demand query on a filled store.
async fn measure(store: &Store) -> anyhow::Result<Value> {
    let mut rng = StdRng::seed_from_u64(7);
    let now = Utc::now();
    let mut per_filter = serde_json::Map::new();
    for name in FILTERS {
        let mut times = Vec::new();
        for _ in 0..QUERIES {
            let f = filter(name, &mut rng, now);
            let t = Instant::now();
            store.list_jobs(&f).await?;
            times.push(t.elapsed());
        }
        per_filter.insert(name.to_string(), json!(p95_ms(times)));
    }
    let worst = per_filter.values().filter_map(Value::as_f64).fold(0.0, f64::max);
    let (mut demand, mut counts) = (Vec::new(), Vec::new());
    for _ in 0..QUERIES {
        let t = Instant::now();
        store.running_by_type().await?;
        store.oldest_queued_by_type().await?;
        demand.push(t.elapsed());
        let t = Instant::now();
        store.count_by_type_and_status().await?;
        counts.push(t.elapsed());
    }
    Ok(json!({"list_p95_ms": worst, "list_p95_ms_by_filter": per_filter, "demand_p95_ms": p95_ms(demand),
              "status_counts_p95_ms": p95_ms(counts)}))
}

/// A `trainyard serve` running in this process.
type Serving = tokio::task::JoinHandle<Result<(), ServeError>>;

/// `trainyard serve` on `url` in this process, on a port of its own: its address, the token
/// that stops it and its task.
async fn start_serve(amqp_url: &str, prefix: &str, url: &str) -> anyhow::Result<(std::net::SocketAddr, CancellationToken, Serving)> {
    let settings = ServeSettings {
        amqp_url: amqp_url.into(),
        topology: Topology::new(prefix),
        database_url: url.into(),
        artifacts: std::env::temp_dir().join(prefix).display().to_string(),
        job_types: vec!["noop".into()],
        tokens: Tokens::parse("bench:read:bench-token")?,
        config: ControlConfig::default(),
        body_limit: 1 << 20,
        demand_interval: Duration::from_secs(5),
        consumer_timeout: Duration::from_secs(trainyard_common::job::DEFAULT_CONSUMER_TIMEOUT_S),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move { serve(settings, listener, stop).await }
    });
    Ok((addr, stop, task))
}

/// Waits up to 120 s for the first page from `trainyard serve` on `addr`; the error says
/// why not: serve's own error when it ended, else the last answer or failure.
async fn wait_ready(http: &reqwest::Client, addr: std::net::SocketAddr, task: &mut Serving) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        if task.is_finished() {
            let ended = match task.await {
                Ok(Ok(())) => "it returned".to_string(),
                Ok(Err(e)) => e.to_string(),
                Err(e) => e.to_string(),
            };
            anyhow::bail!("trainyard serve ended before answering on {addr}: {ended}");
        }
        let last = match http.get(format!("http://{addr}/v1/jobs?limit=1")).bearer_auth("bench-token").send().await {
            Ok(r) if r.status().is_success() => break,
            Ok(r) => format!("HTTP {}: {}", r.status(), r.text().await.unwrap_or_default()),
            Err(e) => format!("{e:#}"),
        };
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "trainyard serve did not answer on {addr} within 120 s (last: {last})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("store: trainyard serve answered after {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// p95 of a filtered page (`bot` and `status`, random bot) over HTTP from `trainyard serve`
/// on `url`, over [`REQUESTS`] requests, and of `GET /readyz` (what a readiness probe asks).
/// Serve is stopped and its broker objects deleted whatever the outcome.
async fn http_p95(amqp_url: &str, prefix: &str, url: &str) -> anyhow::Result<(f64, f64)> {
    let (addr, stop, mut task) = start_serve(amqp_url, prefix, url).await?;
    // A request that hangs is a failure to answer too, not a bench that waits for ever.
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
    let timed = async {
        wait_ready(&http, addr, &mut task).await?;
        let mut rng = StdRng::seed_from_u64(11);
        let (mut pages, mut ready) = (Vec::new(), Vec::new());
        for _ in 0..REQUESTS {
            let q = format!("bot={}&status=succeeded&limit={PAGE}", bot(rng.random_range(0..BOTS)));
            let t = Instant::now();
            http.get(format!("http://{addr}/v1/jobs?{q}")).bearer_auth("bench-token").send().await?.error_for_status()?.bytes().await?;
            pages.push(t.elapsed());
        }
        for _ in 0..QUERIES {
            let t = Instant::now();
            http.get(format!("http://{addr}/readyz")).send().await?.error_for_status()?;
            ready.push(t.elapsed());
        }
        anyhow::Ok((p95_ms(pages), p95_ms(ready)))
    }
    .await;
    stop.cancel();
    if !task.is_finished() {
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }
    // What went wrong with serve first: a broker that is down fails the clean-up too.
    let cleaned = crate::broker::cleanup(amqp_url, prefix).await;
    let out = timed?;
    cleaned?;
    Ok(out)
}

/// Fills and measures one store.
async fn one(name: &str, url: &str, jobs: usize, amqp_url: &str, prefix: &str) -> anyhow::Result<Value> {
    let store = Store::open(url).await?;
    let (events, secs) = fill(&store, jobs, name == "postgres").await?;
    eprintln!("store {name}: {jobs} jobs, {events} events in {secs:.1} s");
    if name == "postgres" {
        // What autovacuum does after a bulk load, done now rather than whenever it wakes up.
        store.execute_raw("VACUUM ANALYZE jobs").await?;
    }
    let mut out = measure(&store).await?;
    store.close().await;
    out["jobs"] = json!(jobs);
    out["events"] = json!(events);
    out["fill_s"] = json!(secs);
    out["recorder_events_per_s"] = json!(events as f64 / secs);
    eprintln!("store {name}: {out}");
    // A failed HTTP measurement is reported, not allowed to lose the store's figures.
    match http_p95(amqp_url, &format!("{prefix}-{name}"), url).await {
        Ok((page, ready)) => {
            out["http_page_p95_ms"] = json!(page);
            out["readyz_p95_ms"] = json!(ready);
        }
        Err(e) => out["http_error"] = json!(format!("{e:#}")),
    }
    eprintln!("store {name}: {out}");
    Ok(out)
}

/// The scenario: SQLite under `work_dir`, PostgreSQL in a schema of its own on `pg_url`
/// (`backends`: which of the two).
pub async fn run(
    work_dir: &std::path::Path,
    pg_url: &str,
    jobs: usize,
    amqp_url: &str,
    prefix: &str,
    backends: &[String],
) -> anyhow::Result<Value> {
    let mut out = json!({});
    if backends.iter().any(|b| b == "sqlite") {
        let file = work_dir.join(format!("{prefix}-store.db"));
        let sqlite = one("sqlite", &format!("sqlite://{}", file.display()), jobs, amqp_url, prefix).await;
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", file.display()));
        }
        out["sqlite"] = sqlite?;
    }
    if !backends.iter().any(|b| b == "postgres") {
        return Ok(out);
    }
    let schema = format!("bench_{}", prefix.replace(|c: char| !c.is_ascii_alphanumeric(), "_"));
    let admin = Store::open(pg_url).await?;
    admin.execute_raw(&format!("CREATE SCHEMA {schema}")).await?;
    let sep = if pg_url.contains('?') { '&' } else { '?' };
    let url = format!("{pg_url}{sep}options=-c%20search_path%3D{schema}");
    let postgres = one("postgres", &url, jobs, amqp_url, prefix).await;
    admin.execute_raw(&format!("DROP SCHEMA {schema} CASCADE")).await?;
    admin.close().await;
    out["postgres"] = postgres?;
    Ok(out)
}
