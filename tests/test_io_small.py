"""Small images: enlarged as before (the same pixels), but never silently — one `UpscaleWarning` line naming the file,
its size and the factor where the resize enlarges a side more than `io.UPSCALE_WARN` times or the image is smaller
than a patch; an image with a side of 0 pixels is one `InputError` line, not a ZeroDivisionError."""

import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from spectral_jax import io
from spectral_jax.errors import InputError
from spectral_jax.models.spec import PreprocessSpec

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(autouse=True)
def fresh_names(monkeypatch):
    monkeypatch.setattr(io, "_NAMED", set(), raising=False)   # no image named by an earlier test


def picture(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3)).astype(np.uint8)


def png(tmp_path, h, w, name=None):
    path = str(tmp_path / (name or f"img{h}x{w}.png"))
    Image.fromarray(picture(h, w)).save(path)
    return path


def caught(fn):
    """(fn's result, the messages of the UpscaleWarnings it gave), every warning shown."""
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in got if issubclass(w.category, io.UpscaleWarning)]


def reference(img, hw):
    """The preprocessing as it always was: PIL bicubic to (H', W'), then (x/255 − mean)/std."""
    x = np.asarray(Image.fromarray(img).resize((hw[1], hw[0]), Image.Resampling.BICUBIC)).astype(np.float32) / 255
    return (x - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)


def test_a_5px_file_at_448_is_enlarged_as_before_with_one_line_naming_it(tmp_path):
    path = png(tmp_path, 5, 5, "tiny.png")
    x, msgs = caught(lambda: io.preprocess(io.load_image(path), 448, 14, MEAN, STD, name=path))
    np.testing.assert_array_equal(x, reference(picture(5, 5), (448, 448)))       # the same input for the model
    assert len(msgs) == 1 and "\n" not in msgs[0], msgs
    assert msgs[0].startswith(f"{path}: 5x5 pixels (HxW) enlarged 89.6x to 448x448"), msgs
    assert "smaller than one 14-pixel patch" in msgs[0] and "larger image" in msgs[0]


@pytest.mark.parametrize("hw,size,want", [
    ((100, 100), 448, "enlarged 4.48x to 448x448 (over 4x)"),        # over the factor
    ((10, 300), (224, 224), "enlarged 22.4x to 224x224"),            # one side many-fold (HxW: distorted)
    ((10, 10), 14, "enlarged 1.4x to 14x14 (smaller than one 14-pixel patch on a side)"),   # below a patch
    ((13, 400), 14, "enlarged 1.08x to 14x420 (smaller than one 14-pixel patch on a side)"),
])
def test_warned(tmp_path, hw, size, want):
    path = png(tmp_path, *hw)
    x, msgs = caught(lambda: io.preprocess(io.load_image(path), size, 14, MEAN, STD, name=path))
    assert len(msgs) == 1 and msgs[0].startswith(f"{path}: {hw[0]}x{hw[1]} pixels (HxW) {want}"), msgs
    np.testing.assert_array_equal(x, reference(picture(*hw), x.shape[:2]))


@pytest.mark.parametrize("hw,size", [((112, 112), 448), ((120, 160), 448), ((480, 640), 224), ((28, 42), (28, 42)),
                                     ((14, 14), 28), ((1000, 20), (28, 14))])
def test_normal_images_say_nothing_and_are_unchanged(tmp_path, hw, size):
    """At most 4× (112 → 448), shrinking, no resize, a patch-sized image at 2×: no warning, the same pixels."""
    path = png(tmp_path, *hw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = io.preprocess(io.load_image(path), size, 14, MEAN, STD)
    want = io.target_size(hw, size, 14)
    np.testing.assert_array_equal(x, reference(picture(*hw), want) if want != hw else
                                  (picture(*hw) / np.float32(255) - np.asarray(MEAN, np.float32))
                                  / np.asarray(STD, np.float32))


def test_the_name_is_the_one_given(tmp_path):
    path = png(tmp_path, 5, 5)
    img = io.load_image(path)
    _, msgs = caught(lambda: io.preprocess(img, 56, 14, MEAN, STD))                 # no name: its size alone
    assert msgs == ["an image of 5x5 pixels (HxW) enlarged 11.2x to 56x56 (smaller than one 14-pixel patch on a "
                    "side): the model sees interpolated pixels, not detail; pass a larger image or a smaller --size "
                    "/ size"]
    _, msgs = caught(lambda: io.preprocess(img, 56, 14, MEAN, STD, name="images[3]"))
    assert msgs[0].startswith("images[3]: 5x5 pixels")
    _, msgs = caught(lambda: io.load_images([path], 56, 14, MEAN, STD))
    assert msgs[0].startswith(f"{path}: 5x5 pixels")


def test_every_reader_names_the_file(tmp_path):
    """analyze (`pipeline.load_inputs`), extract (`PreprocessSpec.image(name=)`) and dataset (`folder.read_image`)
    give `preprocess` the file's name: each warning names the file."""
    from spectral_jax import folder, pipeline

    path = png(tmp_path, 5, 5, "tiny.png")
    prep = PreprocessSpec(56, 14, MEAN, STD)
    for read in (lambda: pipeline.load_inputs([path], prep), lambda: prep.image(io.load_image(path), name=path),
                 lambda: folder.read_image(path, (56, 56), prep)):
        io._NAMED.clear()                                 # each file is named once a process: forget it
        _, msgs = caught(read)
        assert len(msgs) == 1 and msgs[0].startswith(f"{path}: 5x5 pixels (HxW) enlarged 11.2x to 56x56"), msgs


def test_a_folder_of_thumbnails_names_five_then_one_line(tmp_path):
    """A dataset of 8 thumbnails read for two epochs: 5 lines naming the first 5, one line for the rest, nothing
    more (every warning shown: the lines are io's own count, not Python's once-per-message rule, which each
    `load_image` resets)."""
    paths = [png(tmp_path, 8, 8, f"t{i}.png") for i in range(8)]
    _, msgs = caught(lambda: [io.preprocess(io.load_image(p), 56, 14, MEAN, STD, name=p) for _ in range(2)
                                 for p in paths])
    assert len(msgs) == io.UPSCALE_NAMED + 1, msgs
    assert [m.split(":")[0] for m in msgs[:-1]] == paths[:io.UPSCALE_NAMED]
    assert msgs[-1].startswith("more images are enlarged over 4x") and "not named" in msgs[-1]


@pytest.mark.parametrize("shape", [(5, 0, 3), (0, 7, 3), (0, 0, 3)])
def test_a_zero_side_is_one_input_error_line(shape):
    with pytest.raises(InputError) as e:
        io.preprocess(np.zeros(shape, np.uint8), 448, 14, MEAN, STD)
    msg = str(e.value)
    assert "\n" not in msg and f"{shape[0]}x{shape[1]} pixels (HxW), a side of 0 pixels" in msg
    with pytest.raises(InputError, match="a side of 0 pixels"):
        io.target_size(shape[:2], 448, 14)
    with pytest.raises(InputError, match="a side of 0 pixels"):
        PreprocessSpec(56, 14, MEAN, STD).image(np.zeros(shape, np.uint8))


def test_a_zero_sided_pil_image_given_to_analyze_is_an_input_error():
    from spectral_jax import pipeline

    with pytest.raises(InputError, match="5x0 pixels"):
        pipeline.load_inputs([Image.new("RGB", (0, 5))], PreprocessSpec(56, 14, MEAN, STD))


@pytest.mark.parametrize("w,h", [(0, 5), (5, 0)])
def test_a_zero_sided_file_is_refused_in_one_line(tmp_path, w, h):
    """A PNG whose header says 0 pixels wide or high (PIL will not write one): PIL does not identify it, so
    `load_image` refuses it naming the file (this held before too)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + b"\x00" * (3 * w) for _ in range(h))
    path = tmp_path / "empty.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    with pytest.raises(InputError, match="empty.png: cannot read the image") as e:
        io.load_image(str(path))
    assert "\n" not in str(e.value)


def test_analyze_says_it_in_one_line_and_still_runs(tmp_path):
    """The console script, end to end: a 5×5 PNG analysed at --size 56 gives one stderr line naming it, and the run
    goes on (exit 0, its folder written)."""
    import os
    import subprocess
    import sys

    path = png(tmp_path, 5, 5, "tiny.png")
    exe = os.path.join(os.path.dirname(sys.executable), "spectral-jax")
    r = subprocess.run([exe, "analyze", path, "--model", "dinov2_vits14", "--weights", "random", "--size", "56",
                        "--num-eigs", "3", "--out", str(tmp_path / "out")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines == [f"spectral-jax analyze: warning: {path}: 5x5 pixels (HxW) enlarged 11.2x to 56x56 (smaller "
                     "than one 14-pixel patch on a side): the model sees interpolated pixels, not detail; pass a "
                     "larger image or a smaller --size / size"], r.stderr[-3000:]
    assert (tmp_path / "out" / "tiny" / "panel.png").is_file()


def test_analyze_gives_the_warning_when_it_starts_not_prepare(tmp_path):
    """`pipeline.prepare` holds the images' UpscaleWarnings (a run refused after it — K, --out — says only why);
    `analyze` gives them when it starts; arrays are named by their place in the list."""
    from spectral_jax import pipeline

    _, msgs = caught(lambda: pipeline.prepare([picture(5, 5)], size=56, num_eigs=3))
    assert msgs == []
    io._NAMED.clear()                                 # each name is warned about once a process: forget it
    prep = pipeline.prepare([picture(5, 5)], size=56, num_eigs=3)
    assert len(prep.notes) == 1 and prep.notes[0].startswith("images[0]: 5x5 pixels"), prep.notes
    io._NAMED.clear()
    with pytest.raises(InputError, match="num_eigs"), warnings.catch_warnings():
        warnings.simplefilter("error", io.UpscaleWarning)              # refused before anything is said about it
        pipeline.prepare([picture(5, 5)], size=56, num_eigs=1000)
    # the corrected run, in the same process (a notebook), still names the image: the refused one gave nothing
    _, msgs = caught(lambda: pipeline.analyze([picture(5, 5)], size=56, num_eigs=3, weights="random"))
    assert len(msgs) == 1 and msgs[0].startswith("images[0]: 5x5 pixels"), msgs
    io._NAMED.clear()
    with warnings.catch_warnings():                                    # analyze says it first, before the model
        warnings.simplefilter("error", io.UpscaleWarning)
        with pytest.raises(io.UpscaleWarning, match=r"^images\[0\]: 5x5 pixels"):
            pipeline.analyze(prep, weights="random")
