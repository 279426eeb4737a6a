"""One prefill and one decode worker servicer in this process, moving KV over the torch.distributed
backend (gloo on CPU: the same code as NCCL on CUDA, only the device differs) with the cluster token:
the tokens are the offline engine's; a corrupted payload, a transfer released mid-way and a sender
without the token all end with every decode block free and the pair still serving.

(The subprocess cluster of test_cluster.py runs the same backend by default; this file reaches inside
the prefill worker to corrupt or cut a transfer, which a subprocess would not let it do.)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import openai
import pytest
import torch
from conftest import grpc_server_in_thread

from k2serve.decode.worker import DecodeServicer
from k2serve.engine.async_engine import AsyncEngine
from k2serve.engine.config import EngineConfig
from k2serve.engine.llm import LLM
from k2serve.engine.llm_engine import LLMEngine
from k2serve.engine.metrics import LABELS
from k2serve.engine.sampling_params import SamplingParams
from k2serve.prefill.worker import PrefillServicer, route
from k2serve.proto import kv_transfer_pb2, worker_pb2, worker_pb2_grpc
from k2serve.rpc.auth import InternalAuth
from k2serve.rpc.convert import sampling_to_proto
from k2serve.transfer import outbox
from k2serve.transfer.grpc_backend import GrpcKVReceiver
from k2serve.transfer.handshake import HandshakeError
from k2serve.transfer.registry import make_receiver, make_sender
from k2serve.transfer.torch_receiver import TorchKVReceiver

pytestmark = pytest.mark.timeout(180)
TOKEN = "pair-test-token-0123456789"  # noqa: S105 - a test credential
CFG = EngineConfig(num_kv_blocks=128, block_size=8, max_model_len=256)


@dataclass
class Pair:
    decode: AsyncEngine
    decode_servicer: DecodeServicer
    prefill_stub: worker_pb2_grpc.PrefillWorkerStub
    decode_stub: worker_pb2_grpc.DecodeWorkerStub
    other_prefill_stub: worker_pb2_grpc.PrefillWorkerStub  # its KV "on cuda": it cannot pair over gloo


def _engine(ckpt: Path) -> AsyncEngine:
    engine = AsyncEngine(LLMEngine.from_pretrained(ckpt, torch.float32, CFG), "tiny")
    engine.start()
    return engine


@pytest.fixture(scope="module")
def pair(tiny_ckpt: Path) -> Iterator[Pair]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    prefill, decode, gpu_prefill = _engine(tiny_ckpt), _engine(tiny_ckpt), _engine(tiny_ckpt)
    receiver = make_receiver("torch", token=TOKEN, connect_timeout=10)
    assert isinstance(receiver, TorchKVReceiver)
    # as the decode worker runs it: a gRPC receiver of the same transfers, for senders that cannot pair
    fallback = GrpcKVReceiver(
        interceptors=InternalAuth(TOKEN).thread_server_interceptors(), inbox=receiver.inbox
    )
    d = DecodeServicer(decode, receiver, "torch", payload_device="cpu", fallback=fallback.endpoint)
    p = PrefillServicer(prefill, transfer_options={"device": torch.device("cpu"), "token": TOKEN})
    # a prefill worker whose KV would be on a GPU (only the routing reads its device)
    other = PrefillServicer(
        gpu_prefill,
        metadata=InternalAuth(TOKEN).metadata(),
        transfer_options={"device": torch.device("cuda"), "token": TOKEN},
    )

    def add_prefill(server: grpc.aio.Server) -> None:
        worker_pb2_grpc.add_PrefillWorkerServicer_to_server(p, server)

    def add_other(server: grpc.aio.Server) -> None:
        worker_pb2_grpc.add_PrefillWorkerServicer_to_server(other, server)

    def add_decode(server: grpc.aio.Server) -> None:
        worker_pb2_grpc.add_DecodeWorkerServicer_to_server(d, server)

    try:
        with (
            grpc_server_in_thread(add_prefill) as ps,
            grpc_server_in_thread(add_decode) as ds,
            grpc_server_in_thread(add_other) as os_,
            grpc.insecure_channel(ps.target) as pc,
            grpc.insecure_channel(ds.target) as dc,
            grpc.insecure_channel(os_.target) as oc,
        ):
            yield Pair(
                decode,
                d,
                worker_pb2_grpc.PrefillWorkerStub(pc),
                worker_pb2_grpc.DecodeWorkerStub(dc),
                worker_pb2_grpc.PrefillWorkerStub(oc),
            )
    finally:
        p.senders.shutdown()
        other.senders.shutdown()
        fallback.shutdown()
        receiver.shutdown()
        prefill.shutdown()
        gpu_prefill.shutdown()
        decode.shutdown()
        torch.set_num_threads(threads)


def free_blocks(engine: AsyncEngine) -> int:
    return asyncio.run(engine.call(lambda e: e.blocks.num_free_blocks))


def wait_free(engine: AsyncEngine, want: int) -> int:
    """The engine's free blocks once they reach `want` (or after 10 s, whatever they are then)."""
    deadline = time.monotonic() + 10
    while (got := free_blocks(engine)) != want and time.monotonic() < deadline:
        time.sleep(0.05)
    return got


def disaggregated(
    pair: Pair,
    rid: str,
    prompt: list[int],
    max_tokens: int,
    via_other_prefill: bool = False,
    answers: list[int] | None = None,
) -> list[int]:
    """What the router does: Reserve on decode, Prefill (KV sent to the reservation), Decode. `answers`
    gets the Prefill response's prompts_computed."""
    sampling = sampling_to_proto(SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    res = pair.decode_stub.Reserve(
        worker_pb2.ReserveRequest(request_id=rid, num_prompt_tokens=len(prompt), max_tokens=max_tokens),
        timeout=30,
    )
    assert res.endpoint.backend == "torch"
    target = worker_pb2.DecodeTarget(endpoint=res.endpoint, transfer_id=res.transfer_id)
    prefill = pair.other_prefill_stub if via_other_prefill else pair.prefill_stub
    pre = prefill.Prefill(
        worker_pb2.PrefillRequest(
            request_id=rid, prompt_token_ids=prompt, sampling=sampling, decode_target=target
        ),
        timeout=60,
    )
    if answers is not None:
        answers.append(pre.prompts_computed)
    request = worker_pb2.DecodeRequest(
        request_id=rid,
        transfer_id=res.transfer_id,
        prompt_token_ids=prompt,
        first_token_id=pre.first_token_id,
        sampling=sampling,
    )
    out = [pre.first_token_id]
    for chunk in pair.decode_stub.Decode(request, timeout=60):
        out += chunk.token_ids
    return out


PROMPTS = [[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46], list(range(1, 41)), [7] * 19]


def test_torch_pair_gives_the_offline_engines_tokens(pair: Pair, tiny_ckpt: Path) -> None:
    before = free_blocks(pair.decode)
    want = LLM(tiny_ckpt, engine_config=CFG).generate(
        PROMPTS, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    )
    answers: list[int] = []
    got = [disaggregated(pair, f"ok-{i}", p, 6, answers=answers) for i, p in enumerate(PROMPTS)]
    assert got == [o.token_ids for o in want]
    # each answer counts its own prompt among the prefill worker's computed ones (the router's stale-queue fix)
    assert answers[0] >= 1 and answers == [answers[0] + i for i in range(len(PROMPTS))]
    assert pair.decode_servicer.bytes_received > 0
    assert wait_free(pair.decode, before) == before


def test_a_corrupted_payload_fails_the_request_and_leaks_no_block(
    pair: Pair, tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The prefill side's checksum of each chunk is made wrong by one bit: the decode worker's check
    rejects the transfer (DATA_LOSS, naming the checksum), the prefill worker reports it (ABORTED),
    every reserved block goes back, and the next request is served."""
    before = free_blocks(pair.decode)
    real = outbox.checksum
    monkeypatch.setattr(outbox, "checksum", lambda payload: real(payload)._replace(lo=real(payload).lo ^ 1))
    with pytest.raises(grpc.RpcError) as err:
        disaggregated(pair, "corrupt", PROMPTS[1], 4)
    assert err.value.code() == grpc.StatusCode.ABORTED and "checksum" in (err.value.details() or "")
    assert pair.decode_servicer.reservations  # the router would now Release, or Decode and fail
    tid = next(iter(pair.decode_servicer.reservations))
    request = worker_pb2.DecodeRequest(request_id="corrupt", transfer_id=tid, prompt_token_ids=PROMPTS[1])
    with pytest.raises(grpc.RpcError) as err:
        list(pair.decode_stub.Decode(request, timeout=30))
    assert err.value.code() == grpc.StatusCode.DATA_LOSS and "checksum" in (err.value.details() or "")
    assert wait_free(pair.decode, before) == before and pair.decode_servicer.reservations == {}
    monkeypatch.undo()
    want = LLM(tiny_ckpt, engine_config=CFG).generate(
        [PROMPTS[1]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    )
    assert disaggregated(pair, "after-corrupt", PROMPTS[1], 4) == want[0].token_ids


def test_a_transfer_released_mid_way_frees_its_blocks(pair: Pair) -> None:
    """A sender that got one of the model's layers out when the request was aborted (the router's
    Release): the blocks come back, the rest of the transfer is refused, the pair keeps serving."""
    before = free_blocks(pair.decode)
    prompt = PROMPTS[1]
    res = pair.decode_stub.Reserve(
        worker_pb2.ReserveRequest(request_id="cut", num_prompt_tokens=len(prompt), max_tokens=4), timeout=30
    )
    assert free_blocks(pair.decode) < before
    geometry = pair.decode.kv_geometry
    sender = make_sender("torch", res.endpoint.address, token=TOKEN, connect_timeout=10)
    try:
        kv = torch.randn(geometry.num_layers, len(prompt), geometry.kv_dim).to(geometry.dtype)
        sender.open(res.transfer_id, geometry.num_layers, len(prompt), geometry.kv_dim, geometry.dtype)
        sender.send_layer(res.transfer_id, 0, kv[0]).result(10)
        released = pair.decode_stub.Release(
            worker_pb2.ReleaseRequest(transfer_id=res.transfer_id), timeout=30
        )
        assert released.released
        assert wait_free(pair.decode, before) == before
        for layer in range(1, geometry.num_layers):
            sender.send_layer(res.transfer_id, layer, kv[layer])
        with pytest.raises(Exception, match="transfer_id|rejected"):
            sender.close(res.transfer_id, timeout=10)
    finally:
        sender.shutdown()
    assert free_blocks(pair.decode) == before
    assert len(disaggregated(pair, "after-cut", PROMPTS[0], 3)) == 3


def test_the_decode_receiver_refuses_a_sender_without_the_token(pair: Pair) -> None:
    """A client that reaches the decode worker's transfer port with no token or another: refused by
    the handshake before it can send a byte into a reservation, whose blocks stay its own."""
    before = free_blocks(pair.decode)
    res = pair.decode_stub.Reserve(
        worker_pb2.ReserveRequest(request_id="intruder", num_prompt_tokens=8, max_tokens=2), timeout=30
    )
    for token in (None, "not-the-cluster-token-0123"):
        with pytest.raises(HandshakeError, match="refused"):
            make_sender("torch", res.endpoint.address, token=token, connect_timeout=10)
    assert pair.decode_stub.Release(
        worker_pb2.ReleaseRequest(transfer_id=res.transfer_id), timeout=30
    ).released
    assert wait_free(pair.decode, before) == before


def test_a_prefill_worker_that_cannot_pair_sends_over_the_grpc_fallback(pair: Pair, tiny_ckpt: Path) -> None:
    """The decode worker's torch endpoint names its payload device and a gRPC fallback sharing its
    transfers: a prefill worker whose KV is on another device type sends there (with the cluster
    token), and the tokens are the offline engine's; the torch pair is not touched."""
    endpoint = pair.decode_servicer.endpoint()
    assert (endpoint.backend, endpoint.payload_device, endpoint.fallback.backend) == ("torch", "cpu", "grpc")
    before = free_blocks(pair.decode)
    received = pair.decode_servicer.bytes_received
    want = LLM(tiny_ckpt, engine_config=CFG).generate(
        PROMPTS[:2], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    )
    got = [disaggregated(pair, f"fb-{i}", p, 5, via_other_prefill=True) for i, p in enumerate(PROMPTS[:2])]
    assert got == [o.token_ids for o in want]
    assert pair.decode_servicer.bytes_received > received
    assert wait_free(pair.decode, before) == before
    labels = dict(zip(LABELS, pair.decode.metrics.labels, strict=True))
    registry = pair.decode.metrics.registry  # the fallback's transfers are counted as gRPC ones
    grpc_bytes = registry.get_sample_value("k2serve_kv_transfer_bytes_total", {**labels, "backend": "grpc"})
    assert grpc_bytes == pair.decode_servicer.bytes_received - received


def test_route_picks_the_pair_or_the_fallback_and_says_why_not() -> None:
    """Pure: which backend a prefill worker uses for a decode worker's endpoint."""
    grpc_ep = kv_transfer_pb2.KVEndpoint(backend="grpc", address="d:1")
    fb = kv_transfer_pb2.KVEndpoint(backend="grpc", address="d:2")
    torch_ep = kv_transfer_pb2.KVEndpoint(backend="torch", address="d:3", payload_device="cuda", fallback=fb)
    bare = kv_transfer_pb2.KVEndpoint(backend="torch", address="d:4", payload_device="cuda")
    assert route(grpc_ep, tls=True, device_type="cuda") == ("grpc", "d:1")
    assert route(kv_transfer_pb2.KVEndpoint(address="d:5"), tls=False, device_type="cpu") == ("grpc", "d:5")
    assert route(torch_ep, tls=False, device_type="cuda") == ("torch", "d:3")  # NCCL pair
    assert route(torch_ep, tls=False, device_type="cpu") == ("grpc", "d:2")  # another device type
    assert route(torch_ep, tls=True, device_type="cuda") == ("grpc", "d:2")  # TLS: never plaintext
    old = kv_transfer_pb2.KVEndpoint(backend="torch", address="d:6")  # a worker that predates the fields
    assert route(old, tls=False, device_type="cuda") == ("torch", "d:6")
    with pytest.raises(ValueError, match="d:4 offers the torch KV backend only, and it takes cuda payloads"):
        route(bare, tls=False, device_type="cpu")
    with pytest.raises(ValueError, match="uses TLS"):
        route(bare, tls=True, device_type="cuda")


@pytest.mark.slow
def test_a_1p1d_cluster_over_the_torch_backend_matches_the_offline_engine(
    tiny_ckpt: Path, tmp_path: Path
) -> None:
    """`k2serve up` processes, one prefill and one decode worker, KV over torch.distributed (gloo) with
    the cluster's generated token: the tokens are the offline engine's, the decode worker's endpoint
    names its payload device and its gRPC fallback, a client without the token is refused by the
    transfer handshake, and every decode block is free afterwards."""
    from cluster_calls import http_greedy
    from conftest import local_cluster_spec

    from k2serve.cluster.local import LocalCluster

    prompts = [PROMPTS[0], PROMPTS[1], [5, 4, 3, 2, 1] * 7]
    want = LLM(tiny_ckpt, engine_config=CFG).generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    )
    with LocalCluster(local_cluster_spec(tiny_ckpt, tmp_path, transfer_backend="torch")) as c:
        client = openai.AsyncOpenAI(base_url=f"{c.http_url}/v1", api_key="unused", max_retries=0)

        async def run() -> list[list[int]]:
            return await asyncio.gather(*(http_greedy(client, tiny_ckpt.name, p, 6) for p in prompts))

        assert asyncio.run(run()) == [o.token_ids for o in want]
        decode = next(w for w in c.workers() if w["worker_id"].startswith("decode"))
        assert c.spec.cluster_token_file is not None
        auth = InternalAuth(Path(c.spec.cluster_token_file).read_text().strip())
        with grpc.insecure_channel(decode["address"]) as channel:
            stub = worker_pb2_grpc.DecodeWorkerStub(channel)
            res = stub.Reserve(
                worker_pb2.ReserveRequest(request_id="probe", num_prompt_tokens=8, max_tokens=2),
                metadata=auth.metadata(),
                timeout=30,
            )
            ep = res.endpoint
            assert (ep.backend, ep.payload_device, ep.fallback.backend) == ("torch", "cpu", "grpc")
            with pytest.raises(HandshakeError, match="refused"):
                make_sender("torch", ep.address, token="not-the-cluster-token-000", connect_timeout=10)
            release = worker_pb2.ReleaseRequest(transfer_id=res.transfer_id)
            assert stub.Release(release, metadata=auth.metadata(), timeout=30).released
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            d = next(w for w in c.workers() if w["worker_id"].startswith("decode"))
            if d["free_blocks"] == d["total_blocks"]:
                break
            time.sleep(0.2)
        assert d["free_blocks"] == d["total_blocks"] > 0, d
