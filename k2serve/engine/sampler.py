"""Turns a batch of next-token logits into tokens, one SamplingParams per row.

Order of operations per row (vLLM's): penalties from the generated tokens -> allowed mask ->
greedy rows take the argmax here; sampled rows go on: / temperature -> min_p -> top_k -> top_p
-> draw. The draw is the Gumbel-max trick, `argmax(logits + g)` with g = -log(-log(u)), which
samples exactly from softmax(logits) and needs one uniform per vocabulary entry. A seeded row
draws its uniforms from its own generator, so its tokens do not depend on the rest of the batch.
Everything else is batched tensor math; the only Python loops run over rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from k2serve.engine.sampling_params import SamplingParams

__all__ = [
    "Sampler",
    "SamplerError",
    "SamplerOutput",
    "TokenLogprobs",
    "make_generator",
    "skip_draw",
    "suppress_tokens",
]


class SamplerError(ValueError):
    """The sampler's inputs disagree (shapes, lengths) or leave a row with no allowed token."""


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probabilities for one sampled token, from log_softmax of the raw model logits.

    token_id / logprob: the sampled token and its log-probability.
    top: the `logprobs` most likely (token id, log-probability) pairs, most likely first.
    """

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(frozen=True)
class SamplerOutput:
    """token_ids: LongTensor [B]. logprobs: per row (None for rows that did not ask), or None if no row did."""

    token_ids: torch.Tensor
    logprobs: list[TokenLogprobs | None] | None


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    """The generator a request keeps for its whole life: seeded if params.seed is set, else None."""
    if params.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


def suppress_tokens(logits: torch.Tensor, rows: Sequence[int], token_ids: Sequence[int]) -> torch.Tensor:
    """Set logits[rows, token_ids] to -inf in place (e.g. EOS before min_tokens); returns `logits`."""
    if rows and token_ids:
        r = torch.as_tensor(rows, dtype=torch.long, device=logits.device)
        t = torch.as_tensor(token_ids, dtype=torch.long, device=logits.device)
        logits[r[:, None], t[None, :]] = float("-inf")
    return logits


class Sampler:
    """Stateless; one instance serves every step."""

    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        output_token_ids: Sequence[Sequence[int]],
        generators: Sequence[torch.Generator | None],
        allowed_mask: torch.Tensor | None = None,
    ) -> SamplerOutput:
        """Pick one token per row.

        logits: [B, V] raw model logits (any float dtype; computed in float32).
        params / output_token_ids / generators: one entry per row; output_token_ids are the tokens
            generated so far (penalties use these, not the prompt); generators come from
            `make_generator` and advance by one draw of V uniforms per sampled step.
        allowed_mask: optional BoolTensor [B, V], True where a token may be chosen.
        """
        batch, vocab = logits.shape
        if not len(params) == len(output_token_ids) == len(generators) == batch:
            raise SamplerError(
                f"{batch} logit rows but {len(params)} params, {len(output_token_ids)} outputs, "
                f"{len(generators)} generators"
            )
        device = logits.device
        raw = logits.float()  # [B, V]
        x = _masked(_apply_penalties(raw, params, output_token_ids), allowed_mask)

        greedy = torch.tensor([p.is_greedy for p in params], device=device)  # [B]
        token_ids = x.argmax(dim=-1)  # [B]
        if not bool(greedy.all()):
            sampled = _draw(_filter(x, params), params, generators)
            token_ids = torch.where(greedy, token_ids, sampled)
        return SamplerOutput(token_ids=token_ids, logprobs=_logprobs(raw, token_ids, params))

    def verify_draft(
        self,
        logits: torch.Tensor,
        params: SamplingParams,
        output_token_ids: Sequence[int],
        generator: torch.Generator | None,
        draft: int,
    ) -> tuple[SamplerOutput, bool]:
        """Speculative decoding: the token at a position whose draft is `draft`, and whether the draft
        was accepted. logits: [1, V] at that position; the rest as in `sample` for one row.

        Greedy: accepted iff the draft is the argmax, and the token is the argmax either way.
        Sampled (rejection sampling with a point-mass draft distribution q = 1[draft]): with p the
        distribution `sample` would draw from (penalties, temperature, min_p, top_k, top_p), accept
        with probability min(1, p(draft) / q(draft)) = p(draft); on rejection draw from p with the
        draft removed and renormalised, so the token is distributed exactly as p.
        """
        if params.is_greedy:
            out = self.sample(logits, [params], [output_token_ids], [generator])
            return out, int(out.token_ids[0]) == draft
        raw = logits.float()
        probs = _filter(_apply_penalties(raw, [params], [output_token_ids]), [params]).softmax(dim=-1)[0]
        probs = probs.cpu()
        u = torch.rand(1, generator=generator, device=generator.device if generator is not None else "cpu")
        if float(u) < float(probs[draft]):
            token, accepted = draft, True
        else:
            residual = probs.clone()
            residual[draft] = 0.0
            token = int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
            accepted = False
        token_ids = torch.tensor([token], device=logits.device)
        return SamplerOutput(token_ids=token_ids, logprobs=_logprobs(raw, token_ids, [params])), accepted


def _masked(logits: torch.Tensor, allowed_mask: torch.Tensor | None) -> torch.Tensor:
    """-inf where `allowed_mask` is False (checked against the logits' shape; no row may be empty)."""
    if allowed_mask is None:
        return logits
    if allowed_mask.shape != logits.shape:
        raise SamplerError(f"allowed_mask shape {tuple(allowed_mask.shape)} != logits {tuple(logits.shape)}")
    empty = (~allowed_mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise SamplerError(f"allowed_mask allows no token in rows {empty}")
    return logits.masked_fill(~allowed_mask, float("-inf"))


def _row_tensor(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)[:, None]  # [B, 1]


def _apply_penalties(
    logits: torch.Tensor, params: Sequence[SamplingParams], output_token_ids: Sequence[Sequence[int]]
) -> torch.Tensor:
    """OpenAI presence/frequency penalties and the multiplicative repetition penalty, from generated tokens.

    logit -= frequency_penalty * count + presence_penalty * (count > 0); then a seen token's
    logit is divided by repetition_penalty if positive, multiplied by it if not.
    """
    if all(
        p.presence_penalty == 0 and p.frequency_penalty == 0 and p.repetition_penalty == 1 for p in params
    ) or not any(output_token_ids):
        return logits
    batch, vocab = logits.shape
    device = logits.device
    width = max(len(t) for t in output_token_ids)
    # Pad with an extra column `vocab` that is dropped after counting.
    padded = torch.tensor([list(t) + [vocab] * (width - len(t)) for t in output_token_ids], device=device)
    counts = torch.zeros(batch, vocab + 1, device=device).scatter_add_(
        1, padded, torch.ones(padded.shape, device=device)
    )[:, :vocab]  # [B, V]
    seen = counts > 0
    freq = _row_tensor([p.frequency_penalty for p in params], device)
    pres = _row_tensor([p.presence_penalty for p in params], device)
    rep = _row_tensor([p.repetition_penalty for p in params], device)
    logits = logits - freq * counts - pres * seen.float()
    repeated = torch.where(logits > 0, logits / rep, logits * rep)
    return torch.where(seen, repeated, logits)


def _filter(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, then min_p, top_k and top_p as -inf masks; greedy rows pass through unscaled."""
    device = logits.device
    temperature = _row_tensor([1.0 if p.is_greedy else p.temperature for p in params], device)
    logits = logits / temperature  # [B, V]
    if all(p.min_p == 0 and p.top_k == 0 and p.top_p == 1 for p in params):
        return logits
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V]
    rank = torch.arange(vocab, device=device)[None, :]  # [1, V]
    probs = sorted_logits.softmax(dim=-1)
    min_p = _row_tensor([p.min_p for p in params], device)
    drop = probs < min_p * probs[:, :1]
    top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=device)[:, None]
    drop |= rank >= top_k
    # top_p over what min_p and top_k kept: drop a token once the mass before it reaches top_p.
    kept = probs.masked_fill(drop, 0.0)
    kept = kept / kept.sum(dim=-1, keepdim=True)
    top_p = _row_tensor([p.top_p if p.top_p < 1 else 2.0 for p in params], device)  # 2: never reached
    drop |= (kept.cumsum(dim=-1) - kept) >= top_p
    drop[:, 0] = False  # the most likely token always survives
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _draw(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> torch.Tensor:
    """One sample per row from softmax(logits) by Gumbel-max; seeded rows use their own generator."""
    batch, vocab = logits.shape
    u = torch.rand(batch, vocab, device=logits.device)  # [B, V], unseeded rows
    for row, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if gen is not None and not p.is_greedy:
            u[row] = _seeded_uniforms(vocab, gen).to(logits.device)
    gumbel = -torch.log(-torch.log(u))  # u = 0 gives -inf: never chosen
    return (logits + gumbel).argmax(dim=-1)


def _seeded_uniforms(vocab: int, generator: torch.Generator) -> torch.Tensor:
    """What a seeded row draws from its own generator per sampled step: [V] uniforms."""
    return torch.rand(vocab, generator=generator, device=generator.device)


def skip_draw(params: SamplingParams, generator: torch.Generator | None, vocab_size: int) -> None:
    """Advance a request's generator past one sampled step, as `Sampler.sample` would have: for a token
    sampled in another process from the same seed (a disaggregated prefill samples the first token),
    so the steps that follow draw what a single process would have drawn."""
    if generator is not None and not params.is_greedy:
        _seeded_uniforms(vocab_size, generator)


def _logprobs(
    raw: torch.Tensor, token_ids: torch.Tensor, params: Sequence[SamplingParams]
) -> list[TokenLogprobs | None] | None:
    """Per-row log-probabilities of the raw logits for rows with params.logprobs set."""
    wanted = [p.logprobs for p in params]
    if all(n is None for n in wanted):
        return None
    logp = raw.log_softmax(dim=-1)  # [B, V]
    chosen = logp.gather(1, token_ids[:, None])[:, 0].tolist()
    top = logp.topk(max(n for n in wanted if n is not None), dim=-1)  # [B, n_max]
    top_values, top_ids = top.values.tolist(), top.indices.tolist()
    ids = token_ids.tolist()
    return [
        None
        if n is None
        else TokenLogprobs(
            ids[row], chosen[row], list(zip(top_ids[row][:n], top_values[row][:n], strict=True))
        )
        for row, n in enumerate(wanted)
    ]
