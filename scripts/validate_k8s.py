#!/usr/bin/env python3
"""Offline validation of trainyard's Kubernetes manifests (called by scripts/validate-k8s.sh).

1. Renders every overlay under k8s/overlays with `kubectl kustomize` (the kubectl of the
   venv, pinned), and validates every built-in object against the Kubernetes OpenAPI
   schemas (kubernetes-validate, strict: unknown fields fail) for the oldest and newest
   Kubernetes versions we support. Custom resources get structural checks here.
2. Consistency and policy checks against the code: job types (worker/src/handlers/mod.rs),
   metric names (common/src/metrics.rs ALL_NAMES), the longest job timeout
   (common/src/job.rs MAX_TIMEOUT_S), and the binaries' own CLI definitions (each
   container's command line is parsed by the real binary with `--help` appended).

Exits non-zero with one line per failure.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
OVERLAYS = ["dev", "gpu", "keda"]
PRODUCTION = {"gpu", "keda"}
K8S_VERSIONS = ["1.33.0", "1.37.0"]
GPU_TYPES = {"intent-train"}
GPU_LABEL = "nvidia.com/gpu.present"
DEMAND = "trainyard_jobs_demand"
SECRET_ENV = re.compile(r"(AMQP_URL|API_TOKENS|DATABASE_URL|PASSWORD|SECRET|TOKEN)", re.I)
WORKER_SA = "trainyard-worker"

failures: list[str] = []


def fail(where: str, msg: str) -> None:
    failures.append(f"{where}: {msg}")


# ---------------------------------------------------------------- facts from the code


def metric_names() -> set[str]:
    src = (ROOT / "common/src/metrics.rs").read_text()
    consts = dict(re.findall(r'pub const (\w+): &str = "([^"]+)";', src))
    body = re.search(r"pub const ALL_NAMES: &\[&str\] = &\[(.*?)\];", src, re.S)
    if not body:
        sys.exit("validate-k8s: cannot find ALL_NAMES in common/src/metrics.rs")
    names = {consts[i] for i in re.findall(r"\b([A-Z][A-Z0-9_]+)\b", body.group(1)) if i in consts}
    if not names:
        sys.exit("validate-k8s: ALL_NAMES in common/src/metrics.rs is empty or unparsable")
    return names


def job_types() -> set[str]:
    src = (ROOT / "worker/src/handlers/mod.rs").read_text()
    types = set(re.findall(r'\.register\(\s*"([a-z0-9-]+)"', src))
    if not types:
        sys.exit("validate-k8s: no .register(\"<type>\", ...) found in worker/src/handlers/mod.rs")
    return types


def max_timeout_s() -> int:
    src = (ROOT / "common/src/job.rs").read_text()
    m = re.search(r"pub const MAX_TIMEOUT_S: u64 = ([0-9_ *]+);", src)
    if not m:
        sys.exit("validate-k8s: cannot find MAX_TIMEOUT_S in common/src/job.rs")
    return int(eval(m.group(1).replace("_", ""), {"__builtins__": {}}))  # e.g. "6 * 3600"


# ---------------------------------------------------------------- rendering and schemas


def render(kubectl: str, overlay: str) -> list[dict]:
    out = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True)
    if out.returncode != 0:
        fail(f"overlay {overlay}", f"kubectl kustomize failed: {out.stderr.strip()}")
        return []
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def schema_check(overlay: str, objs: list[dict]) -> tuple[int, int]:
    builtin = custom = 0
    for o in objs:
        where = f"{overlay}/{o.get('kind')}/{o.get('metadata', {}).get('name')}"
        try:
            for v in K8S_VERSIONS:
                kubernetes_validate.validate(o, v, strict=True)
            builtin += 1
        except kubernetes_validate.SchemaNotFoundError:
            custom += 1
            check_custom(where, o)
        except kubernetes_validate.ValidationError as e:
            fail(where, f"schema: {e.message} at {'/'.join(map(str, e.path))}")
    return builtin, custom


def need(where: str, obj: dict, path: str, typ: type | tuple = object):
    cur = obj
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            fail(where, f"missing {path}")
            return None
        cur = cur[part]
    if not isinstance(cur, typ):
        fail(where, f"{path} should be {typ}, is {type(cur).__name__}")
        return None
    return cur


def check_custom(where: str, o: dict) -> None:
    """Structural checks of the custom resources we use (their CRDs are not in kubernetes-validate)."""
    kind, api = o.get("kind"), o.get("apiVersion")
    known = {
        "RabbitmqCluster": "rabbitmq.com/v1beta1",
        "Cluster": "postgresql.cnpg.io/v1",
        "ScheduledBackup": "postgresql.cnpg.io/v1",
        "ObjectStore": "barmancloud.cnpg.io/v1",
        "ServiceMonitor": "monitoring.coreos.com/v1",
        "PodMonitor": "monitoring.coreos.com/v1",
        "PrometheusRule": "monitoring.coreos.com/v1",
        "ScaledObject": "keda.sh/v1alpha1",
    }
    if known.get(kind) != api:
        fail(where, f"unknown kind {api} {kind}: no schema and no structural check")
        return
    need(where, o, "metadata.name", str)
    if kind == "RabbitmqCluster":
        need(where, o, "spec.replicas", int)
        need(where, o, "spec.rabbitmq.additionalConfig", str)
    elif kind == "Cluster":
        need(where, o, "spec.instances", int)
        need(where, o, "spec.storage.size", str)
        need(where, o, "spec.bootstrap.initdb.database", str)
    elif kind == "ScheduledBackup":
        need(where, o, "spec.cluster.name", str)
        sched = need(where, o, "spec.schedule", str)
        if sched and len(sched.split()) != 6:
            fail(where, "CloudNativePG schedules have six fields (seconds first)")
    elif kind == "ObjectStore":
        need(where, o, "spec.configuration.destinationPath", str)
    elif kind == "ServiceMonitor":
        need(where, o, "spec.selector.matchLabels", dict)
        for ep in need(where, o, "spec.endpoints", list) or []:
            if "port" not in ep:
                fail(where, "endpoint without port")
    elif kind == "PodMonitor":
        need(where, o, "spec.selector.matchLabels", dict)
        for ep in need(where, o, "spec.podMetricsEndpoints", list) or []:
            if "port" not in ep:
                fail(where, "podMetricsEndpoint without port")
    elif kind == "PrometheusRule":
        for g in need(where, o, "spec.groups", list) or []:
            for r in g.get("rules", []):
                if not r.get("alert") and not r.get("record"):
                    fail(where, "rule without alert/record name")
                if not str(r.get("expr", "")).strip():
                    fail(where, f"rule {r.get('alert')} without expr")
                if r.get("alert") and r.get("labels", {}).get("severity") not in {"info", "warning", "critical"}:
                    fail(where, f"alert {r.get('alert')} needs severity info|warning|critical")
    elif kind == "ScaledObject":
        need(where, o, "spec.scaleTargetRef.name", str)
        for t in need(where, o, "spec.triggers", list) or []:
            if t.get("type") != "prometheus":
                fail(where, "only prometheus triggers are expected")
            for k in ("serverAddress", "query", "threshold"):
                if not isinstance(t.get("metadata", {}).get(k), str):
                    fail(where, f"trigger metadata.{k} missing or not a string")


# ---------------------------------------------------------------- policy checks


def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o.get("kind") == kind]


def name(o: dict) -> str:
    return o["metadata"]["name"]


def worker_type(dep: dict) -> str | None:
    return dep["spec"]["template"]["metadata"].get("labels", {}).get("trainyard.io/job-type")


def arg_after(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args and args.index(flag) + 1 < len(args) else None


def check_workers(overlay: str, objs: list[dict], types: set[str]) -> None:
    deps = [d for d in by_kind(objs, "Deployment") if worker_type(d)]
    seen = {}
    for d in deps:
        t = worker_type(d)
        where = f"{overlay}/Deployment/{name(d)}"
        seen.setdefault(t, []).append(name(d))
        pod = d["spec"]["template"]["spec"]
        c = pod["containers"][0]
        args = c.get("args", [])
        if arg_after(args, "--types") != t:
            fail(where, f"--types should be {t}, args are {args}")
        psc, csc = pod.get("securityContext", {}), c.get("securityContext", {})
        if not (csc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True):
            fail(where, "container must runAsNonRoot")
        if csc.get("readOnlyRootFilesystem") is not True:
            fail(where, "container must have readOnlyRootFilesystem")
        if csc.get("allowPrivilegeEscalation") is not False:
            fail(where, "container must set allowPrivilegeEscalation: false")
        if "/tmp" not in {m["mountPath"] for m in c.get("volumeMounts", [])}:
            fail(where, "read-only root filesystem needs a writable /tmp volume")
        for probe in ("livenessProbe", "readinessProbe"):
            if c.get(probe, {}).get("httpGet", {}).get("path") != "/healthz":
                fail(where, f"{probe} should GET /healthz")
        if not c.get("resources", {}).get("requests"):
            fail(where, "resource requests missing")
        env = {e["name"]: e for e in c.get("env", [])}
        for var, field in (("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace"), ("NODE_NAME", "spec.nodeName")):
            if env.get(var, {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != field:
                fail(where, f"{var} must come from the downward API ({field})")
        if pod.get("serviceAccountName") != WORKER_SA:
            fail(where, f"serviceAccountName must be {WORKER_SA}")
        grace = arg_after(args, "--grace-period")
        tgps = pod.get("terminationGracePeriodSeconds", 30)
        if grace is None or not grace.isdigit() or int(grace) >= tgps:
            fail(where, f"--grace-period ({grace}) must be set and below terminationGracePeriodSeconds ({tgps})")
        limits = c.get("resources", {}).get("limits", {})
        requests = c.get("resources", {}).get("requests", {})
        tolerations = pod.get("tolerations", [])
        gpu_tol = any(x.get("key") == "nvidia.com/gpu" and x.get("effect") == "NoSchedule" for x in tolerations)
        terms = (pod.get("affinity", {}).get("nodeAffinity", {}).get("requiredDuringSchedulingIgnoredDuringExecution", {})
                 .get("nodeSelectorTerms", []))
        exprs = [e for term in terms for e in term.get("matchExpressions", []) if e.get("key") == GPU_LABEL]
        if t in GPU_TYPES and overlay in PRODUCTION:
            if str(limits.get("nvidia.com/gpu")) != "1":
                fail(where, "GPU worker needs limits nvidia.com/gpu: 1")
            if not gpu_tol:
                fail(where, "GPU worker needs a toleration for the nvidia.com/gpu NoSchedule taint")
            if not (terms and all(any(e.get("operator") == "In" and "true" in e.get("values", []) for e in term.get("matchExpressions", [])
                                      if e.get("key") == GPU_LABEL) for term in terms)):
                fail(where, f"GPU worker needs required node affinity {GPU_LABEL} In [true]")
            if tgps < 300:
                fail(where, f"terminationGracePeriodSeconds {tgps} is too short to finish and checkpoint an epoch")
        else:
            if "nvidia.com/gpu" in limits or "nvidia.com/gpu" in requests:
                fail(where, "CPU worker (or dev overlay) must not request GPUs")
            if gpu_tol:
                fail(where, "CPU worker (or dev overlay) must not tolerate the GPU taint")
            if overlay in PRODUCTION and not any(e.get("operator") == "NotIn" for e in exprs):
                fail(where, f"CPU worker should keep off GPU nodes ({GPU_LABEL} NotIn [true])")
    for t in types:
        if len(seen.get(t, [])) != 1:
            fail(f"overlay {overlay}", f"job type {t} needs exactly one worker Deployment, has {seen.get(t, [])}")
    for t in set(seen) - types:
        fail(f"overlay {overlay}", f"worker Deployment for unknown job type {t} (not registered in worker/src/handlers/mod.rs)")


def check_autoscaling(overlay: str, objs: list[dict]) -> None:
    workers = {name(d): worker_type(d) for d in by_kind(objs, "Deployment") if worker_type(d)}
    hpas, sos = by_kind(objs, "HorizontalPodAutoscaler"), by_kind(objs, "ScaledObject")
    if overlay == "dev":
        if hpas or sos:
            fail(f"overlay {overlay}", "dev has no autoscaling (no prometheus-adapter/KEDA on a laptop)")
        return
    scalers = hpas if overlay == "gpu" else sos
    if overlay == "gpu" and sos or overlay == "keda" and hpas:
        fail(f"overlay {overlay}", "HPAs and ScaledObjects must not target the same Deployments")
    targets = {}
    for s in scalers:
        where = f"{overlay}/{s['kind']}/{name(s)}"
        target = s["spec"]["scaleTargetRef"]["name"]
        targets.setdefault(target, []).append(name(s))
        if target not in workers:
            fail(where, f"targets {target}, which is not a worker Deployment here")
            continue
        t = workers[target]
        if s["kind"] == "HorizontalPodAutoscaler":
            ext = [m for m in s["spec"].get("metrics", []) if m.get("type") == "External"]
            if not ext or any(m["external"]["metric"]["name"] != DEMAND for m in ext):
                fail(where, f"must scale on the External metric {DEMAND}")
            for m in ext:
                if m["external"]["metric"].get("selector", {}).get("matchLabels", {}).get("job_type") != t:
                    fail(where, f"metric selector must be job_type={t}")
            sd = s["spec"].get("behavior", {}).get("scaleDown", {})
            if sd.get("stabilizationWindowSeconds", 0) < 300:
                fail(where, "scale-down stabilization window should be at least 300 s")
            if s["spec"].get("minReplicas", 1) > s["spec"]["maxReplicas"]:
                fail(where, "minReplicas > maxReplicas")
        else:
            for trig in s["spec"]["triggers"]:
                q = trig["metadata"]["query"]
                if DEMAND not in q or f'job_type="{t}"' not in q:
                    fail(where, f"query must read {DEMAND} for job_type=\"{t}\": {q}")
            if s["spec"].get("minReplicaCount", 0) > s["spec"].get("maxReplicaCount", 100):
                fail(where, "minReplicaCount > maxReplicaCount")
    for dep in workers:
        if len(targets.get(dep, [])) != 1:
            fail(f"overlay {overlay}", f"worker Deployment {dep} needs exactly one autoscaler, has {targets.get(dep, [])}")


def check_control_plane(overlay: str, objs: list[dict]) -> None:
    deps = [d for d in by_kind(objs, "Deployment") if name(d) == "trainyard-control-plane"]
    if len(deps) != 1:
        fail(f"overlay {overlay}", "no trainyard-control-plane Deployment")
        return
    d = deps[0]
    where = f"{overlay}/Deployment/trainyard-control-plane"
    want = 1 if overlay == "dev" else 2
    if d["spec"].get("replicas") != want:
        fail(where, f"replicas should be {want}")
    c = d["spec"]["template"]["spec"]["containers"][0]
    if c.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/readyz":
        fail(where, "readinessProbe should GET /readyz")
    if c.get("livenessProbe", {}).get("httpGet", {}).get("path") != "/healthz":
        fail(where, "livenessProbe should GET /healthz")
    if c.get("securityContext", {}).get("readOnlyRootFilesystem") is not True:
        fail(where, "readOnlyRootFilesystem")
    if overlay != "dev" and not any(name(p) == "trainyard-control-plane" for p in by_kind(objs, "PodDisruptionBudget")):
        fail(where, "needs a PodDisruptionBudget")
    if not any(name(s) == "trainyard-control-plane" for s in by_kind(objs, "Service")):
        fail(where, "needs a Service")


def check_broker(overlay: str, objs: list[dict], max_timeout: int) -> None:
    for r in by_kind(objs, "RabbitmqCluster"):
        where = f"{overlay}/RabbitmqCluster/{name(r)}"
        conf = r["spec"].get("rabbitmq", {}).get("additionalConfig", "")
        m = re.search(r"^\s*consumer_timeout\s*=\s*(\d+)\s*$", conf, re.M)
        if not m:
            fail(where, "consumer_timeout must be set explicitly in additionalConfig")
        elif int(m.group(1)) <= max_timeout * 1000:
            fail(where, f"consumer_timeout {m.group(1)} ms must exceed the longest job timeout ({max_timeout} s)")
        if "rabbitmq_prometheus" not in r["spec"].get("rabbitmq", {}).get("additionalPlugins", []):
            fail(where, "rabbitmq_prometheus plugin missing")
        if overlay != "dev" and r["spec"].get("replicas") != 3:
            fail(where, "3 replicas in production (quorum queues)")


def check_secrets(overlay: str, objs: list[dict]) -> None:
    for o in objs:
        where = f"{overlay}/{o.get('kind')}/{o.get('metadata', {}).get('name')}"
        if o.get("kind") == "Secret" and (o.get("data") or o.get("stringData")):
            fail(where, "Secrets must not be inlined in manifests")
        tmpl = o.get("spec", {}).get("template", {}).get("spec", {}) if isinstance(o.get("spec"), dict) else {}
        documented = (K8S / "secrets.example.env").read_text()
        for c in tmpl.get("containers", []) + tmpl.get("initContainers", []):
            for e in c.get("env", []):
                if SECRET_ENV.search(e["name"]) and "value" in e:
                    fail(where, f"env {e['name']} must come from a Secret (valueFrom), not a literal")
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref and f"Secret {ref['name']}, key `{ref['key']}`" not in documented:
                    fail(where, f"Secret {ref['name']} key {ref['key']} is not documented in k8s/secrets.example.env")
            for src in c.get("envFrom", []):
                ref = src.get("secretRef")
                if ref and f"Secret {ref['name']}" not in documented:
                    fail(where, f"Secret {ref['name']} is not documented in k8s/secrets.example.env")


def check_rbac(overlay: str, objs: list[dict]) -> None:
    roles = {(o["kind"], name(o)): o for o in objs if o["kind"] in ("Role", "ClusterRole")}
    bound = []
    for b in by_kind(objs, "RoleBinding") + by_kind(objs, "ClusterRoleBinding"):
        for s in b.get("subjects", []):
            if s.get("kind") == "ServiceAccount" and s.get("name") == WORKER_SA:
                bound.append((b["roleRef"]["kind"], b["roleRef"]["name"], b["kind"]))
            if s.get("kind") == "ServiceAccount" and s.get("name") == "trainyard-control-plane":
                fail(f"{overlay}/{b['kind']}/{name(b)}", "the control plane needs no Kubernetes API access")
    want = {
        ("Role", "RoleBinding"): [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "patch"]}],
        ("ClusterRole", "ClusterRoleBinding"): [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}],
    }
    kinds = sorted((k, bk) for k, _, bk in bound)
    if kinds != sorted(want):
        fail(f"overlay {overlay}", f"{WORKER_SA} must be bound to exactly one Role and one ClusterRole, is bound to {bound}")
    for kind, rname, bkind in bound:
        role = roles.get((kind, rname))
        if role is None:
            fail(f"overlay {overlay}", f"{bkind} refers to missing {kind} {rname}")
            continue
        rules = [{k: sorted(v) for k, v in r.items()} for r in role.get("rules", [])]
        if rules != want.get((kind, bkind)):
            fail(f"{overlay}/{kind}/{rname}", f"rules must be exactly {want.get((kind, bkind))}, are {role.get('rules')}")


def check_metric_refs(metrics: set[str]) -> int:
    """Every trainyard_* name in dashboards, alerts, adapter rules and scalers exists in ALL_NAMES."""
    files = [p for p in K8S.rglob("*") if p.suffix in {".yaml", ".yml", ".json"}]
    count = 0
    for p in files:
        for m in re.finditer(r"\btrainyard_[a-z0-9_]+", p.read_text()):
            ref = re.sub(r"_(bucket|sum|count)$", "", m.group(0))
            if ref in metrics or m.group(0) in metrics:
                count += 1
                continue
            fail(str(p.relative_to(ROOT)), f"metric {m.group(0)} is not in common/src/metrics.rs ALL_NAMES")
    return count


def check_raw_files() -> None:
    for p in list(K8S.rglob("*.yaml")) + list(K8S.rglob("*.yml")):
        for doc in yaml.safe_load_all(p.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData")):
                fail(str(p.relative_to(ROOT)), "Secret with literal data")
            if isinstance(doc, dict) and doc.get("kind") == "Kustomization":
                for gen in doc.get("secretGenerator", []):
                    fail(str(p.relative_to(ROOT)), f"secretGenerator {gen.get('name')} would put secrets in git")


def check_dashboard(metrics: set[str]) -> None:
    p = K8S / "components/monitoring/dashboard.json"
    d = json.loads(p.read_text())
    panels = [x for x in d["panels"] if x.get("type") != "row"]
    if not any(x.get("type") == "logs" and "$job_id" in json.dumps(x.get("targets")) for x in panels):
        fail(str(p.relative_to(ROOT)), "needs a Loki logs panel filtered by $job_id")
    if "job_id" not in {v["name"] for v in d["templating"]["list"]}:
        fail(str(p.relative_to(ROOT)), "needs a job_id variable")
    used = set(re.findall(r"\btrainyard_[a-z0-9_]+", p.read_text()))
    for want in ("trainyard_jobs_total", DEMAND, "trainyard_jobs_running", "trainyard_job_duration_seconds_bucket",
                 "trainyard_retries_total", "trainyard_poison_messages_total", "trainyard_training_epoch_seconds_bucket"):
        if want not in used:
            fail(str(p.relative_to(ROOT)), f"no panel for {want}")
    alloy = (K8S / "components/logging/config.alloy").read_text()
    if "job_id" not in alloy or alloy.count("{") != alloy.count("}"):
        fail("k8s/components/logging/config.alloy", "must extract job_id, and braces must balance")


def check_cli(objs_by_overlay: dict[str, list[dict]], bindir: Path) -> int:
    """Each container command line parses with the binary's own clap definition."""
    lines = set()
    for objs in objs_by_overlay.values():
        for d in by_kind(objs, "Deployment"):
            for c in d["spec"]["template"]["spec"]["containers"]:
                cmd = c.get("command", [])
                if cmd and cmd[0].startswith("/usr/local/bin/trainyard"):
                    lines.add(tuple(cmd + c.get("args", [])))
    for line in sorted(lines):
        exe = bindir / Path(line[0]).name
        if not exe.exists():
            fail("cli", f"{exe} not built")
            continue
        out = subprocess.run([str(exe), *line[1:], "--help"], capture_output=True, text=True, timeout=60,
                             env={"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")})
        if out.returncode != 0:
            fail("cli", f"`{' '.join(line)}` does not parse: {(out.stderr or out.stdout).strip().splitlines()[:3]}")
    return len(lines)


def main() -> int:
    kubectl, bindir = sys.argv[1], Path(sys.argv[2])
    metrics, types, max_timeout = metric_names(), job_types(), max_timeout_s()
    rendered = {}
    total_builtin = total_custom = 0
    for overlay in OVERLAYS:
        objs = render(kubectl, overlay)
        rendered[overlay] = objs
        if not objs:
            continue
        b, c = schema_check(overlay, objs)
        total_builtin, total_custom = total_builtin + b, total_custom + c
        check_workers(overlay, objs, types)
        check_autoscaling(overlay, objs)
        check_control_plane(overlay, objs)
        check_broker(overlay, objs, max_timeout)
        check_secrets(overlay, objs)
        check_rbac(overlay, objs)
        print(f"  {overlay}: {len(objs)} objects rendered")
    refs = check_metric_refs(metrics)
    check_raw_files()
    check_dashboard(metrics)
    cli = check_cli(rendered, bindir)
    print(f"  schemas: {total_builtin} built-in objects valid for Kubernetes {', '.join(K8S_VERSIONS)} (strict); "
          f"{total_custom} custom resources checked structurally")
    print(f"  code: job types {sorted(types)}; {refs} metric references, all in ALL_NAMES; {cli} command lines parsed by the binaries")
    if failures:
        print(f"validate-k8s: {len(failures)} failure(s):", file=sys.stderr)
        for f in failures:
            print(f"  FAIL {f}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
