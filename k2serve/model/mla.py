"""Multi-head Latent Attention (MLA).

Per token the layer caches only the latent: norm(c_kv) (kv_lora_rank values) followed by the rotated
shared k_pe (qk_rope_head_dim values) -- `kv_cache_dim` = 576 for K2. Two ways to attend over it:

- expanded (prefill): k_nope, v = kv_b_proj(c_kv) per head; scores over 192-dim heads;
- absorbed (decode): W_UK is folded into the query and W_UV applied after the softmax, so attention
  runs directly over the 512-dim latent and the cache is never expanded.

Both compute the same function; tests assert it.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from k2serve.config import ModelConfig
from k2serve.model.layers import RMSNorm, apply_rope


class AttentionBackend(Protocol):
    """Given one layer's projections, return the attention output [*, H, v_head_dim].

    `latent` is what the cache stores for the tokens being processed; a cached backend writes it and
    attends over everything the sequence has cached so far.
    """

    def __call__(
        self, mla: MLA, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor
    ) -> torch.Tensor: ...


class MLA(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.kv_rank = config.kv_lora_rank
        self.softmax_scale = config.softmax_scale
        h, qk = config.hidden_size, config.qk_head_dim
        self.q_lora_rank = config.q_lora_rank
        if config.q_lora_rank:
            self.q_a_proj = nn.Linear(h, config.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, 1e-6)
            self.q_b_proj = nn.Linear(config.q_lora_rank, self.n_heads * qk, bias=False)
        else:
            self.q_proj = nn.Linear(h, self.n_heads * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, self.kv_rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, 1e-6)
        self.kv_b_proj = nn.Linear(self.kv_rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, h, bias=False)

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [*, D] -> q_nope [*, H, dn], rotated q_pe [*, H, dr], latent [*, kv_rank + dr]."""
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora_rank else self.q_proj(x)
        q = q.unflatten(-1, (self.n_heads, self.nope_dim + self.rope_dim))  # [*, H, dn + dr]
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_pe = apply_rope(q_pe, cos.unsqueeze(-2), sin.unsqueeze(-2))
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope_dim], dim=-1)
        latent = torch.cat((self.kv_a_layernorm(c_kv), apply_rope(k_pe, cos, sin)), dim=-1)  # [*, C + dr]
        return q_nope, q_pe, latent

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: AttentionBackend
    ) -> torch.Tensor:
        q_nope, q_pe, latent = self.project(x, cos, sin)
        out = backend(self, q_nope, q_pe, latent)  # [*, H, dv]
        return self.o_proj(out.flatten(-2))

    # ---- attention over a latent context ---------------------------------------------------------
    def absorb_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, dn, C] and W_UV [H, dv, C]: views of kv_b_proj's weight."""
        w = self.kv_b_proj.weight.view(
            self.n_heads, self.nope_dim + self.v_dim, self.kv_rank
        )  # [H, dn+dv, C]
        return w[:, : self.nope_dim], w[:, self.nope_dim :]  # W_UK [H, dn, C], W_UV [H, dv, C]

    def _softmax(self, scores: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        if mask is not None:
            scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))  # mask [B, Q, K] -> [B, 1, Q, K]
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)

    def attend_expanded(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """q_* [B, Q, H, *], kv [B, K, C + dr], mask [B, Q, K] (True = may attend) -> [B, Q, H, dv]."""
        c_kv, k_pe = kv.split([self.kv_rank, self.rope_dim], dim=-1)
        kvb = self.kv_b_proj(c_kv).unflatten(
            -1, (self.n_heads, self.nope_dim + self.v_dim)
        )  # [B, K, H, dn+dv]
        k_nope, v = kvb.split([self.nope_dim, self.v_dim], dim=-1)
        scores = torch.einsum("bqhd,bkhd->bhqk", q_nope, k_nope) + torch.einsum("bqhr,bkr->bhqk", q_pe, k_pe)
        p = self._softmax(scores * self.softmax_scale, mask, q_nope.dtype)  # [B, H, Q, K]
        return torch.einsum("bhqk,bkhd->bqhd", p, v)

    def attend_absorbed(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Same contract as `attend_expanded`, computed over the latent without expanding it."""
        w_uk, w_uv = self.absorb_weights()
        c_kv, k_pe = kv.split([self.kv_rank, self.rope_dim], dim=-1)
        q_lat = torch.einsum("bqhd,hdc->bqhc", q_nope, w_uk)  # [B, Q, H, C]
        scores = torch.einsum("bqhc,bkc->bhqk", q_lat, c_kv) + torch.einsum("bqhr,bkr->bhqk", q_pe, k_pe)
        p = self._softmax(scores * self.softmax_scale, mask, q_nope.dtype)  # [B, H, Q, K]
        o_lat = torch.einsum("bhqk,bkc->bqhc", p, c_kv)  # [B, Q, H, C]
        return torch.einsum("bqhc,hdc->bqhd", o_lat, w_uv)


class CausalBackend:
    """No cache: each batch row attends causally over its own tokens (inputs [B, S, ...])."""

    def __init__(self, absorbed: bool = False) -> None:
        self.absorbed = absorbed

    def __call__(
        self, mla: MLA, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor
    ) -> torch.Tensor:
        s = q_nope.shape[1]
        mask = torch.ones(s, s, dtype=torch.bool, device=q_nope.device).tril().expand(q_nope.shape[0], s, s)
        attend = mla.attend_absorbed if self.absorbed else mla.attend_expanded
        return attend(q_nope, q_pe, latent, mask)
