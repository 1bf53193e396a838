"""Celery dispatch benchmark: N no-op tasks published with confirms by K
publisher processes, run by W Celery workers; jobs/s from the first publish
to the last completion. Prints one JSON object.

--events: task events and a Redis result backend on (tasks.py, BENCH_CELERY_EVENTS),
and an event monitor consuming every task event (as Flower does), counted in the
JSON line (`events`); the run's results are deleted from Redis afterwards."""

import argparse
import glob
import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def counts(d):
    total, last = 0, 0.0
    for p in glob.glob(os.path.join(d, "*")):
        if p.endswith(".tmp"):
            continue
        try:
            c, t = open(p).read().split()
        except (OSError, ValueError):
            continue
        total += int(c)
        last = max(last, float(t))
    return total, last


def wait_count(d, n, timeout):
    deadline = time.time() + timeout
    while True:
        total, last = counts(d)
        if total >= n:
            return last
        if time.time() > deadline:
            raise SystemExit(f"only {total} of {n} Celery tasks finished within {timeout}s")
        time.sleep(0.02)


def publisher(n, ready, go, cpu):
    from tasks import app, noop
    with app.connection_for_write() as conn:
        conn.ensure_connection()
        with app.producer_or_acquire() as producer:
            noop.apply_async(producer=producer)  # opens the channel before the clock starts
            ready.release()
            go.wait()
            c0 = time.process_time()
            for _ in range(n):
                noop.apply_async(producer=producer)
            cpu.put(time.process_time() - c0)


TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid):
    """User + system CPU seconds of a process (0 when it is gone)."""
    try:
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / TICKS
    except (OSError, IndexError, ValueError):
        return 0.0


def tree(pid):
    """A process and its descendants (the prefork pool's children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for t in glob.glob(f"/proc/{p}/task/*/children"):
            try:
                todo += [int(c) for c in open(t).read().split()]
            except OSError:
                pass
    return out


def broker_pids():
    pids = []
    for comm in glob.glob("/proc/[0-9]*/comm"):
        try:
            if open(comm).read().strip() == "beam.smp":
                pids.append(int(comm.split("/")[2]))
        except OSError:
            pass
    return pids


def consumers(app, queue):
    with app.connection_for_write() as conn:
        ch = conn.channel()
        try:
            _, _, c = ch.queue_declare(queue=queue, passive=True)
            return c
        except Exception:
            return 0


# Celery >= 5.5 declares these (global names) when it sees a quorum queue: native delayed delivery.
DELAYED_QUEUES = [f"celery_delayed_{i}" for i in range(28)]
DELAYED_EXCHANGES = DELAYED_QUEUES + ["celery_delayed_delivery", "celery.pidbox", "celeryev"]


def delayed_exists(app):
    with app.connection_for_write() as conn:
        try:
            conn.channel().queue_declare(queue=DELAYED_QUEUES[0], passive=True)
            return True
        except Exception:
            return False


def cleanup(app, queue, delayed_existed):
    """Deletes the bench queue, and Celery's delayed-delivery objects unless they existed before."""
    with app.connection_for_write() as conn:
        ch = conn.channel()
        ch.queue_delete(queue)
        ch.exchange_delete(queue)
        if not delayed_existed:
            for q in DELAYED_QUEUES:
                ch.queue_delete(q)
            for x in DELAYED_EXCHANGES:
                ch.exchange_delete(x)


def monitor(counter, ready):
    """Consumes every Celery event (its own queue on `celeryev`), as an event monitor does."""
    from tasks import app

    def on_event(ev):
        if ev.get("type", "").startswith("task-"):
            with counter.get_lock():
                counter.value += 1

    with app.connection() as conn:
        recv = app.events.Receiver(conn, handlers={"*": on_event})
        ready.release()
        recv.capture(limit=None, timeout=None, wakeup=False)


def drop_results(queue):
    """Deletes the run's results from Redis (keys prefixed with the queue name)."""
    import redis

    from tasks import app

    r = redis.Redis.from_url(app.conf.result_backend)
    for key in r.scan_iter(match=f"{queue}-*", count=1000):
        r.delete(key)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cleanup-only", action="store_true", help="only delete the queue (and the delayed-delivery objects)")
    ap.add_argument("--delayed-existed", action="store_true", help="keep Celery's delayed-delivery objects: they were there before")
    ap.add_argument("--check-delayed", action="store_true", help="print 1 when Celery's delayed-delivery objects exist, else 0")
    ap.add_argument("--jobs", type=int, default=20000)
    ap.add_argument("--publishers", type=int, default=8)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--pool", default="prefork")
    ap.add_argument("--log-dir", default=".")
    ap.add_argument("--events", action="store_true", help="task events, a Redis result backend and an event monitor on")
    a = ap.parse_args()

    count_dir = tempfile.mkdtemp(prefix="celery-bench-")
    os.environ["BENCH_COUNT_DIR"] = count_dir
    if a.events:
        os.environ["BENCH_CELERY_EVENTS"] = "1"
    sys.path.insert(0, HERE)
    from tasks import QUEUE, app

    if a.check_delayed:
        print(1 if delayed_exists(app) else 0)
        return
    if a.cleanup_only:
        cleanup(app, QUEUE, a.delayed_existed)
        return
    if a.events:
        import redis

        try:
            redis.Redis.from_url(app.conf.result_backend, socket_connect_timeout=5).ping()
        except redis.RedisError as e:
            raise SystemExit(f"no Redis at {app.conf.result_backend} for the results (set BENCH_CELERY_RESULT_URL): {e}")
    delayed_existed = a.delayed_existed or delayed_exists(app)
    celery = os.path.join(os.path.dirname(sys.executable), "celery")
    procs = []
    for i in range(a.workers):
        log = open(os.path.join(a.log_dir, f"celery-worker-{i}.log"), "w")
        procs.append(subprocess.Popen(
            [celery, "-A", "tasks", "worker", "-P", a.pool, "-c", str(a.concurrency), "-Q", QUEUE, "-n", f"bench{i}@%h",
             "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "warning"],
            cwd=HERE, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=HERE)))
    mon, events = None, None
    try:
        if a.events:
            ctx = mp.get_context("fork")
            events, up = ctx.Value("q", 0), ctx.Semaphore(0)
            mon = ctx.Process(target=monitor, args=(events, up), daemon=True)
            mon.start()
            up.acquire()
        deadline = time.time() + 120
        while consumers(app, QUEUE) < a.workers:
            if time.time() > deadline:
                raise SystemExit("Celery workers did not start consuming")
            time.sleep(0.1)
        ctx = mp.get_context("fork")
        ready, go, cpu = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
        share = [a.jobs // a.publishers + (1 if i < a.jobs % a.publishers else 0) for i in range(a.publishers)]
        pubs = [ctx.Process(target=publisher, args=(n, ready, go, cpu)) for n in share]
        for p in pubs:
            p.start()
        for _ in pubs:
            ready.acquire()
        warm = a.publishers
        wait_count(count_dir, warm, 60)
        # CPU over the timed jobs, as `trainyard-bench` measures its processes.
        workers = [c for w in procs for c in tree(w.pid)]
        brokers = broker_pids()
        w0, b0 = sum(map(cpu_s, workers)), sum(map(cpu_s, brokers))
        t0 = time.time()
        go.set()
        last = wait_count(count_dir, warm + a.jobs, 1800)
        w1, b1 = sum(map(cpu_s, workers)), sum(map(cpu_s, brokers))
        publishers_cpu = sum(cpu.get(timeout=60) for _ in pubs)
        for p in pubs:
            p.join()
        secs = last - t0
        per_job = lambda s: round(s / a.jobs * 1e6, 1)
        out = {"jobs": a.jobs, "seconds": secs, "jobs_per_s": a.jobs / secs, "workers": a.workers,
               "concurrency": a.concurrency, "pool": a.pool, "publishers": a.publishers,
               "cpu_us_per_job": {"celery_workers": per_job(w1 - w0), "publishers": per_job(publishers_cpu),
                                  "broker": per_job(b1 - b0)}}
        if a.events:
            time.sleep(1)  # the last events in flight to the monitor
            out.update(events=events.value, result_backend="redis")
        print(json.dumps(out))
    finally:
        if mon is not None:
            mon.terminate()
            try:
                drop_results(QUEUE)
            except Exception as e:  # best effort
                print(f"cleanup of the results: {e}", file=sys.stderr)
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        try:
            cleanup(app, QUEUE, delayed_existed)
        except Exception as e:  # best effort
            print(f"cleanup: {e}", file=sys.stderr)
        shutil.rmtree(count_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
