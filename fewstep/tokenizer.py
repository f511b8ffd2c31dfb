"""CLIP byte-level BPE tokenizer, built with the HF `tokenizers` library from vocab.json + merges.txt.

The pipeline is transformers' `CLIPTokenizer` (transformers 5, tokenization_clip.py): NFC, whitespace
runs to one space, lowercase; split on CLIP's regex; byte-level BPE with the "</w>" end-of-word
suffix. Note that this is *not* bit-identical to OpenAI's original tokenizer, which also ran ftfy
and HTML unescaping; Stable Diffusion pipelines use the transformers one, so fewstep does too.

Framing is done here, not by a tokenizers post-processor, so truncation can be reported:
[BOS] + first 75 tokens + [EOS] + padding to 77. SD 1.x pads with "<|endoftext|>", SDXL's second
tokenizer pads with "!" (id 0); the pad token is read from the folder's JSON files.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from .errors import FewstepError

DEFAULTS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}


def _special_tokens(folder: Path) -> dict[str, tuple[str, bool]]:
    """bos/eos/unk/pad as (content, normalized): special_tokens_map.json wins over tokenizer_config.json
    over defaults. A token written as a plain string matches un-normalized text, as in transformers."""
    found = {k: (v, False) for k, v in DEFAULTS.items()}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if not path.is_file():
            continue
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise FewstepError(f"malformed JSON in {path}: {e}") from None
        for key in DEFAULTS:
            value = d.get(key)
            if isinstance(value, dict):  # AddedToken form: {"content": "<|endoftext|>", "normalized": true, ...}
                found[key] = (value.get("content"), bool(value.get("normalized", False)))
            elif isinstance(value, str):
                found[key] = (value, False)
    return found


def _max_length(folder: Path) -> int:
    path = folder / "tokenizer_config.json"
    n = json.loads(path.read_text()).get("model_max_length", 77) if path.is_file() else 77
    return n if isinstance(n, int) and 2 < n <= 77 else 77  # transformers writes 1e30 for "unlimited"


def _from_tokenizer_json(path: Path):
    """A tokenizer.json written by transformers: its BPE, normalizer and added tokens as saved; the
    BOS/EOS/padding are applied by `CLIPTokenizer.__call__`, so its own post-processing is switched off."""
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for a malformed file
        raise FewstepError(f"cannot read {path}: {e}") from None
    tok.no_padding()
    tok.no_truncation()
    return tok


def set_clip_processing(tok):
    """CLIP's normalizer (NFC, whitespace runs to one space, lower case), pre-tokenizer (CLIP's regex,
    then byte-level) and decoder, as transformers' converter builds them; returns `tok`."""
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
                                   r"|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _from_vocab_merges(folder: Path, special: dict):
    """CLIP's BPE rebuilt from vocab.json + merges.txt, as transformers' converter builds it."""

    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    for f in (vocab, merges):
        if not f.is_file():
            raise FewstepError(f"CLIP tokenizer folder {folder} has no {f.name} (needs vocab.json and merges.txt)")
    tok = set_clip_processing(Tokenizer(BPE.from_file(str(vocab), str(merges), continuing_subword_prefix="",
                                                      end_of_word_suffix="</w>", fuse_unk=False,
                                                      unk_token=special["unk_token"][0])))
    # As transformers does, every special token is also matched inside prompts: a literal
    # "<|endoftext|>" is one token, and with SDXL's pad token "!" every "!" in a prompt becomes
    # id 0 instead of merging ("paint!" -> "paint</w>", "!"). Pad comes last and wins on duplicates.
    added = {content: normalized for content, normalized in special.values()}
    tok.add_special_tokens([AddedToken(c, normalized=n) for c, n in added.items()])
    return tok


class CLIPTokenizer:
    """prompts -> [B, max_length] token ids, as transformers' CLIPTokenizer with
    padding="max_length", truncation=True (SD pipelines' call)."""

    def __init__(self, tokenizer, bos_id: int, eos_id: int, pad_id: int, max_length: int = 77):
        self.tokenizer = tokenizer  # a tokenizers.Tokenizer without post-processor
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.max_length = max_length
        self.expansions: dict[int, list[int]] = {}  # a multi-vector embedding's first id -> all its ids

    @classmethod
    def from_folder(cls, path) -> CLIPTokenizer:
        folder = Path(path)
        if not folder.is_dir():
            raise FewstepError(f"tokenizer folder not found: {folder}")
        special = _special_tokens(folder)
        if not (folder / "vocab.json").is_file() and (folder / "tokenizer.json").is_file():
            tok = _from_tokenizer_json(folder / "tokenizer.json")  # folders saved by transformers >= 5
        else:
            tok = _from_vocab_merges(folder, special)
        ids = {k: tok.token_to_id(c) for k, (c, _) in special.items()}
        for k, i in ids.items():
            if i is None:
                raise FewstepError(f"tokenizer {folder}: {k} {special[k][0]!r} is not in vocab.json")
        return cls(tok, ids["bos_token"], ids["eos_token"], ids["pad_token"], _max_length(folder))

    def ids(self, text: str) -> list[int]:
        """The BPE token ids of `text`, without BOS / EOS and without truncation; a multi-vector embedding's
        token stands for all its vectors' tokens (`add_embedding_tokens`)."""
        out = []
        for i in self.tokenizer.encode(text, add_special_tokens=False).ids:
            out += self.expansions.get(i, [i])
        return out

    def known(self, token: str) -> bool:
        return self.tokenizer.token_to_id(token) is not None

    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def add_embedding_tokens(self, tokens: list[str]) -> list[int]:
        """Add a textual-inversion embedding's tokens (its name, then name_1 ... for further vectors) at the
        end of the vocabulary; in prompts the name stands for all of them. Returns their ids."""
        known = [t for t in tokens if self.tokenizer.token_to_id(t) is not None]
        if known:
            raise FewstepError(f"the token {known[0]!r} is in the vocabulary already: give the embedding another "
                               "token (token=...)")
        self.tokenizer.add_tokens([AddedToken(t, normalized=False, single_word=False) for t in tokens])
        ids = [self.tokenizer.token_to_id(t) for t in tokens]
        self.expansions[ids[0]] = ids
        return ids

    def count_tokens(self, prompt: str) -> int:
        """BPE tokens in `prompt`, without BOS/EOS; more than max_length - 2 gets truncated."""
        return len(self.tokenizer.encode(prompt, add_special_tokens=False).ids)

    def __call__(self, prompts: list[str] | str) -> torch.Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        keep = self.max_length - 2  # room for BOS and EOS
        rows = []
        for prompt, enc in zip(prompts, self.tokenizer.encode_batch(list(prompts), add_special_tokens=False)):
            ids = enc.ids
            if len(ids) > keep:
                short = prompt if len(prompt) <= 60 else prompt[:57] + "..."
                warnings.warn(f"prompt truncated to {self.max_length} tokens, {len(ids) - keep} dropped: {short!r}",
                              stacklevel=2)
            ids = [self.bos_id, *ids[:keep], self.eos_id]
            rows.append(ids + [self.pad_id] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)  # [B, max_length]
