#!/usr/bin/env python3
"""Offline validation of trainyard's Kubernetes manifests (called by scripts/validate-k8s.sh).

1. Renders every overlay under k8s/overlays with `kubectl kustomize` (the kubectl of the
   venv, pinned), and validates every built-in object against the Kubernetes OpenAPI
   schemas (kubernetes-validate, strict: unknown fields fail) for the oldest and newest
   Kubernetes versions we support, and every custom resource against the CRDs of the
   oldest operator versions we support, vendored under k8s/schemas/ (unknown fields fail:
   a CRD would prune them silently). docs/operations.md must name each of those versions.
2. Consistency and policy checks against the code: job types (worker/src/handlers/mod.rs),
   the longest job timeout (common/src/job.rs MAX_TIMEOUT_S), the worker's stop budget
   (worker/src/runtime/session.rs), its default log filters, and the binaries' own CLI
   definitions (each container's command line is parsed by the real binary with `--help`
   appended; every TRAINYARD_* variable a container gets is one the code reads).
3. Every metric and label a dashboard panel, alert, autoscaler or adapter rule queries is
   one a running control plane or worker exports: k8s/components/monitoring/series.txt,
   written by the end-to-end test tests/tests/e2e/series.rs (validate_k8s_promql.py).
4. Writes the PrometheusRule's rules as a plain rules file for `promtool` (called by
   scripts/validate-k8s.sh) when given a third argument.

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

from validate_k8s_crds import CrdSchemas
from validate_k8s_promql import check_series
from validate_k8s_vap import check_policy

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
SCHEMAS = K8S / "schemas"
# Pods that may open TCP 443 (6443: API server) to anywhere, and why.
HTTPS_EGRESS = {
    "trainyard-worker": "object storage and the API server (own pod's deletion cost, own Node)",
    "trainyard-control-plane": "object storage",
    "trainyard-rabbitmq": "the API server (peer discovery)",
    "trainyard-db": "the API server (instance manager) and object storage (backups)",
}
API_SERVER_EGRESS = {"trainyard-worker", "trainyard-rabbitmq", "trainyard-db"}
# RabbitMQ's disk_free_limit.absolute when additionalConfig does not set it: the cluster
# operator's default rabbitmq.conf (internal/resource/configmap.go, 2.17).
OPERATOR_DISK_FREE_LIMIT = "2GB"
# Margin between the worker's stop budget and terminationGracePeriodSeconds (SIGKILL race).
GRACE_MARGIN_S = 5

failures: list[str] = []


def fail(where: str, msg: str) -> None:
    failures.append(f"{where}: {msg}")


# ---------------------------------------------------------------- facts from the code


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


def stop_budget_s() -> tuple[int, int]:
    """(seconds for stopped jobs after the grace period, seconds to close the connection)."""
    src = (ROOT / "worker/src/runtime/session.rs").read_text()
    got = dict(re.findall(r"pub const (STOPPED_JOBS_WAIT|CLOSE_WAIT): Duration = Duration::from_secs\((\d+)\);", src))
    if set(got) != {"STOPPED_JOBS_WAIT", "CLOSE_WAIT"}:
        sys.exit("validate-k8s: cannot find STOPPED_JOBS_WAIT and CLOSE_WAIT in worker/src/runtime/session.rs")
    return int(got["STOPPED_JOBS_WAIT"]), int(got["CLOSE_WAIT"])


def worker_log_filter() -> list[str]:
    """The worker's default RUST_LOG directives (used when RUST_LOG is unset)."""
    src = (ROOT / "worker/src/runtime/cli.rs").read_text()
    m = re.search(r'EnvFilter::try_from_default_env\(\)\.unwrap_or_else\(\|_\| "([^"]+)"', src)
    if not m:
        sys.exit("validate-k8s: cannot find the worker's default log filter in worker/src/runtime/cli.rs")
    return m.group(1).split(",")


def env_read_by_code() -> set[str]:
    """TRAINYARD_* variables the code reads: clap `env = "..."` and string literals."""
    names = set()
    for crate in ("common", "producer", "worker"):
        for f in (ROOT / crate / "src").rglob("*.rs"):
            names |= set(re.findall(r'"(TRAINYARD_[A-Z0-9_]+)"', f.read_text()))
    return names


# ---------------------------------------------------------------- rendering and schemas


def render(kubectl: str, overlay: str) -> list[dict]:
    out = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True)
    if out.returncode != 0:
        fail(f"overlay {overlay}", f"kubectl kustomize failed: {out.stderr.strip()}")
        return []
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def schema_check(overlay: str, objs: list[dict], crds: CrdSchemas) -> tuple[int, int]:
    builtin = custom = 0
    for o in objs:
        where = f"{overlay}/{o.get('kind')}/{o.get('metadata', {}).get('name')}"
        try:
            for v in K8S_VERSIONS:
                kubernetes_validate.validate(o, v, strict=True)
            builtin += 1
        except kubernetes_validate.SchemaNotFoundError:
            errors = crds.check(o)
            if errors is None:
                fail(where, f"no CRD for {o.get('apiVersion')} {o.get('kind')} under k8s/schemas/: vendor the operator's CRD")
                continue
            custom += 1
            for e in errors:
                fail(where, f"CRD schema: {e}")
            check_custom(where, o)
        except kubernetes_validate.ValidationError as e:
            fail(where, f"schema: {e.message} at {'/'.join(map(str, e.path))}")
    return builtin, custom


def check_custom(where: str, o: dict) -> None:
    """What the CRDs cannot say."""
    kind = o.get("kind")
    if kind == "ScheduledBackup":
        sched = o.get("spec", {}).get("schedule", "")
        if len(sched.split()) != 6:
            fail(where, "CloudNativePG schedules have six fields (seconds first)")
    elif kind == "PrometheusRule":
        for g in o["spec"].get("groups", []):
            for r in g.get("rules", []):
                if r.get("alert") and r.get("labels", {}).get("severity") not in {"info", "warning", "critical"}:
                    fail(where, f"alert {r.get('alert')} needs severity info|warning|critical")
    elif kind == "ScaledObject":
        fb = o["spec"].get("fallback")
        if not fb or fb.get("behavior") != "currentReplicasIfHigher":
            fail(where, "fallback.behavior must be currentReplicasIfHigher: never scale busy workers down when the signal is missing")
        for t in o["spec"].get("triggers", []):
            if t.get("type") != "prometheus":
                fail(where, "only prometheus triggers are expected")


def check_versions(crds: CrdSchemas) -> None:
    """docs/operations.md states the minimum version of each operator whose CRDs are vendored."""
    doc = (ROOT / "docs/operations.md").read_text()
    for project, version in crds.projects.items():
        if f"`{project}` {version}" not in doc:
            fail("docs/operations.md", f"must state the minimum version of {project} as `{project}` {version} (k8s/schemas/)")


# ---------------------------------------------------------------- policy checks


def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o.get("kind") == kind]


def name(o: dict) -> str:
    return o["metadata"]["name"]


def worker_type(dep: dict) -> str | None:
    return dep["spec"]["template"]["metadata"].get("labels", {}).get("trainyard.io/job-type")


def arg_after(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args and args.index(flag) + 1 < len(args) else None


def check_workers(overlay: str, objs: list[dict], types: set[str], budget: tuple[int, int]) -> None:
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
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            if c.get(probe, {}).get("httpGet", {}).get("path") != path:
                fail(where, f"{probe} should GET {path}")
        if overlay in PRODUCTION and "replicas" in d["spec"]:
            fail(where, "spec.replicas under an HPA/KEDA resets the autoscaled count to it on every `kubectl apply`; leave it out")
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
        stopped, close = budget
        if grace is None or not grace.isdigit():
            fail(where, f"--grace-period must be set, is {grace}")
        elif int(grace) + stopped + close + GRACE_MARGIN_S > tgps:
            fail(where, f"terminationGracePeriodSeconds {tgps} < the worker's stop budget: --grace-period {grace} + {stopped} s "
                        f"for stopped jobs + {close} s to close the connection + {GRACE_MARGIN_S} s margin "
                        f"= {int(grace) + stopped + close + GRACE_MARGIN_S}")
        device = env.get("TRAINYARD_DEVICE", {}).get("value")
        rolling = d["spec"].get("strategy", {}).get("rollingUpdate", {})
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
            if device != "cuda":
                fail(where, f"GPU worker must default to the GPU: env TRAINYARD_DEVICE=cuda, is {device}")
            if str(rolling.get("maxSurge")) != "0" or str(rolling.get("maxUnavailable")) != "1":
                fail(where, f"GPU worker rollouts need no spare GPU: maxSurge 0, maxUnavailable 1, are {rolling}")
        else:
            if device is not None and device.startswith("cuda"):
                fail(where, f"CPU worker (or dev overlay) must not default to CUDA (TRAINYARD_DEVICE={device})")
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


def longest_timeout_s(consumer_timeout_s: float) -> float:
    """The longest `timeout_s` a worker runs under a broker's consumer timeout: a tenth kept for
    ending a job, and one dispatcher sweep (a twentieth, 1-60 s) for waiting for a slot
    (`longest_timeout` in worker/src/runtime/process.rs)."""
    return consumer_timeout_s - consumer_timeout_s / 10 - min(max(consumer_timeout_s / 20, 1), 60)


def check_broker(overlay: str, objs: list[dict], max_timeout: int) -> None:
    for r in by_kind(objs, "RabbitmqCluster"):
        where = f"{overlay}/RabbitmqCluster/{name(r)}"
        conf = r["spec"].get("rabbitmq", {}).get("additionalConfig", "")
        m = re.search(r"^\s*consumer_timeout\s*=\s*(\d+)\s*$", conf, re.M)
        if not m:
            fail(where, "consumer_timeout must be set explicitly in additionalConfig")
        elif longest_timeout_s(int(m.group(1)) / 1000) < max_timeout:
            fail(
                where,
                f"consumer_timeout {m.group(1)} ms leaves workers room for jobs of {longest_timeout_s(int(m.group(1)) / 1000):.0f} s, "
                f"under the longest job timeout ({max_timeout} s)",
            )
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
        ("Role", "RoleBinding"): [{"apiGroups": [""], "resources": ["pods"], "verbs": ["patch"]}],
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
    check_pod_patch_policy(overlay, objs)


def check_pod_patch_policy(overlay: str, objs: list[dict]) -> None:
    """`patch pods` is narrowed to the worker's own pod's deletion cost by an admission policy."""
    where = f"overlay {overlay}"
    user = f"system:serviceaccount:trainyard:{WORKER_SA}"
    policies = [p for p in by_kind(objs, "ValidatingAdmissionPolicy")
                if any(user in m.get("expression", "") for m in p["spec"].get("matchConditions", []))]
    if len(policies) != 1:
        fail(where, f"needs one ValidatingAdmissionPolicy matching {user}, has {len(policies)}")
        return
    pol = policies[0]
    if "namespace" in pol["metadata"]:
        fail(f"{overlay}/ValidatingAdmissionPolicy/{name(pol)}", "is cluster-scoped: no metadata.namespace")
    rules = pol["spec"].get("matchConstraints", {}).get("resourceRules", [])
    if not any("pods" in r.get("resources", []) and "UPDATE" in r.get("operations", []) for r in rules):
        fail(f"{overlay}/ValidatingAdmissionPolicy/{name(pol)}", "must match UPDATE of pods (a patch is an update)")
    exprs = " ".join(v.get("expression", "") for v in pol["spec"].get("validations", []))
    for needle in ("authentication.kubernetes.io/pod-name", "controller.kubernetes.io/pod-deletion-cost", "object.spec == oldObject.spec"):
        if needle not in exprs and needle not in json.dumps(pol["spec"].get("variables", [])):
            fail(f"{overlay}/ValidatingAdmissionPolicy/{name(pol)}", f"validations must use {needle}")
    for f in check_policy(pol["spec"]):
        fail(f"{overlay}/ValidatingAdmissionPolicy/{name(pol)}", f"on a sample request: {f}")
    if pol["spec"].get("failurePolicy", "Fail") != "Fail":
        fail(f"{overlay}/ValidatingAdmissionPolicy/{name(pol)}", "failurePolicy must be Fail")
    binds = [b for b in by_kind(objs, "ValidatingAdmissionPolicyBinding") if b["spec"].get("policyName") == name(pol)]
    if len(binds) != 1 or "Deny" not in binds[0]["spec"].get("validationActions", []):
        fail(where, f"needs one ValidatingAdmissionPolicyBinding of {name(pol)} with validationActions [Deny]")


def selected_apps(pol: dict) -> set[str]:
    """The app names a NetworkPolicy's podSelector selects (app.kubernetes.io/name or cnpg.io/cluster)."""
    sel = pol["spec"].get("podSelector", {})
    apps = set()
    for key in ("app.kubernetes.io/name", "cnpg.io/cluster"):
        if key in sel.get("matchLabels", {}):
            apps.add(sel["matchLabels"][key])
        for e in sel.get("matchExpressions", []):
            if e.get("key") == key and e.get("operator") == "In":
                apps |= set(e.get("values", []))
    if not sel:
        apps.add("*")
    return apps


def check_network_policies(overlay: str, objs: list[dict]) -> None:
    """HTTPS to anywhere only for the pods that need it; nothing to port 80 (instance metadata)."""
    https, api = {}, set()
    for pol in by_kind(objs, "NetworkPolicy"):
        where = f"{overlay}/NetworkPolicy/{name(pol)}"
        for rule in pol["spec"].get("egress", []):
            ports = {p.get("port") for p in rule.get("ports", [])}
            if 80 in ports:
                fail(where, "port 80 egress (instance metadata) is not opened by default: docs/operations.md says how")
            if rule.get("to"):
                continue
            if ports & {443, 6443}:
                for app in selected_apps(pol):
                    https.setdefault(app, []).append(name(pol))
                    if 6443 in ports:
                        api.add(app)
            elif ports - {53}:
                fail(where, f"egress to anywhere on {sorted(ports - {53})}: name the destination")
    for app, pols in https.items():
        if app not in HTTPS_EGRESS:
            fail(f"overlay {overlay}", f"{app} may reach 443 anywhere ({pols}) but needs neither object storage nor the API server")
    for app in HTTPS_EGRESS:
        if app not in https:
            fail(f"overlay {overlay}", f"{app} needs HTTPS egress for {HTTPS_EGRESS[app]}")
    if api != API_SERVER_EGRESS:
        fail(f"overlay {overlay}", f"API server egress (6443) must be exactly {sorted(API_SERVER_EGRESS)}, is {sorted(api)}")


def check_config(overlay: str, objs: list[dict], noisy: list[str], known_env: set[str], help_env: set[str]) -> None:
    """JSON logs everywhere, the worker's noisy-crate filters kept, every TRAINYARD_* variable read by the code."""
    cms = [c for c in by_kind(objs, "ConfigMap") if name(c) == "trainyard-config"]
    if len(cms) != 1:
        fail(f"overlay {overlay}", "no ConfigMap trainyard-config")
        return
    data = cms[0].get("data", {})
    where = f"{overlay}/ConfigMap/trainyard-config"
    if data.get("TRAINYARD_LOG_FORMAT") != "json":
        fail(where, "TRAINYARD_LOG_FORMAT must be json (Alloy parses JSON lines)")
    directives = data.get("RUST_LOG", "").split(",")
    for d in noisy[1:]:
        if d not in directives:
            fail(where, f"RUST_LOG must keep the worker's filter {d} (worker/src/runtime/cli.rs), is {data.get('RUST_LOG')}")
    names = {k for k in data if k.startswith("TRAINYARD_")}
    for d in by_kind(objs, "Deployment"):
        for c in d["spec"]["template"]["spec"]["containers"]:
            names |= {e["name"] for e in c.get("env", []) if e["name"].startswith("TRAINYARD_")}
            trainyard = c.get("command", [""])[0].startswith("/usr/local/bin/trainyard")
            if trainyard and not any(src.get("configMapRef", {}).get("name") == "trainyard-config" for src in c.get("envFrom", [])):
                fail(f"{overlay}/Deployment/{name(d)}", "must take its settings (log format, RUST_LOG) from the ConfigMap trainyard-config")
            if trainyard and any(e["name"] in ("TRAINYARD_LOG_FORMAT", "RUST_LOG") for e in c.get("env", [])):
                fail(f"{overlay}/Deployment/{name(d)}", "TRAINYARD_LOG_FORMAT and RUST_LOG come from trainyard-config, not per container")
    for n in sorted(names - known_env - help_env):
        fail(f"overlay {overlay}", f"{n} is set but read by no code (common/producer/worker src, or the binaries' --help)")


def check_disk(overlay: str, objs: list[dict]) -> None:
    """The broker's volume leaves room above disk_free_limit (below it RabbitMQ blocks publishers)."""
    units = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40, "kib": 2**10, "mib": 2**20, "gib": 2**30}

    def size(v: str) -> int:
        m = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", str(v))
        if not m or m.group(2).lower() not in units:
            raise ValueError(v)
        return int(m.group(1)) * units[m.group(2).lower()]

    for r in by_kind(objs, "RabbitmqCluster"):
        where = f"{overlay}/RabbitmqCluster/{name(r)}"
        conf = r["spec"].get("rabbitmq", {}).get("additionalConfig", "")
        m = re.search(r"^\s*disk_free_limit\.absolute\s*=\s*(\S+)\s*$", conf, re.M)
        limit = size(m.group(1) if m else OPERATOR_DISK_FREE_LIMIT)
        storage = size(r["spec"].get("persistence", {}).get("storage", "10Gi"))
        if storage < 2 * limit:
            fail(where, f"persistence.storage {storage} B leaves less than disk_free_limit ({limit} B) for messages")


def check_raw_files() -> None:
    for p in list(K8S.rglob("*.yaml")) + list(K8S.rglob("*.yml")):
        for doc in yaml.safe_load_all(p.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData")):
                fail(str(p.relative_to(ROOT)), "Secret with literal data")
            if isinstance(doc, dict) and doc.get("kind") == "Kustomization":
                for gen in doc.get("secretGenerator", []):
                    fail(str(p.relative_to(ROOT)), f"secretGenerator {gen.get('name')} would put secrets in git")


def check_dashboard() -> None:
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


def check_cli(objs_by_overlay: dict[str, list[dict]], bindir: Path, help_env: set[str]) -> int:
    """Each container command line parses with the binary's own clap definition; collects the
    environment variables its `--help` names."""
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
        help_env |= set(re.findall(r"\[env: (TRAINYARD_[A-Z0-9_]+)", out.stdout))
    return len(lines)


def check_alert_tests(objs: list[dict]) -> None:
    """Every alert has a promtool unit test where it fires and one where it stays silent."""
    path = K8S / "components/monitoring/alerts_test.yaml"
    tests = yaml.safe_load(path.read_text()).get("tests", [])
    fires, silent = set(), set()
    for t in tests:
        for case in t.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else silent).add(case["alertname"])
    alerts = {r["alert"] for o in objs if o.get("kind") == "PrometheusRule" for g in o["spec"]["groups"] for r in g["rules"] if "alert" in r}
    for a in sorted(alerts - fires):
        fail(str(path.relative_to(ROOT)), f"no test where {a} fires")
    for a in sorted(alerts - silent):
        fail(str(path.relative_to(ROOT)), f"no test where {a} stays silent")
    for a in sorted((fires | silent) - alerts):
        fail(str(path.relative_to(ROOT)), f"tests an alert that does not exist: {a}")


def write_rules(objs: list[dict], out: Path) -> int:
    """The PrometheusRule's groups as a plain Prometheus rules file (for promtool)."""
    rules = [o for o in objs if o.get("kind") == "PrometheusRule"]
    if len(rules) != 1:
        fail("monitoring", f"expected one PrometheusRule, found {len(rules)}")
        return 0
    out.write_text(yaml.safe_dump({"groups": rules[0]["spec"]["groups"]}, sort_keys=False))
    return sum(len(g["rules"]) for g in rules[0]["spec"]["groups"])


def main() -> int:
    kubectl, bindir = sys.argv[1], Path(sys.argv[2])
    rules_out = Path(sys.argv[3]) if len(sys.argv) > 3 else None
    types, max_timeout = job_types(), max_timeout_s()
    budget, noisy, known_env = stop_budget_s(), worker_log_filter(), env_read_by_code()
    crds = CrdSchemas(SCHEMAS)
    rendered = {}
    total_builtin = total_custom = 0
    for overlay in OVERLAYS:
        objs = render(kubectl, overlay)
        rendered[overlay] = objs
        if not objs:
            continue
        b, c = schema_check(overlay, objs, crds)
        total_builtin, total_custom = total_builtin + b, total_custom + c
        check_workers(overlay, objs, types, budget)
        check_autoscaling(overlay, objs)
        check_control_plane(overlay, objs)
        check_broker(overlay, objs, max_timeout)
        check_disk(overlay, objs)
        check_secrets(overlay, objs)
        check_rbac(overlay, objs)
        check_network_policies(overlay, objs)
        print(f"  {overlay}: {len(objs)} objects rendered")
    check_versions(crds)
    check_raw_files()
    check_dashboard()
    help_env: set[str] = set()
    cli = check_cli(rendered, bindir, help_env)
    for overlay, objs in rendered.items():
        check_config(overlay, objs, noisy, known_env, help_env)
    selectors = check_series(K8S, rendered, fail)
    check_alert_tests(rendered["gpu"])
    n_rules = write_rules(rendered["gpu"], rules_out) if rules_out else 0
    print(f"  schemas: {total_builtin} built-in objects valid for Kubernetes {', '.join(K8S_VERSIONS)} (strict); "
          f"{total_custom} custom resources valid for the CRDs of "
          f"{', '.join(f'{p} {v}' for p, v in crds.projects.items())} (unknown fields rejected)")
    print(f"  code: job types {sorted(types)}; {cli} command lines parsed by the binaries; "
          f"stop budget grace + {budget[0]} s + {budget[1]} s")
    print(f"  series: {selectors} metric selectors of dashboard, alerts and autoscalers checked against series.txt"
          + (f"; {n_rules} rules written for promtool" if rules_out else ""))
    if failures:
        print(f"validate-k8s: {len(failures)} failure(s):", file=sys.stderr)
        for f in failures:
            print(f"  FAIL {f}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
