"""The K2 / DeepSeek-V3 causal LM: embeddings, decoder layers (MLA + dense or MoE MLP), final norm, lm_head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from k2serve.config import ModelConfig
from k2serve.model.layers import DenseMLP, RMSNorm, RotaryEmbedding
from k2serve.model.mla import MLA, AttentionBackend, CausalBackend
from k2serve.model.moe import MoE


class DecoderLayer(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        layer_idx: int,
        expert_ids: Sequence[int] | None,
        int4_group_size: int | None,
        dtype: torch.dtype,
        int4_layout: str = "ct",
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLA(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp: nn.Module
        if config.is_moe_layer(layer_idx):
            self.mlp = MoE(config, expert_ids, int4_group_size, dtype, int4_layout)
        else:
            self.mlp = DenseMLP(config.hidden_size, config.intermediate_size)

    def forward(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: AttentionBackend
    ) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, backend)
        return h + self.mlp(self.post_attention_layernorm(h))


class K2Model(nn.Module):
    """`model(input_ids [B, S]) -> logits [B, S, V]`: a full causal forward without a cache.

    `forward_hidden` is the general entry: any leading shape, explicit positions, and an attention
    backend (the engine passes one that reads and writes the paged latent cache).
    """

    def __init__(
        self,
        config: ModelConfig,
        expert_ids: Sequence[int] | None = None,
        int4_group_size: int | None = None,
        dtype: torch.dtype = torch.float32,
        int4_layout: str = "ct",
    ) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary = RotaryEmbedding(config)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, expert_ids, int4_group_size, dtype, int4_layout)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def forward_hidden(
        self, input_ids: torch.Tensor, positions: torch.Tensor, backend: AttentionBackend
    ) -> torch.Tensor:
        """input_ids, positions [*] -> final-normed hidden states [*, D]."""
        h = self.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, h.dtype)
        for layer in self.layers:
            h = layer(h, cos, sin, backend)
        return self.norm(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, absorbed: bool = False) -> torch.Tensor:
        b, s = input_ids.shape
        positions = torch.arange(s, device=input_ids.device).expand(b, s)
        return self.logits(self.forward_hidden(input_ids, positions, CausalBackend(absorbed)))
