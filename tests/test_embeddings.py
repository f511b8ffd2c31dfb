"""Textual inversion: A1111 and diffusers embedding files (one or several vectors; SDXL's clip_l + clip_g)
load under their token and give diffusers' images (`load_textual_inversion`); bad files are one line and
leave the pipeline as it was."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import fewstep
from fewstep.errors import FewstepError
from helpers.env import requires_shared

pytestmark = [requires_shared, pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    from helpers.tiny import make_pipeline
    root = tmp_path_factory.mktemp("ti-pipes")
    return {f: make_pipeline(f, root) for f in ("sd1", "sdxl")}


def image(pipe=None, ref=None, prompt="a photo of grumpy, best quality"):
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    if ref is not None:
        out = ref(prompt, num_inference_steps=2, guidance_scale=4.0, latents=latents.clone(), height=64, width=64,
                  output_type="np").images[0]
        return np.round(out * 255).astype(np.int16)
    return np.asarray(pipe(prompt, steps=2, guidance=4.0, latents=latents, width=64, height=64, progress=False)[0],
                      dtype=np.int16)


@pytest.mark.parametrize("layout,vectors", [("a1111", 1), ("a1111", 3), ("diffusers", 1)])
def test_embeddings_give_diffusers_images(pipelines, tmp_path, layout, vectors):
    folder, ref = pipelines["sd1"]
    g = torch.Generator().manual_seed(vectors)
    v = torch.randn(vectors, 32, generator=g)
    path = tmp_path / "grumpy.safetensors"
    save_file({"emb_params": v} if layout == "a1111" else {"grumpy": v[0]}, str(path))
    pipe = fewstep.load(folder)
    (before, _), = pipe.encode_prompt([["a photo of grumpy, best quality"]])
    assert pipe.load_embedding(path) == "grumpy"
    (after, _), = pipe.encode_prompt([["a photo of grumpy, best quality"]])
    assert (after - before).abs().max() > 0.1  # the token now means the embedding's vectors
    ref.load_textual_inversion(str(path), token="grumpy")
    try:
        theirs = image(ref=ref)
    finally:
        ref.unload_textual_inversion()
    ours = image(pipe)
    assert np.abs(ours - theirs).mean() <= 1.0 and np.abs(ours - theirs).max() <= 4


def test_sdxl_embeddings_go_to_both_encoders(pipelines, tmp_path):
    folder, ref = pipelines["sdxl"]
    g = torch.Generator().manual_seed(7)
    vl, vg = torch.randn(2, 32, generator=g), torch.randn(2, 32, generator=g)
    path = tmp_path / "grumpy.safetensors"
    save_file({"clip_l": vl, "clip_g": vg}, str(path))
    pipe = fewstep.load(folder)
    pipe.load_embedding(path)
    ref.load_textual_inversion(vl, token="grumpy", text_encoder=ref.text_encoder, tokenizer=ref.tokenizer)
    ref.load_textual_inversion(vg, token="grumpy", text_encoder=ref.text_encoder_2, tokenizer=ref.tokenizer_2)
    try:
        theirs = image(ref=ref)
    finally:
        ref.unload_textual_inversion("grumpy", tokenizer=ref.tokenizer, text_encoder=ref.text_encoder)
        ref.unload_textual_inversion("grumpy", tokenizer=ref.tokenizer_2, text_encoder=ref.text_encoder_2)
    assert np.abs(image(pipe) - theirs).mean() <= 1.0


def test_a1111_pickles_need_consent(pipelines, tmp_path):
    folder, _ = pipelines["sd1"]
    pipe = fewstep.load(folder)
    torch.save({"string_to_param": {"*": torch.randn(2, 32)}, "name": "grumpy"}, tmp_path / "grumpy.pt")
    with pytest.raises(FewstepError, match="is a pickle file"):
        pipe.load_embedding(tmp_path / "grumpy.pt")
    assert pipe.load_embedding(tmp_path / "grumpy.pt", allow_pickle=True) == "grumpy"
    assert pipe.tokenizers[0].ids("grumpy") == [49408, 49409]  # the token stands for both vectors


def test_bad_embeddings_are_one_line_and_change_nothing(pipelines, tmp_path):
    folder, _ = pipelines["sdxl"]
    pipe = fewstep.load(folder)
    rows = [e.text_model.embeddings.token_embedding.num_embeddings for e in pipe.text_encoders]
    vocab = [t.vocab_size() for t in pipe.tokenizers]
    save_file({"emb_params": torch.randn(1, 768)}, str(tmp_path / "wide.safetensors"))
    save_file({"clip_l": torch.randn(1, 32), "clip_g": torch.randn(1, 64)}, str(tmp_path / "half.safetensors"))
    save_file({"a": torch.zeros(3), "b": torch.zeros(3)}, str(tmp_path / "odd.safetensors"))
    save_file({"clip_l": torch.randn(1, 32), "clip_g": torch.randn(1, 32)}, str(tmp_path / "cat.safetensors"))
    for path, token, match in ((tmp_path / "wide.safetensors", None, "do not fit this text encoder"),
                               (tmp_path / "half.safetensors", None, "do not fit this text encoder"),
                               (tmp_path / "odd.safetensors", None, "not a textual-inversion embedding"),
                               (tmp_path / "cat.safetensors", "cat", "in the vocabulary already"),
                               (tmp_path / "none.safetensors", None, "no such embedding file")):
        with pytest.raises(FewstepError, match=match) as e:
            pipe.load_embedding(path, token)
        assert "\n" not in str(e.value)
    assert [e.text_model.embeddings.token_embedding.num_embeddings for e in pipe.text_encoders] == rows
    assert [t.vocab_size() for t in pipe.tokenizers] == vocab
