"""The package's import layers (ARCHITECTURE.md, "Import layers"), enforced on every import statement of
every module under k2serve/, the ones inside functions included: which subpackage may import which,
no cycle between subpackages, and argparse only in command-line modules."""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "k2serve"

# Bottom up. A unit (a subpackage, or a top-level module) may import the units of lower layers, and of
# its own layer only through SAME_LAYER; the units in ONLY_FROM may be imported by the units listed
# there alone. ARCHITECTURE.md draws the same table.
LAYERS: list[tuple[str, ...]] = [
    ("proto", "testing", "config", "extras", "capacity"),  # import nothing of k2serve (but capacity: config)
    ("kvcache", "chat", "tracing"),  # tracing: spans and their propagation, off unless configured
    ("model",),
    ("engine",),  # with its serving contract (engine/protocol.py, engine/validation.py)
    ("transfer", "experts", "rpc"),
    ("worker",),
    ("prefill", "decode", "sessions", "api"),
    ("router",),
    ("cluster", "planner", "bench", "loadgen", "agent"),
    ("cli",),
    ("__init__", "__main__"),  # the package itself: `k2serve.LLM` and `python -m k2serve`
]
SAME_LAYER = {
    ("capacity", "config"),  # the memory model reads a ModelConfig
    ("api", "sessions"),  # /v1/sessions and chat turns with a session_id
    ("planner", "cluster"),  # the local connector scales a LocalCluster
    ("planner", "loadgen"),  # the dry run replays loadgen's traces
    ("bench", "cluster"),
    ("bench", "agent"),
    ("bench", "loadgen"),  # kv-trace / kv-history drive the load generator against local clusters
}
ONLY_FROM = {
    "testing": {"bench"},  # test and benchmark harnesses: never the server
    "agent": {"bench"},  # the client SDK: the server never imports it
}
AGENT_IMPORTS = {"proto", "extras"}  # the SDK talks to the server through the public messages only
# Modules that parse command lines (the CLI package, the planner's, the load generator's and the
# benchmarks' own); everything else takes settings dataclasses.
MODULE_NAME = re.compile(r"k2serve(\.[a-z_][a-z0-9_]*)+")  # fullmatch below: a whole string
COMMAND_LINE = ("cli/", "bench/", "loadgen/cli.py", "planner/cli.py", "planner/measure_cli.py")


def layer_of() -> dict[str, int]:
    return {unit: i for i, units in enumerate(LAYERS) for unit in units}


def allowed(src: str, dst: str) -> bool:
    layers = layer_of()
    if dst in ONLY_FROM and src not in ONLY_FROM[dst]:
        return False
    if src == "agent":
        return dst in AGENT_IMPORTS
    return layers[dst] < layers[src] or (src, dst) in SAME_LAYER


def modules() -> Iterator[tuple[str, Path]]:
    """(dotted name, path) of every module under k2serve/ (generated protobuf code included)."""
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        yield ".".join(parts), path


def unit(module: str) -> str:
    """The layering unit of a dotted module name: its subpackage, or the top-level module's name."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imported(module: str, path: Path) -> Iterator[tuple[str, int]]:
    """(k2serve module or package named, line) for every import statement in the file, at any depth;
    `from a import b` yields both a and a.b (b may be a submodule). A string that is a whole dotted
    k2serve module name counts too (what `importlib.import_module` would load)."""
    is_package = path.name == "__init__.py"
    own = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and MODULE_NAME.fullmatch(node.value)
        ):
            yield node.value, node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = own[: len(own) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            yield name, node.lineno
            for alias in node.names:
                yield f"{name}.{alias.name}", node.lineno


@functools.cache
def edges() -> dict[tuple[str, str], list[str]]:
    """unit -> unit edges between different units of k2serve, with where each import is."""
    out: dict[tuple[str, str], list[str]] = {}
    for module, path in modules():
        src = unit(module)
        for name, line in imported(module, path):
            if name.split(".")[0] != "k2serve" or name == "k2serve":
                continue
            dst = unit(name)
            if dst != src:
                out.setdefault((src, dst), []).append(f"{path.relative_to(PACKAGE.parent)}:{line}")
    return out


def test_every_unit_has_a_layer() -> None:
    units = {unit(m) for m, _ in modules()}
    missing = sorted(units - set(layer_of()))
    assert not missing, f"add these to LAYERS (here and in ARCHITECTURE.md): {missing}"
    assert len(layer_of()) == sum(len(units) for units in LAYERS), "a unit is in two layers"


def test_imports_follow_the_layers() -> None:
    wrong = {
        f"{src} -> {dst}": where[:3]
        for (src, dst), where in sorted(edges().items())
        if src in layer_of() and dst in layer_of() and not allowed(src, dst)
    }
    assert not wrong, f"imports against the layers (ARCHITECTURE.md): {wrong}"


def test_the_core_imports_no_front_end_or_launcher() -> None:
    """The single-node core stays usable alone (the import rule of issue 14, checked by name)."""
    core = {"config", "kvcache", "chat", "model", "engine"}
    outside = {"api", "router", "cluster", "cli", "prefill", "decode", "planner", "loadgen", "bench"}
    bad = sorted(f"{s} -> {d}" for s, d in edges() if s in core and d in outside)
    assert not bad


def test_no_cycle_between_units() -> None:
    graph: dict[str, set[str]] = {}
    for src, dst in edges():
        graph.setdefault(src, set()).add(dst)
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path, node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, node])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [])
            assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_the_allowed_edges_are_acyclic() -> None:
    """The table itself cannot admit a cycle: same-layer edges only go one way."""
    assert not {(b, a) for a, b in SAME_LAYER} & SAME_LAYER


def test_argparse_only_in_command_line_modules() -> None:
    users = sorted(
        str(path.relative_to(PACKAGE))
        for module, path in modules()
        if any(name == "argparse" for name, _ in imported(module, path))
    )
    assert users, "the command line itself uses argparse"
    stray = [u for u in users if not u.startswith(COMMAND_LINE)]
    assert not stray, f"argparse outside the command-line modules (take a settings dataclass): {stray}"


def test_the_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    """A lazy import is an import: the walk finds it at any depth."""
    path = tmp_path / "lazy.py"
    path.write_text(
        "def f():\n    if True:\n        from k2serve.cli import main\n"
        "def g():\n    return importlib.import_module('k2serve.router.main')\n"
    )
    assert {("k2serve.cli", 3), ("k2serve.router.main", 5)} <= set(imported("k2serve.engine.lazy", path))
    assert unit("k2serve.engine.lazy") == "engine" and not allowed("engine", "cli")
