"""Prompts -> the UNet's text conditioning: A1111's prompt language (`prompts`) through each text encoder,
as the model family's `TextConditioning` says.

Each prompt becomes chunks of the encoder's window (77 tokens: BOS, up to 75 tokens, EOS, padding); each
chunk is encoded on its own, its tokens' hidden states weighted by their attention and rescaled to keep
the mean (A1111's emphasis), and the chunks are concatenated along the token axis. Every prompt of a call
(the negative ones too) gets as many chunks as the longest, the missing ones the empty prompt's (A1111
pads the same way), so they stack. A plain prompt of up to 75 tokens is one chunk with weights 1: exactly
diffusers' conditioning. SDXL's pooled text is the last encoder's, from the first chunk.
"""

from __future__ import annotations

import torch

from .configs import TextConditioning
from .errors import FewstepError
from .prompts import Chunk, chunks


def prompt_chunks(tokenizers: list, prompts: list[str]) -> list[list[list[Chunk]]]:
    """[encoder][prompt] -> that prompt's chunks for that encoder's tokenizer."""
    return [[chunks(p, tok.ids, tok.bos_id, tok.eos_id, tok.pad_id, tok.max_length) for p in prompts]
            for tok in tokenizers]


def count(all_chunks: list[list[list[Chunk]]]) -> int:
    return max(len(c) for per_encoder in all_chunks for c in per_encoder)


def encode(tokenizers: list, encoders: list, conditioning: TextConditioning, groups: list[list[str]],
           device: torch.device, dtype: torch.dtype, clip_skip: int = 0) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """For each group of prompts (e.g. the prompts and their negatives): (context [B, n * window, D],
    pooled [B, P] or None), every group with the same number n of chunks, the longest prompt's.
    `clip_skip` layers of each encoder are left out of the context (diffusers' `clip_skip`)."""
    check_clip_skip(encoders, conditioning, clip_skip)
    per_group = [prompt_chunks(tokenizers, g) for g in groups]
    n = max(count(c) for c in per_group)
    return [_encode(tokenizers, encoders, conditioning, c, n, device, dtype, clip_skip) for c in per_group]


def check_clip_skip(encoders: list, conditioning: TextConditioning, clip_skip: int) -> None:
    """clip_skip must leave at least one layer of every encoder before the context is read."""
    read = 2 if conditioning.hidden_state == "penultimate" else 1
    layers = min(len(e.text_model.encoder.layers) for e in encoders)
    if not 0 <= clip_skip <= layers - read:
        raise FewstepError(f"clip_skip={clip_skip}: this model's text encoder has {layers} layers, so clip_skip "
                           f"goes from 0 to {layers - read} (A1111's 'Clip skip' is clip_skip + 1)")


def _encode(tokenizers, encoders, conditioning, all_chunks, n: int, device, dtype, clip_skip: int):
    states, pooled = [], None
    for tok, enc, per_prompt in zip(tokenizers, encoders, all_chunks):
        empty = chunks("", tok.ids, tok.bos_id, tok.eos_id, tok.pad_id, tok.max_length)[0]
        parts = []
        for k in range(n):
            row = [c[k] if k < len(c) else empty for c in per_prompt]
            out = enc(torch.tensor([c.ids for c in row], device=device), skip=clip_skip)
            hidden = out.penultimate if conditioning.hidden_state == "penultimate" else out.last_hidden_state
            parts.append(emphasis(hidden, torch.tensor([c.weights for c in row], device=device)))
            pooled = out.text_embeds if k == 0 else pooled
        states.append(torch.cat(parts, dim=1))  # [B, n * window, D]
    context = torch.cat(states, dim=-1).to(dtype)  # [B, n * 77, 768 | 1024 | 2048]
    return context, (pooled.to(dtype) if conditioning.pooled else None)


def emphasis(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Hidden states [B, L, D] times their tokens' weights [B, L], each row rescaled to keep its mean
    (A1111's emphasis); rows of weight 1 come back untouched."""
    if bool((weights == 1).all()):
        return hidden
    w = weights.to(hidden.dtype)[..., None]
    before = hidden.mean(dim=(1, 2), keepdim=True)
    weighted = hidden * w
    return weighted * (before / weighted.mean(dim=(1, 2), keepdim=True))
