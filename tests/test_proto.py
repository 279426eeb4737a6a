"""The committed generated code matches the .proto files; messages and services behave."""

from __future__ import annotations

import dataclasses
import struct
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from k2serve.engine.sampling_params import SamplingParams, SamplingParamsError
from k2serve.proto import api_pb2, common_pb2, kv_transfer_pb2, registry_pb2, registry_pb2_grpc, worker_pb2
from k2serve.proto.limits import KV_CHUNK_MAX_BYTES, KV_MAX_MESSAGE_BYTES, grpc_options
from k2serve.rpc.convert import sampling_from_proto, sampling_to_proto

REPO_ROOT = Path(__file__).resolve().parent.parent
GEN_SCRIPT = REPO_ROOT / "scripts" / "gen_proto.py"


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(GEN_SCRIPT), "--out", str(tmp_path)], check=True, timeout=60)
    sys.path.insert(0, str(GEN_SCRIPT.parent))
    try:
        import gen_proto
    finally:
        sys.path.remove(str(GEN_SCRIPT.parent))
    fresh = gen_proto.generated_files(tmp_path)
    committed = gen_proto.generated_files(REPO_ROOT)
    assert fresh, "gen_proto.py produced nothing"
    missing = sorted(set(fresh) - set(committed))
    extra = sorted(set(committed) - set(fresh))
    assert not missing, f"generated but not committed: {missing}; run scripts/gen_proto.py"
    assert not extra, f"committed but no longer generated: {extra}; delete them"
    stale = [str(rel) for rel in fresh if (tmp_path / rel).read_bytes() != (REPO_ROOT / rel).read_bytes()]
    assert not stale, f"stale generated files: {stale}; run scripts/gen_proto.py"


def test_generated_grpc_modules_use_package_imports() -> None:
    for path in (REPO_ROOT / "k2serve" / "proto").glob("*_pb2*.py"):
        for line in path.read_text().splitlines():
            if line.startswith("import ") and "_pb2" in line:
                pytest.fail(f"{path.name}: top-level import {line!r}")


def test_generate_request_oneof_and_optional_roundtrip() -> None:
    req = api_pb2.GenerateRequest(
        request_id="r1",
        model="kimi-k2",
        token_ids=api_pb2.TokenIds(ids=[1, 163584, 7]),
        sampling=common_pb2.SamplingParams(temperature=0.0, top_k=20, stop=["\n\n"], logprobs=2),
        session_id="s1",
    )
    back = api_pb2.GenerateRequest.FromString(req.SerializeToString())
    assert back == req
    assert back.WhichOneof("prompt") == "token_ids"
    assert list(back.token_ids.ids) == [1, 163584, 7]
    assert back.sampling.HasField("temperature") and back.sampling.temperature == 0.0
    assert not back.sampling.HasField("top_p")  # unset means "server default", not 0
    back.text = "hello"
    assert back.WhichOneof("prompt") == "text"


def test_chat_request_with_tool_calls_roundtrip() -> None:
    call = api_pb2.ToolCall(
        id="functions.get_weather:0",
        type="function",
        function=api_pb2.FunctionCall(name="get_weather", arguments='{"city": "Paris"}'),
    )
    req = api_pb2.ChatRequest(
        model="kimi-k2",
        messages=[
            api_pb2.ChatMessage(role="user", content="weather?"),
            api_pb2.ChatMessage(role="assistant", reasoning_content="need a tool", tool_calls=[call]),
            api_pb2.ChatMessage(role="tool", content="sunny", tool_call_id=call.id),
        ],
        tools=[api_pb2.Tool(type="function", name="get_weather", parameters='{"type": "object"}')],
        tool_choice=api_pb2.ToolChoice(mode="auto"),
        response_format=api_pb2.ResponseFormat(type="text"),
    )
    back = api_pb2.ChatRequest.FromString(req.SerializeToString())
    assert back == req
    assert not back.messages[1].HasField("content")
    assert back.messages[1].tool_calls[0].function.arguments == '{"city": "Paris"}'


def test_internal_messages_roundtrip() -> None:
    info = registry_pb2.WorkerInfo(
        worker_id="d0",
        role=registry_pb2.WORKER_ROLE_DECODE,
        grpc_address="10.0.0.2:50051",
        kv_endpoints=[kv_transfer_pb2.KVEndpoint(backend="torch", address="10.0.0.2:29500")],
        num_layers=61,
        kv_dim=576,
        block_size=64,
        kv_dtype="bfloat16",
        capacity=registry_pb2.WorkerCapacity(free_blocks=10, total_blocks=12, max_batch=256),
        ep_size=8,
    )
    assert registry_pb2.WorkerInfo.FromString(info.SerializeToString()) == info
    pre = worker_pb2.PrefillRequest(
        request_id="r",
        prompt_token_ids=[5, 6],
        decode_target=worker_pb2.DecodeTarget(
            worker_id="d0", endpoint=info.kv_endpoints[0], block_ids=[3, 9]
        ),
    )
    assert worker_pb2.PrefillRequest.FromString(pre.SerializeToString()) == pre


def test_kv_chunk_payload_is_raw_bytes() -> None:
    payload = bytes(range(256)) * 4
    chunk = kv_transfer_pb2.KVChunk(
        header=kv_transfer_pb2.KVChunkHeader(
            transfer_id="t", layer=3, num_tokens=8, kv_dim=64, dtype="bfloat16"
        ),
        payload=payload,
    )
    data = chunk.SerializeToString()
    assert payload in data  # bytes on the wire as they are, no encoding
    assert kv_transfer_pb2.KVChunk.FromString(data).payload == payload
    frame = kv_transfer_pb2.KVControlFrame(goodbye=True)
    assert (
        kv_transfer_pb2.KVControlFrame.FromString(frame.SerializeToString()).WhichOneof("kind") == "goodbye"
    )


def test_service_shapes() -> None:
    methods = {m.name: m for m in api_pb2.DESCRIPTOR.services_by_name["K2Serve"].methods}
    assert set(methods) == {
        "Generate", "Chat", "ListModels", "CreateSession", "GetSession", "GetSessionMessages",
        "AppendSession", "DeleteSession",
    }  # fmt: skip
    assert methods["Generate"].server_streaming and methods["Chat"].server_streaming
    history = methods["GetSessionMessages"].output_type.fields_by_name["messages"]
    assert history.message_type is api_pb2.ChatMessage.DESCRIPTOR and history.is_repeated
    push = kv_transfer_pb2.DESCRIPTOR.services_by_name["KVTransfer"].methods_by_name["Push"]
    assert push.client_streaming and not push.server_streaming
    assert KV_MAX_MESSAGE_BYTES > KV_CHUNK_MAX_BYTES


class _Registry(registry_pb2_grpc.WorkerRegistryServicer):
    def Heartbeat(  # noqa: N802
        self, request: registry_pb2.HeartbeatRequest, context: grpc.ServicerContext
    ) -> registry_pb2.HeartbeatResponse:
        return registry_pb2.HeartbeatResponse(known=request.worker_id == "p0")


def test_generated_stubs_serve_a_call() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=grpc_options(1 << 20))
    registry_pb2_grpc.add_WorkerRegistryServicer_to_server(_Registry(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=grpc_options(1 << 20)) as channel:
            stub = registry_pb2_grpc.WorkerRegistryStub(channel)
            assert stub.Heartbeat(registry_pb2.HeartbeatRequest(worker_id="p0"), timeout=10).known
            assert not stub.Heartbeat(registry_pb2.HeartbeatRequest(worker_id="x"), timeout=10).known
            with pytest.raises(grpc.RpcError) as err:
                stub.Register(registry_pb2.WorkerInfo(worker_id="p0"), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        server.stop(grace=None)


# ---- SamplingParams across the process boundary --------------------------------------------------------

# A value for every SamplingParams field that differs from its default (a field added without one here
# fails test_every_sampling_field_roundtrips, so it cannot be dropped on the way to a worker again).
NON_DEFAULT_SAMPLING = {
    "n": 2,
    "temperature": 0.7,
    "top_p": 0.9,
    "top_k": 17,
    "min_p": 0.05,
    "seed": 1234,
    "max_tokens": 33,
    "min_tokens": 3,
    "stop": ["</s>", "\n\n"],
    "stop_token_ids": [7, 9],
    "ignore_eos": True,
    "presence_penalty": 0.5,
    "frequency_penalty": -0.25,
    "repetition_penalty": 1.25,
    "logprobs": 3,
    "skip_special_tokens": False,
}


def test_every_sampling_field_has_a_proto_field() -> None:
    fields = {f.name for f in dataclasses.fields(SamplingParams)}
    assert fields == set(NON_DEFAULT_SAMPLING), "update NON_DEFAULT_SAMPLING for the new field"
    assert fields <= set(common_pb2.SamplingParams.DESCRIPTOR.fields_by_name)


def as_float32(p: SamplingParams) -> SamplingParams:
    """`p` with its float fields rounded to float32: the wire's `float`, and what the sampler computes
    in (engine/sampler.py builds float32 row tensors), so the rounding changes no token."""
    rounded = {
        f.name: struct.unpack("f", struct.pack("f", getattr(p, f.name)))[0]
        for f in dataclasses.fields(p)
        if isinstance(getattr(p, f.name), float)
    }
    return dataclasses.replace(p, **rounded)


def test_every_sampling_field_roundtrips() -> None:
    defaults = SamplingParams()
    for name, value in NON_DEFAULT_SAMPLING.items():
        assert getattr(defaults, name) != value, name
    p = SamplingParams(**NON_DEFAULT_SAMPLING)
    wire = common_pb2.SamplingParams.FromString(sampling_to_proto(p).SerializeToString())
    assert sampling_from_proto(wire) == as_float32(p)
    # each field alone, so one field's value cannot hide another's loss
    for name, value in NON_DEFAULT_SAMPLING.items():
        one = SamplingParams(**{name: value})
        assert sampling_from_proto(sampling_to_proto(one), default_max_tokens=16) == as_float32(one), name


def test_unset_sampling_fields_take_the_defaults() -> None:
    assert sampling_from_proto(common_pb2.SamplingParams(), default_max_tokens=16) == SamplingParams()
    assert sampling_from_proto(common_pb2.SamplingParams(), default_max_tokens=5).max_tokens == 5
    with pytest.raises(SamplingParamsError, match="repetition_penalty"):
        sampling_from_proto(common_pb2.SamplingParams(repetition_penalty=0.0))
