//! Recording events: idempotent, set-based inserts and the projection of each
//! touched job's current run into its row.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use sqlx::{any::AnyRow, AssertSqlSafe, Row};
use trainyard_common::{JobEvent, JobSpec};

use super::{
    fresh::{self, FreshRow},
    from_micros, micros, placeholders, projection,
    projection::Projection,
    q, types, update_from_values, values_list, Backend, Recorded, Store, StoreError, ROWS_PER_STATEMENT,
};

impl Store {
    /// Records an event. Returns `false` when it was already recorded (a duplicate).
    pub async fn record_event(&self, event: &JobEvent) -> Result<bool, StoreError> {
        Ok(self.record_events(std::slice::from_ref(event)).await?[0].new)
    }

    /// Records a batch of events in one transaction; one [`Recorded`] per event, in order.
    ///
    /// Set-based, so a batch costs a handful of statements rather than several per
    /// event: create the missing job rows, read (and on PostgreSQL lock, in `job_id`
    /// order, so concurrent recorders cannot deadlock) their run, insert the events
    /// (`RETURNING` says which were new), then project each touched job once.
    pub async fn record_events(&self, events: &[JobEvent]) -> Result<Vec<Recorded>, StoreError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.pool.begin().await.map_err(q("begin recording events"))?;
        let out = self.record_events_in(&mut tx, events).await?;
        tx.commit().await.map_err(q("commit recorded events"))?;
        Ok(out)
    }

    /// [`Store::record_events`] inside the caller's transaction.
    ///
    /// Every job of the batch is locked before its stored events are read (a row this batch
    /// creates by its insert, the others `FOR UPDATE` on PostgreSQL; SQLite has one writer),
    /// so the events read are all there are until the commit: which of the batch's are new is
    /// known before they are inserted, and no row comes back per event (on SQLite each row
    /// returned is a hop between the database thread and the caller's).
    pub(super) async fn record_events_in(&self, tx: &mut sqlx::AnyConnection, events: &[JobEvent]) -> Result<Vec<Recorded>, StoreError> {
        let mut out = vec![Recorded { new: false, since: None }; events.len()];
        if events.is_empty() {
            return Ok(out);
        }
        // A write first, so SQLite takes its write lock now rather than failing to upgrade later.
        let rows = fresh::rows(events);
        let created = self.create_rows(tx, &rows).await?;
        let ids: Vec<&str> = rows.keys().copied().filter(|id| !created.contains(id)).collect();
        let mut state = self.read_runs(tx, &ids).await?;
        for &id in &created {
            let row = &rows[id];
            state.insert(id.to_string(), (row.run, row.run_since, row.created_at));
        }
        let event_runs = event_runs(events, &created, &state);
        self.advance_runs(tx, events, &event_runs, &mut state).await?;
        // A job created by this batch has no stored events; the others' are read once, for
        // both what is new and their projection.
        let stored = self.stored_events(tx, &ids).await?;
        let new = new_events(events, &event_runs, &stored);
        self.insert_events(tx, events, &event_runs, &new).await?;
        for &i in &new {
            out[i].new = true;
        }
        // A row this batch created holds its spec and projection already: its terminal events
        // only need their duration's start.
        for (i, e) in events.iter().enumerate() {
            let Some(row) = created.contains(e.job_id.as_str()).then(|| &rows[e.job_id.as_str()]) else { continue };
            if out[i].new && e.status.is_terminal() && event_runs[i] == row.run {
                out[i].since = Some(row.since);
            }
        }
        // Other jobs with new events of their current run: store the spec, project the row.
        let (touched, specs) = touched_jobs(events, &event_runs, &state, &created, &out);
        self.update_specs(tx, &specs).await?;
        let projections = project_touched(events, &touched, &state, &stored, &mut out)?;
        self.update_projections(tx, &projections).await?;
        Ok(out)
    }

    /// The run, run start and submission time of each job of `ids` that has a row, locked
    /// until the transaction ends on PostgreSQL (in `job_id` order, so concurrent recorders
    /// cannot deadlock).
    async fn read_runs(&self, tx: &mut sqlx::AnyConnection, ids: &[&str]) -> Result<RunState, StoreError> {
        let lock = if self.backend == Backend::Postgres { " FOR UPDATE" } else { "" };
        let sql = format!(
            "SELECT job_id, run, run_since, COALESCE(submitted_at, created_at) FROM jobs WHERE job_id IN ({{}}) ORDER BY job_id{lock}"
        );
        let mut state = HashMap::with_capacity(ids.len());
        for r in self.select_in(tx, &sql, ids, "read job rows").await? {
            state.insert(r.get(0), (r.get(1), r.get(2), r.get(3)));
        }
        Ok(state)
    }

    /// The stored events of each job of `ids` (locked by the caller), bodies undecoded.
    async fn stored_events(&self, tx: &mut sqlx::AnyConnection, ids: &[&str]) -> Result<HashMap<String, Vec<StoredEvent>>, StoreError> {
        let mut stored: HashMap<String, Vec<StoredEvent>> = HashMap::with_capacity(ids.len());
        let sql = "SELECT job_id, run, seq, body FROM job_events WHERE job_id IN ({})";
        for r in self.select_in(tx, sql, ids, "read events").await? {
            let event = StoredEvent { run: r.get(1), seq: r.get::<i64, _>(2) as u64, body: r.get(3) };
            stored.entry(r.get(0)).or_default().push(event);
        }
        Ok(stored)
    }

    /// The `recorded_at` of this transaction's events: the feed clock moved to now, or one past
    /// its last value when that is later. Its row stays locked until the commit, so every
    /// writer of events stamps in the order it commits: a reader of the change feed that sees a
    /// stamp has seen every smaller one (stamped from the clock as it was, a transaction that
    /// waited on a lock, or ran on a replica whose clock was behind, committed a smaller stamp
    /// after a reader had moved past it, and the live stream never showed its job).
    async fn feed_stamp(&self, tx: &mut sqlx::AnyConnection) -> Result<i64, StoreError> {
        let greatest = if self.backend == Backend::Postgres { "GREATEST" } else { "MAX" };
        let sql = format!(
            "INSERT INTO feed_clock (id, last) VALUES (1, $1) ON CONFLICT (id) DO UPDATE SET last = {greatest}(feed_clock.last + 1, excluded.last) \
             RETURNING last"
        );
        let row = sqlx::query(AssertSqlSafe(sql)).bind(micros(Utc::now())).fetch_one(&mut *tx).await.map_err(q("stamp recorded events"))?;
        Ok(row.get::<i64, _>(0))
    }

    /// Inserts the events at `new` (indexes into `events`, none of them stored: the caller
    /// holds their jobs' locks). One statement per chunk; a chunk that inserts fewer rows
    /// than it carries met events the store should not hold (of a job without a row): the
    /// batch is refused as inconsistent, and the recorder parks the entry that meets them.
    async fn insert_events(
        &self,
        tx: &mut sqlx::AnyConnection,
        events: &[JobEvent],
        runs: &[i64],
        new: &[usize],
    ) -> Result<(), StoreError> {
        if new.is_empty() {
            return Ok(());
        }
        let now = self.feed_stamp(tx).await?;
        for chunk in new.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "INSERT INTO job_events (job_id, run, seq, status, attempt, at, body, recorded_at) VALUES {} \
                 ON CONFLICT (job_id, run, seq) DO NOTHING",
                values_list(self.backend, chunk.len(), 8, "")
            );
            let mut query = sqlx::query(AssertSqlSafe(sql)).persistent(false);
            for &i in chunk {
                let e = &events[i];
                let body = serde_json::to_string(e).map_err(|err| StoreError::Decode { what: "event", reason: err.to_string() })?;
                query = query
                    .bind(&e.job_id)
                    .bind(runs[i])
                    .bind(e.seq as i64)
                    .bind(e.status.as_str())
                    .bind(i64::from(e.attempt))
                    .bind(micros(e.at))
                    .bind(body)
                    .bind(now);
            }
            let inserted = query.execute(&mut *tx).await.map_err(q("insert events"))?.rows_affected();
            if inserted != chunk.len() as u64 {
                let n = chunk.len();
                return Err(StoreError::Inconsistent(format!("{inserted} of {n} new events inserted: the others were stored already")));
            }
        }
        Ok(())
    }

    /// Creates the row of each job of the batch that has none, as the batch alone makes it
    /// ([`fresh`]); which rows it created. One statement per chunk.
    async fn create_rows<'a>(
        &self,
        conn: &mut sqlx::AnyConnection,
        rows: &BTreeMap<&'a str, FreshRow<'a>>,
    ) -> Result<HashSet<&'a str>, StoreError> {
        let mut created = HashSet::with_capacity(rows.len());
        for chunk in rows.values().collect::<Vec<_>>().chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "INSERT INTO jobs (job_id, job_type, bot, run, run_since, spec, trigger_kind, trigger_source, submitted_at, \
                 created_at, status, status_seq, attempts, worker, progress, result, error, started_at, finished_at, updated_at) \
                 VALUES {} ON CONFLICT (job_id) DO NOTHING RETURNING job_id",
                values_list(self.backend, chunk.len(), 20, "")
            );
            let mut query = sqlx::query(AssertSqlSafe(sql)).persistent(false);
            for row in chunk {
                let spec = row.spec.map(types::to_json);
                let p = &row.projection;
                query = query
                    .bind(row.job_id)
                    .bind(row.job_type)
                    .bind(row.bot)
                    .bind(row.run)
                    .bind(row.run_since)
                    .bind(spec)
                    .bind(row.spec.map(|s| s.trigger.kind.to_string()))
                    .bind(row.spec.map(|s| s.trigger.source.clone()))
                    .bind(row.spec.map(|s| micros(s.submitted_at)))
                    .bind(row.created_at);
                query = bind_projection(query, p);
            }
            for r in query.fetch_all(&mut *conn).await.map_err(q("create job rows"))? {
                let id: String = r.get(0);
                if let Some((&key, _)) = rows.get_key_value(id.as_str()) {
                    created.insert(key);
                }
            }
        }
        Ok(created)
    }

    /// Moves each job whose events carry a newer run than its row to that run (a dead-letter
    /// replay started it), from the earliest of those events: its row is then projected
    /// from the new run's events alone. Updates `state` to match.
    async fn advance_runs(
        &self,
        conn: &mut sqlx::AnyConnection,
        events: &[JobEvent],
        event_runs: &[i64],
        state: &mut RunState,
    ) -> Result<(), StoreError> {
        // job_id → (newest run, when its first event in this batch happened)
        let mut newest: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
        for (e, &run) in events.iter().zip(event_runs) {
            if run <= state[e.job_id.as_str()].0 {
                continue;
            }
            let at = micros(e.at);
            let slot = newest.entry(e.job_id.as_str()).or_insert((run, at));
            if run > slot.0 {
                *slot = (run, at);
            } else if run == slot.0 {
                slot.1 = slot.1.min(at);
            }
        }
        for (job_id, (run, since)) in newest {
            sqlx::query("UPDATE jobs SET run = $1, run_since = $2 WHERE job_id = $3")
                .bind(run)
                .bind(since)
                .bind(job_id)
                .execute(&mut *conn)
                .await
                .map_err(q(format!("start run {run} of job {job_id}")))?;
            if let Some(row) = state.get_mut(job_id) {
                (row.0, row.1) = (run, since);
            }
        }
        Ok(())
    }

    /// Runs `sql` (whose `{}` stands for the list of `ids`) over `ids` in chunks; all the rows.
    async fn select_in(&self, conn: &mut sqlx::AnyConnection, sql: &str, ids: &[&str], what: &str) -> Result<Vec<AnyRow>, StoreError> {
        let mut out = Vec::new();
        for chunk in ids.chunks(ROWS_PER_STATEMENT) {
            let text = sql.replacen("{}", &placeholders(self.backend, 1, chunk.len()), 1);
            let query = chunk.iter().fold(sqlx::query(AssertSqlSafe(text)).persistent(false), |q, id| q.bind(*id));
            out.extend(query.fetch_all(&mut *conn).await.map_err(q(what))?);
        }
        Ok(out)
    }

    /// Stores each job's spec (from its `queued` event) in its row: one statement per chunk.
    async fn update_specs(&self, conn: &mut sqlx::AnyConnection, specs: &[(&str, &JobSpec)]) -> Result<(), StoreError> {
        let set =
            "spec = v.column2, trigger_kind = v.column3, trigger_source = v.column4, submitted_at = v.column5, created_at = v.column5";
        for chunk in specs.chunks(ROWS_PER_STATEMENT) {
            let mut query = sqlx::query(AssertSqlSafe(update_from_values(self.backend, set, chunk.len(), 5))).persistent(false);
            for (job_id, spec) in chunk {
                let spec_json = serde_json::to_string(spec).map_err(|err| StoreError::Decode { what: "spec", reason: err.to_string() })?;
                query = query
                    .bind(*job_id)
                    .bind(spec_json)
                    .bind(spec.trigger.kind.to_string())
                    .bind(spec.trigger.source.clone())
                    .bind(micros(spec.submitted_at));
            }
            query.execute(&mut *conn).await.map_err(q("store job specs"))?;
        }
        Ok(())
    }

    /// Writes each job's projection of its current-run events into its row: one statement per chunk.
    async fn update_projections(&self, conn: &mut sqlx::AnyConnection, rows: &[(&str, Projection)]) -> Result<(), StoreError> {
        let set = "status = v.column2, status_seq = v.column3, attempts = v.column4, worker = v.column5, progress = v.column6, \
                   result = v.column7, error = v.column8, started_at = v.column9, finished_at = v.column10, updated_at = v.column11";
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            let mut query = sqlx::query(AssertSqlSafe(update_from_values(self.backend, set, chunk.len(), 11))).persistent(false);
            for (job_id, p) in chunk {
                query = bind_projection(query.bind(*job_id), p);
            }
            query.execute(&mut *conn).await.map_err(q("update job rows"))?;
        }
        Ok(())
    }
}

/// An event as stored: its key and its undecoded body.
struct StoredEvent {
    run: i64,
    seq: u64,
    body: String,
}

/// The events of the batch to insert, by index, in `(job, run, seq)` order: each key once
/// (the first copy in the batch), and none that is stored already.
fn new_events(events: &[JobEvent], runs: &[i64], stored: &HashMap<String, Vec<StoredEvent>>) -> Vec<usize> {
    let stored: HashSet<(&str, i64, u64)> =
        stored.iter().flat_map(|(job_id, evs)| evs.iter().map(move |s| (job_id.as_str(), s.run, s.seq))).collect();
    let mut keyed: HashMap<(&str, i64, u64), usize> = HashMap::with_capacity(events.len());
    for (i, e) in events.iter().enumerate() {
        if !stored.contains(&(e.job_id.as_str(), runs[i], e.seq)) {
            keyed.entry((e.job_id.as_str(), runs[i], e.seq)).or_insert(i);
        }
    }
    let mut unique: Vec<((&str, i64, u64), usize)> = keyed.into_iter().collect();
    unique.sort_unstable();
    unique.into_iter().map(|(_, i)| i).collect()
}

/// Job id → (run, run start, when the job was submitted as far as its row knows).
type RunState = HashMap<String, (i64, i64, i64)>;

/// The run each event belongs to: the one it carries (a replay sets it in the job message).
/// Events of releases before runs were carried are filed by time, as those releases did.
fn event_runs(events: &[JobEvent], created: &HashSet<&str>, state: &RunState) -> Vec<i64> {
    events
        .iter()
        .map(|e| match e.run {
            Some(run) => i64::from(run),
            None if created.contains(e.job_id.as_str()) => fresh::run_of(e),
            None => legacy_run(state[e.job_id.as_str()], e.at),
        })
        .collect()
}

/// Job id → the indexes of its new events of its current run.
type Touched<'a> = BTreeMap<&'a str, Vec<usize>>;

/// Of the jobs that had a row before the batch: those with new events of their current run,
/// and the specs the new events carry.
fn touched_jobs<'a>(
    events: &'a [JobEvent],
    runs: &[i64],
    state: &RunState,
    created: &HashSet<&str>,
    out: &[Recorded],
) -> (Touched<'a>, Vec<(&'a str, &'a JobSpec)>) {
    let mut touched = Touched::new();
    let mut specs = Vec::new();
    for (i, e) in events.iter().enumerate().filter(|(i, e)| out[*i].new && !created.contains(e.job_id.as_str())) {
        if runs[i] == state[e.job_id.as_str()].0 {
            touched.entry(e.job_id.as_str()).or_default().push(i);
        }
        if let Some(spec) = &e.spec {
            specs.push((e.job_id.as_str(), spec));
        }
    }
    (touched, specs)
}

/// The projection of each touched job's current run from its stored and new events; sets the
/// duration's start of each new terminal event.
fn project_touched<'a>(
    events: &[JobEvent],
    touched: &Touched<'a>,
    state: &RunState,
    stored: &HashMap<String, Vec<StoredEvent>>,
    out: &mut [Recorded],
) -> Result<Vec<(&'a str, Projection)>, StoreError> {
    let mut projections = Vec::with_capacity(touched.len());
    for (&job_id, new_events) in touched {
        let run = state[job_id].0;
        let mut run_events = Vec::new();
        for s in stored.get(job_id).into_iter().flatten().filter(|s| s.run == run) {
            run_events.push(types::from_json::<JobEvent>("event", &s.body)?);
        }
        run_events.extend(new_events.iter().map(|&i| events[i].clone()));
        run_events.sort_by_key(|e| e.seq);
        // A job's duration starts at its submission: the `queued` event's spec, else the row.
        let since = run_events.iter().find_map(|e| e.spec.as_ref().map(|s| s.submitted_at)).unwrap_or_else(|| from_micros(state[job_id].2));
        for &i in new_events.iter().filter(|&&i| events[i].status.is_terminal()) {
            out[i].since = Some(since);
        }
        if let Some(p) = projection::project(&run_events) {
            projections.push((job_id, p));
        }
    }
    Ok(projections)
}

/// The run of an event that carries none (written before runs were carried): the row's
/// run, or the one before if the event happened before the latest replay started.
fn legacy_run((run, run_since, _): (i64, i64, i64), at: DateTime<Utc>) -> i64 {
    if run > 0 && micros(at) < run_since {
        run - 1
    } else {
        run
    }
}

/// Binds a projection's ten columns: status, status_seq, attempts, worker, progress,
/// result, error, started_at, finished_at, updated_at.
fn bind_projection<'q>(
    query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>,
    p: &Projection,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments> {
    query
        .bind(p.status.as_str())
        .bind(p.status_seq as i64)
        .bind(i64::from(p.attempts))
        .bind(p.worker.as_ref().map(types::to_json))
        .bind(p.progress.as_ref().map(types::to_json))
        .bind(p.result.as_ref().map(types::to_json))
        .bind(p.error.as_ref().map(types::to_json))
        .bind(p.started_at.map(micros))
        .bind(p.finished_at.map(micros))
        .bind(micros(p.updated_at))
}
