"""Dashboard, alert and autoscaler queries against the series trainyard really exports.

k8s/components/monitoring/series.txt lists every series (name and label names) a control
plane and a worker export after a noop job, an intent-train job and a poison message; the
end-to-end test tests/tests/e2e/series.rs scrapes their /metrics, writes it, and fails when
the committed file differs. Here, offline, every PromQL query of the dashboard, the alert
rules, the KEDA triggers and the prometheus-adapter rules is parsed, and each metric it
names must be in that file (or be a standard series listed in EXTERNAL), each label it
matches on must be a label of that metric or one Prometheus adds to the target, and each
label it groups or joins by must be a label of one of the metrics of the query.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

# Standard series some alerts use (marked "standard:" in alerts.yaml), with their labels.
EXTERNAL = {
    "kube_pod_status_phase": {"namespace", "pod", "uid", "phase"},  # kube-state-metrics
    "rabbitmq_identity_info": {"rabbitmq_node", "rabbitmq_cluster", "rabbitmq_cluster_permanent_id"},  # RabbitMQ plugin
}
# Labels the Prometheus Operator gives every target of a ServiceMonitor/PodMonitor.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "container", "service", "endpoint"}

AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
                "quantile", "limitk", "limit_ratio"}
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = {"bool", "and", "or", "unless", "offset", "atan2", "inf", "nan"} | GROUPING
TOKEN = re.compile(r'\s+|"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`|\[[^\]]*\]|[A-Za-z_:][A-Za-z0-9_:.]*'
                   r'|\$\{?[A-Za-z_][A-Za-z0-9_]*\}?|[0-9]+(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?[smhdwy]?|=~|!~|!=|==|>=|<=|[{}(),=<>+\-*/^%]')


def load_series(path: Path) -> dict[str, set[str]]:
    series: dict[str, set[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        metric, labels = parts[1], set(parts[2].split(",")) if len(parts) > 2 and parts[2] != "-" else set()
        series.setdefault(metric, set()).update(labels)
    return series


def tokens(expr: str) -> list[str]:
    out, pos = [], 0
    while pos < len(expr):
        m = TOKEN.match(expr, pos)
        if not m:
            raise ValueError(f"cannot parse at {expr[pos:pos + 20]!r}")
        pos = m.end()
        if not m.group(0).isspace():
            out.append(m.group(0))
    return out


def parse(expr: str) -> tuple[list[tuple[str, set[str]]], set[str]]:
    """(selectors: (metric, matched labels), grouping labels) of a PromQL expression."""
    toks = tokens(expr)
    selectors, grouping = [], set()
    i = 0
    while i < len(toks):
        t = toks[i]
        nxt = toks[i + 1] if i + 1 < len(toks) else ""
        if t in GROUPING and nxt == "(":
            j = i + 2
            while toks[j] != ")":
                if toks[j] != ",":
                    grouping.add(toks[j])
                j += 1
            i = j + 1
            continue
        if re.fullmatch(r"[A-Za-z_:][A-Za-z0-9_:]*", t) and t not in KEYWORDS | AGGREGATIONS and nxt != "(":
            labels = set()
            i += 1
            if nxt == "{":
                i += 1
                while toks[i] != "}":
                    if toks[i] != "," and toks[i + 1] in ("=", "!=", "=~", "!~"):
                        labels.add(toks[i])
                        i += 3
                    else:
                        i += 1
                i += 1
            selectors.append((t, labels))
            continue
        i += 1
    return selectors, grouping


def queries(k8s: Path, rendered: dict[str, list[dict]]) -> list[tuple[str, str]]:
    """(where, PromQL) of every dashboard panel and variable, alert, KEDA trigger and adapter rule."""
    out = []
    dash = json.loads((k8s / "components/monitoring/dashboard.json").read_text())
    for p in dash["panels"]:
        for t in p.get("targets", []):
            ds = json.dumps(t.get("datasource", p.get("datasource", {})))
            if "loki" in ds:
                continue
            out.append((f"dashboard panel {p.get('title')!r}", t["expr"]))
    for v in dash["templating"]["list"]:
        q = v.get("definition") or ""
        m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", q)
        if m:
            out.append((f"dashboard variable {v['name']}", f"group by ({m.group(2)}) ({m.group(1)})"))
    seen = set()
    for objs in rendered.values():
        for o in objs:
            if o.get("kind") == "PrometheusRule":
                for g in o["spec"]["groups"]:
                    for r in g["rules"]:
                        out.append((f"alert {r.get('alert') or r.get('record')}", r["expr"]))
            elif o.get("kind") == "ScaledObject":
                for t in o["spec"]["triggers"]:
                    out.append((f"ScaledObject {o['metadata']['name']}", t["metadata"]["query"]))
    import yaml  # noqa: PLC0415 (the venv has it; keep this module importable alone)

    adapter = yaml.safe_load((k8s / "addons/prometheus-adapter-values.yaml").read_text())
    for r in adapter["rules"].get("external", []):
        out.append(("prometheus-adapter seriesQuery", r["seriesQuery"]))
    return [q for q in out if not (q in seen or seen.add(q))]


def check_series(k8s: Path, rendered: dict[str, list[dict]], fail) -> int:
    path = k8s / "components/monitoring/series.txt"
    if not path.exists():
        fail(str(path), "missing: run the e2e test with TRAINYARD_UPDATE_SERIES=1 (see the file's header)")
        return 0
    series = load_series(path)
    target = set(TARGET_LABELS)
    for objs in rendered.values():
        for o in objs:
            if o.get("kind") in ("ServiceMonitor", "PodMonitor"):
                for ep in o["spec"].get("endpoints", []) + o["spec"].get("podMetricsEndpoints", []):
                    target |= {r["targetLabel"] for r in ep.get("relabelings", []) if "targetLabel" in r}
    count = 0
    for where, expr in queries(k8s, rendered):
        try:
            selectors, grouping = parse(expr)
        except (ValueError, IndexError) as e:
            fail(where, f"cannot parse the query {expr!r}: {e}")
            continue
        known, missing = set(target), False
        for metric, labels in selectors:
            count += 1
            have = series.get(metric, EXTERNAL.get(metric))
            if have is None:
                fail(where, f"{metric} is not exported by a control plane or worker (k8s/components/monitoring/series.txt)")
                missing = True
                continue
            have = have | target
            known |= have
            for lab in sorted(labels - have):
                fail(where, f"{metric} has no label {lab}; it has {sorted(have - target)}")
        for lab in sorted(grouping - known) if not missing else []:
            fail(where, f"groups or joins by {lab}, which none of {sorted({m for m, _ in selectors})} has")
    return count
