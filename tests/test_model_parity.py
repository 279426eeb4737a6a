"""Acceptance of the model core: logits and greedy continuations equal transformers' DeepseekV3ForCausalLM,
at short prompts through the model and at a 4,500-token prompt through the engine (issue 15)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from k2serve.bench.long_context import LONG_BENCH_DIMS
from k2serve.config import ModelConfig
from k2serve.engine.config import EngineConfig
from k2serve.engine.llm_engine import LLMEngine
from k2serve.engine.sampling_params import SamplingParams
from k2serve.model.checkpoint import write_checkpoint
from k2serve.model.loader import load_model
from k2serve.model.presets import PRESETS


def random_config(seed: int, n_group: int, yarn: bool, dense_layers: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)

    def pick(*options: int) -> int:
        return options[int(torch.randint(len(options), (1,), generator=g))]

    n_experts = 4 * n_group * pick(1, 2)
    d = dict(PRESETS["tiny"]) | {
        "vocab_size": pick(300, 512),
        "hidden_size": pick(64, 96),
        "intermediate_size": pick(128, 160),
        "moe_intermediate_size": pick(32, 48),
        "num_hidden_layers": dense_layers + pick(1, 2),
        "first_k_dense_replace": dense_layers,
        "num_attention_heads": pick(2, 4),
        "q_lora_rank": pick(32, 48),
        "kv_lora_rank": pick(32, 64),
        "qk_nope_head_dim": pick(16, 32),
        "qk_rope_head_dim": pick(8, 16),
        "v_head_dim": pick(16, 24),
        "n_routed_experts": n_experts,
        "num_experts_per_tok": min(6, n_experts // 2),
        "n_group": n_group,
        "topk_group": max(1, n_group // 2),
        "routed_scaling_factor": 2.5,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 2,
        "max_position_embeddings": 4096,
    }
    if not yarn:
        d.pop("rope_scaling")
        d["rope_theta"] = 10000.0
    return d


CASES = [
    # (seed, n_group, yarn, dense layers)
    (1, 1, True, 1),
    (2, 2, True, 2),
    (3, 4, False, 1),
    (4, 1, False, 2),
]


def load_hf(model_dir: Path) -> Any:
    cfg = ModelConfig.from_file(model_dir)
    hf_cfg = transformers.DeepseekV3Config(**cfg.to_hf_dict())
    model = transformers.DeepseekV3ForCausalLM.from_pretrained(model_dir, config=hf_cfg, dtype=torch.float32)
    return model.eval()


def greedy(model: torch.nn.Module, prompt: torch.Tensor, n: int) -> list[int]:
    ids = prompt.clone()
    for _ in range(n):
        nxt = model(ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat((ids, nxt), dim=1)
    return ids[0, prompt.shape[1] :].tolist()


@pytest.mark.parametrize(("seed", "n_group", "yarn", "dense"), CASES)
def test_logits_and_greedy_match_transformers(
    tmp_path: Path, seed: int, n_group: int, yarn: bool, dense: int
) -> None:
    d = random_config(seed, n_group, yarn, dense)
    ckpt = write_checkpoint(tmp_path, d, seed=seed, dtype=torch.float32, tokenizer=False)
    ours = load_model(ckpt, torch.float32)
    hf = load_hf(ckpt)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, d["vocab_size"], (3, 40), generator=g)
    with torch.inference_mode():
        ref = hf(ids).logits.float()
        got = ours(ids)
        got_absorbed = ours(ids, absorbed=True)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 1e-4, f"relative logits error {rel:.2e}"
    assert ((got_absorbed - ref).norm() / ref.norm()).item() < 1e-4
    assert got.std() > 0.5, "logits are degenerate; the parity check would be meaningless"

    prompt = ids[:1, :12]
    with torch.inference_mode():
        hf.generation_config.eos_token_id = (
            None  # compare 64 raw greedy steps, no stopping or EOS suppression
        )
        hf.generation_config.max_length = None
        hf_out = hf.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=64,
            do_sample=False,
            pad_token_id=d["pad_token_id"],
        )[0, 12:]
        hf_out = hf_out.tolist()
        our_out = greedy(ours, prompt, 64)
    assert our_out == hf_out
    assert len(set(our_out)) > 4, "greedy output is degenerate"


LONG_PROMPT = 4500  # past K2's YaRN original_max_position_embeddings (4,096)
LONG_NEW_TOKENS = 16
LONG_CHUNK = 512  # max_num_batched_tokens: the prompt is prefilled in 9 chunks


@pytest.mark.slow
def test_long_prompt_through_engine_matches_transformers(tmp_path: Path) -> None:
    """A 4,500-token prompt on the `long` preset's positions (K2's YaRN: factor 64 over an original
    4,096, so positions past 4,096 are in the region YaRN extends to) and its dims cut as in the long-
    context tests (2 layers, dense + MoE), through k2serve's engine: chunked prefill (512-token chunks,
    each over a growing paged context), tiled attention (512-key tiles), decode splits merged by
    log-sum-exp. Against transformers' one full forward over prompt + the engine's tokens (sdpa, one
    softmax over the whole context):
    - greedy: at every step the engine's token is transformers' argmax given the same prefix, which by
      induction is the statement "transformers' greedy continuation equals the engine's";
    - logits: the engine's log-probabilities of every vocabulary entry (log_softmax of its logits, so
      the same up to each row's constant) within 1e-3 of transformers'. Both run in fp32; what differs
      is only the order of sums (chunks, tiles, splits, the absorbed decode), ~1e-5 here, while a
      wrong position, a wrong YaRN frequency or a lost chunk moves log-probabilities by O(1)."""
    config = PRESETS["long"] | LONG_BENCH_DIMS
    ckpt = write_checkpoint(tmp_path, config, seed=0, dtype=torch.float32, tokenizer=False)
    vocab = config["vocab_size"]
    prompt = torch.randint(0, vocab, (LONG_PROMPT,), generator=torch.Generator().manual_seed(0)).tolist()
    engine = LLMEngine.from_pretrained(
        ckpt,
        torch.float32,
        EngineConfig(
            num_kv_blocks=(LONG_PROMPT + LONG_NEW_TOKENS) // 16 + 1, max_num_batched_tokens=LONG_CHUNK
        ),
    )
    assert 8 * engine.runner.tiles.tile_tokens < LONG_PROMPT, "the prompt must span several attention tiles"
    params = SamplingParams(temperature=0.0, max_tokens=LONG_NEW_TOKENS, ignore_eos=True, logprobs=vocab)
    engine.add_request("long", prompt, params)
    steps, outs = 0, []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.finished]
        steps += 1
    assert steps == -(-LONG_PROMPT // LONG_CHUNK) + LONG_NEW_TOKENS - 1, "prefill was not chunked as asked"
    (out,) = outs
    got = torch.full((LONG_NEW_TOKENS, vocab), float("nan"))
    for i, lp in enumerate(out.logprobs):
        ids, values = zip(*lp.top, strict=True)
        got[i, list(ids)] = torch.tensor(values)

    hf = load_hf(ckpt)
    with torch.inference_mode():
        ids = torch.tensor([prompt + out.token_ids[:-1]])
        ref = hf(ids).logits[0, LONG_PROMPT - 1 :].float().log_softmax(-1)  # [new tokens, V]
    assert ref.argmax(-1).tolist() == out.token_ids
    assert len(set(out.token_ids)) > 4, "greedy output is degenerate"
    assert ref.std(-1).min() > 0.5, "logits are degenerate; the parity check would be meaningless"
    err = (got - ref).abs().max().item()  # a NaN (a token the engine did not report) fails too
    print(f"{LONG_PROMPT}-token prompt: max |log-prob error| vs transformers {err:.2e}")
    assert err < 1e-3, f"max |log-prob error| {err:.2e}"


def test_absorbed_equals_expanded_attention() -> None:
    cfg = ModelConfig.from_dict(random_config(7, 2, True, 1))
    from k2serve.model.mla import MLA

    torch.manual_seed(0)
    mla = MLA(cfg, 0)
    for p in mla.parameters():
        torch.nn.init.normal_(p, std=0.2)
    b, q, k, h = 2, 5, 9, cfg.num_attention_heads
    q_nope = torch.randn(b, q, h, cfg.qk_nope_head_dim)
    q_pe = torch.randn(b, q, h, cfg.qk_rope_head_dim)
    kv = torch.randn(b, k, cfg.kv_cache_dim)
    mask = torch.rand(b, q, k) > 0.3
    mask[..., 0] = True
    a = mla.attend_expanded(q_nope, q_pe, kv, mask)
    c = mla.attend_absorbed(q_nope, q_pe, kv, mask)
    assert a.shape == (b, q, h, cfg.v_head_dim)
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
