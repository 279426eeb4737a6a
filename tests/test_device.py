"""Device placement (`--device`): the engine's tensors live on the device it is given, bad devices are
named, and `--device cpu` gives the same tokens as the default. CUDA itself is checked by
`k2serve bench device` on a GPU machine; here the CPU path runs with the device given explicitly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from k2serve.engine.config import EngineConfig, EngineConfigError, resolve_device
from k2serve.engine.llm import LLM
from k2serve.engine.llm_engine import LLMEngine
from k2serve.engine.model_runner import build_step_inputs
from k2serve.engine.sampling_params import SamplingParams

REPO = Path(__file__).resolve().parents[1]


def test_engine_tensors_are_on_the_given_device(tiny_ckpt: Path) -> None:
    cfg = EngineConfig(num_kv_blocks=64, block_size=8, device="cpu")
    engine = LLMEngine.from_pretrained(tiny_ckpt, torch.float32, cfg)
    cpu = torch.device("cpu")
    assert engine.device == cpu and engine.pool.kv.device == cpu
    assert {p.device for p in engine.model.parameters()} == {cpu}
    engine.add_request(
        "a", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], SamplingParams(temperature=1.0, seed=3, max_tokens=2)
    )
    assert engine.seqs["a"].generator is not None and engine.seqs["a"].generator.device == cpu
    engine.add_request("b", [4, 5, 6], SamplingParams(temperature=0.0, max_tokens=2))
    seen: list[torch.Tensor] = []
    real = build_step_inputs

    def spy(*a: object, **k: object) -> object:
        inputs = real(*a, **k)  # type: ignore[arg-type]
        seen.extend([inputs.input_ids, inputs.positions, inputs.slots, inputs.sample_index])
        for w in inputs.work:
            seen.extend([w.token, w.q_pos, w.key_blocks, w.key_pos])
        return inputs

    import k2serve.engine.model_runner as mr

    mp = pytest.MonkeyPatch()
    mp.setattr(mr, "build_step_inputs", spy)
    try:
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        mp.undo()
    assert len(seen) >= 8 and {t.device for t in seen} == {cpu}


def test_explicit_cpu_gives_the_default_tokens(tiny_ckpt: Path) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    seeded = SamplingParams(temperature=0.8, seed=11, max_tokens=6, ignore_eos=True)
    prompt = [3, 14, 15, 92, 65, 35]
    cfg = EngineConfig(num_kv_blocks=64, block_size=8)
    default = LLM(tiny_ckpt, engine_config=cfg).generate([prompt, prompt], [params, seeded])
    cpu = LLM(tiny_ckpt, engine_config=cfg, device="cpu").generate([prompt, prompt], [params, seeded])
    assert [o.token_ids for o in cpu] == [o.token_ids for o in default]
    assert all(len(o.token_ids) == 6 for o in cpu)


def test_bad_devices_are_named() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("gpu", "meta", "cuda:x", "tpu:0"):
        with pytest.raises(EngineConfigError, match="--device must be cpu, cuda or cuda:N"):
            EngineConfig(device=bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(tiny_ckpt: Path) -> None:
    with pytest.raises(EngineConfigError, match="--device cuda:1: torch sees no CUDA device"):
        EngineConfig(device="cuda:1").torch_device  # noqa: B018 - the property resolves (and checks) it
    assert EngineConfig(device="cuda:1").device == "cuda:1"  # spelled right: a config alone is fine
    env = os.environ | {"PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "k2serve", "generate", "--model", str(tiny_ckpt), "--prompt-ids", "1,2"]
        + ["--device", "cuda"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode != 0
    assert "--device cuda: torch sees no CUDA device" in done.stderr and "Traceback" not in done.stderr


def test_cli_device_flag_flows() -> None:
    from k2serve.cli.parser import build_parser
    from k2serve.cli.settings import engine_args_from_up, engine_config

    parser = build_parser()
    for command in ("serve", "prefill", "decode"):
        args = parser.parse_args([command, "--preset", "tiny", "--device", "cpu"])
        assert engine_config(args).device == "cpu"
    assert engine_config(parser.parse_args(["serve", "--preset", "tiny"])).device is None
    passed = engine_args_from_up(parser.parse_args(["up", "--preset", "tiny", "--device", "cpu"]))
    assert passed[passed.index("--device") + 1] == "cpu"
    assert "--device" not in engine_args_from_up(parser.parse_args(["up", "--preset", "tiny"]))


def test_cli_generate_on_cpu(tiny_ckpt: Path) -> None:
    env = os.environ | {"PYTHONPATH": str(REPO)}
    base = [sys.executable, "-m", "k2serve", "generate", "--model", str(tiny_ckpt), "--prompt-ids", "3,14,15"]
    base += ["--max-tokens", "3", "--json"]
    got = subprocess.run(
        base + ["--device", "cpu"], capture_output=True, text=True, env=env, timeout=120, check=True
    )
    want = LLM(tiny_ckpt).generate([3, 14, 15], SamplingParams(temperature=0.0, max_tokens=3))[0].token_ids
    assert json.loads(got.stdout.strip().splitlines()[-1])["token_ids"] == want


def test_workers_pass_their_device_to_the_kv_transfer(monkeypatch: pytest.MonkeyPatch) -> None:
    from k2serve.cli.parser import build_parser
    from k2serve.cli.settings import worker_settings

    parser = build_parser()
    for role in ("prefill", "decode"):
        args = parser.parse_args(
            [
                role,
                "--preset",
                "tiny",
                "--insecure-internal",
                "--device",
                "cpu",
                "--transfer-backend",
                "torch",
            ]
        )
        assert worker_settings(role, args).kv_transfer_options() == {
            "device": torch.device("cpu"),
            "token": None,
        }
        args = parser.parse_args(
            [role, "--preset", "tiny", "--insecure-internal", "--device", "cpu", "--transfer-backend", "grpc"]
        )
        # a decode worker receiving over gRPC needs none; a prefill worker's senders follow each
        # decode worker's backend, so they always have them
        want = {"device": torch.device("cpu"), "token": None} if role == "prefill" else {}
        assert worker_settings(role, args).kv_transfer_options() == want
    # a CUDA machine, as torch would report it: the torch transfer gets the CUDA device (NCCL) ...
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    args = parser.parse_args(
        [
            "decode",
            "--preset",
            "tiny",
            "--insecure-internal",
            "--device",
            "cuda:1",
            "--transfer-backend",
            "torch",
        ]
    )
    assert worker_settings("decode", args).kv_transfer_options() == {
        "device": torch.device("cuda:1"),
        "token": None,  # --insecure-internal; with --cluster-token-file, the token the handshake proves
    }
    # ... and each rank of an expert-parallel group on CUDA gets its own GPU (NCCL collectives, its KV
    # pool there too: the torch KV transfer sends from / receives into that GPU)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    for rank, want in ((0, "cuda:0"), (1, "cuda:1"), (3, "cuda:1")):
        args = parser.parse_args(
            [
                "decode",
                "--preset",
                "tiny",
                "--insecure-internal",
                "--device",
                "cuda",
                "--ep",
                "4",
                "--ep-rank",
                str(rank),
                "--ep-init",
                "tcp://127.0.0.1:1",
            ]
        )
        settings = worker_settings("decode", args)
        assert settings.engine.device == want
        assert settings.kv_transfer_options()["device"] == torch.device(want)


def test_expert_parallel_backend_and_device_choice() -> None:
    """Pure: NCCL for CUDA ranks, gloo for CPU ones; a bare "cuda" becomes the rank's own GPU
    (LOCAL_RANK first, else the rank modulo the host's GPUs), an explicit cuda:N is kept."""
    from k2serve.experts.comm import EPConfigError, ep_backend, ep_rank_device

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert ep_backend(cuda) == ep_backend(torch.device("cuda:3")) == "nccl"
    assert ep_backend(cpu) == "gloo"
    assert [ep_rank_device(cuda, r, 8) for r in range(8)] == [torch.device("cuda", r) for r in range(8)]
    assert [ep_rank_device(cuda, r, 4) for r in (4, 5, 7)] == [torch.device("cuda", r) for r in (0, 1, 3)]
    assert ep_rank_device(cuda, 5, 1) == torch.device("cuda:0")  # one GPU per pod
    assert ep_rank_device(cuda, 5, 8, local_rank=2) == torch.device("cuda:2")  # the launcher's LOCAL_RANK
    assert ep_rank_device(torch.device("cuda:6"), 1, 8) == torch.device("cuda:6")  # placed by hand
    assert ep_rank_device(cpu, 3, 8) == cpu
    assert ep_rank_device(cuda, 3, 0) == cuda  # no GPU visible (a config checked elsewhere)
    with pytest.raises(EPConfigError, match="LOCAL_RANK"):
        ep_rank_device(cuda, 0, 8, local_rank=-1)


def test_expert_parallel_collectives_stage_host_tensors_on_a_device_group() -> None:
    """An NCCL group takes device tensors only: the comm copies a host tensor (the step flags, the
    EPLB counts) to its device and copies the result back. A real one-rank gloo group runs the
    collectives; then, told it is NCCL on "meta" (a device no host tensor is on), it stages."""
    from datetime import timedelta

    import torch.distributed as dist

    from k2serve.experts.comm import EPComm

    store = dist.HashStore()
    comm = EPComm(store, 0, 1, timedelta(seconds=10), timedelta(seconds=1))
    assert (comm.backend, comm.device) == ("gloo", torch.device("cpu"))
    flags = torch.tensor([1, 0])
    comm.all_reduce(flags, "max", "flags")
    assert flags.tolist() == [1, 0]
    out = torch.empty(3, 2)
    inp = torch.arange(6, dtype=torch.float32).view(3, 2)
    comm.all_to_all(out, inp, [3], [3], "rows")
    assert torch.equal(out, inp)
    comm.backend = "nccl"  # as a CUDA group sees a host tensor: staged through comm.device and back
    staged = torch.tensor([4, 2])
    assert comm._on_device(staged) is staged  # already on the group's device: no copy  # noqa: SLF001
    comm.device = torch.device("meta")
    assert comm._on_device(staged).device.type == "meta"  # noqa: SLF001


def test_kv_transfer_backend_flag_names_the_transfer_backend() -> None:
    """--kv-transfer-backend is --transfer-backend by its issue's name, on the workers and on `up`."""
    from k2serve.cli.parser import build_parser

    parser = build_parser()
    for cmd in ("prefill", "decode", "up"):
        for backend in ("grpc", "torch", "auto"):
            args = parser.parse_args([cmd, "--preset", "tiny", "--kv-transfer-backend", backend])
            assert args.transfer_backend == backend
        with pytest.raises(SystemExit):
            parser.parse_args([cmd, "--preset", "tiny", "--kv-transfer-backend", "nccl"])


def test_expert_parallel_group_on_cuda_is_nccl_bound_to_the_ranks_gpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A CUDA rank's EPComm builds a ProcessGroupNCCL (with the group's timeout) after selecting the
    rank's GPU, and a CPU rank a gloo group: NCCL itself stands in here as a recorder (no GPU)."""
    from datetime import timedelta

    import torch.distributed as dist

    from k2serve.experts.comm import EPComm

    made: list[tuple[str, object]] = []

    class FakeNCCL:
        class Options:
            _timeout = timedelta(0)

        def __init__(self, store: object, rank: int, size: int, opts: FakeNCCL.Options) -> None:
            made.append(("nccl", (rank, size, opts._timeout)))

    monkeypatch.setattr(dist, "ProcessGroupNCCL", FakeNCCL, raising=False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: made.append(("set_device", torch.device(d))))
    comm = EPComm(dist.HashStore(), 1, 4, timedelta(seconds=42), timedelta(seconds=1), "cuda:1")
    assert (comm.backend, comm.device) == ("nccl", torch.device("cuda:1"))
    assert made == [("set_device", torch.device("cuda:1")), ("nccl", (1, 4, timedelta(seconds=42)))]
    assert EPComm(dist.HashStore(), 0, 1, timedelta(seconds=5), timedelta(seconds=1)).backend == "gloo"


def test_a_bare_cuda_device_is_indexed_for_nccl_and_in_place_receives(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tensors made on "cuda" report cuda:N (the current device): the torch KV transfer and the EP
    group use that index, so NCCL binds to a GPU and a receive lands in a pool on the same device."""
    from k2serve.engine.config import indexed_device

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    assert indexed_device(torch.device("cuda")) == torch.device("cuda:2")
    assert indexed_device(torch.device("cuda:0")) == torch.device("cuda:0")
    assert indexed_device(torch.device("cpu")) == torch.device("cpu")
