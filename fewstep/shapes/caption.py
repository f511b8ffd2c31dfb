"""The caption grammar of the synthetic scenes (public interface, documented in docs/shapes.md):

    one object:   a [SIZE] COLOUR SHAPE [POSITION] [on a COLOUR background]
    two objects:  OBJECT and OBJECT [on a COLOUR background]

Bracketed parts are optional: what a prompt leaves out, the model chooses. Captions use "an"
before a vowel ("an orange square"); prompts may use either article, any case, extra spaces and a
final full stop. Prompts may also leave out an object's colour ("a large circle"); captions the
renderer writes never do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np

from ..errors import FewstepError
from .render import ALL_SHAPES, COLORS, POSITIONS, SIZES, Scene, sample_scene


@dataclass(frozen=True)
class Wanted:
    """One object as a prompt asks for it; None is an attribute the prompt leaves to the model."""
    color: str | None
    shape: str
    size: str | None
    position: str | None


@dataclass(frozen=True)
class Prompt:
    objects: tuple[Wanted, ...]
    background: str | None


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _keep(rng: np.random.Generator | None, drop: float) -> bool:
    return drop == 0 or rng.random() >= drop


def caption(scene: Scene, rng: np.random.Generator | None = None, drop: float = 0.0) -> str:
    """The scene's caption; each optional part (an object's size and position, the background) is
    left out with probability `drop`, drawn from `rng` (drop=0: the full caption)."""
    if drop and rng is None:
        raise FewstepError("caption(): pass an rng (numpy.random.default_rng(seed)) when drop > 0")
    parts = []
    for obj in scene.objects:
        words = ([obj.size] if _keep(rng, drop) else []) + [obj.color, obj.shape]
        position = [obj.position] if _keep(rng, drop) else []
        parts.append(" ".join([_a(words[0])] + words[1:] + position))
    text = " and ".join(parts)
    return f"{text} on {_a(scene.background)} background" if _keep(rng, drop) else text


def _alternatives(names) -> str:
    # Longest first, so "at the top left" wins over "at the top".
    return "|".join(sorted((re.escape(n) for n in names), key=len, reverse=True))


_COLOR = _alternatives(COLORS)
_OBJECT = re.compile(rf"an? (?:({_alternatives(SIZES)}) )?(?:({_COLOR}) )?({_alternatives(ALL_SHAPES)})"
                     rf"(?: ({_alternatives(POSITIONS)}))?")
_BACKGROUND = re.compile(rf"(.*) on an? ({_COLOR}) background")
_WORDS = {"a", "an", "and", "on", "background", *COLORS, *ALL_SHAPES, *SIZES, *" ".join(POSITIONS).split()}
_FORM = "'a [small|large] COLOUR SHAPE [POSITION]', two joined by 'and', then optionally 'on a COLOUR background'"


def parse_prompt(text: str) -> Prompt:
    """Read a prompt written in the grammar; FewstepError (one line) for anything outside it."""
    clean = " ".join(str(text).lower().replace(",", " ").split()).rstrip(".").strip()
    if not clean:
        raise FewstepError(f"prompt {text!r} is empty: write {_FORM}")
    unknown = [w for w in clean.split() if w not in _WORDS]
    if unknown:
        raise FewstepError(f"prompt {text!r}: unknown word {unknown[0]!r}; colours are {', '.join(COLORS)}, "
                           f"shapes {', '.join(ALL_SHAPES)}, sizes {', '.join(SIZES)} (see docs/shapes.md)")
    match = _BACKGROUND.fullmatch(clean)
    body, background = (match.group(1), match.group(2)) if match else (clean, None)
    pieces = body.split(" and ")
    if len(pieces) > 2:
        raise FewstepError(f"prompt {text!r}: at most two objects, not {len(pieces)}")
    objects = []
    for piece in pieces:
        found = _OBJECT.fullmatch(piece)
        if not found:
            raise FewstepError(f"prompt {text!r}: cannot read {piece!r}; write {_FORM}")
        size, color, shape, position = found.groups()
        objects.append(Wanted(color, shape, size, position))
    if background is not None and any(w.color == background for w in objects):
        raise FewstepError(f"prompt {text!r}: the background colour must differ from every object's")
    if len(objects) == 2 and objects[0].position is not None and objects[0].position == objects[1].position:
        raise FewstepError(f"prompt {text!r}: two objects cannot both be {objects[0].position!r}")
    return Prompt(tuple(objects), background)


def write_prompt(prompt: Prompt) -> str:
    """The caption text of `prompt`, as `caption` writes it: write_prompt(parse_prompt(c)) == c for every
    caption the renderer writes."""
    parts = []
    for w in prompt.objects:
        words = [x for x in (w.size, w.color, w.shape) if x is not None]
        parts.append(" ".join([_a(words[0])] + words[1:] + ([w.position] if w.position else [])))
    text = " and ".join(parts)
    return f"{text} on {_a(prompt.background)} background" if prompt.background else text


def swap_positions(text: str) -> str | None:
    """The two-object caption `text` with its objects' positions exchanged ("a red circle on the left and
    a blue square at the top" -> "a red circle at the top and a blue square on the left"), which no
    longer describes the image it was written for; None unless `text` states both positions of two
    objects it tells apart (two "red square"s swapped are the same caption)."""
    prompt = parse_prompt(text)
    if len(prompt.objects) != 2 or any(w.position is None for w in prompt.objects):
        return None
    a, b = prompt.objects
    if (a.size, a.color, a.shape) == (b.size, b.color, b.shape):
        return None
    return write_prompt(Prompt((replace(a, position=b.position), replace(b, position=a.position)), prompt.background))


def sample_prompts(seed: int, n: int, two_fraction: float = 0.5) -> list[str]:
    """A fixed, seeded eval set: round(n * two_fraction) two-object prompts in random order, and
    alternately a full caption and one with each optional part left out with probability 0.5."""
    if not 0 <= two_fraction <= 1:
        raise FewstepError(f"two_fraction must be between 0 and 1, not {two_fraction}")
    rng = np.random.default_rng(seed)
    n_two = round(n * two_fraction)
    counts = rng.permutation([2] * n_two + [1] * (n - n_two))
    return [caption(sample_scene(rng, int(k)), rng, 0.0 if i % 2 == 0 else 0.5) for i, k in enumerate(counts)]


def concept_prompts(seed: int, n: int, shape: str) -> list[str]:
    """`sample_prompts`' form for scenes whose first object is the new `shape`: the held-out prompts a LoRA
    that teaches it is scored on (docs/lora.md)."""
    rng = np.random.default_rng(seed)
    n_two = round(n / 2)
    counts = rng.permutation([2] * n_two + [1] * (n - n_two))
    return [caption(sample_scene(rng, int(k), ALL_SHAPES, must=shape), rng, 0.0 if i % 2 == 0 else 0.5)
            for i, k in enumerate(counts)]
