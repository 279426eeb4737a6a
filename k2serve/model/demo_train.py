"""Train the `demo` preset: a small K2-architecture model that answers through tools (`k2serve train-demo`).

Steps: generate the corpus (`demo_data.training_samples`), train the tokenizer's BPE ranks on it with
every 1-3 digit string forced in (Kimi's split pattern cuts digits in groups of at most 3, so every
group is one token and copying a number is copying tokens), then train `K2Model` itself (the
engine's own modules, fp32, autograd through `forward_hidden` with the causal backend) with AdamW on
the assistant tokens only. The noaux_tc router's `e_score_correction_bias` gets no gradient; it is
updated by the auxiliary-loss-free rule (each step: +rate for under-loaded experts, -rate for
over-loaded). The result is written in the Hugging Face layout the loader reads (per-expert
gate/up/down projections, bf16), with config.json, generation_config.json, tokenizer files and
`train_loss.csv` (step, loss, tokens, seconds).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from k2serve.chat.bpe_train import _fill, _learn_merges, write_tokenizer_files
from k2serve.chat.tokenizer import KimiTokenizer, load_tokenizer
from k2serve.config import ModelConfig
from k2serve.model.demo_data import Sample, corpus_text, render_sample, training_samples
from k2serve.model.mla import CausalBackend
from k2serve.model.model import K2Model
from k2serve.model.moe import MoE, Router
from k2serve.model.presets import PRESETS


def digit_ranks() -> list[bytes]:
    """Every 2- and 3-digit string (the 1-digit ones are single bytes), in numeric order per length."""
    return [str(i).zfill(n).encode() for n in (2, 3) for i in range(10**n)]


def train_demo_ranks(text: str, num_ranks: int) -> dict[bytes, int]:
    """BPE ranks: the 256 bytes, every 2-3 digit string, then merges learned on `text` (then filler)."""
    ranks: dict[bytes, int] = {bytes([b]): b for b in range(256)}
    for tok in digit_ranks():
        ranks.setdefault(tok, len(ranks))
    _learn_merges(text, ranks, num_ranks)
    _fill(ranks, num_ranks)  # a corpus with fewer pairs than ranks: filler tokens, as bpe_train does
    return ranks


@dataclass
class TrainConfig:
    """What `train_demo` does. `arch` overrides fields of the `demo` preset (tests train a toy size)."""

    out_dir: str
    steps: int = 2000
    batch_size: int = 8
    lr: float = 1e-3  # at 3e-3 this model size never learns to copy (BENCHMARKS.md, Demo model)
    warmup: int = 100
    weight_decay: float = 0.01
    num_samples: int = 40000
    seed: int = 0
    # 1 thread: on this repo's 2-core host shared with other work, 2 intra-op threads ran a step
    # 4-5x slower than 1 (the threads wait for each other when a core is taken away).
    threads: int = 1
    log_every: int = 10
    bias_rate: float = 1e-3
    max_minutes: float | None = None  # stop early (and still write the checkpoint) after this long
    arch: dict[str, Any] | None = None
    keep_fp32: bool = False  # also write the fp32 weights (train_state_fp32.pt; not shipped)
    # Continue from an earlier run's directory (its train_state_fp32.pt and its tokenizer, reused as is).
    init_from: str | None = None
    kind_weights: tuple[float, ...] | None = None  # per demo_data.KINDS; None: demo_data.KIND_WEIGHTS
    varied_phrasings: bool = (
        False  # composed training questions (demo_data `varied`), not the fixed templates
    )


def _init_weights(model: K2Model, seed: int) -> None:
    """Normal(0, 0.02) linears, embeddings and experts; output projections scaled by depth; norms 1."""
    g = torch.Generator().manual_seed(seed)
    depth_scale = 1.0 / math.sqrt(2 * model.config.num_hidden_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.fill_(1.0)
                continue
            std = 0.02 * (depth_scale if name.endswith(("o_proj.weight", "down_proj.weight", "w2")) else 1.0)
            p.copy_(torch.randn(p.shape, generator=g) * std)


def build_model(config: ModelConfig, seed: int) -> K2Model:
    """An fp32 `K2Model` with every weight trainable (routed experts included), initialised by seed."""
    model = K2Model(config)
    for p in model.parameters():
        p.requires_grad_(True)
    _init_weights(model, seed)
    return model


def digit_token_mask(tok: KimiTokenizer, vocab_size: int) -> torch.Tensor:
    """[vocab_size] bool: True for the tokens that are all digits (what copying a number emits)."""
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    for i in range(tok.num_ranks):
        mask[i] = tok.id_to_token_bytes(i).isdigit()
    return mask


def train_forward(model: K2Model, ids: torch.Tensor, targets_at: torch.Tensor) -> torch.Tensor:
    """ids [B, S] -> logits [N, V] at the N positions where `targets_at` [B, S] is True (no cache)."""
    b, s = ids.shape
    positions = torch.arange(s).expand(b, s)
    hidden = model.forward_hidden(ids, positions, CausalBackend())
    return model.logits(hidden[targets_at])


class _RouterLoads:
    """Counts the experts each router picks during a forward (for the auxiliary-loss-free bias update)."""

    def __init__(self, model: K2Model) -> None:
        self.counts: dict[Router, torch.Tensor] = {}
        for layer in model.layers:
            if isinstance(layer.mlp, MoE):
                layer.mlp.gate.register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, _inp: Any, out: tuple[torch.Tensor, torch.Tensor]) -> None:
        assert isinstance(module, Router)
        self.counts[module] = torch.bincount(out[1].flatten(), minlength=module.n_experts).float()

    @torch.no_grad()
    def update(self, rate: float) -> float:
        """bias += rate * sign(mean load - load) per layer; returns the worst max/mean load seen."""
        worst = 0.0
        for router, load in self.counts.items():
            router.e_score_correction_bias += rate * torch.sign(load.mean() - load)
            worst = max(worst, float(load.max() / load.mean().clamp(min=1)))
        self.counts.clear()
        return worst


def batches(
    data: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Endless shuffled batches of similar lengths (little padding): (ids [B, S], input positions whose
    next token is trained [B, S] bool, the targets [N]); rows padded on the right (causal attention
    never looks at the padding)."""
    rng = random.Random(seed)  # noqa: S311 - reproducible batches, not a secret
    pending: list[list[int]] = []
    while True:
        if not pending:  # an epoch: shuffle, cut into windows of 16 batches, batch by length inside
            order = list(range(len(data)))
            rng.shuffle(order)
            window = 16 * batch_size
            for w in range(0, len(order) - batch_size + 1, window):
                chunk = sorted(order[w : w + window], key=lambda i: len(data[i][0]))
                pending.extend(
                    chunk[b : b + batch_size] for b in range(0, len(chunk) - batch_size + 1, batch_size)
                )
            rng.shuffle(pending)
        rows = [data[i] for i in pending.pop()]
        s = max(len(r[0]) for r in rows)
        ids = torch.full((batch_size, s), pad_id, dtype=torch.long)
        at = torch.zeros(batch_size, s, dtype=torch.bool)
        for i, (tok, mask) in enumerate(rows):
            ids[i, : len(tok)] = torch.tensor(tok)
            at[i, : len(tok) - 1] = torch.tensor(mask[1:], dtype=torch.bool)  # position t predicts t + 1
        targets = ids[:, 1:][at[:, :-1]]
        yield ids, at, targets


def demo_config(num_ranks: int | None = None, arch: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `demo` preset's HF config (optionally with fields overridden, e.g. a toy size for tests)."""
    cfg = dict(PRESETS["demo"]) | (arch or {})
    if num_ranks is not None and num_ranks + 256 != cfg["vocab_size"]:
        raise ValueError(f"{num_ranks} ranks do not fit vocab_size {cfg['vocab_size']}")
    return cfg


def hf_tensors(model: K2Model) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's tensors under the names real K2 checkpoints use (routed experts split per expert)."""
    for name, t in model.state_dict().items():
        if name.endswith("experts.w13"):
            prefix = "model." + name.removesuffix("w13")
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                yield f"{prefix}{e}.gate_proj.weight", t[e, :inter]
                yield f"{prefix}{e}.up_proj.weight", t[e, inter:]
        elif name.endswith("experts.w2"):
            prefix = "model." + name.removesuffix("w2")
            for e in range(t.shape[0]):
                yield f"{prefix}{e}.down_proj.weight", t[e]
        else:
            yield (name if name.startswith("lm_head") else "model." + name), t


def save_checkpoint(model: K2Model, cfg: dict[str, Any], out: Path, dtype: torch.dtype) -> None:
    """model.safetensors (+ index), config.json and generation_config.json in `out`. The router's
    correction bias stays fp32, as in real checkpoints."""
    tensors = {
        n: (t if n.endswith("e_score_correction_bias") else t.to(dtype)).contiguous().clone()
        for n, t in hf_tensors(model)
    }
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict.fromkeys(tensors, "model.safetensors")}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    cfg = dict(cfg) | {"torch_dtype": str(dtype).removeprefix("torch.")}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = {
        "bos_token_id": cfg["bos_token_id"],
        "eos_token_id": cfg["eos_token_id"],
        "pad_token_id": cfg["pad_token_id"],
        "do_sample": False,
        "max_length": cfg["max_position_embeddings"],
    }
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))


def write_demo_tokenizer(out: Path, samples: list[Sample], num_ranks: int) -> KimiTokenizer:
    """Train the ranks on the rendered samples and write the tokenizer files; returns the tokenizer."""
    write_tokenizer_files(out, train_demo_ranks(corpus_text(samples), num_ranks))
    return load_tokenizer(out)


def train_demo(cfg: TrainConfig, log: Callable[[str], None] = print) -> Path:
    """Generate, tokenize, train and write the demo checkpoint to `cfg.out_dir`; returns the directory."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = demo_config(arch=cfg.arch)
    t0 = time.perf_counter()
    samples = training_samples(cfg.num_samples, cfg.seed, cfg.kind_weights, cfg.varied_phrasings)
    if cfg.init_from is None:
        tok = write_demo_tokenizer(out, samples[: min(len(samples), 4000)], hf["vocab_size"] - 256)
    else:
        for name in ("tiktoken.model", "tokenizer_config.json"):
            shutil.copyfile(Path(cfg.init_from) / name, out / name)
        tok = load_tokenizer(out)
    data = [render_sample(tok, s) for s in samples]
    lengths = [len(d[0]) for d in data]
    log(
        f"{len(data)} samples, {sum(lengths)} tokens (mean {sum(lengths) / len(data):.0f}, max {max(lengths)}), "
        f"{sum(sum(d[1]) for d in data)} trained; data in {time.perf_counter() - t0:.1f}s"
    )
    config = ModelConfig.from_dict(hf)
    model = build_model(config, cfg.seed)
    if cfg.init_from is not None:
        state = torch.load(Path(cfg.init_from) / "train_state_fp32.pt", weights_only=True)
        model.load_state_dict(state)
        log(f"continuing from {cfg.init_from}")
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f}M parameters")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, frac))))

    loads = _RouterLoads(model)
    is_digit = digit_token_mask(tok, hf["vocab_size"])
    # Loss on digit targets alone (the part that needs copying), averaged over the last log_every steps:
    # the overall loss hides it (most assistant tokens are format tokens the model already predicts).
    digit_losses: list[float] = []
    rows = ["step,loss,lr,tokens,seconds,digit_loss"]
    t_start = time.perf_counter()
    tokens = 0
    it = batches(data, cfg.batch_size, tok.pad_id, cfg.seed)
    model.train()
    step = 0
    for step in range(cfg.steps):
        ids, at, targets = next(it)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        per_token = F.cross_entropy(train_forward(model, ids, at), targets, reduction="none")
        loss = per_token.mean()
        digits = is_digit[targets]
        digit_loss = float(per_token[digits].detach().mean()) if bool(digits.any()) else float("nan")
        if digit_loss == digit_loss:
            digit_losses.append(digit_loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        imbalance = loads.update(cfg.bias_rate)
        tokens += ids.numel()
        elapsed = time.perf_counter() - t_start
        rows.append(f"{step + 1},{loss.item():.5f},{lr_at(step):.6f},{tokens},{elapsed:.1f},{digit_loss:.5f}")
        if (step + 1) % cfg.log_every == 0 or step == 0:
            recent = digit_losses[-cfg.log_every :]
            log(
                f"step {step + 1}/{cfg.steps} loss {loss.item():.4f} "
                f"digit loss {sum(recent) / max(1, len(recent)):.4f} lr {lr_at(step):.2e} "
                f"{tokens / elapsed:.0f} tok/s max/mean expert load {imbalance:.2f} {elapsed / 60:.1f} min"
            )
        if cfg.max_minutes is not None and elapsed > cfg.max_minutes * 60:
            log(f"stopping at step {step + 1}: {cfg.max_minutes} minutes reached")
            break
    (out / "train_loss.csv").write_text("\n".join(rows) + "\n")
    save_checkpoint(model, hf, out, torch.bfloat16)
    if cfg.keep_fp32:
        torch.save(model.state_dict(), out / "train_state_fp32.pt")
    log(f"wrote {out} after {step + 1} steps in {(time.perf_counter() - t_start) / 60:.1f} min")
    return out
