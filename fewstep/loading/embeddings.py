"""Textual-inversion embeddings (Gal et al. 2022, "An Image is Worth One Word") as people share them: a
few learned token vectors with a trigger word.

Layouts, told apart by their keys: A1111's `.pt` (`string_to_param: {"*": [n, D]}`, its trigger word the
file's name; a pickle, so only with `allow_pickle`), A1111's `.safetensors` (`emb_params: [n, D]`),
diffusers' `learned_embeds` (`{"<token>": [D] or [n, D]}`, the key is the token), and SDXL's
(`clip_l: [n, 768]`, `clip_g: [n, 1280]`, one set per text encoder).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import FewstepError
from .weights import read_state_dict


@dataclass(frozen=True)
class Embedding:
    token: str  # the trigger word; vectors after the first get token_1, token_2, ...
    vectors: dict[str, torch.Tensor]  # "clip_l" / "clip_g" (SDXL), or "any": [n, D]


def read_embedding(path: str | Path, token: str | None = None, allow_pickle: bool = False) -> Embedding:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FewstepError(f"no such embedding file: {path}")
    sd = read_state_dict(path, allow_pickle) if path.suffix != ".pt" else _a1111_pt(path, allow_pickle)
    if "clip_l" in sd or "clip_g" in sd:
        vectors = {k: _rows(v, path) for k, v in sd.items() if k in ("clip_l", "clip_g")}
        return Embedding(token or path.stem, vectors)
    if "emb_params" in sd:
        return Embedding(token or path.stem, {"any": _rows(sd["emb_params"], path)})
    if len(sd) == 1:  # diffusers' learned_embeds: {"<token>": vectors}
        (name, v), = sd.items()
        return Embedding(token or name, {"any": _rows(v, path)})
    raise FewstepError(f"{path.name} is not a textual-inversion embedding fewstep knows (keys {sorted(sd)[:4]})")


def _a1111_pt(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if not allow_pickle:
        raise FewstepError(f"{path} is a pickle file: pickles can run code; pass allow_pickle=True if you trust it")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad or unsafe pickle
        raise FewstepError(f"cannot load {path} with weights_only=True ({type(e).__name__})") from None
    params = obj.get("string_to_param") if isinstance(obj, dict) else None
    if isinstance(params, dict) and len(params) == 1:
        return {"emb_params": next(iter(params.values()))}
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise FewstepError(f"{path.name} is not an A1111 embedding (no string_to_param)")


def _rows(v: torch.Tensor, path: Path) -> torch.Tensor:
    v = v.detach().float()
    v = v[None] if v.ndim == 1 else v
    if v.ndim != 2 or not torch.isfinite(v).all():
        raise FewstepError(f"{path.name}: embedding vectors of shape {tuple(v.shape)}, expected finite [n, width]")
    return v


def attach(emb: Embedding, tokenizers: list, encoders: list) -> None:
    """Add the embedding's tokens to each tokenizer and its vectors to each text encoder's token table
    (SDXL: clip_l to the first, clip_g to the second). Everything is checked before anything changes."""
    keys = ["clip_l", "clip_g"] if len(encoders) == 2 else ["any"]
    plan = []
    for key, tok, enc in zip(keys, tokenizers, encoders):
        vectors = emb.vectors.get(key, emb.vectors.get("any"))
        table = enc.text_model.embeddings.token_embedding
        if vectors is None or vectors.shape[1] != table.embedding_dim:
            have = {k: v.shape[1] for k, v in emb.vectors.items()}
            raise FewstepError(f"the embedding's vectors ({have}) do not fit this text encoder "
                               f"({table.embedding_dim} wide): an embedding for another architecture")
        plan.append((tok, table, vectors))
    names = [emb.token] + [f"{emb.token}_{i}" for i in range(1, len(plan[0][2]))]
    for tok, table, _ in plan:
        if any(tok.known(n) for n in names):
            raise FewstepError(f"the token {emb.token!r} is in the vocabulary already: give the embedding another "
                               "token (token=...)")
        if tok.vocab_size() != table.num_embeddings:
            raise FewstepError(f"the tokenizer has {tok.vocab_size()} tokens and the text encoder "
                               f"{table.num_embeddings} rows: they disagree")
    for tok, table, vectors in plan:
        tok.add_embedding_tokens(names)
        with torch.no_grad():
            w = table.weight
            table.weight = torch.nn.Parameter(torch.cat([w, vectors.to(w.device, w.dtype)]), requires_grad=False)
        table.num_embeddings = table.weight.shape[0]
