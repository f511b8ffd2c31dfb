"""CLIP text encoder: parity with transformers CLIPTextModel / CLIPTextModelWithProjection at full
width on the real SD 1.5, SD 2.1 and SDXL configs (random weights), exact parameter counts, and
strict loading of both transformers key layouts."""

import dataclasses
import json

import pytest
import torch

from fewstep.configs import CLIPTextConfig
from fewstep.models.clip import CLIPTextModel
from fewstep.tokenizer import CLIPTokenizer
from helpers.env import CONFIGS, requires_shared, slow

PROMPTS = ["a photo of a cat", "An oil painting of a fox! in the snow, highly detailed, 4k",
           "cat " * 75]  # the last one is exactly 77 ids: BOS, 75 tokens, EOS, no padding


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def our_config(sub: str, **overrides) -> CLIPTextConfig:
    cfg = CLIPTextConfig.from_transformers(json.loads((CONFIGS / sub / "config.json").read_text()))
    return dataclasses.replace(cfg, **overrides)


def random_transformers_model(sub: str, **overrides):
    """The oracle with random weights, built on meta and filled directly (transformers' own init is
    ~3x slower than one normal_ pass). Biases and LayerNorm affines are random too, so a misnamed or
    skipped one changes the output."""
    import transformers
    hc = transformers.CLIPTextConfig.from_pretrained(CONFIGS / sub, **overrides)
    hc.dtype = torch.float32  # the SDXL config says float16
    with_projection = "WithProjection" in hc.architectures[0]
    cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    with torch.device("meta"):
        model = cls(hc)
    model = model.to_empty(device="cpu").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            mean = 1.0 if "norm" in name and name.endswith(".weight") else 0.0  # LayerNorm gains near 1
            p.normal_(mean, 0.1 if p.ndim == 1 else 0.02)
        for name, b in model.named_buffers():  # the non-persistent position_ids left empty by to_empty
            assert name.endswith("position_ids")
            b.copy_(torch.arange(b.shape[-1]).expand_as(b))
    return model


def token_ids(sub: str) -> torch.Tensor:
    tokenizer = "tokenizer_2" if sub.endswith("_2") else "tokenizer"
    ids = CLIPTokenizer.from_folder(CONFIGS / sub.split("/")[0] / tokenizer)(PROMPTS)
    assert ids[2, -1].item() == 49407 and ids[2, -2].item() != 49407  # the 77-token prompt ends in EOS
    return ids


def check_parity(sub: str, **overrides):
    hf = random_transformers_model(sub, **overrides)
    with torch.device("meta"):  # shares hf's tensors: no second copy of a 700M-parameter model
        ours = CLIPTextModel(our_config(sub, **overrides))
    ours.load_state_dict(hf.state_dict(), strict=True, assign=True)
    ids = token_ids(sub)
    inner = []  # CLIPTextModelWithProjection's output has no pooler_output: catch its text_model's
    if ours.text_projection is not None:
        hf.text_model.register_forward_hook(lambda module, args, output: inner.append(output.pooler_output))
    with torch.no_grad():
        out, ref = ours(ids), hf(ids, output_hidden_states=True)
    assert rel_err(out.last_hidden_state, ref.last_hidden_state) <= 1e-4
    assert rel_err(out.penultimate, ref.hidden_states[-2]) <= 1e-4
    if ours.text_projection is None:
        assert out.text_embeds is None
        assert rel_err(out.pooled, ref.pooler_output) <= 1e-4
    else:
        assert rel_err(out.pooled, inner[0]) <= 1e-4
        assert rel_err(out.text_embeds, ref.text_embeds) <= 1e-4


@requires_shared
@pytest.mark.parametrize("sub", ["sd15/text_encoder", "sd21-base/text_encoder"])
def test_matches_transformers_full_size(sub):
    """CLIP-L (SD 1.5, and SDXL's first encoder) and OpenCLIP-H (SD 2.x, 23 layers) at full size."""
    check_parity(sub)


@requires_shared
def test_matches_transformers_sdxl_bigg_full_width_few_layers():
    """OpenCLIP-bigG with projection at full width (1280, 20 heads, 5120 MLP), 4 of its 32 layers:
    the full model takes 30-45 s here, see the slow test below."""
    check_parity("sdxl-base/text_encoder_2", num_hidden_layers=4)


@requires_shared
@slow
@pytest.mark.parametrize("sub", ["sdxl-base/text_encoder", "sdxl-base/text_encoder_2"])
def test_matches_transformers_sdxl_pair_full(sub):
    """The SDXL pair at full size; the first encoder's config differs from SD 1.5's only in its dtype."""
    check_parity(sub)


@requires_shared
@pytest.mark.parametrize("sub,count", [("sd15/text_encoder", 123_060_480),
                                       ("sd21-base/text_encoder", 340_387_840),
                                       ("sdxl-base/text_encoder_2", 694_659_840)])
def test_parameter_counts(sub, count):
    with torch.device("meta"):
        model = CLIPTextModel(our_config(sub))
    assert sum(p.numel() for p in model.parameters()) == count


TINY = dict(vocab_size=49408, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


def test_new_eos_rule_pools_at_first_eos():
    """eos_token_id=49407 configs pool at the first EOS, even when padding repeats it."""
    import transformers
    hf = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY)).eval()
    ours = CLIPTextModel(CLIPTextConfig(**TINY))
    ours.load_state_dict(hf.state_dict(), strict=True)
    ids = torch.tensor([[49406, 320, 1125, 49407] + [49407] * 73, [49406] + [539] * 75 + [49407]])
    with torch.no_grad():
        out, ref = ours(ids), hf(ids)
    assert ours.eos_positions(ids).tolist() == [3, 76]
    assert rel_err(out.pooled, ref.pooler_output) <= 1e-5


def test_both_transformers_key_layouts_load_strict():
    """transformers 5 saves a bare CLIPTextModel without `text_model.`; checkpoints from transformers
    < 4.31 carry a persistent `position_ids` buffer. Both load with strict=True."""
    import transformers
    hf = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY)).eval()
    bare = hf.state_dict()
    assert "embeddings.token_embedding.weight" in bare
    old = {"text_model." + k: v for k, v in bare.items()}
    old["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    ids = torch.tensor([[49406, 320, 1125, 49407] + [49407] * 73])
    outs = []
    for sd in (bare, old):
        ours = CLIPTextModel(CLIPTextConfig(**TINY))
        ours.load_state_dict(sd, strict=True)
        outs.append(ours(ids).last_hidden_state)
    assert torch.equal(outs[0], outs[1])
    with pytest.raises(RuntimeError, match="text_model.encoder.layers.0.mlp.fc1.weight"):
        CLIPTextModel(CLIPTextConfig(**TINY)).load_state_dict(
            {k: v for k, v in old.items() if "fc1.weight" not in k}, strict=True)
