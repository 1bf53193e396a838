#!/usr/bin/env python3
"""Verdict of a chaos run (scripts/chaos.sh): reads the job store (SQLite, as
written by `trainyard serve`) and the artifact store (a local directory), and
compares them with the list of jobs the broker confirmed at submit time.

  chaos_check.py progress IDS DB            -> prints "<final> <submitted>"
  chaos_check.py verdict IDS DB ARTIFACTS RSS_LOG [key=value ...]
                                              -> prints the one JSON line

A job is *lost* when the store has no final status for it (succeeded, failed,
dead, cancelled). A result is *duplicated* when the store holds two different
`succeeded` events for one job (two attempts both recorded a success), or when
the store's `succeeded` event is not the one in the job's outcome record (`outcomes/<last 2 chars>/<id>.json`).
"""

import json
import os
import sqlite3
import sys

FINAL = ("succeeded", "failed", "dead", "cancelled")


def read_ids(path):
    jobs = {}
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3:
                jobs[parts[0]] = (parts[1], parts[2])
    return jobs


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
    jobs = read_ids(ids_path)
    st = statuses(connect(db))
    final = sum(1 for j in jobs if st.get(j) in FINAL)
    print(final, len(jobs))


def verdict(ids_path, db, artifacts, rss_log, extra):
    jobs = read_ids(ids_path)
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

    out = {
        "submitted": len(jobs),
        "succeeded": sum(1 for j in jobs if st.get(j) == "succeeded"),
        "dead": sum(1 for j in jobs if st.get(j) in ("dead", "failed")),
        "lost": len(lost),
        "duplicate_results": len(duplicates),
        "redeliveries": redeliveries,
        "resumed_from_checkpoint": resumed,
        "max_worker_rss_mb": round(max_rss_kb / 1024, 1),
    }
    for kv in extra:
        k, _, v = kv.partition("=")
        out[k] = int(v) if v.lstrip("-").isdigit() else v
    if outcome_missing:
        out["succeeded_without_outcome"] = len(outcome_missing)
    print(json.dumps(out, separators=(",", ":")))
    for j in lost[:20]:
        print(f"lost: {j} {jobs[j][0]} {jobs[j][1]} store status {st.get(j)}", file=sys.stderr)
    for j in sorted(duplicates)[:20]:
        print(f"duplicate result: {j}", file=sys.stderr)
    return 0 if not lost and not duplicates else 1


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "progress" and len(sys.argv) == 4:
        progress(sys.argv[2], sys.argv[3])
    elif cmd == "verdict" and len(sys.argv) >= 6:
        sys.exit(verdict(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6:]))
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
