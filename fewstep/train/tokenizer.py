"""Stage 1: a CLIP-compatible byte-level BPE tokenizer learned from the scene captions.

Follows OpenAI CLIP's tokenizer (Radford et al. 2021, `simple_tokenizer.py`) as transformers
rebuilds it: NFC, whitespace runs to one space, lowercase, CLIP's split regex, byte-level BPE whose
word-final symbols carry "</w>". The merges are learned with the HF `tokenizers` BpeTrainer on
captions from `fewstep.shapes`; the vocabulary is then laid out as CLIP lays out its own (256 byte
symbols, the same with "</w>", one entry per merge, then <|startoftext|> and <|endoftext|>), so
vocab.json + merges.txt load unchanged in fewstep's and transformers' CLIPTokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, pre_tokenizers, trainers
from tokenizers.models import BPE

from ..shapes.caption import caption
from ..shapes.render import sample_scene
from ..tokenizer import set_clip_processing

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77  # the CLIP context every SD pipeline pads to (the default; shapes-turbo uses Sizes.context)


def bytes_to_unicode() -> list[str]:
    """The 256 printable stand-ins of the byte values, in CLIP's order (byte i -> entry i of the
    permutation that lists printable bytes first)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def clip_tokenizer(vocab: dict | None = None, merges: list | None = None):
    """An empty (or given) BPE with CLIP's normalizer and pre-tokenizer, exactly as
    `fewstep.tokenizer` and transformers' CLIPTokenizer build theirs."""
    return set_clip_processing(Tokenizer(BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                                             fuse_unk=False, unk_token=EOS)))


def captions(seed: int, n: int, drop: float = 0.3) -> list[str]:
    """n training captions without drawing the images (the renderer's scene and caption samplers)."""
    rng = np.random.default_rng(seed)
    return [caption(sample_scene(rng), rng, drop) for _ in range(n)]


def learn_merges(texts: list[str], vocab_size: int) -> list[tuple[str, str]]:
    """BPE merges, most frequent first, learned on `texts`; the trainer stops early once every word
    of the corpus is one symbol (the captions have ~40 distinct words)."""
    tok = clip_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), end_of_word_suffix="</w>")
    tok.train_from_iterator(texts, trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]


def clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary layout: bytes, bytes + "</w>", one token per merge, then BOS and EOS."""
    base = bytes_to_unicode()
    tokens = base + [b + "</w>" for b in base] + ["".join(m) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}


def save(folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]], max_length: int = MAX_LENGTH) -> None:
    """vocab.json, merges.txt and the two JSON files transformers and fewstep read the specials from."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {**special, "model_max_length": max_length, "add_prefix_space": False, "do_lower_case": True,
              "clean_up_tokenization_spaces": True, "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def train_tokenizer(folder: Path, seed: int = 0, n: int = 20000, vocab_size: int = 1024,
                    max_length: int = MAX_LENGTH) -> dict[str, int]:
    """Learn the tokenizer from n captions and write it to `folder` (padding prompts to `max_length`
    tokens); returns the vocabulary."""
    merges = learn_merges(captions(seed, n), vocab_size)
    vocab = clip_vocab(merges)
    save(Path(folder), vocab, merges, max_length)
    return vocab
