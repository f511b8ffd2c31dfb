"""A1111's prompt language (`fewstep.prompts`, `fewstep.text`): the attention grammar gives A1111's
documented results, prompts longer than the window become 75-token chunks as A1111 cuts them (BREAK,
the comma backtrack), weights re-scale hidden states keeping their mean, and the pipeline conditions on
the chunks: a plain prompt exactly as before, a long one with every chunk, negatives padded to match."""

import pytest
import torch

import fewstep
from fewstep.prompts import chunks, parse_attention
from fewstep.text import emphasis

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("text,want", [  # the examples of A1111's own documentation of the grammar
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    ("a cat BREAK a dog", [("a cat", 1.0), ("BREAK", -1.0), ("a dog", 1.0)]),
    ("[dim] x]", [("dim", 1 / 1.1), (" x]", 1.0)]),  # a closing bracket with nothing open is literal
    ("(a:0.5) b:1.2)", [("a", 0.5), (" b:1.2)", 1.0)]),
    ("", [("", 1.0)]),
])
def test_the_grammar_is_a1111s(text, want):
    assert parse_attention(text) == want


def words(text: str) -> list[int]:
    """A stand-in tokenizer: one token per word or comma (ids from a fixed table)."""
    table = {",": 9}
    return [table.setdefault(w, 10 + len(table)) for w in text.replace(",", " , ").split()]


def framed(n_words: int, commas: dict[int, bool] = {}) -> str:
    return " ".join("," if i in commas else f"w{i}" for i in range(n_words))


def test_chunks_frame_pad_and_cut_at_the_window():
    one = chunks("a b c", words, bos=1, eos=2, pad=0, window=8)
    assert len(one) == 1 and one[0].ids[0] == 1 and one[0].ids[4] == 2 and one[0].ids[5:] == [0, 0, 0]
    long = chunks(framed(13), words, 1, 2, 0, window=8)  # 6 tokens a chunk: 13 -> 6 + 6 + 1
    assert [sum(i > 2 for i in c.ids) for c in long] == [6, 6, 1] and all(len(c.ids) == 8 for c in long)
    assert chunks("", words, 1, 2, 0, window=8)[0].ids == [1, 2, 0, 0, 0, 0, 0, 0]


def test_a_full_chunk_ends_after_its_last_comma():
    text = framed(10, {3: True})  # w0 w1 w2 , w4 ... with 6-token chunks: the cut moves back after the comma
    got = [[i for i in c.ids if i > 2] for c in chunks(text, words, 1, 2, 0, window=8)]
    assert [len(c) for c in got] == [4, 6] and got[0][-1] == 9
    far = framed(40, {1: True})  # a comma more than 20 tokens back: cut at the window
    assert [sum(i > 2 for i in c.ids) for c in chunks(far, words, 1, 2, 0, window=32)][0] == 30


def test_break_starts_a_new_chunk():
    got = chunks("a b BREAK c", words, 1, 2, 0, window=8)
    assert [sum(i > 2 for i in c.ids) for c in got] == [2, 1]
    assert len(chunks("BREAK a", words, 1, 2, 0, window=8)) == 2  # an empty chunk first, as A1111


def test_weights_follow_the_tokens():
    got = chunks("a (b c:1.5) d", words, 1, 2, 0, window=8)[0]
    assert got.weights[:6] == [1.0, 1.0, 1.5, 1.5, 1.0, 1.0]


def test_emphasis_keeps_each_rows_mean():
    h = torch.randn(2, 5, 4) + 0.3
    w = torch.tensor([[1, 1.5, 1, 0.5, 1], [1, 1, 1, 1, 1.0]])
    out = emphasis(h, w)
    assert torch.allclose(out.mean(dim=(1, 2)), h.mean(dim=(1, 2)), atol=1e-6)
    assert not torch.allclose(out[0], h[0]) and torch.allclose(out[1] / h[1], (out[1] / h[1])[0, 0].expand(5, 4))
    same = torch.ones(2, 5)
    assert emphasis(h, same) is h  # weights of 1: untouched, so plain prompts are diffusers' conditioning


def test_the_pipeline_conditions_on_every_chunk():
    pipe = fewstep.load()  # its text encoder's window is 32 tokens: chunks of 30
    window = pipe.tokenizers[0].max_length
    short = "a red circle on the left"
    (plain, _), = pipe.encode_prompt([[short]])
    tok, enc = pipe.tokenizers[0], pipe.text_encoders[0]
    assert torch.equal(plain, enc(tok([short])).last_hidden_state)  # one chunk, weights 1: as before
    long = ", ".join(["a red circle on the left"] * 8)  # more than one window
    (ctx, _), (neg, _) = pipe.encode_prompt([[long], [""]])
    assert ctx.shape[1] == neg.shape[1] == 2 * window  # the negative padded to the same chunks
    weighted, = pipe.encode_prompt([["a (red:1.4) circle on the left"]])
    assert not torch.equal(weighted[0], plain)
    images = pipe([long, short], negative_prompt=None, guidance=3.0, steps=2, progress=False)
    assert len(images) == 2


@pytest.fixture(scope="module")
def tiny_pipelines(tmp_path_factory):
    from helpers.env import SHARED
    if not SHARED.exists():
        pytest.skip("needs ../shared/data")
    from helpers.tiny import make_pipeline
    root = tmp_path_factory.mktemp("clip-skip")
    return {f: make_pipeline(f, root) for f in ("sd1", "sd2-eps", "sdxl")}


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("family,skip", [("sd1", 1), ("sd1", 3), ("sd2-eps", 2), ("sdxl", 1), ("sdxl", 2)])
def test_clip_skip_gives_diffusers_images(tiny_pipelines, family, skip):
    """diffusers applies clip_skip to the prompt only (A1111 and ComfyUI to the negative too, as fewstep
    does): compared without a negative, i.e. no guidance for SD 1.x / 2.x, SDXL's zeros for the negative."""
    import numpy as np
    folder, ref = tiny_pipelines[family]
    if not hasattr(ref.text_encoder, "text_model"):  # transformers 5 flattened CLIPTextModel; diffusers'
        object.__setattr__(ref.text_encoder, "text_model", ref.text_encoder)  # SD clip_skip path still reads it
    guidance = 4.0 if family == "sdxl" else 1.0
    pipe = fewstep.load(folder)
    prompt = "a photo of a cat, best quality"
    (plain, _), = pipe.encode_prompt([[prompt]])
    (skipped, _), (empty, _) = pipe.encode_prompt([[prompt], [""]], clip_skip=skip)
    assert (plain - skipped).abs().max() > 0.1  # another layer's hidden states
    assert torch.equal(empty, pipe.encode_prompt([[""]], clip_skip=skip)[0][0])  # the negative's too
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    theirs = ref(prompt, num_inference_steps=2, guidance_scale=guidance, latents=latents.clone(), height=64,
                 width=64, output_type="np", clip_skip=skip).images[0]
    theirs = np.round(theirs * 255).astype(np.int16)
    image = pipe(prompt, steps=2, guidance=guidance, latents=latents, width=64, height=64, clip_skip=skip,
                 progress=False)[0]
    ours = np.asarray(image, dtype=np.int16)
    assert np.abs(ours - theirs).mean() <= 1.0 and np.abs(ours - theirs).max() <= 4
    assert f"Clip skip: {skip + 1}" in image.info["parameters"]  # A1111 counts the last layer as 1


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_long_prompts_chunk_as_compel_does(tiny_pipelines, family):
    """compel (diffusers' long-prompt library, truncate_long_prompts=False) cuts at 75 tokens too: without a
    comma near a cut (A1111's backtrack, which compel lacks) its conditioning is fewstep's, float for float."""
    from compel import Compel, ReturnedEmbeddingsType
    folder, ref = tiny_pipelines[family]
    pipe = fewstep.load(folder)
    long = " ".join(["a red circle on the left and a blue square"] * 12)  # 122 tokens: two chunks
    if family == "sdxl":
        compel = Compel(tokenizer=[ref.tokenizer, ref.tokenizer_2], text_encoder=[ref.text_encoder, ref.text_encoder_2],
                        returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
                        requires_pooled=[False, True], truncate_long_prompts=False)
        theirs, theirs_pooled = compel(long)
    else:
        theirs, theirs_pooled = Compel(tokenizer=ref.tokenizer, text_encoder=ref.text_encoder,
                                       truncate_long_prompts=False)(long), None
    (ours, pooled), = pipe.encode_prompt([[long]])
    assert ours.shape == theirs.shape == (1, 154, theirs.shape[-1])
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    if theirs_pooled is not None:
        torch.testing.assert_close(pooled, theirs_pooled, rtol=0, atol=1e-5)


def test_clip_skip_out_of_range_is_one_line():
    from fewstep.errors import FewstepError
    pipe = fewstep.load()
    layers = len(pipe.text_encoders[0].text_model.encoder.layers)
    pipe.encode_prompt([["a red circle"]], clip_skip=layers - 1)  # the first layer's output: still allowed
    with pytest.raises(FewstepError, match=f"clip_skip={layers}: .* from 0 to {layers - 1}"):
        pipe.encode_prompt([["a red circle"]], clip_skip=layers)
    with pytest.raises(FewstepError, match="clip_skip=-1 must be a whole number >= 0"):
        pipe("a red circle", clip_skip=-1, progress=False)
    assert "Clip skip" not in pipe("a red circle", steps=1, progress=False)[0].info["parameters"]


def test_clip_skip_from_the_command_line(tmp_path, capsys):
    from fewstep.cli import main
    from fewstep.outputs import read_parameters
    assert main(["generate", "a red circle", "--clip-skip", "1", "--output", str(tmp_path / "a.png"), "--quiet"]) == 0
    assert "Clip skip: 2" in read_parameters(tmp_path / "a.png")
    assert main(["generate", "a red circle", "--clip-skip", "99", "--output", str(tmp_path / "b.png"), "--quiet"]) == 2
    assert "clip_skip=99: this model's text encoder has" in capsys.readouterr().err
    assert not (tmp_path / "b.png").exists()
