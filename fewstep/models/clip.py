"""CLIP text transformer (Radford et al. 2021, "Learning Transferable Visual Models From Natural
Language Supervision"), the prompt encoder of Stable Diffusion 1.x / 2.x / SDXL.

Follows transformers' `CLIPTextModel` / `CLIPTextModelWithProjection` (modeling_clip.py): pre-LN
transformer, causal self-attention, learned position embeddings; attribute names are its state-dict
keys (`text_model.encoder.layers.{i}.self_attn.q_proj`, ...), so checkpoints load with `strict=True`.
No padding mask, as the SD pipelines call it: padding tokens sit after EOS and causal attention
keeps them from touching the tokens before.

Two transformers key quirks are absorbed by `fix_transformers_keys` (run as a load_state_dict
pre-hook, so `load_state_dict(hf_model.state_dict(), strict=True)` just works):
- checkpoints saved by transformers < 4.31 hold `text_model.embeddings.position_ids`, then a
  persistent buffer holding arange(77); it carries no information and is dropped. Positions here are
  simply the first L rows of the position embedding.
- transformers >= 5 saves a bare `CLIPTextModel` without the `text_model.` prefix
  (`embeddings.token_embedding.weight`); the prefix is added back.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import CLIPTextConfig


class CLIPTextOutput(NamedTuple):
    last_hidden_state: torch.Tensor  # [B, L, D] after the final LayerNorm (SD 1.x / 2.x context)
    penultimate: torch.Tensor  # [B, L, D] hidden_states[-2]: before the last layer, no final LN (SDXL)
    pooled: torch.Tensor  # [B, D] final-LN'd state at the EOS token
    text_embeds: torch.Tensor | None  # [B, projection_dim] text_projection(pooled), SDXL's add-embedding


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(input_ids) + self.position_embedding.weight[: input_ids.shape[1]]


class CLIPAttention(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = (p(x).view(B, L, self.num_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, heads, L, head_dim]
        return self.out_proj(y.transpose(1, 2).reshape(B, L, D))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.quick_gelu = cfg.hidden_act == "quick_gelu"  # OpenAI CLIP; OpenCLIP models use exact GELU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        x = x * torch.sigmoid(1.702 * x) if self.quick_gelu else F.gelu(x)
        return self.fc2(x)


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class CLIPTextTransformer(nn.Module):
    """The `text_model.` part of the checkpoint; its forward lives in CLIPTextModel."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


def fix_transformers_keys(state_dict: dict, prefix: str = "") -> None:
    """In place: drop the old `position_ids` buffer and restore the `text_model.` prefix (see module doc)."""
    for name in ("text_model.embeddings.position_ids", "embeddings.position_ids"):
        state_dict.pop(prefix + name, None)
    for key in [k for k in state_dict if k.startswith(prefix)]:
        if key[len(prefix):].split(".")[0] in ("embeddings", "encoder", "final_layer_norm"):
            state_dict[prefix + "text_model." + key[len(prefix):]] = state_dict.pop(key)


def _fix_keys_hook(module, state_dict, prefix, *_) -> None:
    fix_transformers_keys(state_dict, prefix)


class CLIPTextModel(nn.Module):
    """CLIP text encoder; with `cfg.projection_dim` set it is CLIPTextModelWithProjection."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.cfg = cfg
        self.text_model = CLIPTextTransformer(cfg)
        self.text_projection = (nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)
                                if cfg.projection_dim else None)
        self.register_load_state_dict_pre_hook(_fix_keys_hook)

    fix_keys = staticmethod(fix_transformers_keys)  # used by fewstep.loading.weights.build before its key check

    def run_layers(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Hidden states [B, L, D] through encoder layers [start:stop] (a part of forward, for
        training only some of them)."""
        for layer in self.text_model.encoder.layers[start:stop]:
            x = layer(x)
        return x

    def forward(self, input_ids: torch.Tensor, skip: int = 0) -> CLIPTextOutput:
        """`skip` > 0 (diffusers' `clip_skip`) moves the context `skip` layers up: last_hidden_state is
        the final LayerNorm of hidden_states[-(1 + skip)] and penultimate is hidden_states[-(2 + skip)];
        the pooled outputs always come from the whole model, as in diffusers."""
        tm, n = self.text_model, len(self.text_model.encoder.layers)
        penultimate = self.run_layers(tm.embeddings(input_ids), 0, n - 1 - skip)  # [B, L, D]
        chosen = self.run_layers(penultimate, n - 1 - skip, n - skip)
        x = tm.final_layer_norm(self.run_layers(chosen, n - skip))
        pooled = x[torch.arange(x.shape[0], device=x.device), self.eos_positions(input_ids)]  # [B, D]
        text_embeds = self.text_projection(pooled) if self.text_projection is not None else None
        return CLIPTextOutput(x if skip == 0 else tm.final_layer_norm(chosen), penultimate, pooled, text_embeds)

    def eos_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Where pooling reads, with transformers' exact rule: configs written before transformers
        PR #24773 say eos_token_id=2 and pool at the highest id (EOS, 49407, is the largest in the
        CLIP vocabulary); newer ones pool at the first EOS (the pad token may also be EOS)."""
        if self.cfg.eos_token_id == 2:
            return input_ids.argmax(dim=-1)
        return (input_ids == self.cfg.eos_token_id).int().argmax(dim=-1)
