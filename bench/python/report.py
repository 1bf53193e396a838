"""Assembles the raw outputs of scripts/bench.sh into results.json and prints
a Markdown table. Usage: report.py RAW_DIR OUT_JSON LOAD_BEFORE LOAD_AFTER SECONDS QUICK"""

import datetime
import glob
import json
import os
import platform
import sys


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def best(paths):
    runs = [r for r in (load(p) for p in sorted(glob.glob(paths))) if r]
    return max(runs, key=lambda r: r["jobs_per_s"]) if runs else None, runs


def num(v, nd=1):
    return "n/a" if v is None else f"{v:,.{nd}f}"


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main():
    raw_dir, out, load_before, load_after, seconds, quick = sys.argv[1:7]
    r = {}
    ty, ty_runs = best(os.path.join(raw_dir, "dispatch-[0-9]*.json"))
    rw, rw_runs = best(os.path.join(raw_dir, "raw-[0-9]*.json"))
    if ty and rw:
        r["dispatch"] = {
            "jobs": ty["jobs"], "workers": ty["workers"], "slots": ty["concurrency"], "submitters": ty["submitters"],
            "jobs_per_s": ty["jobs_per_s"], "raw_jobs_per_s": rw["jobs_per_s"], "ratio": ty["jobs_per_s"] / rw["jobs_per_s"],
            "recorded_jobs_per_s": ty.get("recorded_jobs_per_s"), "raw_recorded_jobs_per_s": rw.get("recorded_jobs_per_s"),
            "cpu_us_per_job": ty.get("cpu_us_per_job"), "raw_cpu_us_per_job": rw.get("cpu_us_per_job"),
            "worker_peak_rss_mb": ty.get("worker_peak_rss_mb"), "broker_ops": ty.get("broker_ops"),
            "broker_reductions_per_job": ty.get("broker_reductions_per_job"), "raw_broker_reductions_per_job": rw.get("broker_reductions_per_job"),
            "runs": {"trainyard": [x["jobs_per_s"] for x in ty_runs], "raw": [x["jobs_per_s"] for x in rw_runs]},
        }
        tm = load(os.path.join(raw_dir, "dispatch-tmpfs.json"))
        if tm:
            r["dispatch"].update(tmpfs_artifacts_jobs_per_s=tm["jobs_per_s"], tmpfs_artifacts_ratio=tm["jobs_per_s"] / rw["jobs_per_s"],
                                 tmpfs_artifacts_cpu_us_per_job=tm.get("cpu_us_per_job"))
    oc = load(os.path.join(raw_dir, "outcomes.json"))
    if oc:
        r["outcome_records"] = {k: oc[k] for k in ("records", "us_per_record", "records_per_s")}
    ce = load(os.path.join(raw_dir, "celery.json"))
    if ce:
        r["celery"] = dict(ce, ratio=(ty["jobs_per_s"] / ce["jobs_per_s"]) if ty else None)
        tc, cc = (ty or {}).get("cpu_us_per_job"), ce.get("cpu_us_per_job")
        if tc and cc:
            # On two shared cores jobs/s is bounded by the broker; the framework's own cost is what is left.
            r["celery"]["worker_cpu_us_per_job"] = tc["worker"]
            r["celery"]["celery_worker_cpu_us_per_job"] = cc["celery_workers"]
            r["celery"]["outside_broker_cpu_us_per_job"] = tc["worker"] + tc["recorder"] + tc["bench"]
            r["celery"]["celery_outside_broker_cpu_us_per_job"] = cc["celery_workers"] + cc["publishers"]
    cv = load(os.path.join(raw_dir, "celery-events.json"))
    if cv:
        # Celery as a user who wants per job what trainyard shows: task events and a result backend.
        r["celery_events"] = dict(cv, ratio=(ty["jobs_per_s"] / cv["jobs_per_s"]) if ty else None)
    pk, pr = load(os.path.join(raw_dir, "pickup.json")), load(os.path.join(raw_dir, "pickup-raw.json"))
    if pk:
        r["pickup"] = dict(pk)
        if pr:
            r["pickup"].update(raw_p50_ms=pr["p50_ms"], raw_p99_ms=pr["p99_ms"])
    fw, fc = load(os.path.join(raw_dir, "footprint.json")), load(os.path.join(raw_dir, "footprint-celery.json"))
    if fw or fc:
        r["footprint"] = {
            "worker_idle_rss_mb": fw and fw["rss_mb"], "celery_idle_rss_mb": fc and fc["rss_mb"],
        }
    tr, sk = load(os.path.join(raw_dir, "training.json")), load(os.path.join(raw_dir, "sklearn.json"))
    if tr or sk:
        t = r["training"] = {}
        if tr:
            t.update(wall_s=tr["wall_s"], in_scope_accuracy=tr.get("in_scope_accuracy"), oos_recall=tr.get("oos_recall"),
                     accuracy=tr.get("accuracy"))
            for k in ("examples_per_s", "epoch_s", "train_examples_per_s", "epochs"):
                if k in tr:
                    t[k] = tr[k]
        if sk:
            t.update(sklearn_fit_s=sk["fit_s"], sklearn_in_scope_accuracy=sk["in_scope_accuracy"], sklearn_oos_recall=sk["oos_recall"],
                     sklearn_accuracy=sk["accuracy"])
        if tr and sk:
            t["wall_over_sklearn_fit"] = tr["wall_s"] / sk["fit_s"]
    sc = load(os.path.join(raw_dir, "scaling.json"))
    if sc:
        r["scaling"] = {"points": [{k: p.get(k) for k in ("workers", "slots", "jobs_per_s", "raw_jobs_per_s", "ratio")} for p in sc]}
    st = load(os.path.join(raw_dir, "store.json"))
    if st:
        keys = {"sqlite": ("jobs", "list_p95_ms", "demand_p95_ms"), "postgres": ("jobs", "list_p95_ms", "demand_p95_ms", "recorder_events_per_s")}
        extra = ("http_page_p95_ms", "readyz_p95_ms", "http_error", "status_counts_p95_ms", "list_p95_ms_by_filter", "events", "fill_s")
        r["store"] = {db: {k: st[db].get(k) for k in keys[db] + extra} for db in keys if db in st}
    fa = load(os.path.join(raw_dir, "fairness.json"))
    if fa:
        r["fairness"] = fa
    gpu = {d: load(os.path.join(raw_dir, f"gpu-{d}.json")) for d in ("cpu", "cuda")}
    if all(gpu.values()):
        r["gpu"] = {"cpu_wall_s": gpu["cpu"]["wall_s"], "cuda_wall_s": gpu["cuda"]["wall_s"], "speedup": gpu["cpu"]["wall_s"] / gpu["cuda"]["wall_s"]}
    r["meta"] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpus": os.cpu_count(), "cpu": cpu_model(), "load_before": load_before, "load_after": load_after,
        "seconds": int(seconds), "quick": quick == "1",
    }
    with open(out, "w") as f:
        json.dump(r, f, indent=2)

    rows = []
    d = r.get("dispatch")
    if d:
        rows.append(("Dispatch (jobs/s)", num(d["jobs_per_s"], 0), f"raw lapin {num(d['raw_jobs_per_s'], 0)}", f"{d['ratio']:.2f}", ">= 0.8 of raw", d["ratio"] >= 0.8))
        if "tmpfs_artifacts_jobs_per_s" in d:
            rows.append(("Dispatch, artifacts on tmpfs", num(d["tmpfs_artifacts_jobs_per_s"], 0), f"raw lapin {num(d['raw_jobs_per_s'], 0)}",
                         f"{d['tmpfs_artifacts_ratio']:.2f}", "(diagnostic)", None))
        br, brr = d.get("broker_reductions_per_job"), d.get("raw_broker_reductions_per_job")
        if br and brr:
            rows.append(("Broker work per job (Erlang reductions)", num(br, 0), f"raw lapin {num(brr, 0)}", f"{br / brr:.2f}", "(diagnostic)", None))
    o = r.get("outcome_records")
    if o:
        rows.append(("Outcome record, durable (us)", num(o["us_per_record"], 0), f"{num(o['records_per_s'], 0)} records/s", "", "(diagnostic)", None))
    c = r.get("celery")
    if c and c.get("ratio"):
        rows.append(("Versus Celery (jobs/s)", num(d["jobs_per_s"], 0) if d else "n/a", f"Celery {num(c['jobs_per_s'], 0)}", f"{c['ratio']:.1f}x", ">= 2.0x", c["ratio"] >= 2.0))
        if "worker_cpu_us_per_job" in c:
            w, cw = c["worker_cpu_us_per_job"], c["celery_worker_cpu_us_per_job"]
            o, co = c["outside_broker_cpu_us_per_job"], c["celery_outside_broker_cpu_us_per_job"]
            rows.append(("CPU per job, worker (us)", num(w, 0), f"Celery workers {num(cw, 0)}", f"{cw / w:.1f}x less", "(diagnostic)", None))
            rows.append(("CPU per job, all but the broker (us)", num(o, 0), f"Celery {num(co, 0)}", f"{co / o:.1f}x less", "(diagnostic)", None))
    cv = r.get("celery_events")
    if cv and cv.get("ratio"):
        rows.append(("Versus Celery with events + results", num(d["jobs_per_s"], 0) if d else "n/a", f"Celery {num(cv['jobs_per_s'], 0)}",
                     f"{cv['ratio']:.1f}x", "(reported)", None))
    p = r.get("pickup")
    if p:
        rows.append(("Pickup p50 (ms)", num(p["p50_ms"], 2), f"raw {num(p.get('raw_p50_ms'), 2)}", "", "<= 2 ms", p["p50_ms"] <= 2))
        rows.append(("Pickup p99 (ms)", num(p["p99_ms"], 2), f"raw {num(p.get('raw_p99_ms'), 2)}", "", "<= 10 ms", p["p99_ms"] <= 10))
    f = r.get("footprint")
    if f and f["worker_idle_rss_mb"] is not None:
        rows.append(("Idle worker RSS (MB)", num(f["worker_idle_rss_mb"]), f"Celery solo {num(f['celery_idle_rss_mb'])}", "", "<= 30 MB", f["worker_idle_rss_mb"] <= 30))
    t = r.get("training")
    if t and "wall_s" in t and "sklearn_fit_s" in t:
        better = (t["in_scope_accuracy"] or 0) > t["sklearn_in_scope_accuracy"]
        rows.append(("Training wall (s)", num(t["wall_s"]), f"sklearn fit {num(t['sklearn_fit_s'])}", f"{t['wall_over_sklearn_fit']:.1f}x", "<= 3x sklearn", t["wall_over_sklearn_fit"] <= 3))
        rows.append(("In-scope accuracy", num((t["in_scope_accuracy"] or 0) * 100, 2) + " %", f"sklearn {num(t['sklearn_in_scope_accuracy'] * 100, 2)} %", "", "> sklearn", better))
        rows.append(("OOS recall", num((t["oos_recall"] or 0) * 100, 2) + " %", f"sklearn {num(t['sklearn_oos_recall'] * 100, 2)} %", "", "", None))
    for db, s_ in r.get("store", {}).items():
        rows.append((f"Store {db}: jobs list p95 (ms)", num(s_["list_p95_ms"], 2), f"{s_['jobs']:,} jobs, worst filter", "", "<= 50 ms", s_["list_p95_ms"] <= 50))
        rows.append((f"Store {db}: demand query p95 (ms)", num(s_["demand_p95_ms"], 2), f"status counts {num(s_['status_counts_p95_ms'], 2)}", "", "<= 50 ms",
                     s_["demand_p95_ms"] <= 50))
        h = s_.get("http_page_p95_ms")
        rows.append((f"Store {db}: filtered page over HTTP p95 (ms)", num(h, 2), "100 requests", "", "<= 100 ms", None if h is None else h <= 100))
        if "recorder_events_per_s" in s_:
            rows.append((f"Store {db}: recorder (events/s)", num(s_["recorder_events_per_s"], 0), "batches via Store::record_events", "", ">= 5,000",
                         s_["recorder_events_per_s"] >= 5000))
    fa = r.get("fairness")
    if fa:
        bf, bp = fa["backlog_fair_share"], fa["backlog_fifo"]
        rows.append(("Fairness: 1-job bots behind a backlog, start p95 (ms)", num(bf["p95_ms"], 0), f"plain FIFO {num(bp['p95_ms'], 0)}", "",
                     "<= 2,000 ms", bf["p95_ms"] <= 2000))
        h = fa["high_priority"]
        rows.append(("Fairness: high job behind 500 low, start p95 (ms)", num(h["p95_ms"], 0), f"{h['trials']} trials", "", "<= 100 ms", h["p95_ms"] <= 100))
        c = fa["coalesce"]
        rows.append(("Fairness: 10 submits, one key: ran / superseded", f"{c['ran']} / {c['superseded']}", "", "", "1 / 9", c["ran"] == 1 and c["superseded"] == 9))
        t = fa["throughput"]
        rows.append(("Fairness: dispatch with tiers + fair share (jobs/s)", num(t["fair_share_jobs_per_s"], 0), f"plain {num(t['plain_jobs_per_s'], 0)}",
                     f"{t['ratio']:.2f}", ">= 0.8 of plain", t["ratio"] >= 0.8))
    print()
    print(f"trainyard benchmarks, {r['meta']['date']}, {r['meta']['cpus']} x {r['meta']['cpu']}, "
          f"load {load_before} -> {load_after}{' (--quick)' if r['meta']['quick'] else ''}")
    print()
    print("| scenario | trainyard | baseline (same run) | ratio | target | met |")
    print("|---|---:|---:|---:|---|---|")
    for name, val, base, ratio, target, met in rows:
        print(f"| {name} | {val} | {base} | {ratio} | {target} | {'' if met is None else ('yes' if met else 'no')} |")
    if sc:
        print()
        print("| processes x slots | trainyard jobs/s | raw jobs/s | ratio |")
        print("|---|---:|---:|---:|")
        for pt in r["scaling"]["points"]:
            ratio = f"{pt['ratio']:.2f}" if pt.get("ratio") else ""
            print(f"| {pt['workers']} x {pt['slots']} | {num(pt['jobs_per_s'], 0)} | {num(pt.get('raw_jobs_per_s'), 0)} | {ratio} |")
    if "gpu" in r:
        g = r["gpu"]
        print(f"\nGPU: training wall {num(g['cpu_wall_s'])} s on CPU, {num(g['cuda_wall_s'])} s on CUDA ({g['speedup']:.1f}x)")
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
