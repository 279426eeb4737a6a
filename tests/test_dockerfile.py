"""deploy/Dockerfile, read by a small parser (no Docker engine here): multi-stage, both variants
resolvable from the VARIANT build argument, a non-root numeric USER, `k2serve` as the entry
point, nothing remote ADDed, no secrets in ENV or ARG, writable state under /tmp only."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from k2serve.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
VARIANTS = ("cpu", "cuda")


@dataclass
class Stage:
    base: str  # as written, ${ARG}s unresolved
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments)


def logical_lines(text: str) -> list[str]:
    """Instructions with `\\` continuations joined and comment lines dropped."""
    out: list[str] = []
    buf = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        if buf.strip():
            out.append(buf.strip())
        buf = ""
    assert not buf.strip(), "dangling line continuation"
    return out


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages)."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical_lines(text):
        instr, _, rest = line.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif not stages:
            assert instr == "ARG", f"only ARG may precede the first FROM, got {instr}"
            key, _, default = rest.partition("=")
            global_args[key] = default
        else:
            stages[-1].instructions.append((instr, rest.strip()))
    return global_args, stages


def substitute(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), text)


def chain(stages: list[Stage], global_args: dict[str, str], **build_args: str) -> list[Stage]:
    """The stages the final image is built from, final first, following FROM <stage>."""
    args = global_args | build_args
    by_name = {s.name: s for s in stages if s.name}
    out = [stages[-1]]
    while (base := substitute(out[-1].base, args)) in by_name:
        out.append(by_name[base])
    assert "$" not in base, f"unresolved base image {base!r}"
    assert ":" in base, f"{base!r} is neither a stage nor a tagged image"
    return out


def env_of(stages: list[Stage]) -> dict[str, str]:
    """ENV of an image built through `stages` (final first)."""
    env: dict[str, str] = {}
    for stage in reversed(stages):
        for instr, rest in stage.instructions:
            if instr == "ENV":
                env |= dict(word.split("=", 1) for word in shlex.split(rest))
    return env


def last(stage: Stage, instr: str) -> str | None:
    return next((rest for i, rest in reversed(stage.instructions) if i == instr), None)


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    return parse(DOCKERFILE.read_text())


def test_multi_stage_final_copies_from_builder(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    global_args, stages = dockerfile
    for variant in VARIANTS:
        final = chain(stages, global_args, VARIANT=variant)
        assert "builder" not in {s.name for s in final}, "the final image must not be built on the builder"
        copies = [rest for s in final for i, rest in s.instructions if i == "COPY"]
        assert any(c.startswith("--from=builder ") for c in copies)
    builder = next(s for s in stages if s.name == "builder")
    assert any(i == "RUN" and "pip install" in rest for i, rest in builder.instructions)
    assert "slim" in global_args["PYTHON_IMAGE"]


def test_variant_build_arg_selects_torch_index_and_runtime(
    dockerfile: tuple[dict[str, str], list[Stage]],
) -> None:
    global_args, stages = dockerfile
    assert global_args["VARIANT"] == "cpu"
    by_name = {s.name: s for s in stages}
    for variant in VARIANTS:
        final = chain(stages, global_args, VARIANT=variant)
        assert f"runtime-{variant}" in {s.name for s in final}
        builder = chain([*stages[: stages.index(by_name["builder"]) + 1]], global_args, VARIANT=variant)
        assert [s.name for s in builder] == ["builder", f"torch-{variant}"]
        index = substitute(env_of(builder)["TORCH_INDEX"], {"TORCH_CUDA": "cu130"})
        assert index.startswith("https://download.pytorch.org/whl/")
        assert index.endswith("/cpu") if variant == "cpu" else re.search(r"/cu\d+$", index)
        final_env = env_of(final)
        assert ("NVIDIA_VISIBLE_DEVICES" in final_env) == (variant == "cuda")
    with pytest.raises(AssertionError):
        chain(stages, global_args, VARIANT="rocm")  # an unknown variant does not build


def test_final_user_is_non_root_numeric(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    global_args, stages = dockerfile
    final = stages[-1]
    user = last(final, "USER")
    assert user is not None and re.fullmatch(r"\d+(:\d+)?", user), user
    uid = int(user.split(":")[0])
    assert uid >= 1000
    values = yaml.safe_load((ROOT / "helm" / "k2serve" / "values.yaml").read_text())
    assert values["podSecurity"]["runAsUser"] == uid  # the chart runs the image's user
    names = [i for i, _ in final.instructions]
    assert names.index("USER") < names.index("ENTRYPOINT")


def test_entrypoint_is_the_k2serve_cli(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    _, stages = dockerfile
    entry = last(stages[-1], "ENTRYPOINT")
    assert entry is not None and json.loads(entry) == ["k2serve"]
    healthcheck = [rest for s in stages for i, rest in s.instructions if i == "HEALTHCHECK"]
    assert all(h == "NONE" or "k2serve" in h for h in healthcheck)


def test_no_remote_add(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    _, stages = dockerfile
    for s in stages:
        for instr, rest in s.instructions:
            if instr == "ADD":
                assert not re.search(r"(https?|git|ssh)://|git@", rest), rest


SECRETISH = re.compile(r"(?i)(key|secret|password|passwd|token|credential|redis_url)")


def test_no_secrets_in_env_or_args(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    global_args, stages = dockerfile
    names = list(global_args)
    for s in stages:
        for instr, rest in s.instructions:
            if instr == "ENV":
                names += [w.split("=", 1)[0] for w in shlex.split(rest)]
            elif instr == "ARG":
                names.append(rest.split("=", 1)[0])
            assert "--mount=type=secret" not in rest or instr == "RUN"
    assert [n for n in names if SECRETISH.search(n)] == []


def test_writable_state_lives_under_tmp(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    global_args, stages = dockerfile
    for variant in VARIANTS:
        env = env_of(chain(stages, global_args, VARIANT=variant))
        for var in ("HOME", "K2SERVE_HOME", "XDG_CACHE_HOME"):
            assert env[var].startswith("/tmp"), var
        assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert last(stages[-1], "WORKDIR") == "/tmp"


def test_exposed_ports_are_the_cli_defaults(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    _, stages = dockerfile
    exposed = {int(p) for p in (last(stages[-1], "EXPOSE") or "").split()}
    parser = build_parser()
    defaults = set()
    for command, dest in (
        ("router", "port"),
        ("router", "grpc_port"),
        ("router", "internal_port"),
        ("prefill", "port"),
        ("decode", "port"),
    ):
        ns = parser.parse_args([command, "--model", "/m"])
        defaults.add(getattr(ns, dest))
    assert exposed == defaults


def _dockerignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pat) or fnmatch.fnmatch(path, pat + "/*") or path.startswith(pat + "/"):
            ignored = not negate
    return ignored


def test_copied_sources_exist_and_pass_dockerignore(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    _, stages = dockerfile
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for s in stages:
        for instr, rest in s.instructions:
            if instr != "COPY" or rest.startswith("--from="):
                continue
            for src in rest.split()[:-1]:
                assert (ROOT / src).exists(), src
                assert not _dockerignored(src, patterns), f"{src} is excluded by .dockerignore"
    for private in (".git/config", "tests/conftest.py", ".env", "helm/k2serve/values.yaml"):
        assert _dockerignored(private, patterns), private


# --- deploy/ray/cluster.yaml runs this image ------------------------------------------------

RAY_CONFIG = ROOT / "deploy" / "ray" / "cluster.yaml"


def test_ray_cluster_config_runs_the_image() -> None:
    config = yaml.safe_load(RAY_CONFIG.read_text())
    assert config["provider"]["type"] == "local"
    docker = config["docker"]
    assert re.fullmatch(r"\S+/k2serve:\d+\.\d+\.\d+-cuda-ray", docker["image"])
    assert '--entrypoint=""' in docker["run_options"]  # Ray starts containers with a shell, not `k2serve`
    for cmd in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert cmd.startswith("ray "), cmd
    text = json.dumps(config).lower()
    assert not re.search(r"(password|api_key|apikey|token|secret)\s*[:=]", text)


def test_ray_cluster_k2serve_command_parses() -> None:
    lines = [
        ln.strip("# ").strip() for ln in RAY_CONFIG.read_text().splitlines() if ln.startswith("#   k2serve ")
    ]
    assert lines, "the config documents the `k2serve up` command it is for"
    for line in lines:
        argv = shlex.split(line)[1:]
        ns = build_parser().parse_args(argv)
        assert ns.command == "up" and ns.ray == "auto" and ns.host == "0.0.0.0"
