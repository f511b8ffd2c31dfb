"""CLIP tokenizer: identical ids to transformers' CLIPTokenizer on all PartiPrompts (both pad styles),
the truncation warning, and errors for incomplete folders."""

import csv
import shutil
import warnings

import pytest
import torch

from fewstep.errors import FewstepError
from fewstep.tokenizer import CLIPTokenizer
from helpers.env import CONFIGS, SHARED, requires_shared

# Prompts that exercise the odd corners: special tokens written out (upper case too), SDXL's "!" pad
# token inside words, whitespace runs, non-ASCII and emoji, contractions, the empty prompt.
EDGE = ["hello <|endoftext|> world <|startoftext|>", "Hi <|ENDOFTEXT|> x<|endoftext|>y !! a!b",
        "A  B\n\tC", "café naïve ＡＢＣ 😀 ½", "", "it's don't I'LL"]


def parti_prompts() -> list[str]:
    with open(SHARED / "parti" / "PartiPrompts.tsv", newline="") as f:
        return [row["Prompt"] for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


@requires_shared
@pytest.mark.parametrize("folder,pad_id", [(SHARED / "clip-tokenizer", 49407),
                                           (CONFIGS / "sdxl-base" / "tokenizer_2", 0)])
def test_matches_transformers_on_all_parti_prompts(folder, pad_id):
    import transformers
    prompts = parti_prompts() + EDGE
    assert len(prompts) == 1632 + len(EDGE)
    ours = CLIPTokenizer.from_folder(folder)
    assert ours.max_length == 77 and ours.pad_id == pad_id
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one Parti prompt is 82 tokens long
        ids = ours(prompts)
    ref = transformers.CLIPTokenizer.from_pretrained(folder)
    want = ref(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert ids.dtype == torch.long and ids.shape == (len(prompts), 77)
    mismatched = [p for p, a, b in zip(prompts, ids, want) if not torch.equal(a, b)]
    assert not mismatched, f"{len(mismatched)} prompts differ, first: {mismatched[0]!r}"


@requires_shared
def test_truncation_warns_once_with_dropped_count():
    tok = CLIPTokenizer.from_folder(SHARED / "clip-tokenizer")
    fits = "cat " * 75
    assert tok.count_tokens("a photo of a cat") == 5
    assert tok.count_tokens(fits) == 75
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exactly 75 tokens + BOS + EOS fits: no warning
        ids = tok([fits])
    assert ids[0, 0].item() == tok.bos_id and ids[0, -1].item() == tok.eos_id
    with pytest.warns(UserWarning) as record:
        ids = tok(["a photo of a cat", "dog " * 100])
    assert len(record) == 1
    msg = str(record[0].message)
    assert "25 dropped" in msg and "dog dog" in msg and "\n" not in msg and len(msg) < 120
    assert ids[1, -1].item() == tok.eos_id and ids[0, 6].item() == tok.eos_id and ids[0, 7].item() == tok.pad_id


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(FewstepError, match="tokenizer folder not found"):
        CLIPTokenizer.from_folder(tmp_path / "nope")
    with pytest.raises(FewstepError, match="vocab.json"):
        CLIPTokenizer.from_folder(tmp_path)


@requires_shared
def test_missing_merges_is_named(tmp_path):
    shutil.copy(SHARED / "clip-tokenizer" / "vocab.json", tmp_path / "vocab.json")
    with pytest.raises(FewstepError, match="merges.txt"):
        CLIPTokenizer.from_folder(tmp_path)
