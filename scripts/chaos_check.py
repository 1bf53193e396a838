#!/usr/bin/env python3
"""Verdict of a chaos run (scripts/chaos.sh): reads the job store (SQLite, as
written by `trainyard serve`) and the artifact store (a local directory), and
compares them with the list of jobs the broker confirmed at submit time.

  chaos_check.py progress IDS DB            -> prints "<final> <submitted>"
  chaos_check.py verdict IDS DB ARTIFACTS RSS_LOG [key=value ...]
                                              -> prints the one JSON line
  chaos_check.py position DB                -> prints the recorder's stream offset (-1 before any)
  chaos_check.py selftest                     -> checks that the verdict fails when it must

The verdict fails (exit 1, the reasons on stderr) unless: succeeded equals the jobs
meant to succeed (`expected_succeeded`: kinds ok, flaky, train, latest), dead equals the jobs
made to fail (`expected_dead`: kind fatal; `dead` counts dead and failed), lost and
duplicate results are 0, every older job of a coalescing key (kind keyed) ended superseded
(naming a job of its key in `superseded_by`), cancelled (it was running when a newer one came:
`supersede_running`) or succeeded (it finished first), and at least one was superseded, `resumed_from_checkpoint` >= 1 whenever a training job was
killed after its first checkpoint (`training_jobs_killed`: a training job whose
attempt was redelivered after it had reported epoch >= 1), and every fault counted
(key=value pairs kills, sigterms, connection_closes, broker_restarts, leader_stops) is at
least the number planned (planned_<key>=N, not printed). With leader_stop_times=T1,T2 (epoch
seconds of node stops, `chaos.sh --cluster`), it reports `leader_stop_recovery_s`, the time from
each stop to the next job completion, and fails when no job completed after a stop or, with
recovery_bound_s=S, when one took longer than S.

A job is *lost* when the store has no final status for it (succeeded, failed,
dead, cancelled). A result is *duplicated* when the store holds two different
`succeeded` events for one job (two attempts both recorded a success), or when
the store's `succeeded` event is not the one in the job's outcome record (`outcomes/<last 2 chars>/<id>.json`).
"""

import json
import os
import sqlite3
import sys

FINAL = ("succeeded", "failed", "dead", "cancelled", "superseded")
# What an older job of a coalescing key may end as.
KEYED_ENDS = ("superseded", "cancelled", "succeeded")


def read_ids(path):
    """job id -> (job type, kind); coalescing key -> job ids."""
    jobs, keys = {}, {}
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3:
                jobs[parts[0]] = (parts[1], parts[2])
            if len(parts) >= 4:
                keys.setdefault(parts[3], set()).add(parts[0])
    return jobs, keys


def connect(db):
    path = db[len("sqlite://"):] if db.startswith("sqlite://") else db
    if not os.path.exists(path):
        return None
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    conn.execute("PRAGMA busy_timeout = 30000")
    return conn


def statuses(conn):
    if conn is None:
        return {}
    try:
        return dict(conn.execute("SELECT job_id, status FROM jobs"))
    except sqlite3.OperationalError:  # not created yet
        return {}


def progress(ids_path, db):
    jobs, _keys = read_ids(ids_path)
    st = statuses(connect(db))
    final = sum(1 for j in jobs if st.get(j) in FINAL)
    print(final, len(jobs))


def position(db):
    """The recorder's position in the events stream (offset of the last entry recorded), -1 before any."""
    conn = connect(db)
    try:
        row = conn.execute("SELECT MAX(last_offset) FROM stream_positions").fetchone() if conn else None
    except sqlite3.OperationalError:  # not created yet
        row = None
    print(row[0] if row and row[0] is not None else -1)


def superseded_by(conn):
    """job id -> the job named in a superseded job's result."""
    if conn is None:
        return {}
    return {j: (json.loads(r or "{}") or {}).get("superseded_by") for j, r in conn.execute("SELECT job_id, result FROM jobs WHERE status = 'superseded'")}


def coalescing(jobs, keys, st, replaced_by):
    """Counts of the older jobs of coalescing keys, and what is wrong with them."""
    key_of = {j: k for k, ids in keys.items() for j in ids}
    keyed = [j for j, (_t, kind) in jobs.items() if kind == "keyed"]
    wrong = []
    for j in keyed:
        if st.get(j) in FINAL and st.get(j) not in KEYED_ENDS:
            wrong.append(f"older job {j} of key {key_of.get(j)} ended {st.get(j)}")
        if st.get(j) == "superseded" and replaced_by.get(j) not in keys.get(key_of.get(j), set()) - {j}:
            wrong.append(f"{j} superseded by {replaced_by.get(j)!r}, not a newer job of key {key_of.get(j)}")
    counts = {
        "coalesced": len(keyed),
        "superseded": sum(1 for j in keyed if st.get(j) in ("superseded", "cancelled")),
        "keyed_ran_first": sum(1 for j in keyed if st.get(j) == "succeeded"),
    }
    return counts, wrong


def verdict(ids_path, db, artifacts, rss_log, extra):
    jobs, keys = read_ids(ids_path)
    conn = connect(db)
    st = statuses(conn)
    succeeded_events = {}
    redeliveries = 0
    if conn is not None:
        for job_id, run, seq, status, body in conn.execute(
            "SELECT job_id, run, seq, status, body FROM job_events WHERE status IN ('succeeded', 'started')"
        ):
            if job_id not in jobs:
                continue
            if status == "succeeded":
                succeeded_events.setdefault(job_id, set()).add((run, seq))
            else:
                ev = json.loads(body)
                if ((ev.get("progress") or {}).get("redelivery") or 0) > 0:
                    redeliveries += 1

    # Training jobs interrupted after their first checkpoint: a `started` with redelivery > 0
    # after a progress event of epoch >= 1 of the same run.
    training_killed = set()
    if conn is not None:
        seen_epoch = {}
        for job_id, run, seq, status, body in conn.execute(
            "SELECT job_id, run, seq, status, body FROM job_events WHERE status IN ('progress', 'started') ORDER BY job_id, run, seq"
        ):
            if job_id not in jobs or jobs[job_id][0] != "intent-train":
                continue
            ev = json.loads(body)
            p = ev.get("progress") or {}
            if status == "progress" and (p.get("epoch") or 0) >= 1:
                seen_epoch[(job_id, run)] = True
            elif status == "started" and (p.get("redelivery") or 0) > 0 and seen_epoch.get((job_id, run)):
                training_killed.add(job_id)

    lost = [j for j in jobs if st.get(j) not in FINAL]
    duplicates = set(j for j, s in succeeded_events.items() if len(s) > 1)
    resumed = 0
    outcome_missing = []
    for job_id, (job_type, _kind) in jobs.items():
        path = os.path.join(artifacts, "outcomes", job_id[-2:], job_id + ".json")
        outcome = None
        if os.path.exists(path):
            with open(path) as f:
                outcome = json.load(f)["event"]
        if st.get(job_id) == "succeeded":
            if outcome is None:
                outcome_missing.append(job_id)
            elif outcome["seq"] not in {seq for _run, seq in succeeded_events.get(job_id, ())}:
                # The store recorded a success other than the one that won the outcome record.
                duplicates.add(job_id)
        elif outcome is not None and st.get(job_id) in FINAL:
            # Succeeded in the artifact store, but the store says otherwise: two different endings.
            duplicates.add(job_id)
        if outcome is not None and job_type == "intent-train":
            if (outcome.get("result") or {}).get("resumed_from_epoch") is not None:
                resumed += 1

    max_rss_kb = 0
    if os.path.exists(rss_log):
        with open(rss_log) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and parts[2].isdigit():
                    max_rss_kb = max(max_rss_kb, int(parts[2]))

    counts, keyed_wrong = coalescing(jobs, keys, st, superseded_by(conn))
    out = {
        "submitted": len(jobs),
        "expected_succeeded": sum(1 for _t, k in jobs.values() if k not in ("fatal", "keyed")),
        "expected_dead": sum(1 for _t, k in jobs.values() if k == "fatal"),
        "succeeded": sum(1 for j, (_t, k) in jobs.items() if st.get(j) == "succeeded" and k != "keyed"),
        "dead": sum(1 for j in jobs if st.get(j) in ("dead", "failed")),
        "lost": len(lost),
        "duplicate_results": len(duplicates),
        "redeliveries": redeliveries,
        "resumed_from_checkpoint": resumed,
        "training_jobs_killed": len(training_killed),
        "max_worker_rss_mb": round(max_rss_kb / 1024, 1),
        **counts,
    }
    planned = {}
    for kv in extra:
        k, _, v = kv.partition("=")
        v = int(v) if v.lstrip("-").isdigit() else v
        if k.startswith("planned_"):
            planned[k[len("planned_"):]] = v
        else:
            out[k] = v
    if outcome_missing:
        out["succeeded_without_outcome"] = len(outcome_missing)
    if "leader_stop_times" in out:
        stops = [float(t) for t in str(out.pop("leader_stop_times")).split(",") if t]
        out["leader_stop_recovery_s"] = recoveries(conn, jobs, stops)
    print(json.dumps(out, separators=(",", ":")))
    for j in lost[:20]:
        print(f"lost: {j} {jobs[j][0]} {jobs[j][1]} store status {st.get(j)}", file=sys.stderr)
    for j in sorted(duplicates)[:20]:
        print(f"duplicate result: {j}", file=sys.stderr)
    for w in keyed_wrong[:20]:
        print(f"coalescing: {w}", file=sys.stderr)
    failures = judge(out, planned) + ([f"{len(keyed_wrong)} older jobs of a coalescing key ended wrongly"] if keyed_wrong else [])
    for f in failures:
        print(f"verdict: {f}", file=sys.stderr)
    return 1 if failures else 0


def recoveries(conn, jobs, stops):
    """Seconds from each node stop (epoch seconds) to the next job completion (a `succeeded`
    event of a chaos job, by the event's own time); None when no job completed after it."""
    done = []
    if conn is not None:
        done = sorted(at / 1e6 for job_id, at in conn.execute("SELECT job_id, at FROM job_events WHERE status = 'succeeded'") if job_id in jobs)
    out = []
    for t in stops:
        after = [a for a in done if a >= t]
        out.append(round(after[0] - t, 2) if after else None)
    return out


def judge(out, planned):
    """Why the run fails; empty when it passes."""
    f = []
    if out["succeeded"] != out["expected_succeeded"]:
        f.append(f"succeeded {out['succeeded']} != expected {out['expected_succeeded']}")
    if out["dead"] != out["expected_dead"]:
        f.append(f"dead (dead + failed) {out['dead']} != jobs made to fail {out['expected_dead']}")
    if out["lost"]:
        f.append(f"{out['lost']} jobs lost")
    if out["duplicate_results"]:
        f.append(f"{out['duplicate_results']} duplicate results")
    if out.get("coalesced") and not out.get("superseded"):
        f.append(f"none of the {out['coalesced']} older jobs of a coalescing key was superseded")
    if out.get("succeeded_without_outcome"):
        f.append(f"{out['succeeded_without_outcome']} successes without an outcome record")
    if out["training_jobs_killed"] >= 1 and out["resumed_from_checkpoint"] < 1:
        f.append(f"{out['training_jobs_killed']} training jobs killed after a checkpoint, none resumed from it")
    bound = out.get("recovery_bound_s")
    for i, r in enumerate(out.get("leader_stop_recovery_s", [])):
        if r is None:
            f.append(f"no job completed after leader stop {i + 1}")
        elif bound is not None and r > bound:
            f.append(f"leader stop {i + 1}: the next job completed after {r} s (bound {bound} s)")
    for k, n in planned.items():
        if out.get(k, 0) < n:
            f.append(f"{k}: {out.get(k, 0)} happened of {n} planned")
    return f


def selftest():
    """The verdict fails on runs that break a guarantee, and passes on a clean one."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        ids = os.path.join(d, "ids.txt")
        with open(ids, "w") as f:
            f.write("a noop ok\nb noop fatal\nc intent-train train\nd noop keyed k1\ne noop latest k1\ng noop keyed k1\n")
        art = os.path.join(d, "art")

        def run(name, statuses_, extra=(), results=None, events=(), outcomes=None):
            """A run whose store holds `statuses_` (a `succeeded` event of seq 7 and an outcome
            record for each success), plus `events` (job, run, seq, status, body); `outcomes`
            replaces a job's outcome record (None: removes it)."""
            db = os.path.join(d, f"{name}.db")
            conn = sqlite3.connect(db)
            conn.execute("CREATE TABLE jobs (job_id TEXT, status TEXT, result TEXT)")
            conn.execute("CREATE TABLE job_events (job_id TEXT, run INT, seq INT, status TEXT, body TEXT, at INT DEFAULT 0)")
            for j, s_ in statuses_.items():
                conn.execute("INSERT INTO jobs VALUES (?, ?, ?)", (j, s_, json.dumps((results or {}).get(j, {}))))
                path = os.path.join(art, name, "outcomes", j[-2:], j + ".json")
                if s_ == "succeeded":
                    conn.execute("INSERT INTO job_events (job_id, run, seq, status, body) VALUES (?, 0, 7, 'succeeded', '{}')", (j,))
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    with open(path, "w") as f:
                        json.dump({"event": {"seq": 7, "result": {"resumed_from_epoch": 1} if j == "c" else {}}}, f)
            conn.executemany("INSERT INTO job_events (job_id, run, seq, status, body) VALUES (?, ?, ?, ?, ?)", events)
            for j, event in (outcomes or {}).items():
                path = os.path.join(art, name, "outcomes", j[-2:], j + ".json")
                if event is None:
                    os.remove(path)
                    continue
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as f:
                    json.dump({"event": event}, f)
            conn.commit()
            conn.close()
            return verdict(ids, "sqlite://" + db, os.path.join(art, name), os.path.join(d, "none"), list(extra))

        ok = {"a": "succeeded", "b": "dead", "c": "succeeded", "d": "superseded", "e": "succeeded", "g": "succeeded"}
        by_e = {"d": {"superseded_by": "e"}}
        assert run("clean", ok, ["kills=1", "planned_kills=1"], by_e) == 0, "a clean run passes"
        assert run("cancelled", dict(ok, g="cancelled"), results=by_e) == 0, "an older keyed job cancelled while running passes"
        failing = [
            ("all dead", {j: "dead" for j in ok}, (), by_e),
            ("fault missing", ok, ["kills=0", "planned_kills=1"], by_e),
            ("leader stop, no completion after", ok, ["leader_stop_times=5"], by_e),
            ("recovery over bound", ok, ["leader_stop_times=-20", "recovery_bound_s=10"], by_e),
            ("keyed job dead", dict(ok, d="dead"), (), {}),
            ("superseded by a stranger", ok, (), {"d": {"superseded_by": "a"}}),
            ("latest superseded", dict(ok, e="superseded", d="succeeded"), (), {"e": {"superseded_by": "d"}}),
            ("nothing superseded", dict(ok, d="succeeded"), (), {}),
            ("keyed job lost", dict(ok, d="queued"), (), {}),
        ]
        for name, statuses_, extra, results in failing:
            assert run(name.replace(" ", "-"), statuses_, extra, results) == 1, f"the verdict must fail: {name}"
        # The guarantees the store and the outcome records witness together.
        started_again = json.dumps({"progress": {"redelivery": 1}})
        witnessed = [
            ("two successes", {"events": [("a", 0, 9, "succeeded", "{}")]}),
            ("a success other than the recorded one", {"outcomes": {"a": {"seq": 8, "result": {}}}}),
            ("a success without an outcome record", {"outcomes": {"a": None}}),
            ("an outcome record of a job that ended dead", {"outcomes": {"b": {"seq": 7, "result": {}}}}),
            (
                "a training job killed after a checkpoint and not resumed",
                {
                    "events": [("c", 0, 3, "progress", json.dumps({"progress": {"epoch": 1}})), ("c", 0, 4, "started", started_again)],
                    "outcomes": {"c": {"seq": 7, "result": {}}},
                },
            ),
        ]
        for name, kw in witnessed:
            assert run(name.replace(" ", "-"), ok, (), by_e, **kw) == 1, f"the verdict must fail: {name}"
        assert run("a plain job lost", dict(ok, a="queued"), (), by_e) == 1, "the verdict must fail: a plain job lost"
        resumed = {"events": [("c", 0, 3, "progress", json.dumps({"progress": {"epoch": 1}})), ("c", 0, 4, "started", started_again)]}
        assert run("resumed", ok, (), by_e, **resumed) == 0, "a training job killed after a checkpoint and resumed passes"
        # Completions at t=0 (the events' `at` is 0): a recovery within the bound passes.
        assert run("recovered", ok, ["leader_stop_times=-2", "recovery_bound_s=10"], by_e) == 0, "a recovery within the bound passes"
    print("chaos_check selftest: ok")


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "progress" and len(sys.argv) == 4:
        progress(sys.argv[2], sys.argv[3])
    elif cmd == "position" and len(sys.argv) == 3:
        position(sys.argv[2])
    elif cmd == "selftest":
        selftest()
    elif cmd == "verdict" and len(sys.argv) >= 6:
        sys.exit(verdict(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6:]))
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
