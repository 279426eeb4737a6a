"""Every module imports, on the full install and on the base install (`pip install k2serve`, no extras);
every import the docs show works.

The base install is simulated in a fresh interpreter: every top-level module that no distribution of
the base install's requirement closure provides (the extras' and the test tools' packages) is made
unimportable, then every module of k2serve is imported. A module may fail only with MissingExtraError,
naming the extra that brings what it needs.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import k2serve
from k2serve.extras import EXTRAS, MissingExtraError

REPO = Path(__file__).resolve().parents[1]


def all_modules() -> list[str]:
    """Every module of the package but `__main__` ones (importing those runs the program)."""
    names = [k2serve.__name__]
    for info in pkgutil.walk_packages(k2serve.__path__, prefix="k2serve."):
        if not info.name.endswith(".__main__"):
            names.append(info.name)
    return sorted(names)


def base_closure() -> set[str]:
    """Canonical names of the distributions `pip install k2serve` (no extras) installs."""
    seen: set[str] = set()
    stack: list[tuple[str, frozenset[str]]] = [("k2serve", frozenset())]
    while stack:
        name, extras = stack.pop()
        key = canonicalize_name(name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if key in seen and not extras:
            continue
        seen.add(key)
        for line in dist.requires or []:
            req = Requirement(line)
            wanted = {""} | set(extras)
            if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in wanted):
                continue
            stack.append((req.name, frozenset(req.extras)))
    return seen


def providers(module: str) -> set[str]:
    """Canonical names of the installed distributions that provide `module`, a top-level module or a
    subpackage of a namespace package shared by several distributions (`opentelemetry.sdk`)."""
    top = module.split(".")[0]
    dists = metadata.packages_distributions().get(top, [])
    if "." not in module:
        return {canonicalize_name(d) for d in dists}
    prefix = module.replace(".", "/") + "/"
    return {
        canonicalize_name(d)
        for d in dists
        if any(str(f).startswith(prefix) for f in metadata.distribution(d).files or [])
    }


def modules_outside_base() -> list[str]:
    """Top-level modules installed here only by distributions outside the base closure, and the extras'
    subpackages of namespace packages that the base install has (`opentelemetry.sdk`)."""
    base = base_closure()
    top = {
        module
        for module, dists in metadata.packages_distributions().items()
        if module.isidentifier()
        and not module.startswith("_")
        and module != "k2serve"
        and not any(canonicalize_name(d) in base for d in dists)
    }
    nested = {
        m for ms in EXTRAS.values() for m in ms if "." in m and providers(m) and not providers(m) & base
    }
    return sorted(top | nested)


BLOCKER = r"""
import importlib, importlib.abc, json, sys, traceback
blocked = set(json.loads(sys.argv[1]))
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in blocked):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: not in the base install)", name=name)
        return None
sys.meta_path.insert(0, Block())
from k2serve.extras import MissingExtraError
result = {}
for name in json.loads(sys.argv[2]):
    try:
        importlib.import_module(name)
        result[name] = None
    except MissingExtraError as e:
        result[name] = {"extra": e.extra, "module": e.module, "message": str(e)}
    except BaseException as e:
        result[name] = {"error": "".join(traceback.format_exception_only(e)).strip()}
print(json.dumps(result))
"""


def run_blocked(blocked: list[str], modules: list[str]) -> dict[str, dict[str, str] | None]:
    out = subprocess.run(
        [sys.executable, "-c", BLOCKER, json.dumps(blocked), json.dumps(modules)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_module_imports_on_the_full_install() -> None:
    failures = {}
    for name in all_modules():
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - collected and reported together
            failures[name] = repr(e)
    assert not failures


def test_base_install_imports_every_module_or_names_the_extra() -> None:
    blocked = modules_outside_base()
    # the simulation is only meaningful if it really hides the extras' packages
    for extra_modules in EXTRAS.values():
        for module in extra_modules:
            if module not in {"ray", "triton"} or providers(module):
                assert module in blocked, f"{module} is provided by the base install?"
    result = run_blocked(blocked, all_modules())
    errors = {name: r for name, r in result.items() if r is not None and "error" in r}
    assert not errors, f"modules that fail on a base install without naming an extra: {errors}"
    needing_extras = {name: r for name, r in result.items() if r is not None}
    for name, r in needing_extras.items():
        assert r is not None and f"pip install 'k2serve[{r['extra']}]'" in r["message"], name
        assert r["module"] in EXTRAS[r["extra"]], (name, r)
    # today only the plots, the tracing SDK's backend (imported only when tracing is configured) and the
    # Triton attention and MoE kernels (imported only for `--attention-backend triton` / `--moe-backend
    # triton`) need an extra at import time; a new one must be a conscious choice
    assert set(needing_extras) == {
        "k2serve.bench.tool_schemas",
        "k2serve.loadgen.plots",
        "k2serve.model.triton_attention_kernels",
        "k2serve.model.triton_moe_kernels",
        "k2serve.tracing.otel",
    }


def test_extras_match_pyproject() -> None:
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    test_extra = {canonicalize_name(Requirement(r).name) for r in declared["test"]}
    for extra, modules in EXTRAS.items():
        assert extra in declared, f"k2serve/extras.py names extra {extra!r} that pyproject.toml lacks"
        dists = {canonicalize_name(Requirement(r).name) for r in declared[extra]}
        assert dists <= test_extra, f"the test extra must install extra {extra!r}: {dists - test_extra}"
        for module in modules:
            assert providers(module) & dists, (extra, module)


def test_lazy_optional_imports_name_their_extra(tmp_path: Path) -> None:
    """Optional packages imported inside functions fail with MissingExtraError on a base install."""
    script = r"""
import importlib, importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"kubernetes", "openai", "transformers"}:
            raise ModuleNotFoundError(name, name=name)
sys.meta_path.insert(0, Block())
from k2serve.extras import MissingExtraError
from k2serve.agent.http_transport import HTTPTransport
from k2serve.planner.kube import KubernetesConnector
from k2serve.bench.engine import TransformersRun
calls = [
    lambda: HTTPTransport.connect("http://127.0.0.1:1"),
    lambda: KubernetesConnector.from_environment("ns", {}),
    lambda: TransformersRun(None, [[1]], 1, None),
]
for call in calls:
    try:
        call()
    except MissingExtraError as e:
        print(e.extra)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["agent", "kube", "hf"]


def test_missing_extra_error_names_the_command() -> None:
    e = MissingExtraError("matplotlib", "plot", "--plot-dir")
    assert isinstance(e, ImportError) and e.name == "matplotlib"
    assert str(e) == (
        "the 'matplotlib' package is needed for --plot-dir but is not installed; "
        "install it with: pip install 'k2serve[plot]'"
    )
    with pytest.raises(ValueError, match="unknown extra 'nope'"):
        MissingExtraError("x", "nope")


# ---- every import the documentation shows -----------------------------------------------------------

DOCS = ("README.md", "ARCHITECTURE.md")
_FROM_IMPORT = re.compile(r"^\s*from (k2serve[\w.]*) import ([\w, ]+)$", re.M)
_DOTTED = re.compile(r"`(k2serve(?:\.\w+)+)")


def proto_packages() -> set[str]:
    """The protobuf package names (`k2serve.v1`, ...): named in the docs, but not Python modules."""
    found = set()
    for proto in (REPO / "k2serve" / "proto").glob("*.proto"):
        found |= set(re.findall(r"^package ([\w.]+);", proto.read_text(), re.M))
    return found


def documented_imports() -> list[tuple[str, str | None]]:
    """(module, name) for each `from k2serve.x import name` in the docs' code, and (dotted, None) for
    each `k2serve.x.y` named in backticks (protobuf package names aside)."""
    protos = proto_packages()
    found: list[tuple[str, str | None]] = []
    for doc in DOCS:
        text = (REPO / doc).read_text()
        for module, names in _FROM_IMPORT.findall(text):
            found += [(module, n.strip()) for n in names.split(",") if n.strip()]
        found += [(d, None) for d in _DOTTED.findall(text) if not any(d.startswith(p) for p in protos)]
    return sorted(set(found), key=str)


def resolve(dotted: str) -> object:
    """The object a dotted name names: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def test_docs_name_imports() -> None:
    names = documented_imports()
    assert {"k2serve.v1", "k2serve.internal.v1"} <= proto_packages()
    assert ("k2serve.model", "load_model") in names or ("k2serve.model.load_model", None) in names
    assert len(names) >= 5


@pytest.mark.parametrize(("module", "name"), documented_imports(), ids=str)
def test_documented_import_works(module: str, name: str | None) -> None:
    if name is None:
        resolve(module)
    else:
        assert hasattr(importlib.import_module(module), name), f"from {module} import {name}"
