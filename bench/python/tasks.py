"""Celery app of the benchmark: one no-op task on a quorum queue, with the
same safety as trainyard: late acks, prefetch 1, persistent messages,
publisher confirms. Bare (the default): no result backend and no task events
(trainyard's events are its results; Celery is given the lighter load).

BENCH_CELERY_EVENTS=1 is what a Celery user turns on to see per job what
trainyard shows (state changes, a result, a history): task events from the
worker and the publisher (sent, received, started, succeeded), and results
(extended: name, args, worker) stored in Redis (BENCH_CELERY_RESULT_URL,
default the local Redis) under keys prefixed with the queue name.

Completions are counted in-process (task_postrun) and flushed by a
background thread to BENCH_COUNT_DIR/<pid>, so counting costs the tasks
nothing measurable.
"""

import os
import threading
import time

from celery import Celery, signals
from kombu import Exchange, Queue

QUEUE = os.environ.get("BENCH_CELERY_QUEUE", "bench-celery")
COUNT_DIR = os.environ.get("BENCH_COUNT_DIR", "")

# kombu reads the same URL as trainyard (`%2f` is the default vhost).
URL = os.environ.get("TRAINYARD_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
app = Celery("tasks", broker=URL)
app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_queues=[
        Queue(QUEUE, Exchange(QUEUE, type="direct", durable=True), routing_key=QUEUE, durable=True,
              queue_arguments={"x-queue-type": "quorum"}),
    ],
    task_default_queue=QUEUE,
    task_default_exchange=QUEUE,
    task_default_routing_key=QUEUE,
    task_default_delivery_mode="persistent",
    broker_transport_options={"confirm_publish": True},
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    worker_send_task_events=False,
)
EVENTS = os.environ.get("BENCH_CELERY_EVENTS") == "1"
if EVENTS:
    app.conf.update(
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_ignore_result=False,
        result_backend=os.environ.get("BENCH_CELERY_RESULT_URL", "redis://127.0.0.1:6379/0"),
        result_extended=True,
        result_backend_transport_options={"global_keyprefix": f"{QUEUE}-"},
        result_expires=3600,
    )


@app.task(name="bench.noop")
def noop():
    return None


_state = {"pid": None, "count": 0, "last": 0.0}
_lock = threading.Lock()


def _flusher():
    path = os.path.join(COUNT_DIR, str(os.getpid()))
    written = -1
    while True:
        time.sleep(0.05)
        with _lock:
            count, last = _state["count"], _state["last"]
        if count != written:
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.write(f"{count} {last:.6f}\n")
            os.replace(tmp, path)
            written = count


@signals.task_postrun.connect
def _count(**_kwargs):
    if not COUNT_DIR:
        return
    with _lock:
        if _state["pid"] != os.getpid():
            _state.update(pid=os.getpid(), count=0, last=0.0)
            threading.Thread(target=_flusher, daemon=True).start()
        _state["count"] += 1
        _state["last"] = time.time()
