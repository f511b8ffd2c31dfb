"""The synthetic-scene data side: a deterministic renderer, the caption grammar, and the evaluator.

(1) the renderer is deterministic, draws the exact palette, never puts an object on its own colour
or two objects on each other; (2) captions and parse_prompt round-trip on thousands of scenes, full
and with parts dropped, and text outside the grammar gives a one-line FewstepError; (3) the evaluator
reads >= 99% of the renderer's own images right against full and partial captions, rejects >= 99%
of deliberately wrong captions, and stays >= 97% on noisy, blurred renders.
"""

import dataclasses

import numpy as np
import pytest
from PIL import Image, ImageFilter

from fewstep.errors import FewstepError
from fewstep.shapes.caption import (Prompt, Wanted, caption, parse_prompt, sample_prompts, swap_positions,
                                    write_prompt)
from fewstep.shapes.evaluate import FAILURES, accuracy, as_image, failure, failures, matches, parse_image, score
from fewstep.shapes.data import batch, concept_batch
from fewstep.shapes.render import ALL_SHAPES, COLORS, MARGIN, POSITIONS, SHAPES, Obj, Scene, render, sample_scene

N = 1000


@pytest.fixture(scope="module")
def renders():
    images, captions, scenes = batch(seed=1234, n=N, drop=0.0)
    return images, captions, scenes, [parse_image(image) for image in images]


def rate(flags) -> float:
    return float(np.mean(flags))


def test_batch_is_deterministic():
    images, captions, scenes = batch(7, 12, drop=0.5)
    again = batch(7, 12, drop=0.5)
    assert images.shape == (12, 128, 128, 3) and images.dtype == np.uint8
    assert np.array_equal(images, again[0]) and captions == again[1] and scenes == again[2]
    prefix = batch(7, 5, drop=0.5)
    assert np.array_equal(prefix[0], images[:5]) and prefix[1] == captions[:5]
    assert not np.array_equal(batch(8, 12, drop=0.5)[0], images)
    assert render(scenes[0], 256).shape == (256, 256, 3)


def test_batch_mix_of_one_and_two_object_scenes():
    """`two` is the fraction of two-object scenes: its default 0.5 draws exactly the scenes and captions of
    sample_scene(rng) + caption (what the shipped stages trained on), 0 and 1 draw one kind only, and a
    probability outside [0, 1] is a one-line error."""
    rng = np.random.default_rng(7)
    scenes, captions = [], []
    for _ in range(12):
        scenes.append(sample_scene(rng))
        captions.append(caption(scenes[-1], rng, 0.5))
    assert batch(7, 12, drop=0.5)[1:] == (captions, scenes)
    assert {len(s.objects) for s in batch(7, 40, two=1.0)[2]} == {2}
    assert {len(s.objects) for s in batch(7, 40, two=0.0)[2]} == {1}
    assert 290 <= sum(len(s.objects) == 2 for s in batch(3, 400, two=0.8)[2]) <= 350  # 320 +- 3.5 sd
    full = batch(3, 50, drop=0.0, two=1.0)[1]
    assert all(" and " in c and c.count(" at the ") + c.count(" on the ") + c.count(" in the ") == 2 for c in full)
    for bad in ({"two": 1.5}, {"drop": -0.1}):
        with pytest.raises(FewstepError, match="between 0 and 1"):
            batch(7, 4, **bad)


def test_exact_palette_at_centres_and_on_background(renders):
    images, _, scenes, _ = renders
    for image, scene in zip(images, scenes):
        assert tuple(image[0, 0]) == COLORS[scene.background]
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box()  # the box centre is inside all three shapes, triangles too
            assert tuple(image[int((y0 + y1) / 2 * 128), int((x0 + x1) / 2 * 128)]) == COLORS[obj.color]


def test_scenes_keep_their_rules():
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(3000)]
    assert 0.46 < rate([len(s.objects) == 2 for s in scenes]) < 0.54
    for scene in scenes:
        assert scene.background not in {o.color for o in scene.objects}
        for obj in scene.objects:
            assert all(0 < v < 1 for v in obj.box())
        if len(scene.objects) == 2:
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = (o.box() for o in scene.objects)
            assert scene.objects[0].position != scene.objects[1].position
            assert max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1) >= MARGIN - 1e-9
    with pytest.raises(FewstepError, match="background colour 'red'"):
        Scene((Obj("red", "circle", "small", "on the left"),), "red")
    with pytest.raises(FewstepError, match="must not overlap"):
        Scene((Obj("red", "circle", "large", "on the left"), Obj("blue", "circle", "large", "in the center")), "white")
    with pytest.raises(FewstepError, match="unknown shape 'hexagon'"):
        Obj("red", "hexagon", "small", "on the left")


def full_prompt(scene: Scene) -> Prompt:
    return Prompt(tuple(Wanted(o.color, o.shape, o.size, o.position) for o in scene.objects), scene.background)


def test_caption_round_trip():
    rng = np.random.default_rng(1)
    stated = []
    for _ in range(3000):
        scene = sample_scene(rng)
        assert parse_prompt(caption(scene)) == full_prompt(scene)
        partial = parse_prompt(caption(scene, rng, drop=0.5))
        assert partial.background in (None, scene.background)
        for wanted, obj in zip(partial.objects, scene.objects, strict=True):
            assert (wanted.color, wanted.shape) == (obj.color, obj.shape)
            assert wanted.size in (None, obj.size) and wanted.position in (None, obj.position)
            stated += [wanted.size is not None, wanted.position is not None]
        stated.append(partial.background is not None)
    assert 0.47 < rate(stated) < 0.53


def test_caption_text():
    scene = Scene((Obj("orange", "square", "small", "at the top left"), Obj("red", "circle", "large", "on the right")),
                  "white")
    assert caption(scene) == ("a small orange square at the top left and a large red circle on the right "
                              "on a white background")
    lone = Scene((Obj("red", "triangle", "small", "in the center"),), "orange")
    assert caption(lone) == "a small red triangle in the center on an orange background"
    assert parse_prompt("  An Orange  SQUARE. ") == parse_prompt("a orange square") == Prompt(
        (Wanted("orange", "square", None, None),), None)
    assert parse_prompt("a large circle") == Prompt((Wanted(None, "circle", "large", None),), None)


def test_write_prompt_and_swapped_positions():
    """write_prompt inverts parse_prompt on every caption the renderer writes (full and partial);
    swap_positions exchanges the two objects' stated positions, and gives None where the result would
    not be a different caption (one object, a position left out, two objects told apart by nothing)."""
    _, captions, _ = batch(seed=7, n=2000, drop=0.3)
    assert all(write_prompt(parse_prompt(c)) == c for c in captions)
    assert write_prompt(parse_prompt("An Orange  square.")) == "an orange square"
    assert swap_positions("a small red circle on the left and a blue square at the top right on a white "
                          "background") == ("a small red circle at the top right and a blue square on the left "
                                            "on a white background")
    for text in ("a red circle on the left", "a red circle on the left and a blue square",
                 "a red circle and a blue square at the top", "a red square on the left and a red square on the right"):
        assert swap_positions(text) is None, text
    assert swap_positions("a small red square on the left and a red square on the right") is not None
    swapped = [swap_positions(c) for c in captions]
    for text, twin in zip(captions, swapped):
        if twin is not None:
            a, b = parse_prompt(text).objects, parse_prompt(twin).objects
            assert (a[0].position, a[1].position) == (b[1].position, b[0].position) and twin != text
    assert 0.15 < rate([t is not None for t in swapped]) < 0.35  # half two-object, each position kept at 0.7


@pytest.mark.parametrize("text, message", [
    ("a red hexagon", "unknown word 'hexagon'"),
    ("two red circles", "unknown word 'two'"),
    ("", "is empty"),
    ("red circle", "cannot read 'red circle'"),
    ("a circle red", "cannot read 'a circle red'"),
    ("a red circle and a blue square and a green triangle", "at most two objects"),
    ("a red circle on a red background", "background colour must differ"),
    ("a red circle on the left and a blue square on the left", "cannot both be 'on the left'"),
    ("a red circle on a blue background and a green square", "cannot read"),
])
def test_grammar_errors(text, message):
    with pytest.raises(FewstepError, match=message) as error:
        parse_prompt(text)
    assert "\n" not in str(error.value)


def test_evaluator_reads_renders(renders):
    _, captions, scenes, parsed = renders
    full = [matches(c, *p) for c, p in zip(captions, parsed)]
    rng = np.random.default_rng(2)
    dropped = [matches(caption(s, rng, 0.5), *p) for s, p in zip(scenes, parsed)]
    two, full = np.array([len(s.objects) == 2 for s in scenes]), np.array(full)
    print(f"full captions: {rate(full):.4f} (one {rate(full[~two]):.4f}, two {rate(full[two]):.4f});"
          f" dropped: {rate(dropped):.4f}")
    assert rate(full[~two]) >= 0.99 and rate(full[two]) >= 0.99
    assert rate(dropped) >= 0.99


def test_evaluator_rejects_wrong_captions(renders):
    _, _, scenes, parsed = renders
    swapped, reshaped, missing = [], [], []
    for scene, found in zip(scenes, parsed):
        first = scene.objects[0]
        other = SHAPES[(SHAPES.index(first.shape) + 1) % 3]
        reshaped.append(matches(caption(dataclasses.replace(
            scene, objects=(dataclasses.replace(first, shape=other),) + scene.objects[1:])), *found))
        if len(scene.objects) == 2 and first.color != scene.objects[1].color:
            a, b = scene.objects
            swap = (dataclasses.replace(a, color=b.color), dataclasses.replace(b, color=a.color))
            swapped.append(matches(caption(dataclasses.replace(scene, objects=swap)), *found))
            missing.append(matches(caption(dataclasses.replace(scene, objects=(a,))), *found))
    print(f"wrong captions scored correct: swapped colours {rate(swapped):.4f} of {len(swapped)}, "
          f"wrong shape {rate(reshaped):.4f}, an object left out {rate(missing):.4f}")
    assert rate(swapped) <= 0.01 and rate(reshaped) <= 0.01 and rate(missing) <= 0.01


def degrade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(1.0)), np.float32)
    return np.clip(blurred + rng.normal(0, 8, blurred.shape), 0, 255).round().astype(np.uint8)


def test_evaluator_survives_noise_and_blur(renders):
    images, captions, _, _ = renders
    rng = np.random.default_rng(3)
    noisy = [degrade(image, rng) for image in images[:400]]
    result = accuracy(captions[:400], noisy)
    print(f"noise sigma 8/255 + blur radius 1: {result}")
    assert result["one"] >= 0.97 and result["two"] >= 0.97


def test_accuracy_and_eval_prompts(renders):
    images, captions, _, _ = renders
    result = accuracy(captions[:40], images[:40])
    assert result["n_one"] + result["n_two"] == 40 and result["all"] == 1.0
    assert accuracy(captions[1:41], images[:40])["all"] < 0.2  # captions shifted by one image
    assert accuracy(captions[:10], images[:10].astype(np.float32) / 255)["all"] == 1.0
    prompts = sample_prompts(0, 200, two_fraction=0.25)
    assert prompts == sample_prompts(0, 200, two_fraction=0.25) and prompts != sample_prompts(1, 200, 0.25)
    parsed = [parse_prompt(p) for p in prompts]
    assert sum(len(p.objects) == 2 for p in parsed) == 50
    assert 0.6 < rate([p.background is not None for p in parsed]) < 0.9  # all full captions, half the rest
    with pytest.raises(FewstepError, match="3 prompts but 2 images"):
        accuracy(captions[:3], images[:2])


def test_evaluator_edges():
    blank = np.zeros((128, 128, 3), np.uint8) + np.array(COLORS["green"], np.uint8)
    assert parse_image(blank) == ([], "green") and not score("a red circle", blank)
    scene = Scene((Obj("blue", "triangle", "small", "at the bottom right"),
                   Obj("yellow", "circle", "large", "at the top left")), "black")
    for size in (64, 256):
        assert score(caption(scene), render(scene, size)), size
    with pytest.raises(FewstepError, match=r"\[height, width, 3\]"):
        as_image(np.zeros((3, 128, 128), np.uint8))
    with pytest.raises(FewstepError, match="too small"):
        render(scene, 16)
    assert len(POSITIONS) == 9


def test_failure_names_what_is_wrong():
    """`failure` (fewstep eval --why) on a render whose prompt is wrong in one known way."""
    scene = Scene((Obj("red", "circle", "large", "on the left"), Obj("blue", "square", "small", "at the top right")),
                  "white")
    image = render(scene)
    cases = {
        "a large red circle on the left and a small blue square at the top right on a white background": None,
        "a large red circle on the left and a small blue square at the top right on a black background": "background",
        "a large red circle on the left": "extra object",
        "a large red circle at the bottom and a small blue square at the top right": "position",
        "a large red circle at the top right and a small blue square on the left": "position swap",
        "a large red circle at the top right and a small blue square": "position swap",
        "a small red circle on the left and a small blue square at the top right": "size",
        "a large blue circle on the left and a small red square at the top right": "binding",
        "a large blue circle and a small blue square": "colour",
        "a large red triangle and a small blue square": "shape",
        "a small green triangle at the bottom and a small blue square": "several",
    }
    for prompt, why in cases.items():
        assert failure(prompt, image) == why, prompt
    lone = render(Scene((Obj("red", "circle", "large", "on the left"),), "white"))
    assert failure("a red circle and a blue square", lone) == "missing object"
    blob = np.array(lone)
    blob[60:68, 30:110] = COLORS["red"]  # a bar grows out of the circle: no ideal shape fits
    assert failure("a red circle", blob) == "blob"
    counts = failures(list(cases) + ["a red circle and a blue square"], [image] * len(cases) + [lone])
    assert counts[1] == {"extra object": 1}
    assert counts[2]["right"] == 1 and counts[2]["missing object"] == 1 and sum(counts[2].values()) == len(cases)
    assert set(why for why in cases.values() if why) | {"missing object", "blob"} == set(FAILURES)
    with pytest.raises(FewstepError, match="2 prompts but 1 images"):
        failures(["a red circle", "a red circle"], [lone])


def test_the_new_shape_rectangle_is_drawn_parsed_and_read():
    """'rectangle' (flat, 2:1), a shape the shipped models never saw: drawn only when asked for, in the
    grammar, and read back by the evaluator as reliably as the others; a square or triangle caption on a
    rectangle (and a rectangle caption on them) is rejected."""
    rng = np.random.default_rng(5)
    assert all(o.shape in SHAPES for _ in range(300) for o in sample_scene(rng).objects)
    scenes = [sample_scene(rng, None, ALL_SHAPES, must="rectangle") for _ in range(400)]
    assert all(s.objects[0].shape == "rectangle" for s in scenes)
    image = render(scenes[0])
    obj = scenes[0].objects[0]
    assert parse_prompt(f"a {obj.color} rectangle {obj.position}").objects[0].shape == "rectangle"
    captions = [caption(s) for s in scenes]
    parsed = [parse_image(render(s)) for s in scenes]
    right = rate([matches(c, *p) for c, p in zip(captions, parsed)])
    wrong = []
    for scene, found in zip(scenes, parsed):
        for other in SHAPES:
            moved = (dataclasses.replace(scene.objects[0], shape=other),) + scene.objects[1:]
            wrong.append(matches(caption(dataclasses.replace(scene, objects=moved)), *found))
    print(f"rectangle scenes read right: {right:.4f}; other shapes' captions accepted: {rate(wrong):.4f}")
    assert right >= 0.99 and rate(wrong) <= 0.01
    assert image.shape == (128, 128, 3)


def test_rectangle_captions_do_not_fit_square_renders(renders):
    _, _, scenes, parsed = renders
    flipped = [matches(caption(dataclasses.replace(s, objects=(dataclasses.replace(s.objects[0], shape="rectangle"),)
                                                   + s.objects[1:])), *p) for s, p in zip(scenes, parsed)]
    assert rate(flipped) <= 0.01


@pytest.mark.parametrize("two", [0.0, 0.5, 1.0])
def test_concept_batch_draws_two_objects_at_the_share_asked(two):
    """concept_batch(two=P): P of the scenes hold two objects, with or without the new shape; the rest one."""
    _, captions, scenes = concept_batch(4, 200, "rectangle", size=32, two=two)
    pairs = sum(len(s.objects) == 2 for s in scenes)
    assert {0.0: pairs == 0, 1.0: pairs == 200, 0.5: 70 < pairs < 130}[two], pairs
    assert (sum(" and " in c for c in captions) == pairs) and 60 < sum("rectangle" in c for c in captions) < 140
