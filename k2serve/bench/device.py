"""The device check: is the engine right and how fast is it on this machine's device?

Run: `k2serve bench device [--device cuda|cpu] [--json] [--slice k2|small] [--batch-sizes 1,64]
[--steps 8] [--bandwidth-gbs X]`. Defaults: cuda when torch sees a GPU (the K2 slice), else cpu (the
`small` slice, with the Triton kernels under TRITON_INTERPRET=1, which this sets in CPU mode before any
kernel is built). Exit status 1 when a check fails. Meant to finish within ~8 minutes on one H100/H200
and within ~60 s on CPU (what CI runs, tests/test_bench_device.py).

Checks, each printed as one line (and one JSON object per check with --json):
1. logits: one engine step (a prefill of two prompts) of the tiny preset's checkpoint on --device
   against the same step on the CPU (fp32; on CPU mode both sides are the CPU).
2. kernels: the fused Triton MoE (`--moe-backend triton`: the routing's gather and weighted sum in the
   kernels; INT4 group-32 and dense experts) against the torch path, in fp32 and bf16, and the Triton paged MLA attention through one engine step's logits against the
   torch backend (K2's head dims on CUDA; small ones under the interpreter).
3. cuda-graph: the captured decode step (EngineConfig.compile "decode": CUDA graphs on CUDA, Inductor
   on CPU) against eager on the tiny checkpoint: same greedy tokens, every step's logits within 1e-4.
4. decode: tok/s of a layer slice (K2: one dense + one MoE layer at K2's dims with INT4 experts, 384
   routed, top-8; a reduced 32K vocabulary; random weights built on the device) at each batch size,
   against the roofline batch / (bytes read per step / peak bandwidth). Bytes per step: every weight
   but the routed experts, the routed experts a step touches (expected distinct experts of B tokens
   x top-k uniform picks), and the KV the batch reads. Peak bandwidth: a table of known GPUs (H100
   3.35 TB/s, H200 4.8 TB/s, ...) or --bandwidth-gbs; on CPU the figure a large copy measures here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# Peak HBM bandwidth, bytes/s, by a substring of torch.cuda.get_device_name (first match wins).
GPU_PEAK_BANDWIDTH: tuple[tuple[str, float], ...] = (
    ("H200", 4.8e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),
    ("H800", 3.35e12),
    ("B200", 8.0e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100", 1.555e12),
    ("L40S", 0.864e12),
)
SLICE_VOCAB = 32000 + 256


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    figures: dict[str, Any]


def peak_bandwidth(device: torch.device, override_gbs: float | None) -> tuple[float, str]:
    """(bytes/s, where it came from): --bandwidth-gbs, the GPU table, or a measured CPU copy."""
    if override_gbs:
        return override_gbs * 1e9, "--bandwidth-gbs"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, bw in GPU_PEAK_BANDWIDTH:
            if key in name:
                return bw, f"peak of {name} ({key})"
        raise SystemExit(f"no peak bandwidth known for {name!r}: pass --bandwidth-gbs")
    return measure_copy_bandwidth(), "measured: a 256 MiB tensor copy on this CPU (read + write)"


def measure_copy_bandwidth(nbytes: int = 256 << 20, rounds: int = 5) -> float:
    """Bytes/s moved (read + write) by the best of `rounds` copies of an nbytes tensor."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _max_rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12))


def step_logits(ckpt: Path, device: torch.device, attention_backend: str = "torch") -> torch.Tensor:
    """fp32 logits of one engine step: a prefill of two prompts on `device`."""
    from k2serve.engine.config import EngineConfig
    from k2serve.engine.llm_engine import LLMEngine
    from k2serve.engine.model_runner import RowSpec

    cfg = EngineConfig(
        num_kv_blocks=32, block_size=16, device=str(device), attention_backend=attention_backend
    )
    engine = LLMEngine.from_pretrained(ckpt, torch.float32, cfg)
    rows = [RowSpec(list(range(3, 40)), 0, [0, 1, 2], True), RowSpec([5, 9, 2, 7], 0, [3], True)]
    return engine.runner.run(rows).cpu()


def check_logits(ckpt: Path, device: torch.device) -> Check:
    got, want = step_logits(ckpt, device), step_logits(ckpt, torch.device("cpu"))
    err = _max_rel(got, want)
    same = bool(torch.equal(got.argmax(-1), want.argmax(-1)))
    return Check("logits", err < 1e-3 and same, f"{device} vs cpu: max rel err {err:.2e}, argmax equal {same}",
                 {"max_rel_err": err})  # fmt: skip


def decode_logits(
    ckpt: Path, device: torch.device, compile: str
) -> tuple[torch.Tensor, list[list[int]], int]:
    """Every step's logits (prefill and decode, concatenated), the greedy tokens of two prompts, and
    how many steps ran captured, on an engine with EngineConfig.compile = `compile`."""
    from k2serve.engine.config import EngineConfig
    from k2serve.engine.llm_engine import LLMEngine
    from k2serve.engine.sampling_params import SamplingParams

    cfg = EngineConfig(num_kv_blocks=32, block_size=16, max_num_seqs=2, device=str(device), compile=compile)
    engine = LLMEngine.from_pretrained(ckpt, torch.float32, cfg)
    seen: list[torch.Tensor] = []
    run = engine.runner.run

    def recorded(rows: Any, on_layer: Any = None) -> torch.Tensor:
        seen.append(run(rows, on_layer))
        return seen[-1]

    engine.runner.run = recorded  # type: ignore[method-assign]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    for i, p in enumerate((list(range(3, 40)), [5, 9, 2, 7])):
        engine.add_request(str(i), p, params)
    done: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        done |= {o.request_id: o.token_ids for o in engine.step() if o.finished}
    steps = 0 if engine.runner.captured is None else engine.runner.captured.steps
    return torch.cat([t.cpu() for t in seen]), [done["0"], done["1"]], steps


def check_captured(ckpt: Path, device: torch.device) -> Check:
    """The captured decode step (CUDA graphs on CUDA, Inductor on CPU) against eager: same greedy
    tokens, logits of every step within 1e-4 (fp32)."""
    (got, got_tokens, steps), (want, want_tokens, _) = (
        decode_logits(ckpt, device, "decode"),
        decode_logits(ckpt, device, "none"),
    )
    err = _max_rel(got, want)
    what = "CUDA-graph" if device.type == "cuda" else "compiled (Inductor)"
    same = got_tokens == want_tokens
    ok = err < 1e-4 and same and steps > 0
    detail = f"{what} decode step vs eager on {device}: {steps} captured steps, max rel err {err:.2e}, tokens equal {same}"
    return Check("cuda-graph", ok, detail, {"max_rel_err": err, "captured_steps": steps})


def check_fused_moe(device: torch.device, k2: bool) -> list[Check]:
    """The fused MoE kernels (`--moe-backend triton`: gather, gate_up with SwiGLU, weighted down, sum
    over top-k) against the torch path of the same RoutedExperts, INT4 group-32 and dense, fp32 and
    bf16: K2's expert dims (7168 -> 2048) with 16 experts, top-8 of 64 tokens on CUDA (where the fused
    forward must also run without a host sync); 256 -> 128, 8 experts, top-4 of 8 tokens under the
    interpreter."""
    from k2serve.config import ModelConfig
    from k2serve.model.moe import RoutedExperts
    from k2serve.model.presets import PRESETS

    d, i, e, k, t = (7168, 2048, 16, 8, 64) if k2 else (256, 128, 8, 4, 8)
    config = ModelConfig.from_dict(PRESETS["tiny"] | {"hidden_size": d, "moe_intermediate_size": i,
                                   "n_routed_experts": e, "num_experts_per_tok": k, "n_group": 1, "topk_group": 1})  # fmt: skip
    g = torch.Generator(device=device).manual_seed(0)
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(t, d, generator=g, device=device).to(dtype)
        ids = torch.rand(t, e, generator=g, device=device).topk(k, dim=-1).indices  # k distinct experts
        weights = torch.rand(t, k, generator=g, device=device)
        for kind in ("int4", "dense"):
            experts = RoutedExperts(config, int4_group_size=32 if kind == "int4" else None, dtype=dtype).to(
                device
            )
            fill_random(experts, g)
            want = experts(x, weights, ids)
            experts.set_moe_backend("triton")
            err = _max_rel(experts(x, weights, ids), want)
            sync = _host_sync(lambda: experts(x, weights, ids)) if device.type == "cuda" else None  # noqa: B023
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            label = f"fused-moe-{kind}-{str(dtype).removeprefix('torch.')}"
            detail = f"triton vs torch [{t} tokens, top-{k} of {e}, {d}->{i}]: max rel err {err:.2e}"
            if device.type == "cuda":
                detail += f"; host sync: {sync or 'none'}"
            out.append(Check(label, err < tol and sync is None, detail, {"max_rel_err": err}))
    return out


def _host_sync(run: Callable[[], object]) -> str | None:
    """What `run` (already run once: compiled) does that syncs the host with the GPU, as torch's sync
    debug mode reports it, or None: the fused MoE must not, so that a CUDA graph can capture it."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    except RuntimeError as e:
        return str(e).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return None


def check_attention(ckpt: Path, device: torch.device) -> Check:
    got, want = step_logits(ckpt, device, "triton"), step_logits(ckpt, device, "torch")
    err = _max_rel(got, want)
    return Check("paged-attention", err < 1e-3, f"triton vs torch step logits on {device}: max rel err {err:.2e}",
                 {"max_rel_err": err})  # fmt: skip


def slice_config(k2: bool) -> dict[str, Any]:
    """An HF config of two layers (one dense, one MoE): K2's dims with INT4 experts, or the `small`
    preset's with fp32 dense experts (the CPU mode: its INT4 path dequantises per call, too slow for CI)."""
    from k2serve.model.checkpoint import INT4_QUANT_CONFIG
    from k2serve.model.presets import PRESETS

    if k2:
        base = json.loads(
            (Path(__file__).resolve().parents[1] / "capacity" / "kimi-k2-thinking.config.json").read_text()
        )
    else:
        base = dict(PRESETS["small"])
    out = base | {"num_hidden_layers": 2, "vocab_size": SLICE_VOCAB,
                  "bos_token_id": 32000, "eos_token_id": 32002, "pad_token_id": 32255}  # fmt: skip
    return out | {"quantization_config": INT4_QUANT_CONFIG} if k2 else out


def fill_random(module: torch.nn.Module, g: torch.Generator) -> None:
    """Random weights in place: packed INT4 words uniform, scales in [0.001, 0.01], norms 1 (activations
    keep their scale: no denormals on CPU), the rest normal(0, 0.02); index buffers untouched."""
    with torch.no_grad():
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if name.endswith(("inv_freq", "global_to_local")):
                continue
            if t.dtype in (torch.int32, torch.uint8):
                t.random_(0, 2**31 - 1 if t.dtype == torch.int32 else 256, generator=g)
            elif name.endswith(("_scale", "_sz")):
                t.uniform_(0.001, 0.01, generator=g)
            elif "norm" in name:
                t.fill_(1.0)
            else:
                t.normal_(0.0, 0.02, generator=g)


def random_slice(config: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """The slice's model with random weights made on the device (no checkpoint: K2's INT4 experts
    are ~9.5 GB a layer)."""
    from k2serve.model.loader import build_empty_model, default_int4_layout

    layout = default_int4_layout(device)  # CPU: torch's int4 tiles (fast); CUDA: the disk layout
    group = config.quant.group_size if config.quant else None
    model = build_empty_model(config, dtype, None, group, device, layout)
    fill_random(model, torch.Generator(device=device).manual_seed(0))
    return model.eval()


def slice_bytes_per_step(model: Any, batch: int, context: int, kv_row_bytes: int) -> int:
    """Bytes a decode step of `batch` rows at `context` reads: weights (routed experts: the expected
    distinct ones of batch x top-k uniform picks) + the KV of every row."""
    mc = model.config
    total = routed = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        n = t.numel() * t.element_size()
        total += n
        routed += n if ".experts." in name else 0
    e, k = mc.n_routed_experts, mc.num_experts_per_tok
    touched = e * (1 - (1 - k / e) ** batch)
    kv = batch * context * kv_row_bytes * mc.num_hidden_layers
    return int(total - routed + routed * touched / e) + kv


def decode_tok_s(
    model: Any, batch: int, steps: int, context: int, attention: str, moe: str
) -> tuple[float, int]:
    """(median tok/s over `steps` decode steps, KV bytes per token per layer) of `batch` rows."""
    from k2serve.engine.config import EngineConfig
    from k2serve.engine.llm_engine import LLMEngine
    from k2serve.engine.sampling_params import SamplingParams

    blocks = batch * (-(-(context + steps + 2) // 16)) + 1
    cfg = EngineConfig(num_kv_blocks=blocks, block_size=16, max_num_seqs=batch, max_num_batched_tokens=min(
        batch * context, 8192), attention_backend=attention, moe_backend=moe, max_model_len=context + steps + 2)  # fmt: skip
    engine = LLMEngine(model, cfg, eos_token_ids=[])
    params = SamplingParams(temperature=0.0, max_tokens=steps + 2, ignore_eos=True)
    for r in range(batch):
        engine.add_request(str(r), [(r * 7 + j) % 32000 for j in range(context)], params)
    started: set[str] = set()
    while len(started) < batch:  # every prompt prefilled (chunks of 8192 tokens)
        started |= {o.request_id for o in engine.step() if o.new_token_ids}
    engine.step()  # one warm decode step
    times = []
    while engine.has_unfinished_requests():
        _sync(engine.device)
        t0 = time.perf_counter()
        engine.step()
        _sync(engine.device)
        times.append(time.perf_counter() - t0)
    row = engine.pool.kv.shape[-1] * engine.pool.kv.element_size()
    return batch / statistics.median(times), row


def check_decode(device: torch.device, k2: bool, batches: list[int], steps: int, bandwidth: tuple[float, str],
                 attention: str, moe: str) -> list[Check]:  # fmt: skip
    from k2serve.config import ModelConfig

    config = ModelConfig.from_dict(slice_config(k2))
    model = random_slice(config, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    bw, source = bandwidth
    out = []
    context = 512 if k2 else 32
    for b in batches:
        tok_s, row = decode_tok_s(model, b, steps, context, attention, moe)
        roof = b / (slice_bytes_per_step(model, b, context, row) / bw)
        out.append(Check(f"decode-b{b}", tok_s > 0,
                         f"{tok_s:,.1f} tok/s; roofline {roof:,.1f} tok/s ({100 * tok_s / roof:.1f}%) at "
                         f"{bw / 1e9:,.0f} GB/s ({source}), context {context}",
                         {"tok_s": tok_s, "roofline_tok_s": roof, "bandwidth_gbs": bw / 1e9, "batch": b}))  # fmt: skip
    return out


def run(args: argparse.Namespace) -> list[Check]:
    from k2serve.engine.config import resolve_device
    from k2serve.model.checkpoint import write_checkpoint

    device = resolve_device(args.device)
    if device.type != "cuda":
        os.environ["TRITON_INTERPRET"] = "1"  # before the first kernel is built
    k2 = (args.slice or ("k2" if device.type == "cuda" else "small")) == "k2"
    batches = [int(b) for b in args.batch_sizes.split(",")]
    steps = args.steps or (8 if device.type == "cuda" else 3)
    checks: list[Check] = []
    timed: list[tuple[str, Callable[[], list[Check]]]] = []
    with tempfile.TemporaryDirectory() as d:
        ckpt = write_checkpoint(Path(d) / "tiny", "tiny", seed=0, dtype=torch.float32)
        timed = [
            ("logits", lambda: [check_logits(ckpt, device)]),
            ("kernels", lambda: [*check_fused_moe(device, k2), check_attention(ckpt, device)]),
            ("cuda-graph", lambda: [check_captured(ckpt, device)]),
            ("decode", lambda: check_decode(device, k2, batches, steps, peak_bandwidth(device, args.bandwidth_gbs),
                                            args.attention_backend or ("triton" if device.type == "cuda" else "torch"),
                                            args.moe_backend or ("triton" if device.type == "cuda" else "torch"))),
        ]  # fmt: skip
        for _, fn in timed:
            t0 = time.perf_counter()
            for c in fn():
                c.figures["seconds"] = round(time.perf_counter() - t0, 2)
                checks.append(c)
                line = {"check": c.name, "ok": c.ok, "detail": c.detail, **c.figures}
                print(json.dumps(line) if args.json else f"[{'ok' if c.ok else 'FAIL'}] {c.name}: {c.detail}",
                      flush=True)  # fmt: skip
    return checks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="k2serve bench device", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument(
        "--slice", choices=("k2", "small"), default=None, help="decode slice (default: k2 on CUDA)"
    )
    p.add_argument("--batch-sizes", default="1,64")
    p.add_argument("--steps", type=int, default=None, help="timed decode steps per batch size (8; CPU: 3)")
    p.add_argument("--bandwidth-gbs", type=float, default=None, help="peak memory bandwidth, GB/s")
    p.add_argument("--attention-backend", choices=("torch", "triton"), default=None)
    p.add_argument("--moe-backend", choices=("torch", "triton"), default=None)
    p.add_argument("--json", action="store_true")
    checks = run(p.parse_args(argv))
    return 0 if all(c.ok for c in checks) else 1
