"""k2serve against llama.cpp on the same weights (issue 16 item 4).

    python benchmarks/bench_llamacpp.py build      # once: fetch llama.cpp (from the llama-cpp-python sdist), build it
    python benchmarks/bench_llamacpp.py convert    # the `small` checkpoint -> tokenizer.json -> GGUF bf16/f32/Q4_0
    python benchmarks/bench_llamacpp.py verify     # same prompt of token ids: logits and greedy tokens agree?
    python benchmarks/bench_llamacpp.py rope-check # fp32 logits on tiny models: plain RoPE, DeepSeek-V3 YaRN, K2 YaRN
    python benchmarks/bench_llamacpp.py run        # decode and prefill tok/s, alternating rounds, medians

Everything lives in a cache directory outside the repository (--cache, default $K2SERVE_BENCH_CACHE or
~/.cache/k2serve-bench): the llama.cpp source (the `vendor/llama.cpp` of `pip download --no-binary :all:
llama-cpp-python`), its build (GGML_NATIVE, Release, only llama-bench, llama-batched-bench,
llama-quantize and the small greedy-ids tool `llamacpp_greedy.cpp` next to this file), the checkpoint and
the GGUF files. convert_hf_to_gguf.py of the same tree converts the checkpoint; it needs a Hugging Face
tokenizer.json, which `write_tokenizer_json` builds from the checkpoint's tiktoken ranks (same ids, same
merges, Kimi's split pattern).

Measurements (`run`): both engines get the same threads (torch.set_num_threads / llama `-t`), the same
random prompts' shape, and alternate: one k2serve round over all batch sizes, one llama.cpp round, and
so on. Decode throughput is B x n / (t(n+1 tokens) - t(1 token)) for k2serve (two timed generate calls
per round) and llama-batched-bench's S_TG (B x n over the time of the n decode steps after the prompt)
for llama.cpp; prefill is tokens / time-to-first-token at batch 1 against llama-bench's `pp`.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from k2serve.bench.engine import spread

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = Path(os.environ.get("K2SERVE_BENCH_CACHE", Path.home() / ".cache" / "k2serve-bench"))
SDIST_VERSION = "0.3.36"  # llama-cpp-python; its vendor/llama.cpp is the llama.cpp measured
LLAMA_TARGETS = ("llama-bench", "llama-batched-bench", "llama-quantize")
GREEDY_TOOL = "llama-k2serve-greedy"
NICE = ["nice", "-n", "10"]


def sh(argv: list[str], cwd: Path | None = None, capture: bool = False) -> str:
    """Run one of the build's or the benchmark's own commands (fixed argv, no shell). With `capture`,
    return its stdout and keep its log (stderr) unless it fails; a failure raises with the log's tail."""
    out = subprocess.run(argv, cwd=cwd, capture_output=capture, text=True, check=False)  # noqa: S603
    if out.returncode != 0:
        raise RuntimeError(
            f"{Path(argv[0]).name} ... exited {out.returncode}: {argv}\n{(out.stderr or '')[-3000:]}"
        )
    return out.stdout if capture else ""


# ---------------------------------------------------------------------------------------------- build


def llama_source(cache: Path, version: str = SDIST_VERSION) -> Path:
    """The llama.cpp source tree of the llama-cpp-python `version` sdist, downloaded and unpacked once."""
    root = cache / "src" / f"llama_cpp_python-{version}"
    src = root / "vendor" / "llama.cpp"
    if not (src / "CMakeLists.txt").exists():
        (cache / "src").mkdir(parents=True, exist_ok=True)
        sh(
            [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps"]
            + [f"llama-cpp-python=={version}", "-d", str(cache / "src")]
        )
        sh(["tar", "xzf", f"llama_cpp_python-{version}.tar.gz"], cwd=cache / "src")
    # The sdist keeps the submodule's `.git` file, which points at a gitdir the sdist lacks: llama.cpp's
    # build-info step then makes ninja regenerate build.ninja forever ("still dirty after 100 tries").
    (src / ".git").unlink(missing_ok=True)
    return src


def build(cache: Path, jobs: int = 2, version: str = SDIST_VERSION) -> Path:
    """Configure and build the benchmark tools once (nice, `jobs` parallel); returns the bin directory."""
    src = llama_source(cache, version)
    out = cache / "build"
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "build.ninja").exists():
        sh(
            NICE
            + ["cmake", "-S", str(src), "-B", str(out), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release"]
            + ["-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF"]
            + ["-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF"]
        )
    sh(NICE + ["cmake", "--build", str(out), "-j", str(jobs), "--target", *LLAMA_TARGETS])
    bindir = out / "bin"
    tool = bindir / GREEDY_TOOL
    cpp = HERE / "llamacpp_greedy.cpp"
    if not tool.exists() or tool.stat().st_mtime < cpp.stat().st_mtime:
        sh(
            NICE
            + ["g++", "-O2", "-std=c++17", str(cpp), "-o", str(tool)]
            + ["-I", str(src / "include"), "-I", str(src / "ggml" / "include"), "-L", str(bindir)]
            + ["-lllama", "-lggml", "-lggml-base", f"-Wl,-rpath,{bindir}"]
        )
    return bindir


# ------------------------------------------------------------------------------------ tokenizer.json


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the alphabet of byte-level BPE vocabularies
    (tokenizers' ByteLevel pre-tokenizer and llama.cpp's gpt2 vocab expect tokens written in it)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(keep, chars, strict=True)}


def bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """`token` split by byte-level BPE using only ranks below `max_rank` (tiktoken's merge rule: the
    adjacent pair whose concatenation has the lowest rank merges first). A token with rank r that comes
    out as exactly two parts is the merge of those two parts."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best: tuple[int, int] | None = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            break
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def tokenizer_json(ranks: dict[bytes, int], specials: dict[int, str], pattern: str) -> dict[str, Any]:
    """A Hugging Face `tokenizer.json` (byte-level BPE) with the ids of `ranks` and `specials`: the merges
    are recovered from the ranks (in rank order, so merge priority equals tiktoken's), the pre-tokenizer
    splits with `pattern` (isolated pieces) before the byte-level mapping."""
    b2u = bytes_to_unicode()

    def text(tok: bytes) -> str:
        return "".join(b2u[b] for b in tok)

    vocab = {text(tok): rank for tok, rank in ranks.items()}
    if len(vocab) != len(ranks):
        raise ValueError("two ranks map to the same byte-level string")
    merges: list[list[str]] = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) > 1:
            parts = bpe_parts(ranks, tok, rank)
            if len(parts) == 2:
                merges.append([text(parts[0]), text(parts[1])])
    added = [
        {
            "id": i,
            "content": name,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, name in sorted(specials.items())
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            ],
        },
        "post_processor": None,
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": False,
            "use_regex": False,
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


def read_tiktoken(path: Path) -> dict[bytes, int]:
    """A `tiktoken.model` file (base64 token, space, rank per line) as bytes -> rank."""
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(path.read_text(encoding="ascii").splitlines(), 1):
        if line.strip():
            tok, _, rank = line.partition(" ")
            if not rank.strip().isdigit():
                raise ValueError(f"{path}:{n}: expected '<base64> <rank>', got {line!r}")
            ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def write_tokenizer_json(checkpoint: Path, out_dir: Path) -> Path:
    """Write `tokenizer.json` + `tokenizer_config.json` (PreTrainedTokenizerFast) for the Kimi-format
    tokenizer of `checkpoint` (tiktoken.model + tokenizer_config.json) into `out_dir`; returns the json."""
    from k2serve.chat.vocab import PAT_STR

    ranks = read_tiktoken(checkpoint / "tiktoken.model")
    config = json.loads((checkpoint / "tokenizer_config.json").read_text(encoding="utf-8"))
    specials = {int(i): entry["content"] for i, entry in config["added_tokens_decoder"].items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "tokenizer.json"
    path.write_text(
        json.dumps(tokenizer_json(ranks, specials, PAT_STR), ensure_ascii=False), encoding="utf-8"
    )
    fast = {k: v for k, v in config.items() if k != "tokenizer_class"} | {
        "tokenizer_class": "PreTrainedTokenizerFast"
    }
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(fast, ensure_ascii=False, indent=2), encoding="utf-8"
    )
    return path


# ----------------------------------------------------------------------------------------- convert


def hf_dir_for_convert(checkpoint: Path, out_dir: Path) -> Path:
    """A directory convert_hf_to_gguf.py reads: the checkpoint's weights and configs (linked) and the
    tokenizer.json written for it (the checkpoint's own tokenizer is tiktoken, which the converter's
    DeepseekV3 path does not read). config.json is a copy with `model_type` "deepseek_v3": the converter
    picks its model class by `architectures`, but loads the tokenizer through transformers' AutoTokenizer,
    which resolves the config first and does not know "kimi_k2"."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config = json.loads((checkpoint / "config.json").read_text()) | {"model_type": "deepseek_v3"}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    for f in checkpoint.iterdir():
        if f.suffix in (".safetensors", ".json") and f.name not in ("tokenizer_config.json", "config.json"):
            link = out_dir / f.name
            if not link.exists():
                link.symlink_to(f.resolve())
    write_tokenizer_json(checkpoint, out_dir)
    return out_dir


def _convert_in_process(src: Path, argv: list[str]) -> None:
    """Run llama.cpp's convert_hf_to_gguf.py (with the gguf-py of the same tree) on `argv`.

    The converter names the BPE pre-tokenizer by hashing the tokens of a fixed text and refuses any
    tokenizer it does not know; a preset's vocabulary is new to it, so an unknown hash is named
    "kimi-k2", the split rule this tokenizer uses (llama.cpp then applies Kimi's pattern)."""
    sys.path[:0] = [str(src / "gguf-py"), str(src)]
    import conversion.base as base  # type: ignore[import-not-found]  # llama.cpp's tree, on sys.path above

    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self: Any, tokenizer: Any) -> str:
        try:
            return str(original(self, tokenizer))
        except NotImplementedError:
            return "kimi-k2"

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    import convert_hf_to_gguf  # type: ignore[import-not-found]

    sys.argv = ["convert_hf_to_gguf.py", *argv]
    convert_hf_to_gguf.main()


@dataclass
class Paths:
    """Where `convert` puts things under the cache, and where `verify` / `run` find them."""

    cache: Path
    preset: str = "small"

    @property
    def checkpoint(self) -> Path:
        return self.cache / "models" / f"{self.preset}-bf16"

    @property
    def checkpoint_int4(self) -> Path:
        return self.cache / "models" / f"{self.preset}-int4"

    @property
    def checkpoint_int4_all(self) -> Path:
        return self.cache / "models" / f"{self.preset}-int4-all"

    @property
    def hf_dir(self) -> Path:
        return self.cache / "models" / f"{self.preset}-hf-for-gguf"

    def gguf(self, kind: str) -> Path:
        return self.cache / "models" / f"{self.preset}-{kind}.gguf"

    @property
    def bindir(self) -> Path:
        return self.cache / "build" / "bin"


# llama-quantize arguments per quantised GGUF kind (from the bf16 GGUF): plain Q4_0 (llama.cpp's own
# recipe: every matrix Q4_0 but the output head, as the table measured), and Q4_0 on the routed
# experts only with bf16 elsewhere, the split of k2serve's INT4-experts checkpoint (also 4-bit symmetric
# groups of 32 with one scale each).
QUANTIZE_ARGS: dict[str, list[str]] = {
    "q4_0": ["Q4_0"],
    "q4_0-experts": [
        "--tensor-type",
        "ffn_gate_exps=q4_0",
        "--tensor-type",
        "ffn_up_exps=q4_0",
        "--tensor-type",
        "ffn_down_exps=q4_0",
        "BF16",
    ],
}
GGUF_KINDS = ("bf16", "f32", *QUANTIZE_ARGS)
# k2serve's checkpoint for each quantised kind: INT4 (compressed-tensors, symmetric groups of 32) on every
# linear layer but the router for Q4_0 (lm_head too, where llama.cpp keeps its output head at Q6_K), on
# the routed experts only for Q4_0-experts (K2's own split).
INT4_CHECKPOINTS: dict[
    str, tuple[Callable[[Paths], Path], str]
] = {  # kind -> (its path, write_checkpoint quant)
    "q4_0": (lambda p: p.checkpoint_int4_all, "int4-all"),
    "q4_0-experts": (lambda p: p.checkpoint_int4, "int4"),
}
# GGUF kinds timed without llama.cpp's CPU weight repacking: with it, plain Q4_0 of `small` (every matrix,
# the token embedding too) aborts in the backend scheduler (ggml-backend.cpp: GGML_ASSERT(*cur_backend_id
# != -1), llama-cpp-python 0.3.36's llama.cpp); Q4_0 on the experts only runs with it.
NO_REPACK = {"q4_0"}


def convert(paths: Paths, kinds: Sequence[str]) -> None:
    """Write the checkpoints (bf16, and the INT4 one of each Q4_0 kind asked for) and the GGUF `kinds`
    (bf16, f32: converted; q4_0, q4_0-experts: llama-quantize of the bf16 GGUF)."""
    from k2serve.model.checkpoint import write_checkpoint

    quantised = [k for k in kinds if k in QUANTIZE_ARGS]
    if not (paths.checkpoint / "config.json").exists():
        print(f"writing the {paths.preset} checkpoint (bf16) to {paths.checkpoint}", flush=True)
        write_checkpoint(paths.checkpoint, paths.preset, seed=0)
    hf_dir_for_convert(paths.checkpoint, paths.hf_dir)
    src = llama_source(paths.cache)
    for kind in ("bf16", "f32"):
        if (kind in kinds or (kind == "bf16" and quantised)) and not paths.gguf(kind).exists():
            sh(
                NICE
                + [sys.executable, __file__, "_convert", "--src", str(src), "--"]
                + [str(paths.hf_dir), "--outtype", kind, "--outfile", str(paths.gguf(kind))]
            )
    for kind in quantised:  # k2serve's side of each: the same random weights, quantised as llama.cpp's kind
        path, quant = INT4_CHECKPOINTS[kind]
        ckpt = path(paths)
        if not (ckpt / "config.json").exists():
            print(f"writing the {paths.preset} checkpoint ({quant}) to {ckpt}", flush=True)
            write_checkpoint(ckpt, paths.preset, seed=0, quant=quant)
    for kind in quantised:
        if not paths.gguf(kind).exists():
            quantize = [str(paths.bindir / "llama-quantize"), *QUANTIZE_ARGS[kind][:-1]]
            sh(NICE + quantize + [str(paths.gguf("bf16")), str(paths.gguf(kind)), QUANTIZE_ARGS[kind][-1]])


# ------------------------------------------------------------------------------------------ verify


def llama_greedy(
    paths: Paths, gguf: Path, prompt: list[int], n: int, threads: int, kv_type: str = "f16"
) -> tuple[list[int], Any]:
    """llama.cpp's greedy tokens after `prompt` and the logits of the prompt's last position (KV cache in
    `kv_type`, f16 or f32)."""
    import numpy as np

    logits_file = paths.cache / "llama-logits.f32"
    out = sh(
        [str(paths.bindir / GREEDY_TOOL), str(gguf), str(n), str(threads), str(logits_file)]
        + [",".join(map(str, prompt)), kv_type],
        capture=True,
    )
    line = next(ln for ln in out.splitlines() if ln.startswith("greedy:"))
    return [int(t) for t in line.split()[1:]], np.fromfile(logits_file, dtype=np.float32)


def k2serve_greedy(checkpoint: Path, prompt: list[int], n: int, dtype_name: str) -> tuple[list[int], Any]:
    """k2serve's greedy tokens (the reference model, full forward per step) and the last position's logits."""
    import torch

    from k2serve.model.loader import load_model

    model = load_model(checkpoint, getattr(torch, dtype_name))
    ids = list(prompt)
    first = None
    for _ in range(n):
        logits = model(torch.tensor([ids]))[0, -1]
        first = logits if first is None else first
        ids.append(int(logits.argmax()))
    assert first is not None
    return ids[len(prompt) :], first.numpy()


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two greedy sequences share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def verify(paths: Paths, prompt_len: int, n: int, threads: int) -> list[dict[str, Any]]:
    """Same prompt of token ids through both engines: f32 GGUF against k2serve fp32 (the converted model
    is the same function: logits agree to rounding, greedy tokens agree), bf16 against bf16."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(0, 32000, prompt_len)]
    rows = []
    for kind, dtype_name in (("f32", "float32"), ("bf16", "bfloat16")):
        if not paths.gguf(kind).exists():
            print(f"verify: {paths.gguf(kind)} is missing (run `convert --kinds {kind}`); skipped")
            continue
        ours, ours_logits = k2serve_greedy(paths.checkpoint, prompt, n, dtype_name)
        theirs, their_logits = llama_greedy(
            paths, paths.gguf(kind), prompt, n, threads, "f32" if kind == "f32" else "f16"
        )
        diff = np.abs(ours_logits.astype(np.float64) - their_logits.astype(np.float64))
        row = {
            "gguf": kind,
            "k2serve_dtype": dtype_name,
            "max_abs_logit_diff": float(diff.max()),
            "logit_scale": float(np.abs(ours_logits).max()),
            "top1_equal": int(ours_logits.argmax()) == int(their_logits.argmax()),
            "greedy_common_prefix": common_prefix(ours, theirs),
            "n": n,
            "k2serve_tokens": ours,
            "llama_tokens": theirs,
        }
        rows.append(row)
        print(
            f"{kind} GGUF vs k2serve {dtype_name}: max |logit diff| {row['max_abs_logit_diff']:.3g} "
            f"(logits up to {row['logit_scale']:.3g}), top-1 equal: {row['top1_equal']}, "
            f"greedy tokens equal for {row['greedy_common_prefix']}/{n}",
            flush=True,
        )
    return rows


def rope_variants() -> dict[str, dict[str, Any]]:
    """`tiny` with every routed expert active (no top-k choice, so no near-tie can flip a routing) and
    three position schemes: plain RoPE, DeepSeek-V3's YaRN (theta 1e4, factor 40, beta 32/1) and K2's
    YaRN (theta 5e4, factor 64, beta 1/1, as `small` has)."""
    from k2serve.model.presets import K2_POSITIONS, PRESETS

    all_experts = {"num_experts_per_tok": 16, "n_group": 1, "topk_group": 1}
    tiny = {k: v for k, v in PRESETS["tiny"].items() if k != "rope_scaling"} | all_experts
    dsv3 = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0}
    dsv3 |= {"beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
    return {
        "plain-rope": tiny | {"max_position_embeddings": 4096},
        "deepseek-v3-yarn": tiny
        | {"max_position_embeddings": 163840, "rope_theta": 10000.0, "rope_scaling": dsv3},
        "k2-yarn": tiny | K2_POSITIONS,
    }


def rope_check(paths: Paths, lengths: Sequence[int], threads: int) -> dict[str, list[float]]:
    """Max |logit difference| between llama.cpp (f32 GGUF, f32 KV, no flash attention) and k2serve (fp32)
    at the last position of prompts of `lengths` tokens, for each of `rope_variants`. Position 0 checks
    everything but attention scores (one key: softmax is 1); later positions add the scores and RoPE."""
    import numpy as np
    import torch

    from k2serve.model.checkpoint import write_checkpoint
    from k2serve.model.loader import load_model

    torch.set_num_threads(threads)
    src = llama_source(paths.cache)
    prompt = list(range(100, 100 + 60 * max(lengths), 60))
    out: dict[str, list[float]] = {}
    for name, cfg in rope_variants().items():
        ckpt, gguf = paths.cache / "rope-check" / name, paths.cache / "rope-check" / f"{name}.gguf"
        if not (ckpt / "config.json").exists():
            write_checkpoint(ckpt, cfg, seed=0)
        if not gguf.exists():
            hf = hf_dir_for_convert(ckpt, paths.cache / "rope-check" / f"{name}-hf")
            sh(
                NICE
                + [sys.executable, __file__, "_convert", "--src", str(src), "--"]
                + [str(hf), "--outtype", "f32", "--outfile", str(gguf)],
                capture=True,
            )
        ours = load_model(ckpt, torch.float32)(torch.tensor([prompt]))[0].numpy()
        out[name] = []
        for n in lengths:
            _, theirs = llama_greedy(paths, gguf, prompt[:n], 1, threads, "f32")
            out[name].append(float(np.abs(ours[n - 1] - theirs).max()))
        print(
            f"{name}: max |logit diff| at "
            + ", ".join(f"{n} tokens {d:.2g}" for n, d in zip(lengths, out[name], strict=True)),
            flush=True,
        )
    return out


# --------------------------------------------------------------------------------------------- run


def decode_throughput(batch: int, n: int, t_one: float, t_n_plus_one: float) -> float:
    """Generation tokens/s of a batch: B x n / (t(n+1 tokens) - t(1 token)), i.e. the n decode steps
    alone, with the prefill (and its first token) subtracted."""
    if batch < 1 or n < 1:
        raise ValueError(f"batch and n must be >= 1, got batch={batch}, n={n}")
    if t_n_plus_one <= t_one:
        raise ValueError(f"t(n+1)={t_n_plus_one} must exceed t(1)={t_one}")
    return batch * n / (t_n_plus_one - t_one)


def parse_jsonl(text: str) -> list[dict[str, Any]]:
    """The JSON objects among a tool's output lines (llama-batched-bench mixes them with log lines)."""
    return [json.loads(ln) for ln in text.splitlines() if ln.startswith("{")]


class K2Round:
    """k2serve's side: one engine per checkpoint, built once and warmed up, timed per round."""

    def __init__(
        self,
        checkpoint: Path,
        max_batch: int,
        max_prompt: int,
        compile: str = "none",
        warm: Sequence[tuple[int, int, int]] = (),
    ) -> None:
        """`compile` "decode": the captured decode step, its buckets compiled before any timing by
        generating each of `warm` (batch, prompt tokens, new tokens) once."""
        import torch

        from k2serve.bench.engine import make_llm
        from k2serve.engine.sampling_params import SamplingParams

        self.params = SamplingParams
        self.llm = make_llm(checkpoint, max_batch, max_prompt, torch.bfloat16, compile)
        self._timed([[1] * 16] * 2, 4)  # warm-up
        for batch, prompt, new in warm:
            t = time.perf_counter()
            self._timed([[1] * prompt] * batch, new)
            print(f"[k2serve] warm-up batch {batch}: {time.perf_counter() - t:.1f} s", flush=True)

    def _timed(self, prompts: list[list[int]], max_tokens: int) -> float:
        p = self.params(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        t = time.perf_counter()
        outs = self.llm.generate(prompts, p)
        dt = time.perf_counter() - t
        assert all(len(o.token_ids) == max_tokens for o in outs)
        return dt

    def decode(self, prompts: list[list[int]], n: int, tries: int = 3) -> float:
        """B x n / (t(n+1) - t(1)); on a noisy host t(n+1) can come out below t(1) for small n, so the
        pair is retimed (up to `tries` times) before giving up."""
        for attempt in range(tries):
            t_one, t_more = self._timed(prompts, 1), self._timed(prompts, n + 1)
            if t_more > t_one or attempt == tries - 1:
                break
        return decode_throughput(len(prompts), n, t_one, t_more)

    def prefill(self, prompt: list[int]) -> float:
        return len(prompt) / self._timed([prompt], 1)


def llama_decode(
    bindir: Path,
    gguf: Path,
    batches: Sequence[int],
    prompt: int,
    n: int,
    threads: int,
    no_repack: bool = False,
) -> dict[int, float]:
    """llama-batched-bench's S_TG (generation tok/s) per batch size, one run over all of them."""
    ctx = max(batches) * (prompt + n) + 64
    out = sh(
        [str(bindir / "llama-batched-bench"), "-m", str(gguf), "-t", str(threads), "-tb", str(threads)]
        + ["-c", str(ctx), "-b", "2048", "-ub", "512", "-npp", str(prompt), "-ntg", str(n)]
        + ["-npl", ",".join(map(str, batches)), "--output-format", "jsonl"]
        + (["--no-repack"] if no_repack else []),
        capture=True,
    )
    rows = parse_jsonl(out)
    got = {int(r["pl"]): float(r["speed_tg"]) for r in rows}
    if set(got) != set(batches):
        raise RuntimeError(f"llama-batched-bench reported batches {sorted(got)}, wanted {list(batches)}")
    return got


def llama_prefill(bindir: Path, gguf: Path, prompt: int, threads: int, no_repack: bool = False) -> float:
    """llama-bench's prompt-processing tok/s (pp`prompt`, one repetition)."""
    out = sh(
        [str(bindir / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", str(prompt), "-n", "0"]
        + ["-r", "1", "-o", "json", "--repack", "0" if no_repack else "1"],
        capture=True,
    )
    return float(json.loads(out)[0]["avg_ts"])


def fmt(s: dict[str, float]) -> str:
    return f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})"


def run(
    paths: Paths,
    batches: Sequence[int],
    prompt: int,
    n: int,
    prefill: int,
    rounds: int,
    threads: int,
    q4: bool,
    skip_bf16: bool = False,
    compile: str = "none",
) -> list[dict[str, Any]]:
    """Alternating rounds of k2serve and llama.cpp; returns one row per (weights, measurement)."""
    import torch

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 32000, (max(batches), prompt), generator=gen).tolist()
    long_prompt = torch.randint(0, 32000, (prefill,), generator=gen).tolist()
    # (k2serve's checkpoint, the GGUFs of llama.cpp it is compared with)
    pairs: list[tuple[str, Path, list[str]]] = [] if skip_bf16 else [("bf16", paths.checkpoint, ["bf16"])]
    if q4:
        pairs.append(("INT4 experts", paths.checkpoint_int4, ["q4_0-experts"]))
        pairs.append(("INT4 all", paths.checkpoint_int4_all, ["q4_0"]))
    rows: list[dict[str, Any]] = []
    for label, ckpt, kinds in pairs:
        warm = [(b, prompt, n + 1) for b in batches] if compile != "none" else []
        ours_engine = K2Round(ckpt, max(batches), max(prompt, prefill), compile, warm)
        ours: dict[str, list[float]] = {}
        theirs: dict[tuple[str, str], list[float]] = {}
        for r in range(rounds):
            for b in batches:
                ours.setdefault(f"decode batch {b}", []).append(ours_engine.decode(prompts[:b], n))
            ours.setdefault(f"prefill {prefill}", []).append(ours_engine.prefill(long_prompt))
            for kind in kinds:
                gguf = paths.gguf(kind)
                for b, v in llama_decode(
                    paths.bindir, gguf, batches, prompt, n, threads, kind in NO_REPACK
                ).items():
                    theirs.setdefault((kind, f"decode batch {b}"), []).append(v)
                pp = llama_prefill(paths.bindir, gguf, prefill, threads, kind in NO_REPACK)
                theirs.setdefault((kind, f"prefill {prefill}"), []).append(pp)
            print(
                f"[k2serve {label}] round {r + 1}/{rounds}: "
                + "; ".join(
                    f"{k}: k2serve {ours[k][-1]:.1f}, llama.cpp "
                    + ", ".join(f"{kind} {theirs[kind, k][-1]:.1f}" for kind in kinds)
                    for k in ours
                ),
                flush=True,
            )
        for kind in kinds:
            for key in ours:
                o, t = spread(ours[key]), spread(theirs[kind, key])
                rows.append(
                    {
                        "weights": f"k2serve {label} / llama.cpp {kind}",
                        "what": key,
                        "k2serve": o,
                        "llama.cpp": t,
                        "ratio": o["median"] / t["median"],
                        "k2serve_all": ours[key],
                        "llama_all": theirs[kind, key],
                    }
                )
        del ours_engine
        # The next engine's buckets compile into an empty dynamo cache: with the cache entries of two
        # earlier engines on the same `_forward` code, the third engine's batch-1 steps measured ~25%
        # slower (moe200m INT4 all: 186.6 tok/s as the third engine, 247.0 as the second, same build).
        torch._dynamo.reset()  # noqa: SLF001 - dynamo's public reset of its caches
    return rows


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The results as a markdown table: medians with (min-max) over rounds, and the median ratio."""
    lines = [
        "| weights | tok/s | llama.cpp | k2serve | k2serve / llama.cpp |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['weights']} | {r['what']} | {fmt(r['llama.cpp'])} | {fmt(r['k2serve'])} | {r['ratio']:.2f} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line: a subcommand (build, convert, verify, run) and its options."""

    def batch_list(text: str) -> list[int]:
        try:
            xs = [int(x) for x in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
        if not xs or min(xs) < 1:
            raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text!r}")
        return xs

    ap = argparse.ArgumentParser(
        prog="bench_llamacpp.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help="where llama.cpp, the checkpoints and GGUFs live"
    )
    ap.add_argument("--preset", default="small")
    ap.add_argument("--threads", type=int, default=2, help="threads for each engine (default 2)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="fetch and build llama.cpp once")
    b.add_argument("--jobs", type=int, default=2)
    b.add_argument("--version", default=SDIST_VERSION, help="llama-cpp-python sdist version")
    c = sub.add_parser("convert", help="checkpoint -> GGUF")
    c.add_argument(
        "--kinds", default=",".join(GGUF_KINDS), help=f"GGUF kinds to write: {', '.join(GGUF_KINDS)}"
    )
    v = sub.add_parser("verify", help="logits and greedy tokens of both engines on one prompt of ids")
    v.add_argument("--prompt-len", type=int, default=32)
    v.add_argument("--n", type=int, default=16)
    rc = sub.add_parser(
        "rope-check", help="fp32 logits of both engines on tiny models with three RoPE schemes"
    )
    rc.add_argument("--lengths", type=batch_list, default=[1, 2, 4, 8, 12])
    r = sub.add_parser("run", help="the timed comparison")
    r.add_argument("--batch-sizes", type=batch_list, default=[1, 8, 32])
    r.add_argument("--input-len", type=int, default=128, help="prompt tokens per sequence for decode")
    r.add_argument("--output-len", type=int, default=64, help="n: decode steps timed")
    r.add_argument("--prefill-len", type=int, default=512, help="prompt tokens for the prefill figure")
    r.add_argument("--rounds", type=int, default=3)
    r.add_argument(
        "--q4",
        action="store_true",
        help="also k2serve INT4 against llama.cpp Q4_0: every linear INT4 against Q4_0, INT4 experts "
        "against Q4_0 experts",
    )
    r.add_argument("--skip-bf16", action="store_true", help="only the INT4 / Q4_0 comparison (with --q4)")
    r.add_argument(
        "--compile",
        choices=("none", "decode"),
        default="none",
        help="k2serve's --compile: decode = the captured decode step (compiled before timing)",
    )
    r.add_argument("--json", type=Path, default=None, help="write the rows here")
    cv = sub.add_parser("_convert", help=argparse.SUPPRESS)
    cv.add_argument("--src", type=Path, required=True)
    cv.add_argument("rest", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    if args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    if args.cmd == "convert":
        kinds = args.kinds.split(",")
        bad = [k for k in kinds if k not in GGUF_KINDS]
        if bad:
            ap.error(f"--kinds: unknown {bad}; choose from {', '.join(GGUF_KINDS)}")
        args.kinds = kinds
    if args.cmd == "run" and args.skip_bf16 and not args.q4:
        ap.error("--skip-bf16 leaves nothing to run without --q4")
    if args.cmd == "run" and min(args.rounds, args.input_len, args.output_len, args.prefill_len) < 1:
        ap.error("--rounds, --input-len, --output-len and --prefill-len must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    paths = Paths(args.cache, args.preset)
    commands: dict[str, Callable[[], Any]] = {
        "build": lambda: print(f"built: {build(args.cache, args.jobs, args.version)}"),
        "convert": lambda: convert(paths, args.kinds),
        "verify": lambda: verify(paths, args.prompt_len, args.n, args.threads),
        "rope-check": lambda: rope_check(paths, args.lengths, args.threads),
        "_convert": lambda: _convert_in_process(args.src, [a for a in args.rest if a != "--"]),
    }
    if args.cmd in commands:
        commands[args.cmd]()
        return 0
    load = os.getloadavg()
    print(
        f"machine: {os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; threads={args.threads}; "
        f"k2serve --compile {args.compile}"
    )
    rows = run(
        paths,
        args.batch_sizes,
        args.input_len,
        args.output_len,
        args.prefill_len,
        args.rounds,
        args.threads,
        args.q4,
        args.skip_bf16,
        args.compile,
    )
    print()
    print(table(rows))
    if args.json:
        args.json.write_text(
            json.dumps({"load_average": load, "compile": args.compile, "rows": rows}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
