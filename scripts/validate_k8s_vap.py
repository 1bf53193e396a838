"""The worker pod-patch ValidatingAdmissionPolicy, evaluated on sample requests (used by
scripts/validate_k8s.py). Its CEL runs here under cel-python, not the API server's cel-go:
the expressions use only standard CEL (has, in, all, exists, map and list equality), which
both implement alike.
"""

from __future__ import annotations

import copy

import celpy
from celpy import celtypes

SA = "system:serviceaccount:trainyard:trainyard-worker"
COST = "controller.kubernetes.io/pod-deletion-cost"


def _decide(pol: dict, obj: dict, old: dict, user: str, podname: str | None) -> str:
    env = celpy.Environment()

    def ev(expr, act):
        return env.program(env.compile(expr)).evaluate(act)

    extra = {"authentication.kubernetes.io/pod-name": [podname]} if podname else {}
    request = {"userInfo": {"username": user, "extra": extra}}
    act = {"object": celpy.json_to_cel(obj), "oldObject": celpy.json_to_cel(old), "request": celpy.json_to_cel(request)}
    if not all(bool(ev(m["expression"], act)) for m in pol.get("matchConditions", [])):
        return "not matched"
    variables: dict = {}
    for v in pol.get("variables", []):
        act["variables"] = celtypes.MapType({celtypes.StringType(k): val for k, val in variables.items()})
        variables[v["name"]] = ev(v["expression"], act)
    act["variables"] = celtypes.MapType({celtypes.StringType(k): val for k, val in variables.items()})
    for v in pol["validations"]:
        if not bool(ev(v["expression"], act)):
            return "denied"
    return "allowed"


def check_policy(pol: dict) -> list[str]:
    """Failures of the policy (its spec) on requests it must allow, deny or not match."""
    pod = {"metadata": {"name": "w-1", "labels": {"app": "x"}, "annotations": {"kubectl.kubernetes.io/default-container": "worker"}},
           "spec": {"containers": [{"name": "worker", "image": "i"}]}}

    def mod(f):
        o = copy.deepcopy(pod)
        f(o)
        return o

    costed = mod(lambda o: o["metadata"]["annotations"].__setitem__(COST, "10000"))
    cases = [
        ("its own pod's cost set", costed, pod, SA, "w-1", "allowed"),
        ("its own pod's cost changed", mod(lambda o: o["metadata"]["annotations"].__setitem__(COST, "0")), costed, SA, "w-1", "allowed"),
        ("another pod's cost", costed, pod, SA, "w-2", "denied"),
        ("a token without a pod name", costed, pod, SA, None, "denied"),
        ("another annotation of its pod", mod(lambda o: o["metadata"]["annotations"].__setitem__("x", "1")), pod, SA, "w-1", "denied"),
        ("an annotation of its pod removed", mod(lambda o: o["metadata"]["annotations"].clear()), pod, SA, "w-1", "denied"),
        ("a label of its pod", mod(lambda o: o["metadata"]["labels"].__setitem__("app", "y")), pod, SA, "w-1", "denied"),
        ("its pod's spec", mod(lambda o: o["spec"]["containers"][0].__setitem__("image", "evil")), pod, SA, "w-1", "denied"),
        ("another user's change", mod(lambda o: o["metadata"]["labels"].__setitem__("app", "y")), pod,
         "system:serviceaccount:trainyard:other", None, "not matched"),
    ]
    failures = []
    for what, obj, old, user, podname, want in cases:
        try:
            got = _decide(pol, obj, old, user, podname)
        except celpy.CELEvalError as e:
            got = f"error {e}"
        if got != want:
            failures.append(f"{what}: {want} expected, {got}")
    return failures
