"""KV transfer: the shared validation in-process, then both backends between two real processes."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import torch
import xxhash

from k2serve.proto import kv_transfer_pb2_grpc
from k2serve.proto.kv_transfer_pb2 import (
    CHECKSUM_FLETCHER64_PAIR,
    CHECKSUM_XXH3_128,
    KVChunk,
    KVChunkHeader,
    KVControlFrame,
)
from k2serve.transfer import (
    ChunkError,
    TransferError,
    TransferTimeout,
    UnknownBackendError,
    grpc_codec,
    make_receiver,
    make_sender,
    outbox,
    torch_wire,
)
from k2serve.transfer.base import DTYPES, TransferSpec
from k2serve.transfer.checksum import Checksum, checksum, fletcher, fletcher_reference
from k2serve.transfer.inbox import Inbox

BITS = {torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float16: torch.int16}


def make_kv(seed: int, num_layers: int, num_tokens: int, kv_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Random bit patterns (NaNs and infinities included) of dtype, [num_layers, num_tokens, kv_dim]."""
    g = torch.Generator().manual_seed(seed)
    bits = BITS[dtype]
    info = torch.iinfo(bits)
    raw = torch.randint(info.min, info.max, (num_layers, num_tokens, kv_dim), dtype=bits, generator=g)
    return raw.view(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))


# ---------------------------------------------------------------------------------------------
# In-process: validation rules, frames, registry, sender argument checks.


def _header(spec: TransferSpec, payload: bytes, **overrides: Any) -> KVChunkHeader:
    fields = dict(
        transfer_id=spec.transfer_id,
        layer=0,
        token_offset=0,
        num_tokens=spec.num_tokens,
        kv_dim=spec.kv_dim,
        dtype=spec.dtype_name,
        byte_length=len(payload),
        checksum_kind=checksum(payload).kind,
        checksum_lo=checksum(payload).lo,
        checksum_hi=checksum(payload).hi,
    )
    fields.update(overrides)
    return KVChunkHeader(**fields)


@pytest.mark.parametrize("size", [0, 1, 7, 8, 9, 4095, 4096, 4097, 12_345])
def test_host_checksum_is_xxh3_128_of_the_bytes(size: int) -> None:
    data = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(size))
    raw = data.numpy().tobytes()
    digest = xxhash.xxh3_128_intdigest(raw)
    expected = Checksum(CHECKSUM_XXH3_128, digest & (2**64 - 1), digest >> 64)
    assert checksum(raw) == checksum(memoryview(b"pad" + raw)[3:]) == checksum(data) == expected
    if size:  # a tensor of another dtype over the same bytes, and a non-contiguous view of it
        assert checksum(data.view(torch.uint8)) == expected
        flipped = bytearray(raw)
        flipped[size // 2] ^= 0x10
        assert checksum(bytes(flipped)) != expected
    if size >= 16:
        pairs = data[: size // 2 * 2].view(-1, 2)
        assert checksum(pairs.t()) == checksum(pairs.t().contiguous())  # bytes in logical order


@pytest.mark.parametrize("size", [0, 1, 7, 8, 9, 4095, 4096, 4097, 12_345])
def test_device_checksum_matches_its_definition(size: int) -> None:
    """The Fletcher pair that CUDA payloads use, computed by the same torch code on CPU here."""
    data = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(size))
    raw = data.numpy().tobytes()
    expected = fletcher_reference(raw)
    assert fletcher(data) == expected
    if size >= 16:  # a swap of two different words changes the weighted sum only
        swapped = raw[8:16] + raw[:8] + raw[16:]
        if swapped != raw:
            got = fletcher(torch.frombuffer(bytearray(swapped), dtype=torch.uint8))
            assert got[0] == expected[0] and got != expected


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(transfer_id="other"), "transfer_id"),
        (dict(layer=2), "layer"),
        (dict(dtype="float32"), "dtype"),
        (dict(kv_dim=9), "kv_dim"),
        (dict(token_offset=1), "token_offset"),
        (dict(num_tokens=5), "num_tokens"),
        (dict(byte_length=10), "byte_length"),
        (dict(checksum_lo=1), "checksum"),
        (dict(checksum_hi=1), "checksum"),
        (dict(checksum_kind=CHECKSUM_FLETCHER64_PAIR), "checksum_kind"),
        (dict(checksum_kind=0), "checksum_kind"),
    ],
)
def test_inbox_rejects_bad_chunk_and_keeps_serving(overrides: dict[str, Any], field: str) -> None:
    inbox = Inbox()
    spec = TransferSpec("t", 2, 4, 8, torch.bfloat16)
    inbox.expect(spec, lambda layer, kv: None)
    payload = bytes(spec.layer_bytes)
    with pytest.raises(ChunkError) as err:
        inbox.accept(_header(spec, payload, **overrides), payload, "src")
    assert err.value.field == field and str(next(iter(overrides.values()))) in str(err.value)
    if field != "transfer_id":
        with pytest.raises(ChunkError):
            inbox.wait("t", 1)
    good = TransferSpec("t2", 1, 4, 8, torch.bfloat16)
    got: list[torch.Tensor] = []
    inbox.expect(good, lambda layer, kv: got.append(kv.clone()))
    assert inbox.accept(_header(good, payload), payload, "src")
    assert inbox.wait("t2", 1).bytes == good.layer_bytes and got[0].shape == (4, 8)


def test_inbox_assembles_chunks_and_times_out() -> None:
    inbox = Inbox()
    spec = TransferSpec("t", 1, 5, 3, torch.float32)
    kv = make_kv(1, 1, 5, 3, torch.float32)[0]
    got: list[torch.Tensor] = []
    inbox.expect(spec, lambda layer, t: got.append(t.clone()))
    chunks = list(outbox.split_layer(spec, 0, kv, max_chunk_bytes=2 * spec.row_bytes))
    assert [h.num_tokens for h, _ in chunks] == [2, 2, 1]
    for h, p in chunks:
        inbox.accept(h, p.numpy().tobytes(), "src")
    inbox.wait("t", 1)
    assert same_bits(got[0], kv)
    inbox.expect(TransferSpec("slow", 1, 5, 3, torch.float32), lambda layer, t: None)
    start = time.monotonic()
    with pytest.raises(TransferTimeout):
        inbox.wait("slow", 0.2)
    assert time.monotonic() - start < 2
    with pytest.raises(ChunkError, match="transfer_id"):  # dropped after the timeout
        inbox.accept(chunks[0][0], chunks[0][1], "src")


def test_on_layer_error_fails_only_that_transfer() -> None:
    inbox = Inbox()
    spec = TransferSpec("t", 1, 2, 4, torch.float32)
    inbox.expect(spec, lambda layer, kv: 1 / 0)
    payload = bytes(spec.layer_bytes)
    with pytest.raises(TransferError, match="ZeroDivisionError"):
        inbox.accept(_header(spec, payload), payload, "src")
    with pytest.raises(TransferError, match="on_layer"):
        inbox.wait("t", 1)


def test_inbox_lands_chunks_in_place() -> None:
    """landing_site hands out views of place(layer); a landed chunk is verified where it lies and
    completes its layer without on_layer; layers whose place is None go through on_layer."""
    inbox = Inbox()
    spec = TransferSpec("t", 3, 5, 4, torch.bfloat16)
    kv = make_kv(4, 3, 5, 4, torch.bfloat16)
    dest = torch.zeros(3, 5, 4, dtype=torch.bfloat16)
    via_on_layer: dict[int, torch.Tensor] = {}
    inbox.expect(
        spec,
        lambda layer, t: via_on_layer.__setitem__(layer, t.clone()),
        place=lambda layer: None if layer == 1 else dest[layer],
    )
    cpu = torch.device("cpu")
    for layer in range(3):
        for h, p in outbox.split_layer(spec, layer, kv[layer], max_chunk_bytes=2 * spec.row_bytes):
            site = inbox.landing_site(h, "src", cpu)
            if layer == 1:
                assert site is None
                inbox.accept(h, p, "src")
            else:
                assert site is not None and site.numel() == h.byte_length
                assert inbox.landing_site(h, "src", torch.device("meta")) is None  # another device
                site.copy_(p)  # what the backend's receive does
                inbox.accept(h, site, "src", landed=True)
    assert inbox.wait("t", 1).bytes == spec.total_bytes
    assert same_bits(dest[0], kv[0]) and same_bits(dest[2], kv[2]) and not dest[1].any()
    assert list(via_on_layer) == [1] and same_bits(via_on_layer[1], kv[1])


def test_inbox_landing_sites_refuse_bad_chunks_and_verify_in_place() -> None:
    inbox = Inbox()
    spec = TransferSpec("t", 2, 4, 8, torch.bfloat16)
    dest = torch.zeros(2, 4, 8, dtype=torch.bfloat16)
    inbox.expect(spec, lambda layer, kv: None, place=lambda layer: dest[layer])
    payload = torch.arange(spec.layer_bytes, dtype=torch.int64).to(torch.uint8)
    cpu = torch.device("cpu")
    for bad in (
        dict(layer=2),
        dict(num_tokens=5),
        dict(token_offset=1),
        dict(dtype="float32"),
        dict(kv_dim=9),
    ):
        assert inbox.landing_site(_header(spec, payload.numpy().tobytes(), **bad), "src", cpu) is None
    assert inbox.landing_site(_header(TransferSpec("u", 1, 4, 8, torch.bfloat16), b""), "src", cpu) is None
    header = _header(spec, payload.numpy().tobytes())
    site = inbox.landing_site(header, "src", cpu)
    assert site is not None
    site.copy_(payload)
    site[3] ^= 1  # corrupted on the way
    with pytest.raises(ChunkError, match="checksum"):
        inbox.accept(header, site, "src", landed=True)
    assert inbox.landing_site(header, "src", cpu) is None  # failed: nothing lands any more
    with pytest.raises(ChunkError):
        inbox.wait("t", 1)
    wrong = Inbox()
    wrong.expect(spec, lambda layer, kv: None, place=lambda layer: dest[layer, :2])
    assert wrong.landing_site(header, "src", cpu) is None
    with pytest.raises(TransferError, match=r"place\(0\) failed: .*expected \(4, 8\)"):
        wrong.wait("t", 1)


def test_a_duplicate_landing_after_the_last_chunk_fails_the_transfer() -> None:
    """A (misbehaving) sender repeats the last chunk with other bytes: it lands over verified rows,
    so the transfer must not be reported complete even though every layer was in."""
    inbox = Inbox()
    spec = TransferSpec("t", 1, 4, 8, torch.bfloat16)
    dest = torch.zeros(1, 4, 8, dtype=torch.bfloat16)
    inbox.expect(spec, lambda layer, kv: None, place=lambda layer: dest[layer])
    kv = make_kv(5, 1, 4, 8, torch.bfloat16)[0]
    header, payload = next(outbox.split_layer(spec, 0, kv, 1 << 20))
    cpu = torch.device("cpu")
    first, again = inbox.landing_site(header, "src", cpu), inbox.landing_site(header, "src", cpu)
    assert first is not None and again is not None
    first.copy_(payload)
    assert inbox.accept(header, first, "src", landed=True)  # complete
    assert inbox.landing_site(header, "src", cpu) is None  # nothing lands once complete
    again.fill_(7)  # the duplicate's bytes arrive over the verified ones
    with pytest.raises(ChunkError, match="token_offset"):
        inbox.accept(header, again, "src", landed=True)
    with pytest.raises(ChunkError, match="token_offset"):
        inbox.wait("t", 1)


def test_cancel_and_wait_hold_back_while_a_payload_may_still_land() -> None:
    """The caller frees the placed memory once cancel / wait return, so they wait for a landing
    site in use (a receive in flight) to end."""
    inbox = Inbox()
    spec = TransferSpec("t", 1, 4, 8, torch.bfloat16)
    dest = torch.zeros(1, 4, 8, dtype=torch.bfloat16)
    inbox.expect(spec, lambda layer, kv: None, place=lambda layer: dest[layer])
    header = _header(spec, bytes(spec.layer_bytes))
    assert inbox.landing_site(header, "src", torch.device("cpu")) is not None
    done = threading.Event()
    canceller = threading.Thread(target=lambda: (inbox.cancel("t"), done.set()))
    canceller.start()
    assert not done.wait(0.3)  # the receive is still in flight
    inbox.end_landing("t")  # it failed (say, the connection broke)
    assert done.wait(5)
    canceller.join(5)
    later = TransferSpec("w", 1, 4, 8, torch.bfloat16)
    inbox.expect(later, lambda layer, kv: None, place=lambda layer: dest[layer])
    site = inbox.landing_site(_header(later, bytes(later.layer_bytes)), "src", torch.device("cpu"))
    assert site is not None
    returned = threading.Event()
    waiter = threading.Thread(
        target=lambda: (pytest.raises(TransferTimeout, inbox.wait, "w", 0.1), returned.set())
    )
    waiter.start()
    assert not returned.wait(0.5)  # timed out, but a payload may still land
    inbox.end_landing("w")
    assert returned.wait(5)
    waiter.join(5)


def test_frames_roundtrip_and_reject_garbage() -> None:
    frame = KVControlFrame(chunk=KVChunkHeader(transfer_id="x" * 64, layer=60, byte_length=1 << 40))
    buf = torch_wire.encode_frame(frame)
    assert buf.numel() == torch_wire.FRAME_BYTES and torch_wire.decode_frame(buf) == frame
    with pytest.raises(torch_wire.FrameError):
        torch_wire.decode_frame(torch.full((torch_wire.FRAME_BYTES,), 255, dtype=torch.uint8))
    with pytest.raises(torch_wire.FrameError):
        torch_wire.decode_frame(torch.zeros(torch_wire.FRAME_BYTES, dtype=torch.uint8))


def test_grpc_codec_is_wire_identical_to_kvchunk() -> None:
    spec = TransferSpec("t", 1, 3, 8, torch.bfloat16)
    kv = make_kv(2, 1, 3, 8, torch.bfloat16)[0]
    header, payload = next(outbox.split_layer(spec, 0, kv, 1 << 20))
    data = grpc_codec.encode_chunk((header, payload))
    message = KVChunk(header=header, payload=payload.numpy().tobytes())
    assert KVChunk.FromString(data) == message
    got_header, got_payload = grpc_codec.decode_chunk(message.SerializeToString())
    assert got_header == header and got_payload.tobytes() == payload.numpy().tobytes()
    for bad in (data[:-1], b"\x0a\xff", b"\x0a\x02\xff\xff", data + data[:1], b"\x0b"):
        with pytest.raises(grpc_codec.ChunkDecodeError):
            grpc_codec.decode_chunk(bad)


def test_generated_stub_client_talks_to_grpc_receiver() -> None:
    receiver = make_receiver("grpc")
    spec = TransferSpec("stub", 1, 4, 8, torch.float32)
    kv = make_kv(3, 1, 4, 8, torch.float32)[0]
    got: list[torch.Tensor] = []
    receiver.expect("stub", 1, 4, 8, torch.float32, lambda layer, t: got.append(t.clone()))
    try:
        with grpc.insecure_channel(receiver.endpoint) as channel:
            chunks = [
                KVChunk(header=h, payload=p.numpy().tobytes()) for h, p in outbox.split_layer(spec, 0, kv, 64)
            ]
            ack = kv_transfer_pb2_grpc.KVTransferStub(channel).Push(iter(chunks), timeout=10)
        assert ack.ok and ack.bytes_received == spec.layer_bytes
        receiver.wait("stub", 5)
        assert same_bits(got[0], kv)
    finally:
        receiver.shutdown()


def test_spec_registry_and_sender_argument_checks() -> None:
    with pytest.raises(ValueError):
        TransferSpec("", 1, 1, 1, torch.bfloat16)
    with pytest.raises(ValueError):
        TransferSpec("t", 1, 1, 1, torch.int64)
    with pytest.raises(UnknownBackendError):
        make_sender("rdma", "127.0.0.1:1")
    receiver = make_receiver("grpc")
    sender = make_sender("grpc", receiver.endpoint)
    try:
        sender.open("t", 2, 4, 8, torch.bfloat16)
        with pytest.raises(ValueError, match="expected"):
            sender.send_layer("t", 0, torch.zeros(4, 8))
        with pytest.raises(ValueError, match="range"):
            sender.send_layer("t", 2, torch.zeros(4, 8, dtype=torch.bfloat16))
        sender.send_layer("t", 0, torch.zeros(4, 8, dtype=torch.bfloat16))
        with pytest.raises(ValueError, match="already sent"):
            sender.send_layer("t", 0, torch.zeros(4, 8, dtype=torch.bfloat16))
        with pytest.raises(TransferError, match="never sent"):
            sender.close("t", 5)
    finally:
        sender.shutdown()
        receiver.shutdown()


# ---------------------------------------------------------------------------------------------
# Two processes: the receiver here, the sender in a spawned child.


@dataclass(frozen=True)
class Case:
    transfer_id: str
    num_layers: int
    num_tokens: int
    kv_dim: int
    dtype: str
    fault: str = ""  # "", "checksum", "size", "dtype", "unknown", "die"
    expect_field: str = ""  # the ChunkError field the receiver reports

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


CASES = [
    Case("ok-bf16", 4, 257, 48, "bfloat16"),
    Case("ok-fp32", 3, 100, 96, "float32"),
    Case("bad-crc", 3, 64, 48, "bfloat16", fault="checksum", expect_field="checksum"),
    Case("bad-size", 3, 64, 48, "bfloat16", fault="size", expect_field="num_tokens"),
    Case("bad-dtype", 3, 64, 48, "bfloat16", fault="dtype", expect_field="dtype"),
    Case("not-expected", 2, 64, 48, "bfloat16", fault="unknown"),
    Case("ok-after", 3, 300, 48, "bfloat16"),
    Case("dies", 4, 64, 48, "bfloat16", fault="die"),
]


def _sender_main(backend: str, endpoint: str, cases: list[Case], results: Any) -> None:
    """Child process: send every case in order, report (transfer_id, error text or "") per case."""
    options = {"max_chunk_bytes": 8192} if backend == "grpc" else {}
    sender = make_sender(backend, endpoint, **options)
    real_checksum = outbox.checksum
    for case in cases:
        kv = make_kv(
            zlib.crc32(case.transfer_id.encode()),
            case.num_layers,
            case.num_tokens,
            case.kv_dim,
            case.torch_dtype,
        )
        tokens, dtype = case.num_tokens, case.torch_dtype
        if case.fault == "size":
            tokens, kv = tokens + 5, make_kv(0, case.num_layers, tokens + 5, case.kv_dim, dtype)
        if case.fault == "dtype":
            dtype, kv = torch.float16, kv.view(torch.float16)
        corrupt = lambda p: real_checksum(p)._replace(lo=real_checksum(p).lo ^ 1)  # noqa: E731
        outbox.checksum = corrupt if case.fault == "checksum" else real_checksum
        sender.open(case.transfer_id, case.num_layers, tokens, case.kv_dim, dtype)
        if case.fault == "die":
            sender.send_layer(case.transfer_id, 0, kv[0]).result(10)
            results.put((case.transfer_id, "dying"))
            time.sleep(0.3)
            os._exit(3)
        for layer in range(case.num_layers):
            sender.send_layer(case.transfer_id, layer, kv[layer])
        try:
            sender.close(case.transfer_id, timeout=10)
            results.put((case.transfer_id, ""))
        except TransferError as e:
            results.put((case.transfer_id, str(e)))
    sender.shutdown()


@pytest.mark.parametrize(("backend", "in_place"), [("grpc", False), ("torch", False), ("torch", True)])
def test_two_process_transfers(backend: str, in_place: bool) -> None:
    """Every case through one connection; in_place: the torch receiver puts layers straight into a
    destination tensor (as into a decode worker's pool), so on_layer never runs."""
    receiver = make_receiver(backend)
    received: dict[str, dict[int, torch.Tensor]] = {}
    placed: dict[str, torch.Tensor] = {}
    for case in CASES:
        if case.fault != "unknown":
            received[case.transfer_id] = {}
            store = received[case.transfer_id]
            dest = torch.zeros(case.num_layers, case.num_tokens, case.kv_dim, dtype=case.torch_dtype)
            placed[case.transfer_id] = dest
            receiver.expect(
                case.transfer_id,
                case.num_layers,
                case.num_tokens,
                case.kv_dim,
                case.torch_dtype,
                lambda layer, kv, store=store: store.__setitem__(layer, kv.clone()),
                place=(lambda layer, dest=dest: dest[layer]) if in_place else None,
            )
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    child = ctx.Process(target=_sender_main, args=(backend, receiver.endpoint, CASES, results), daemon=True)
    child.start()
    try:
        sender_says = {}
        for _ in CASES:
            tid, error = results.get(timeout=30)
            sender_says[tid] = error
        for case in CASES:
            if case.fault == "unknown":
                assert "transfer_id" in sender_says[case.transfer_id], sender_says
                continue
            if case.fault == "die":
                start = time.monotonic()
                with pytest.raises(TransferError):
                    receiver.wait(case.transfer_id, timeout=3)
                assert time.monotonic() - start < 5
                continue
            if case.fault:
                with pytest.raises(ChunkError) as err:
                    receiver.wait(case.transfer_id, timeout=10)
                assert err.value.field == case.expect_field
                assert case.expect_field in sender_says[case.transfer_id], sender_says
                continue
            stats = receiver.wait(case.transfer_id, timeout=10)
            assert sender_says[case.transfer_id] == ""
            kv = make_kv(
                zlib.crc32(case.transfer_id.encode()),
                case.num_layers,
                case.num_tokens,
                case.kv_dim,
                case.torch_dtype,
            )
            got = received[case.transfer_id]
            if in_place:
                assert got == {} and same_bits(placed[case.transfer_id], kv)
            else:
                assert sorted(got) == list(range(case.num_layers))
                assert all(same_bits(got[i], kv[i]) for i in range(case.num_layers))
                assert not placed[case.transfer_id].any()  # place is ignored without in_place
            assert stats.bytes == kv.numel() * kv.element_size()
        child.join(10)
        assert child.exitcode == 3
    finally:
        if child.is_alive():
            child.kill()
            child.join(5)
        receiver.shutdown()
        results.close()


def test_torch_receiver_serves_several_senders_at_once() -> None:
    receiver = make_receiver("torch")
    senders = [make_sender("torch", receiver.endpoint) for _ in range(2)]
    got: dict[str, dict[int, torch.Tensor]] = {"a": {}, "b": {}}
    kvs = {tid: make_kv(i, 3, 50, 16, torch.bfloat16) for i, tid in enumerate(got)}
    try:
        for tid, store in got.items():
            receiver.expect(
                tid, 3, 50, 16, torch.bfloat16, lambda layer, kv, s=store: s.__setitem__(layer, kv.clone())
            )
        for sender, tid in zip(senders, got, strict=True):
            sender.open(tid, 3, 50, 16, torch.bfloat16)
        for layer in range(3):  # interleaved: both connections busy at once
            for sender, tid in zip(senders, got, strict=True):
                sender.send_layer(tid, layer, kvs[tid][layer])
        for sender, tid in zip(senders, got, strict=True):
            sender.close(tid, timeout=10)
            receiver.wait(tid, timeout=10)
            assert all(same_bits(got[tid][i], kvs[tid][i]) for i in range(3))
    finally:
        for sender in senders:
            sender.shutdown()
        receiver.shutdown()


def test_grpc_receiver_survives_a_malformed_stream() -> None:
    receiver = make_receiver("grpc")
    try:
        with grpc.insecure_channel(receiver.endpoint) as channel:
            raw = channel.stream_unary(
                "/k2serve.internal.v1.KVTransfer/Push", request_serializer=bytes, response_deserializer=bytes
            )
            with pytest.raises(grpc.RpcError) as err:
                raw(iter([b"\x0b"]), timeout=10)
            assert err.value.code() == grpc.StatusCode.INTERNAL
        sender = make_sender("grpc", receiver.endpoint)
        receiver.expect("next", 1, 4, 8, torch.float32, lambda layer, kv: None)
        sender.open("next", 1, 4, 8, torch.float32)
        sender.send_layer("next", 0, torch.zeros(4, 8))
        sender.close("next", timeout=10)
        assert receiver.wait("next", timeout=10).bytes == 128
        sender.shutdown()
    finally:
        receiver.shutdown()


def test_transfer_bench_runs_paired_rounds_and_verifies(capsys: pytest.CaptureFixture[str]) -> None:
    """`k2serve bench transfer` end to end at a small size: every method, the received bytes checked."""
    from k2serve.bench import transfer as bench

    assert bench.main(["--layers", "2", "--tokens", "64,200", "--kv-dim", "48", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    for label in ("raw TCP socket", "grpc", "torch (in place)", "torch (staged)"):
        assert f"{label}:" in out, out
    assert "2 layers x 64 tokens" in out and "2 layers x 200 tokens" in out  # one table per size
    assert out.count("ratio to socket median") == 6 and "reproduce: k2serve bench transfer" in out
    assert out.count("sender connect (torch: rendezvous + authenticated handshakes): grpc") == 2
    with pytest.raises(SystemExit):
        bench.main(["--tokens", "64,x"])


def test_prefill_senders_replace_a_broken_torch_sender() -> None:
    """A decode worker restarted at the same address (a Kubernetes pod's fixed transfer port): the
    prefill worker's cached torch sender broke with the old one, and the next transfer gets a new one."""
    from k2serve.prefill.worker import _Senders

    senders = _Senders()
    receiver = make_receiver("torch")
    endpoint = receiver.endpoint
    kv = make_kv(9, 2, 16, 8, torch.bfloat16)

    def transfer(receiver: Any, tid: str) -> None:
        got: dict[int, torch.Tensor] = {}
        receiver.expect(tid, 2, 16, 8, torch.bfloat16, lambda layer, t: got.__setitem__(layer, t.clone()))
        sender = senders.get("torch", endpoint)
        sender.open(tid, 2, 16, 8, torch.bfloat16)
        for layer in range(2):
            sender.send_layer(tid, layer, kv[layer])
        sender.close(tid, timeout=10)
        receiver.wait(tid, timeout=10)
        assert all(same_bits(got[i], kv[i]) for i in range(2))

    try:
        transfer(receiver, "before")
        first = senders.get("torch", endpoint)
        receiver.shutdown()
        deadline = time.monotonic() + 10
        while first.broken is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.broken is not None and "shut down" in first.broken
        receiver = make_receiver("torch", endpoint)  # the same host:port again
        transfer(receiver, "after")
        assert senders.get("torch", endpoint) is not first
    finally:
        senders.shutdown()
        receiver.shutdown()


TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_transfers_carry_the_senders_span_and_time_the_checksums() -> None:
    """The sender's traceparent reaches the receiver's TransferStats through the chunk headers (gRPC
    backend between a real sender and receiver); the stats time the verification and the arrival."""
    receiver = make_receiver("grpc")
    sender = make_sender("grpc", receiver.endpoint)
    kv = make_kv(5, 2, 6, 8, torch.float32)
    try:
        for tid, traceparent in (("traced", TRACEPARENT), ("plain", "")):
            receiver.expect(tid, 2, 6, 8, torch.float32, lambda layer, t: None)
            before = time.perf_counter()
            sender.open(tid, 2, 6, 8, torch.float32, traceparent)
            for layer in range(2):
                sender.send_layer(tid, layer, kv[layer])
            sender.close(tid, 10)
            stats = receiver.wait(tid, 10)
            assert stats.traceparent == traceparent
            assert before < stats.finished_at < time.perf_counter()
            assert 0 < stats.verify_seconds <= stats.seconds
    finally:
        sender.shutdown()
        receiver.shutdown()
    # the torch backend's fixed control frame holds a header with the longest id and a traceparent
    spec = TransferSpec("x" * 64, 61, 4096, 576, torch.bfloat16, TRACEPARENT)
    header, _ = next(outbox.split_layer(spec, 60, torch.zeros(4096, 576, dtype=torch.bfloat16), 16 << 20))
    assert header.traceparent == TRACEPARENT
    frame = torch_wire.decode_frame(torch_wire.encode_frame(KVControlFrame(chunk=header)))
    assert frame.chunk.traceparent == TRACEPARENT


TOKEN = "cluster-token-0123456789"  # noqa: S105 - a test credential


def _torch_roundtrip(receiver: Any, tid: str, **sender_options: Any) -> None:
    """One 2-layer transfer from a new torch sender (given sender_options) into receiver, bits checked."""
    kv = make_kv(11, 2, 16, 8, torch.bfloat16)
    got: dict[int, torch.Tensor] = {}
    receiver.expect(tid, 2, 16, 8, torch.bfloat16, lambda layer, t: got.__setitem__(layer, t.clone()))
    sender = make_sender("torch", receiver.endpoint, **sender_options)
    try:
        sender.open(tid, 2, 16, 8, torch.bfloat16)
        for layer in range(2):
            sender.send_layer(tid, layer, kv[layer])
        sender.close(tid, timeout=10)
        receiver.wait(tid, timeout=10)
        assert all(same_bits(got[i], kv[i]) for i in range(2))
    finally:
        sender.shutdown()


def test_torch_handshake_refuses_a_sender_without_the_cluster_token() -> None:
    """Every pair connection proves the cluster token both ways before any KV flows: a sender with
    another token or none is refused at once (and learns nothing), the receiver keeps serving."""
    from k2serve.transfer.handshake import HandshakeError

    receiver = make_receiver("torch", token=TOKEN, connect_timeout=10)
    try:
        landed: list[int] = []
        receiver.expect("target", 1, 4, 8, torch.float32, lambda layer, t: landed.append(layer))
        for wrong in ("another-token-0123456789", None):
            start = time.monotonic()
            with pytest.raises(HandshakeError, match="'control' refused: the other side does not hold"):
                make_sender("torch", receiver.endpoint, token=wrong, connect_timeout=10)
            assert time.monotonic() - start < 8  # refused by the check, not by a timeout
        assert receiver.cancel("target") and landed == []
        _torch_roundtrip(receiver, "right-token", token=TOKEN)
    finally:
        receiver.shutdown()
    # and a sender refuses a receiver without the token (no KV goes to an impostor)
    receiver = make_receiver("torch", connect_timeout=10)
    try:
        with pytest.raises(HandshakeError, match="refused"):
            make_sender("torch", receiver.endpoint, token=TOKEN, connect_timeout=10)
    finally:
        receiver.shutdown()


def test_torch_handshake_covers_the_values_the_open_store_publishes() -> None:
    """The rendezvous TCPStore serves any client: one that rewrites the receiver's published chunk
    size makes the next handshake fail (the proofs cover it), and one that writes a would-be stop
    value does not stop the receiver (its stop value is a secret); restored, transfers run again."""
    from datetime import timedelta

    import torch.distributed as dist

    from k2serve.transfer.handshake import HandshakeError

    receiver = make_receiver("torch", token=TOKEN, connect_timeout=10)
    host, port = torch_wire.split_endpoint(receiver.endpoint)
    outsider = dist.TCPStore(host, port, None, False, timedelta(seconds=10))
    try:
        stop = outsider.add("joins", 1) - 1
        outsider.set(f"join/{stop}", "__stop__")  # the old fixed stop value
        outsider.set("max_chunk_bytes", "4096")
        with pytest.raises(HandshakeError, match="rewritten"):
            make_sender("torch", receiver.endpoint, token=TOKEN, connect_timeout=10)
        outsider.set("max_chunk_bytes", str(torch_wire.MAX_CHUNK_BYTES))
        _torch_roundtrip(receiver, "after-restore", token=TOKEN)
    finally:
        del outsider
        receiver.shutdown()


def test_a_grpc_receiver_can_serve_a_torch_receivers_transfers() -> None:
    """The decode worker's fallback: a gRPC receiver on the torch receiver's inbox completes a
    transfer the torch receiver expects (through on_layer: gRPC cannot land in place); shutting the
    fallback down leaves the torch receiver serving."""
    from k2serve.transfer.grpc_backend import GrpcKVReceiver
    from k2serve.transfer.torch_receiver import TorchKVReceiver

    receiver = make_receiver("torch", token=TOKEN, connect_timeout=10)
    assert isinstance(receiver, TorchKVReceiver)
    fallback = GrpcKVReceiver(inbox=receiver.inbox)
    kv = make_kv(13, 2, 16, 8, torch.bfloat16)
    try:
        got: dict[int, torch.Tensor] = {}
        dest = torch.zeros(2, 16, 8, dtype=torch.bfloat16)
        receiver.expect(
            "via-grpc",
            2,
            16,
            8,
            torch.bfloat16,
            lambda layer, t: got.__setitem__(layer, t.clone()),
            place=lambda layer: dest[layer],
        )
        sender = make_sender("grpc", fallback.endpoint)
        try:
            sender.open("via-grpc", 2, 16, 8, torch.bfloat16)
            for layer in range(2):
                sender.send_layer("via-grpc", layer, kv[layer])
            sender.close("via-grpc", timeout=10)
        finally:
            sender.shutdown()
        assert receiver.wait("via-grpc", timeout=10).bytes == kv.numel() * 2
        assert all(same_bits(got[i], kv[i]) for i in range(2)) and not dest.any()
        fallback.shutdown()
        _torch_roundtrip(receiver, "after-fallback-shutdown", token=TOKEN)
    finally:
        fallback.shutdown()
        receiver.shutdown()
