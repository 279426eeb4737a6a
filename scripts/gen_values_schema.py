"""Generate helm/k2serve/values.schema.json from the documented helm/k2serve/values.yaml.

Every key of values.yaml must have a comment right above it; that comment becomes the key's
`description`. The type of a key is inferred from its default (maps become closed objects:
unknown keys are rejected, so a plain-text `apiKey: sk-...` cannot slip in). A comment line
`# @schema {...}` adds JSON Schema keywords; one that names a "type" or a "$ref" replaces the
inferred schema of that key (its sub-keys are then not walked). `$defs` below holds the shared
leaf types the annotations refer to.

    python scripts/gen_values_schema.py          # rewrite the schema
    python scripts/gen_values_schema.py --check  # exit 1 when the schema is stale
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parent.parent / "helm" / "k2serve"

_NAME = r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?"
DEFS: dict[str, Any] = {
    "port": {"type": "integer", "minimum": 1, "maximum": 65535},
    "quantity": {
        "type": ["string", "integer"],
        "pattern": r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$",
    },
    "name": {"type": "string", "pattern": f"^{_NAME}$", "maxLength": 253},
    "optionalName": {"type": "string", "pattern": f"^({_NAME})?$", "maxLength": 253},
    "secretKey": {"type": "string", "pattern": r"^[-._a-zA-Z0-9]+$"},
    "stringMap": {"type": "object", "additionalProperties": {"type": "string"}},
    "tolerations": {"type": "array", "items": {"type": "object"}},
    "resources": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "requests": {"type": "object", "additionalProperties": {"$ref": "#/$defs/quantity"}},
            "limits": {"type": "object", "additionalProperties": {"$ref": "#/$defs/quantity"}},
        },
    },
}

_KEY = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z0-9_.-]+):(\s|$)")
_ANNOTATION = "@schema"

Docs = dict[tuple[str, ...], tuple[str, dict[str, Any]]]


class SchemaSourceError(ValueError):
    """values.yaml breaks the documentation contract; carries the offending key path."""


def parse_docs(text: str, values: dict[str, Any]) -> Docs:
    """(description, annotation) of every mapping key, by key path; list contents are skipped."""
    docs: Docs = {}
    stack: list[tuple[int, str]] = []
    pending: list[str] = []
    skip_deeper_than: int | None = None
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if skip_deeper_than is not None:
            if stripped and indent <= skip_deeper_than and not stripped.startswith("- "):
                skip_deeper_than = None
            else:
                continue
        if not stripped:
            pending = []
            continue
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        m = _KEY.match(line)
        if m is None:
            raise SchemaSourceError(f"values.yaml:{lineno}: cannot read a key from {line!r}")
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = (*(k for _, k in stack), m["key"])
        stack.append((indent, m["key"]))
        desc = [p for p in pending if not p.startswith(_ANNOTATION)]
        notes = [p[len(_ANNOTATION) :].strip() for p in pending if p.startswith(_ANNOTATION)]
        annotation: dict[str, Any] = {}
        for note in notes:
            try:
                annotation.update(json.loads(note))
            except json.JSONDecodeError as e:
                raise SchemaSourceError(f"values.yaml:{lineno}: bad @schema JSON for {'.'.join(path)}") from e
        docs[path] = (" ".join(desc), annotation)
        pending = []
        if isinstance(_lookup(values, path), list):
            skip_deeper_than = indent
    return docs


def _lookup(values: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(values, dict):
            return None
        values = values.get(key)
    return values


def _infer(value: Any, path: tuple[str, ...], docs: Docs) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"type": "boolean"}
    if isinstance(value, int):
        return {"type": "integer"}
    if isinstance(value, float):
        return {"type": "number"}
    if isinstance(value, str):
        return {"type": "string"}
    if isinstance(value, list):
        return {"type": "array"}
    if isinstance(value, dict):
        if not value:
            raise SchemaSourceError(f"{'.'.join(path)}: an empty map needs a '# @schema' type")
        props = {k: node_schema(v, (*path, k), docs) for k, v in value.items()}
        return {"type": "object", "additionalProperties": False, "properties": props}
    raise SchemaSourceError(f"{'.'.join(path)}: cannot infer a type from {value!r}; annotate it")


def node_schema(value: Any, path: tuple[str, ...], docs: Docs) -> dict[str, Any]:
    """The schema of one key: its annotation, or the inferred type refined by the annotation."""
    if path not in docs or not docs[path][0]:
        raise SchemaSourceError(f"{'.'.join(path)}: every key in values.yaml needs a comment above it")
    description, annotation = docs[path]
    if "type" in annotation or "$ref" in annotation:
        schema = dict(annotation)
    else:
        schema = {**_infer(value, path, docs), **annotation}
    return {"description": description, **schema}


def build_schema(text: str) -> dict[str, Any]:
    values = yaml.safe_load(text)
    docs = parse_docs(text, values)
    props = {k: node_schema(v, (k,), docs) for k, v in values.items()}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Values of the k2serve Helm chart (generated by scripts/gen_values_schema.py)",
        "type": "object",
        "additionalProperties": False,
        "properties": props,
        "$defs": DEFS,
    }


def render(chart: Path = CHART) -> str:
    return json.dumps(build_schema((chart / "values.yaml").read_text()), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="fail when values.schema.json is stale")
    p.add_argument("--chart", type=Path, default=CHART)
    args = p.parse_args(argv)
    out = args.chart / "values.schema.json"
    text = render(args.chart)
    if args.check:
        if not out.exists() or out.read_text() != text:
            print(f"{out} is stale: run python scripts/gen_values_schema.py", file=sys.stderr)
            return 1
        return 0
    out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
