"""Convert CustomResourceDefinitions to JSON schemas that kubeconform reads.

    python deploy/ci/crd2jsonschema.py OUT_DIR CRD_DIR_OR_FILE...

For every version of every CRD found (YAML files, several documents each allowed), writes
``OUT_DIR/<group>/<kind lowercased>_<version>.json``, which kubeconform finds with
``-schema-location 'OUT_DIR/{{.Group}}/{{.ResourceKind}}_{{.ResourceAPIVersion}}.json'``.

The conversion is the one kubeconform's own openapi2jsonschema.py does, strict: every
object schema that lists ``properties`` and says nothing of ``additionalProperties``
(nor ``x-kubernetes-preserve-unknown-fields``) rejects keys it does not list, so a
misspelt key in a ScaledObject or ServiceMonitor fails validation instead of being
ignored. ``int-or-string`` becomes ``integer | string``; ``nullable`` adds ``null``.
Used by scripts/deploy-tools on the CRDs of the KEDA and Prometheus operator Go modules.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads a bare ``=`` (YAML 1.1's "value" tag, found in enums) as a string."""


_Loader.add_constructor("tag:yaml.org,2002:value", lambda loader, node: loader.construct_scalar(node))


def _strict(node):
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for k, v in node.items():
        if k in ("properties", "patternProperties", "definitions", "$defs"):
            out[k] = {name: _strict(sub) for name, sub in v.items()}
        else:
            out[k] = _strict(v)
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out["type"] = ["integer", "string"]
        out.pop("format", None)
    if out.pop("nullable", False) and "type" in out:
        t = out["type"]
        out["type"] = (t if isinstance(t, list) else [t]) + ["null"]
    preserve = out.pop("x-kubernetes-preserve-unknown-fields", False)
    for k in [k for k in out if k.startswith("x-kubernetes-")]:
        del out[k]
    if "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


def convert(crd: dict) -> dict[str, dict]:
    spec = crd["spec"]
    group, kind = spec["group"], spec["names"]["kind"]
    out = {}
    for version in spec["versions"]:
        schema = (version.get("schema") or {}).get("openAPIV3Schema")
        if schema is None:
            continue
        schema = _strict(schema)
        props = schema.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
        props["apiVersion"] = {"type": "string", "enum": [f"{group}/{version['name']}"]}
        props["kind"] = {"type": "string", "enum": [kind]}
        schema["additionalProperties"] = False
        schema["$schema"] = "http://json-schema.org/draft-07/schema#"
        out[f"{group}/{kind.lower()}_{version['name']}.json"] = schema
    return out


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    dest = Path(argv[1])
    files: list[Path] = []
    for arg in argv[2:]:
        p = Path(arg)
        files += sorted(p.rglob("*.y*ml")) if p.is_dir() else [p]
    written = 0
    for f in files:
        for doc in yaml.load_all(f.read_text(), Loader=_Loader):
            if not isinstance(doc, dict) or doc.get("kind") != "CustomResourceDefinition":
                continue
            for rel, schema in convert(doc).items():
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(json.dumps(schema, indent=1, sort_keys=True))
                written += 1
    print(f"crd2jsonschema: {written} schemas from {len(files)} files into {dest}", file=sys.stderr)
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
