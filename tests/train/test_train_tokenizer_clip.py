"""The tokenizer and CLIP stages: the learned tokenizer gives transformers' CLIPTokenizer's ids, and the
trained CLIP scores images against captions and gives image features."""

import torch

from helpers.train import PROMPTS


def test_tokenizer_matches_transformers(run):
    from transformers import CLIPTokenizer as Reference

    from fewstep.tokenizer import CLIPTokenizer
    folder = run[0] / "tokenizer"
    ours = CLIPTokenizer.from_folder(folder)(PROMPTS)
    reference = Reference.from_pretrained(folder)
    assert reference.model_max_length == 32  # Sizes.context, written to tokenizer_config.json
    ref = reference(PROMPTS, padding="max_length", max_length=reference.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    assert ours.shape == (len(PROMPTS), 32) and torch.equal(ours, ref)
    words = ours[0][1:ours[0].tolist().index(ours[0][-1].item())]
    assert len(words) == 8  # every caption word is one token: "a large red circle at the top left"


def test_clip_score_and_features(run):
    from fewstep.shapes.data import batch
    from fewstep.shapes.clip import clip_score, load_clip
    model, tok = load_clip(run[0] / "clip")
    images, captions, _ = batch(3, 4, size=64)
    scores = clip_score(model, tok, images, captions)
    assert scores.shape == (4,) and torch.isfinite(scores).all() and scores.abs().max() <= 100
    from fewstep.imaging import from_uint8
    assert model.features(from_uint8(images)).shape == (4, model.visual.proj.in_features)
