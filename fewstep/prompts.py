"""A1111's prompt language: attention weights, BREAK, and prompts longer than the text encoder's window.

The grammar (AUTOMATIC1111's "attention / emphasis", as its wiki specifies it):
- `(text)` multiplies the attention to text by 1.1, `[text]` divides it by 1.1; they nest, `((text))` is
  1.21; `(text:1.5)` sets 1.5 times (times the enclosing brackets'); `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are
  literal characters;
- a bracket left open applies to the end of the prompt; a closing one with nothing open is literal text;
- `BREAK` (upper case, a word of its own) ends a chunk: what follows starts a new one;
- `<lora:name:0.8>` (A1111's extra networks) asks for a LoRA at that scale; the tag is not text
  (`networks` reads them, the pipeline loads them from its `lora_dir`).

A prompt becomes chunks of (window - 2) tokens, each framed by BOS ... EOS and padded, encoded on its
own and concatenated along the token axis (A1111's way past CLIP's 77 tokens); a chunk boundary that
falls within 20 tokens after a comma moves back to just after it. Each token's hidden state is multiplied
by its weight, and the chunk rescaled so its mean is what it was (A1111's "mean-preserving" emphasis;
fewstep takes the mean per prompt, which is A1111's for a batch of one).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ROUND, SQUARE = 1.1, 1 / 1.1
COMMA_BACKTRACK = 20  # A1111's default: a chunk ends after the last comma within this many tokens
# One token of the attention grammar: an escape, a bracket, a ":weight)" close, plain text, or a stray colon.
TOKEN = re.compile(r"\\[\\()\[\]]|\\|[(\[]|:\s*([+-]?[.\d]+)\s*\)|[)\]]|[^\\()\[\]:]+|:")
BREAK = re.compile(r"\s*\bBREAK\b\s*")
NETWORK = re.compile(r"<(\w+):([^:>]+)(?::([^:>]*))?(?::[^>]*)?>")  # <lora:name[:unet weight[:te weight]]>


def networks(text: str) -> tuple[tuple[str, str, float], ...]:
    """The extra-network tags of a prompt: (kind, name, scale), in order; a scale that is not a number
    keeps the tag as text (A1111 reads "1" then)."""
    out = []
    for kind, name, scale in NETWORK.findall(text):
        try:
            out.append((kind, name.strip(), float(scale) if scale else 1.0))
        except ValueError:
            out.append((kind, name.strip(), 1.0))
    return tuple(out)


def parse_attention(text: str) -> list[tuple[str, float]]:
    """`text` as (fragment, weight) pairs; runs of one weight merged; BREAK as ("BREAK", -1); extra-network
    tags removed."""
    text = NETWORK.sub("", text)
    out: list[list] = []
    opened: list[tuple[str, int]] = []  # (bracket, index in out where it began)

    def scale(start: int, factor: float) -> None:
        for piece in out[start:]:
            piece[1] *= factor

    for m in TOKEN.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):  # an escaped character; a lone backslash is dropped
            out.append([token[1:], 1.0])
        elif token in "([":
            opened.append((token, len(out)))
        elif weight is not None and any(k == "(" for k, _ in opened):
            scale(_innermost(opened, "("), float(weight))
        elif token == ")" and any(k == "(" for k, _ in opened):
            scale(_innermost(opened, "("), ROUND)
        elif token == "]" and any(k == "[" for k, _ in opened):
            scale(_innermost(opened, "["), SQUARE)
        else:
            parts = BREAK.split(token)
            for i, part in enumerate(parts):
                if i:
                    out.append(["BREAK", -1.0])
                out.append([part, 1.0])
    for kind, start in opened:  # left open: to the end
        scale(start, ROUND if kind == "(" else SQUARE)
    return _merged(out) or [("", 1.0)]


def _innermost(opened: list[tuple[str, int]], kind: str) -> int:
    """Pop the innermost open bracket of `kind`; its start in the output."""
    i = max(i for i, (k, _) in enumerate(opened) if k == kind)
    return opened.pop(i)[1]


def _merged(pieces: list[list]) -> list[tuple[str, float]]:
    out: list[list] = []
    for text, weight in pieces:
        if text == "" and weight != -1:
            continue
        if out and out[-1][1] == weight and weight != -1:
            out[-1][0] += text
        else:
            out.append([text, weight])
    return [(t, w) for t, w in out]


@dataclass(frozen=True)
class Chunk:
    ids: list[int]  # window ids: BOS, tokens, EOS, padding
    weights: list[float]  # one per id (1.0 on the framing and the padding)


def chunks(text: str, encode, bos: int, eos: int, pad: int, window: int = 77) -> list[Chunk]:
    """The chunks of `text` (see the module docstring); `encode(fragment) -> token ids` without framing."""
    size, comma = window - 2, encode(",")[0]
    tokens: list[tuple[int, float]] = []
    out: list[Chunk] = []

    def flush() -> None:
        nonlocal tokens
        body, tokens = tokens[:size], tokens[size:]
        ids = [bos, *(i for i, _ in body), eos]
        weights = [1.0, *(w for _, w in body), 1.0]
        out.append(Chunk(ids + [pad] * (window - len(ids)), weights + [1.0] * (window - len(ids))))

    for fragment, weight in parse_attention(text):
        if weight == -1:  # BREAK: the chunk ends here, whatever it holds
            flush()
            continue
        for token in encode(fragment):
            tokens.append((token, weight))
            if len(tokens) > size:
                cut = size if token == comma else _comma_cut(tokens, size, comma)
                tokens, rest = tokens[:cut], tokens[cut:]
                flush()
                tokens = rest
    if tokens or not out:
        flush()
    return out


def _comma_cut(tokens: list[tuple[int, float]], size: int, comma: int) -> int:
    """Where a full chunk ends: after its last comma when that is within COMMA_BACKTRACK tokens of the end."""
    last = max((i for i, (t, _) in enumerate(tokens[:size]) if t == comma), default=-1)
    return last + 1 if last >= 0 and size - last <= COMMA_BACKTRACK else size
