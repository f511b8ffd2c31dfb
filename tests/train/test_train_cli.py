"""`fewstep train`'s command line: what it parses, and the one-line errors for options a stage does not take."""

import pytest

from fewstep.errors import FewstepError


def test_cli_parses_and_rejects():
    import argparse

    from fewstep.train.cli import add_train_parser, cmd_train
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    a = parser.parse_args(["train", "teacher", "--out", "x", "--steps", "5", "--batch", "8", "--resume", "--tiny"])
    assert (a.stage, a.steps, a.batch, a.resume, a.tiny, a.seed) == ("teacher", 5, 8, True, True, 0)
    with pytest.raises(FewstepError, match="--scale"):
        cmd_train(parser.parse_args(["train", "all", "--out", "x", "--steps", "5"]))
    a = parser.parse_args(["train", "teacher", "--out", "x", "--text-layers", "2", "--offset-noise", "0.1"])
    assert (a.text_layers, a.offset_noise) == (2, 0.1)
    assert parser.parse_args(["train", "teacher", "--out", "x", "--init", "runs/a/teacher"]).init == "runs/a/teacher"
    for extra in (["--init", "runs/a/teacher"], ["--offset-noise", "0.1"], ["--swap", "1"]):
        with pytest.raises(FewstepError, match="options of the teacher, refine, pairs and swap stages"):
            cmd_train(parser.parse_args(["train", "student", "--out", "x", *extra]))
    for flag, dest in (("--backward-sim", "backward"), ("--one-step", "one_step")):  # the student's own options
        assert getattr(parser.parse_args(["train", "student", "--out", "x", flag, "0.5"]), dest) == 0.5
        with pytest.raises(FewstepError, match=f"{flag} is an option of the student stage"):
            cmd_train(parser.parse_args(["train", "pairs", "--out", "x", flag, "1"]))
        with pytest.raises(FewstepError, match=f"{flag} is a probability between 0 and 1, not -0.1"):
            cmd_train(parser.parse_args(["train", "student", "--out", "x", flag, "-0.1"]))
        with pytest.raises(FewstepError, match="--scale"):
            cmd_train(parser.parse_args(["train", "all", "--out", "x", flag, "1"]))
    with pytest.raises(FewstepError, match="--swap is a weight, 0 or more, not -1.0"):
        cmd_train(parser.parse_args(["train", "pairs", "--out", "x", "--swap", "-1"]))
    with pytest.raises(FewstepError, match="--scale"):
        cmd_train(parser.parse_args(["train", "all", "--out", "x", "--swap", "1"]))
    with pytest.raises(FewstepError, match="--scale"):
        cmd_train(parser.parse_args(["train", "all", "--out", "x", "--text-layers", "1"]))
    a = parser.parse_args(["train", "refine", "--out", "x", "--two-objects", "0.8", "--caption-drop", "0.15"])
    assert (a.two_objects, a.caption_drop) == (0.8, 0.15)
    with pytest.raises(FewstepError, match="--two-objects is a probability between 0 and 1, not 1.5"):
        cmd_train(parser.parse_args(["train", "refine", "--out", "x", "--two-objects", "1.5"]))
    with pytest.raises(FewstepError, match="--caption-drop is an option of the teacher, refine, pairs, swap and"):
        cmd_train(parser.parse_args(["train", "vae", "--out", "x", "--caption-drop", "0.1"]))
    with pytest.raises(FewstepError, match="--scale"):
        cmd_train(parser.parse_args(["train", "all", "--out", "x", "--two-objects", "0.8"]))
    with pytest.raises(FewstepError, match="--processes is 1 or more, not 0"):
        cmd_train(parser.parse_args(["train", "all", "--out", "x", "--processes", "0"]))
    with pytest.raises(FewstepError, match="--processes is 1 or more, not 0"):
        cmd_train(parser.parse_args(["train", "teacher", "--out", "x", "--processes", "0"]))
    with pytest.raises(FewstepError, match="needs x/tokenizer/vocab.json"):  # --init: no earlier teacher stage asked
        cmd_train(parser.parse_args(["train", "pairs", "--out", "x", "--init", "runs/a/teacher"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "decoder", "--out", "x"])
