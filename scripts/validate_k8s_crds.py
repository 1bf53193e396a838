"""Custom resources against the operators' own CRD schemas (used by scripts/validate_k8s.py).

The CRDs under k8s/schemas/<project>-v<version>/ are vendored as their projects publish
them, for the oldest version of each operator the manifests support. A field the CRD does
not declare is an error here: the API server would prune it silently (a CRD's structural
schema drops unknown fields), which is how a setting of a newer operator version is lost.
"""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import yaml


def _strict(schema: dict) -> dict:
    """The CRD's OpenAPI v3 schema as a JSON schema that rejects undeclared fields."""
    s = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, list):
            for x in node:
                walk(x)
            return
        if not isinstance(node, dict):
            return
        if node.pop("x-kubernetes-int-or-string", False):
            node.pop("type", None)
            node.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
        preserve = node.pop("x-kubernetes-preserve-unknown-fields", False)
        for k in [k for k in node if k.startswith("x-kubernetes-")]:
            node.pop(k)
        if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node and not preserve:
            node["additionalProperties"] = False
        for k, v in node.items():
            if k in ("properties", "patternProperties", "definitions"):
                for sub in v.values():
                    walk(sub)
            elif k in ("items", "additionalProperties", "not"):
                walk(v)
            elif k in ("allOf", "anyOf", "oneOf"):
                walk(v)

    walk(s)
    # metadata is checked by the API server itself, not by the CRD.
    s.get("properties", {}).pop("metadata", None)
    s["additionalProperties"] = False
    s.setdefault("properties", {})["metadata"] = {"type": "object"}
    return s


class CrdSchemas:
    """Every vendored CRD version, by (apiVersion, kind)."""

    def __init__(self, root: Path):
        self.by_kind: dict[tuple[str, str], tuple[str, jsonschema.protocols.Validator]] = {}
        self.projects: dict[str, str] = {}  # project dir -> version, e.g. keda -> 2.17.0
        for d in sorted(p for p in root.iterdir() if p.is_dir()):
            project, _, version = d.name.rpartition("-v")
            self.projects[project] = version
            if not any((d / n).exists() for n in ("LICENSE", "LICENSE.txt")):
                raise SystemExit(f"validate-k8s: {d} has no LICENSE")
            for f in sorted(d.glob("*.yaml")):
                for crd in yaml.safe_load_all(f.read_text()):
                    if not crd or crd.get("kind") != "CustomResourceDefinition":
                        continue
                    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
                    for v in crd["spec"]["versions"]:
                        if not v.get("served", True):
                            continue
                        schema = _strict(v["schema"]["openAPIV3Schema"])
                        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
                        self.by_kind[(f"{group}/{v['name']}", kind)] = (f"{d.name}/{f.name}", cls(schema))

    def check(self, obj: dict) -> list[str] | None:
        """Errors of `obj` against its CRD; None when no vendored CRD defines its kind."""
        found = self.by_kind.get((obj.get("apiVersion"), obj.get("kind")))
        if found is None:
            return None
        source, validator = found
        errors = []
        for e in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path)):
            path = "/".join(map(str, e.absolute_path)) or "(root)"
            errors.append(f"{path}: {e.message} (schema {source})")
        return errors
