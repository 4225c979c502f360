"""Image input: every PIL mode we promise, EXIF orientation, broken files, sizes, and the reference processor."""

import numpy as np
import pytest
from PIL import Image

from spectral_jax import io
from spectral_jax.errors import InputError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def gradient(h=30, w=40):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) % 256], -1).astype(np.uint8)


def save(tmp_path, im, name, **kw):
    path = str(tmp_path / name)
    im.save(path, **kw)
    return path


def test_rgb_png_roundtrip(tmp_path):
    rgb = gradient()
    got = io.load_image(save(tmp_path, Image.fromarray(rgb), "a.png"))
    assert got.dtype == np.uint8 and got.shape == (30, 40, 3)
    np.testing.assert_array_equal(got, rgb)


def test_greyscale_bilevel_and_cmyk(tmp_path):
    grey = gradient()[..., 0]
    got = io.load_image(save(tmp_path, Image.fromarray(grey), "g.png"))
    np.testing.assert_array_equal(got, np.repeat(grey[..., None], 3, -1))
    bw = io.load_image(save(tmp_path, Image.fromarray(grey > 127), "b.png"))
    assert set(np.unique(bw)) <= {0, 255} and bw.shape == (30, 40, 3)
    cmyk = Image.fromarray(gradient()).convert("CMYK")
    got = io.load_image(save(tmp_path, cmyk, "c.jpg", quality=100))
    assert got.shape == (30, 40, 3)
    assert np.abs(got.astype(int) - gradient().astype(int)).mean() < 8  # JPEG + CMYK round trip


def test_alpha_is_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[0, 0, 3] = 0      # fully transparent → white
    rgba[1, 1, 3] = 255    # opaque → its colour
    rgba[2, 2, 3] = 128    # half → blend
    got = io.load_image(save(tmp_path, Image.fromarray(rgba, "RGBA"), "t.png"))
    np.testing.assert_array_equal(got[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(got[1, 1], [200, 0, 0])
    assert 200 < got[2, 2, 0] < 255 and 100 < got[2, 2, 1] < 155
    la = io.load_image(save(tmp_path, Image.fromarray(rgba[..., [0, 3]], "LA"), "la.png"))
    np.testing.assert_array_equal(la[0, 0], [255, 255, 255])


def test_palette_with_and_without_transparency(tmp_path):
    pal = Image.fromarray(gradient()).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    got = io.load_image(save(tmp_path, pal, "p.png"))
    np.testing.assert_array_equal(got, np.asarray(pal.convert("RGB")))
    index = int(np.asarray(pal)[0, 0])
    pal.info["transparency"] = index
    got = io.load_image(save(tmp_path, pal, "pt.png", transparency=index))
    np.testing.assert_array_equal(got[0, 0], [255, 255, 255])


def test_sixteen_bit_greyscale_is_scaled(tmp_path):
    a = np.array([[0, 257 * 128, 65535]], np.uint16).repeat(3, 0)
    im = Image.fromarray(a)
    assert im.mode.startswith("I")
    got = io.load_image(save(tmp_path, im, "i16.png"))
    np.testing.assert_array_equal(got[0, :, 0], [0, 128, 255])


def test_exif_orientation_is_applied(tmp_path):
    rgb = gradient(20, 50)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = save(tmp_path, Image.fromarray(rgb), "r.jpg", exif=exif.tobytes(), quality=100)
    got = io.load_image(path)
    assert got.shape == (50, 20, 3)
    want = np.rot90(rgb, k=-1)
    assert np.abs(got.astype(int) - want.astype(int)).mean() < 4


def test_broken_files_name_the_file(tmp_path):
    path = save(tmp_path, Image.fromarray(gradient(200, 200)), "full.jpg", quality=95)
    data = open(path, "rb").read()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated.jpg: cannot read the image"):
        io.load_image(str(truncated))
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(InputError, match="notes.png: cannot read"):
        io.load_image(str(text))
    with pytest.raises(InputError, match="missing.png: no such file"):
        io.load_image(str(tmp_path / "missing.png"))


def test_target_size():
    assert io.target_size((480, 640), 224, 14) == (224, 294)   # 640·224/480 = 298.7 → 299 → 294
    assert io.target_size((640, 480), 224, 14) == (294, 224)
    assert io.target_size((500, 500), 230, 16) == (224, 224)   # shorter side rounded down to a multiple of 16
    assert io.target_size((100, 3000), 16, 16) == (16, 480)
    assert io.target_size((123, 45), (28, 56), 14) == (28, 56)
    with pytest.raises(InputError, match="multiple of the patch size 14"):
        io.target_size((100, 100), (30, 28), 14)
    with pytest.raises(InputError, match="smaller than one patch"):
        io.target_size((100, 100), 10, 14)


def test_preprocess_matches_the_reference_processor():
    transformers = pytest.importorskip("transformers")
    img = (np.random.default_rng(0).random((100, 150, 3)) * 255).astype(np.uint8)
    proc = transformers.BitImageProcessorPil(do_center_crop=False, size={"height": 56, "width": 84}, resample=3,
                                             image_mean=list(MEAN), image_std=list(STD))
    want = proc(images=img, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    got = io.preprocess(img, 56, 14, MEAN, STD)   # shorter side 56, aspect kept → 56×84
    assert got.dtype == np.float32 and got.shape == (56, 84, 3)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_preprocess_normalises_without_resizing_at_target_size():
    img = gradient(28, 42)
    got = io.preprocess(img, (28, 42), 14, MEAN, STD)
    np.testing.assert_allclose(got, (img / 255.0 - np.array(MEAN)) / np.array(STD), rtol=0, atol=1e-6)


def test_load_images_batches_equal_sizes(tmp_path):
    a = save(tmp_path, Image.fromarray(gradient(30, 45)), "a.png")
    b = save(tmp_path, Image.fromarray(gradient(60, 90)), "b.png")
    c = save(tmp_path, Image.fromarray(gradient(40, 40)), "c.png")
    assert io.load_images([a, b], 28, 14, MEAN, STD).shape == (2, 28, 28 + 14, 3)
    with pytest.raises(InputError, match="resize to different sizes"):
        io.load_images([a, c], 28, 14, MEAN, STD)
