"""Expert-parallel workers in the cluster. Fast: `AsyncEngine` driving a lockstep group (idle steps go
on; a lost group fails every in-flight request and calls on_fatal; a real one-rank EPWorker gives the
offline engine's tokens). Slow: `k2serve up --ep 2` (a prefill and a decode group of two rank processes
each, every rank its own registered worker) answers concurrent requests token for token as the offline
engine, every rank exports its EP metrics, a killed rank takes its group down (the survivor exits
non-zero), and every process stops. Then `k2serve up --ep 2 --enable-eplb` on a checkpoint with skewed routing re-places the experts while
serving, with the same tokens and the imbalance down."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from cluster_calls import http_greedy
from conftest import local_cluster_spec
from monitoring_queries import expressions, metric_names
from prometheus_client.parser import text_string_to_metric_families

from k2serve.cluster.local import ClusterSpec, LocalCluster
from k2serve.engine.async_engine import AsyncEngine
from k2serve.engine.config import EngineConfig
from k2serve.engine.llm import LLM
from k2serve.engine.llm_engine import LLMEngine, RequestOutput
from k2serve.engine.protocol import BackendFailure, DrainingError, GenerateRequest
from k2serve.engine.sampling_params import SamplingParams
from k2serve.experts import EPError, EPLBConfig, EPWorker
from k2serve.model.checkpoint import skew_routing, write_checkpoint
from k2serve.model.loader import load_model

ENGINE_ARGS = ("--kv-cache-mb", "32", "--block-size", "8", "--max-num-batched-tokens", "256")


def greedy(m: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True)


def prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, 1024, (int(k),), generator=g).tolist()
        for k in torch.randint(3, 60, (n,), generator=g)
    ]


def offline(ckpt: Path, ps: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the test process shares 2 cores with what it started
    try:
        llm = LLM(ckpt, engine_config=EngineConfig(num_kv_blocks=1024, block_size=8))
        return [o.token_ids for o in llm.generate(ps, [greedy(m) for m in max_tokens])]
    finally:
        torch.set_num_threads(threads)


async def collect(engine: AsyncEngine, rid: str, prompt: list[int], m: int) -> list[int]:
    out: list[int] = []
    async for ev in await engine.generate(GenerateRequest(rid, prompt, greedy(m))):
        out += ev.token_ids
    return out


def ep_cluster_spec(ckpt: Path, workdir: Path, **overrides: Any) -> ClusterSpec:
    """`k2serve up --ep 2`: a prefill and a decode group of two ranks each, small KV, one thread each."""
    return local_cluster_spec(
        ckpt,
        workdir,
        ep_size=2,
        engine_args=ENGINE_ARGS,
        heartbeat_timeout_s=3.0,
        env={"OMP_NUM_THREADS": "1"},
        **overrides,
    )


# ---- AsyncEngine over a lockstep group (in process) -------------------------------------------------
class FakeGroup:
    """A one-member group over a real engine: counts steps, loses the group at step `fail_at`."""

    def __init__(self, engine: LLMEngine, fail_at: int | None = None) -> None:
        self.engine = engine
        self.any_work = False
        self.steps = 0
        self.fail_at = fail_at

    def step(self) -> list[RequestOutput]:
        self.steps += 1
        if self.steps == self.fail_at:
            raise EPError(0, "step agreement", None, (1,), "Connection closed by peer")
        self.any_work = self.engine.has_unfinished_requests()
        return self.engine.step() if self.any_work else []


@pytest.fixture(scope="module")
def tiny_engine_parts(tiny_ckpt: Path) -> Iterator[tuple[object, object]]:
    from k2serve.chat.tokenizer import load_tokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield load_model(tiny_ckpt, torch.float32), load_tokenizer(tiny_ckpt)
    finally:
        torch.set_num_threads(threads)


def make_engine(parts: tuple[object, object]) -> LLMEngine:
    model, tok = parts
    return LLMEngine(model, EngineConfig(num_kv_blocks=256, block_size=8), tok)  # type: ignore[arg-type]


def test_group_steps_while_idle_and_serves(tiny_engine_parts: tuple[object, object], tiny_ckpt: Path) -> None:
    group = FakeGroup(make_engine(tiny_engine_parts))
    engine = AsyncEngine(group.engine, "tiny", group)  # type: ignore[arg-type]  # duck-typed group
    engine.start()
    try:
        time.sleep(0.3)
        idle_steps = group.steps
        assert 20 < idle_steps < 400  # every ~1 ms with no work, not a spin
        ps = prompts(3, seed=5)
        got = asyncio.run(
            _gather(*(collect(engine, f"r{i}", p, 5) for i, p in enumerate(ps)))  # type: ignore[arg-type]
        )
        assert got == offline(tiny_ckpt, ps, [5] * 3)
        n = asyncio.run(engine.call(lambda e: e.blocks.num_free_blocks))
        assert n == 256
    finally:
        engine.shutdown()
    assert engine.fatal_error is None


async def _gather(*coros: object) -> list[list[int]]:
    return list(await asyncio.gather(*coros))  # type: ignore[arg-type]


def test_lost_group_fails_in_flight_requests_and_calls_on_fatal(
    tiny_engine_parts: tuple[object, object],
) -> None:
    group = FakeGroup(make_engine(tiny_engine_parts))
    fatal: list[EPError] = []
    called = threading.Event()

    def on_fatal(exc: EPError) -> None:
        fatal.append(exc)
        called.set()

    engine = AsyncEngine(group.engine, "tiny", group, on_fatal)  # type: ignore[arg-type]

    async def run() -> list[BaseException | list[int]]:
        engine.start()
        group.fail_at = group.steps + 4  # a few steps into generation
        return await asyncio.gather(
            *(collect(engine, f"r{i}", [1, 2, 3, i], 50) for i in range(3)), return_exceptions=True
        )

    try:
        results = asyncio.run(run())
        assert called.wait(5)
        assert all(isinstance(r, BackendFailure) and "group lost" in str(r) for r in results), results
        assert len(fatal) == 1 and fatal[0].peers == (1,)
        assert engine.fatal_error is fatal[0]
        with pytest.raises(DrainingError):  # a lost engine admits nothing more
            asyncio.run(collect(engine, "late", [1, 2], 2))
    finally:
        engine.shutdown()


def test_engine_of_another_group_is_refused(tiny_engine_parts: tuple[object, object]) -> None:
    group = FakeGroup(make_engine(tiny_engine_parts))
    with pytest.raises(ValueError, match="engine of `group`"):
        AsyncEngine(make_engine(tiny_engine_parts), "tiny", group)  # type: ignore[arg-type]


def test_one_rank_ep_worker_matches_offline(tiny_ckpt: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        worker = EPWorker.connect(
            0,
            1,
            tiny_ckpt,
            torch.float32,
            EngineConfig(num_kv_blocks=256, block_size=8),
            f"tcp://127.0.0.1:{port}",
        )
    finally:
        torch.set_num_threads(threads)
    engine = AsyncEngine.for_group(worker, "tiny")
    engine.start()
    try:
        ps = prompts(2, seed=6)
        got = asyncio.run(_gather(*(collect(engine, f"r{i}", p, 4) for i, p in enumerate(ps))))
        assert got == offline(tiny_ckpt, ps, [4, 4])
    finally:
        engine.shutdown()
        worker.close()


# ---- the cluster: k2serve up --ep 2 (real processes) --------------------------------------------------
RANKS = ["prefill-0-ep0", "prefill-0-ep1", "decode-0-ep0", "decode-0-ep1"]


@pytest.fixture(scope="module")
def ep_cluster(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(ep_cluster_spec(tiny_ckpt, tmp_path_factory.mktemp("up-ep"))) as c:
        yield c


@pytest.mark.slow
def test_every_rank_registers_as_its_own_worker(ep_cluster: LocalCluster) -> None:
    assert sorted(w["worker_id"] for w in ep_cluster.workers()) == sorted(RANKS)
    assert sorted(p.name for p in ep_cluster.procs[1:]) == sorted(RANKS)


@pytest.mark.slow
def test_concurrent_requests_match_offline_engine(ep_cluster: LocalCluster, tiny_ckpt: Path) -> None:
    ps = prompts(16, seed=1)
    max_tokens = [3 + i % 9 for i in range(16)]
    expected = offline(tiny_ckpt, ps, max_tokens)
    busy: set[str] = set()
    done = threading.Event()

    def watch() -> None:  # which ranks ever held a request
        while not done.is_set():
            busy.update(w["worker_id"] for w in ep_cluster.workers() if w["in_flight"])
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    client = openai.AsyncOpenAI(base_url=f"{ep_cluster.http_url}/v1", api_key="unused", max_retries=0)

    async def run_all() -> list[list[int]]:
        return list(
            await asyncio.gather(
                *(http_greedy(client, tiny_ckpt.name, p, m) for p, m in zip(ps, max_tokens, strict=True))
            )
        )

    try:
        got = asyncio.run(run_all())
    finally:
        done.set()
        watcher.join()
    assert got == expected
    assert busy == set(RANKS), busy  # the router spread the load over every rank of both groups


@pytest.mark.slow
def test_ranks_export_the_ep_metrics_the_dashboard_queries(ep_cluster: LocalCluster) -> None:
    """After the requests above: every rank's metrics_url has its all-to-all time and a load imbalance
    per MoE layer (>= 1), and every k2serve_ep_* name the chart's dashboard queries is among them."""
    exported: set[str] = set()
    for w in ep_cluster.workers():
        text = httpx.get(w["metrics_url"], timeout=10).text
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        exported |= {s.name for f in fams.values() for s in f.samples}
        (seconds,) = fams["k2serve_ep_all_to_all_seconds"].samples
        assert seconds.value > 0 and seconds.labels["engine"] == w["worker_id"]
        imbalance = fams["k2serve_ep_load_imbalance"].samples
        assert imbalance and all(s.value >= 1.0 for s in imbalance)
        assert any(s.value > 1.0 for s in imbalance)  # tiny's random router is not balanced
    queried = dashboard_ep_metrics() - EPLB_ONLY  # these two appear once EPLB moved a layer (below)
    assert queried and queried <= exported, queried - exported


EPLB_ONLY = {"k2serve_ep_eplb_imbalance_before", "k2serve_ep_eplb_imbalance_after"}


def dashboard_ep_metrics() -> set[str]:
    """The k2serve_ep_* metric names the chart's dashboard and alerts query."""
    exprs, _ = expressions()
    return {n for n in set().union(*map(metric_names, exprs)) if n.startswith("k2serve_ep_")}


@pytest.mark.slow
def test_killed_rank_takes_its_group_down_and_everything_stops(ep_cluster: LocalCluster) -> None:
    """Runs last: SIGKILL one decode rank; its peer loses the group and exits non-zero (deregistering),
    the prefill group keeps running; then stop() ends every process, the stopped ones with status 0."""
    survivor = next(p for p in ep_cluster.procs if p.name == "decode-0-ep0")
    ep_cluster.kill("decode-0-ep1", signal.SIGKILL)
    try:
        survivor.popen.wait(timeout=20)
    except Exception:  # noqa: BLE001 - the timeout (or anything else) fails the test, naming why
        pytest.fail(f"decode-0-ep0 did not exit after losing its peer:\n{survivor.tail()}")
    assert survivor.popen.returncode == 1, survivor.tail()
    assert "expert-parallel group lost" in survivor.log.read_text()
    end = time.monotonic() + 8
    while time.monotonic() < end and {"decode-0-ep0", "decode-0-ep1"} & {
        w["worker_id"] for w in ep_cluster.workers()
    }:
        time.sleep(0.2)
    assert {w["worker_id"] for w in ep_cluster.workers()} == {"prefill-0-ep0", "prefill-0-ep1"}
    r = httpx.post(
        f"{ep_cluster.http_url}/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 2}, timeout=30
    )
    assert r.status_code >= 500, r.text  # no decode worker left
    ep_cluster.stop()
    assert all(p.popen.poll() is not None for p in ep_cluster.procs), ep_cluster.status_table()
    clean = {p.name: p.popen.returncode for p in ep_cluster.procs if p.name.startswith(("router", "prefill"))}
    assert clean == {"router": 0, "prefill-0-ep0": 0, "prefill-0-ep1": 0}, ep_cluster.status_table()


# ---- EPLB while serving: skewed routing, k2serve up --ep 2 --enable-eplb ------------------------------
HOT_EXPERTS = range(6)  # tiny has 16 experts: with --ep 2 all six live on rank 0 at the start
EPLB = EPLBConfig(window_size=1000, step_interval=6, num_redundant_experts=2)


@pytest.fixture(scope="module")
def skewed_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny with K2's router bias (e_score_correction_bias) raised on experts 0-5: they take most tokens."""
    ckpt = write_checkpoint(tmp_path_factory.mktemp("skewed"), "tiny", seed=0, dtype=torch.float32)
    return skew_routing(ckpt, HOT_EXPERTS, 0.4)


@pytest.fixture(scope="module")
def eplb_cluster(skewed_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """Starts after the tests above stopped `ep_cluster` (they run first, in file order)."""
    spec = ep_cluster_spec(skewed_ckpt, tmp_path_factory.mktemp("up-eplb"), eplb_config=EPLB.to_json())
    with LocalCluster(spec) as c:
        yield c


def eplb_metrics(url: str) -> tuple[float, dict[str, float], dict[str, float], set[str]]:
    """(re-placements, imbalance before and after per MoE layer, every sample name) from one rank's
    /metrics."""
    fams = {f.name: f for f in text_string_to_metric_families(httpx.get(url, timeout=10).text)}
    (count,) = fams["k2serve_ep_eplb_rebalances"].samples
    before, after = (
        {s.labels["moe_layer"]: s.value for s in fams[f"k2serve_ep_eplb_imbalance_{when}"].samples}
        for when in ("before", "after")
    )
    return count.value, before, after, {s.name for f in fams.values() for s in f.samples}


FIRST_REPLACEMENT = re.compile(
    r"EPLB re-placement 1 at step \d+ on rank \d+: imbalance of MoE layers \[[^\]]*\]: \[([^\]]*)\]"
)


def first_replacements(log_dir: Path) -> list[list[float]]:
    """Per rank (every worker's log), the imbalance of each moved MoE layer before the rank's first EPLB
    re-placement, from its log line."""
    return [
        [float(v) for v in m.group(1).split(",")]
        for log in sorted(log_dir.glob("*.log"))
        for m in FIRST_REPLACEMENT.finditer(log.read_text(errors="replace"))
    ]


@pytest.mark.slow
def test_eplb_re_places_skewed_experts_while_serving_with_the_same_tokens(
    eplb_cluster: LocalCluster, skewed_ckpt: Path
) -> None:
    """Requests in waves (so both groups take many steps); EPLB re-places every 3 working steps, so the
    decode group moves experts while requests are decoding (a re-placement only runs in a step in
    which some rank has work). Every rank: greedy tokens equal the single-process engine's, at least
    one re-placement, and each re-placed layer's imbalance after it below before it (the contiguous
    start put every hot expert on rank 0: about 2x); every k2serve_ep_* name the dashboard queries is
    exported."""
    ps = prompts(12, seed=3)
    max_tokens = [6 + 3 * (i % 4) for i in range(12)]
    expected = offline(skewed_ckpt, ps, max_tokens)
    client = openai.AsyncOpenAI(base_url=f"{eplb_cluster.http_url}/v1", api_key="unused", max_retries=0)

    async def waves() -> list[list[int]]:
        out: list[list[int]] = []
        for lo in range(0, 12, 2):
            out += await asyncio.gather(
                *(http_greedy(client, skewed_ckpt.name, ps[i], max_tokens[i]) for i in range(lo, lo + 2))
            )
        return out

    got = asyncio.run(waves())
    assert got == expected
    workers = eplb_cluster.workers()
    assert sorted(w["worker_id"] for w in workers) == sorted(RANKS)
    for w in workers:
        count, before, after, exported = eplb_metrics(w["metrics_url"])
        assert dashboard_ep_metrics() <= exported, dashboard_ep_metrics() - exported
        assert count >= 1, w["worker_id"]
        assert before and before.keys() == after.keys(), (w["worker_id"], before, after)
        assert all(after[k] < before[k] for k in before), (w["worker_id"], before, after)
    # The gauges are the last re-placement's: after a second one, "before" is the load under the first
    # EPLB placement (about 1.05 here). The skew of the contiguous start shows in each rank's log line
    # of its first re-placement, whether or not a later one followed.
    first = first_replacements(eplb_cluster.dir / "logs")
    assert len(first) == len(workers), first
    for before in first:
        assert max(before) > 1.3, first  # the skew was real
