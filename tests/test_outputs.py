"""Writing images (`fewstep.outputs`): where they go is decided and checked before any work, files are
written whole or not at all, and PNG, JPEG and WebP carry A1111's parameters text where A1111 reads it."""

import os

import pytest
from PIL import Image

from fewstep.errors import FewstepError
from fewstep.outputs import plan, read_parameters, save_image

TEXT = "a red circle, é ✓\nNegative prompt: blue\nSteps: 4, Sampler: LCM, CFG scale: 0, Seed: 7, Size: 16x16"


@pytest.mark.parametrize("suffix,fmt", [(".png", "PNG"), (".jpg", "JPEG"), (".jpeg", "JPEG"), (".webp", "WEBP")])
def test_each_format_carries_the_parameters(tmp_path, suffix, fmt):
    path = save_image(Image.new("RGB", (16, 16), "red"), tmp_path / f"x{suffix}", TEXT)
    with Image.open(path) as im:
        assert im.format == fmt and im.size == (16, 16)
    assert read_parameters(path) == TEXT
    assert os.listdir(tmp_path) == [f"x{suffix}"]  # no temporary file left beside it


def test_the_image_info_is_written_by_default(tmp_path):
    image = Image.new("RGB", (8, 8))
    image.info["parameters"] = TEXT
    assert read_parameters(save_image(image, tmp_path / "a.png")) == TEXT


def test_a_failed_write_leaves_nothing(tmp_path):
    class Broken:
        info = {}

        def save(self, f, **kw):
            f.write(b"half a file")
            raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        save_image(Broken(), tmp_path / "a.png", TEXT)
    assert os.listdir(tmp_path) == []


def test_folders_number_after_the_highest_image(tmp_path):
    (tmp_path / "00007-3.png").write_bytes(b"")
    assert [p.name for p in plan(tmp_path, [5, 6])] == ["00008-5.png", "00009-6.png"]
    assert [p.name for p in plan(tmp_path / "new", [9])] == ["00000-9.png"]
    assert not (tmp_path / "new").exists()  # made when an image is written, not before the work
    assert [p.name for p in plan(tmp_path / "x.jpg", [1, 2])] == ["x-0.jpg", "x-1.jpg"]


@pytest.mark.parametrize("output,match", [("/proc/x.png", "cannot write to /proc"),
                                          ("/proc/sub/folder", "cannot write to /proc"),
                                          ("FILE/x.png", "is a file, not a folder"),
                                          ("x.gif", r"\.gif images are not written"),
                                          ("x.tiff", r"\.tiff images are not written")])
def test_unwritable_places_and_formats_are_refused_before_work(tmp_path, output, match):
    (tmp_path / "FILE").write_text("")
    with pytest.raises(FewstepError, match=match) as e:
        plan(str(tmp_path / output) if output[0] != "/" else output, [0])
    assert "\n" not in str(e.value)
