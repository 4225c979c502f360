"""Dataset folders, red-team round: a FIFO or a link to a device among the images is skipped with its reason, never
waited on nor read (the content digests of `checkpoint.file_digests` included: they used to block on a FIFO and
read /dev/zero forever); a checkpoint's metadata that is a FIFO is refused at once; a file PIL cannot identify is
refused without the reader object's repr; an image over PIL's pixel limit is refused saying how many pixels it has,
the limit, and how to shrink it.

Each case that could hang runs under a deadline (SIGALRM in process, a timeout for the console script), so that a
regression fails instead of hanging the suite. `dataset.run` cases use test_dataset's synthetic backbone; the CLI
case test_dataset_badinput's tiny random DINOv2-S at 28×28.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from spectral_jax import dataset, io
from spectral_jax import folder as F
from spectral_jax.dataset import checkpoint
from spectral_jax.errors import InputError
from test_dataset import SMALL, make_folder, synthetic
from test_dataset_badinput import TINY, _cli

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo") or not os.path.exists("/dev/zero"),
                                reason="needs POSIX FIFOs and /dev/zero")

FIFO_REASON = "is not a regular file but a FIFO (named pipe)"
DEVICE_REASON = "is not a regular file but a character device"


class Overtime(Exception):
    """A deadline passed. Not a TimeoutError: that is an OSError, which the code under test may catch."""


@contextlib.contextmanager
def deadline(seconds: int, what: str):
    """Raise `Overtime` in this (the main) thread if the block runs longer than `seconds`."""
    def expire(*_):
        raise Overtime(f"{what} still running after {seconds} s (waiting on a FIFO or reading a device?)")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def png_header(w: int, h: int) -> bytes:
    """A PNG that claims w×h RGB pixels and holds none: PIL checks the pixel count when it opens the file, before
    any decoding, so this stands in for a real image of that size (90 MP would be 270 MB decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def add_specials(folder) -> None:
    """folder/fifo.png (a FIFO nobody writes to) and folder/zero.png (a link to /dev/zero)."""
    os.mkfifo(os.path.join(folder, "fifo.png"))
    os.symlink("/dev/zero", os.path.join(folder, "zero.png"))


def test_digests_never_wait_on_a_fifo_nor_read_a_device(tmp_path):
    folder = make_folder(str(tmp_path / "imgs"), 2)
    add_specials(folder)
    files, _ = F.scan(folder)
    assert files == ["fifo.png", "img000.png", "img001.png", "zero.png"]      # listed: they are skipped later
    with deadline(20, "file_digests"):
        got = checkpoint.file_digests(folder, files)
    unreadable = checkpoint._UNREADABLE.hex()
    assert got["fifo.png"] == got["zero.png"] == unreadable
    with open(os.path.join(folder, "img000.png"), "rb") as f:
        assert got["img000.png"] == hashlib.sha256(f.read()).digest()[:16].hex() != unreadable


def test_a_fifo_for_checkpoint_metadata_is_refused_at_once(tmp_path):
    ckdir = tmp_path / "checkpoints"
    (ckdir / "1" / "meta").mkdir(parents=True)
    os.mkfifo(ckdir / "1" / "meta" / "metadata")
    with deadline(20, "read_meta"), pytest.raises(InputError, match=re.escape(f"(unreadable metadata: {FIFO_REASON})")):
        checkpoint.read_meta(str(ckdir), 1)


def test_unidentified_file_names_no_reader_object(tmp_path):
    path = tmp_path / "text.png"
    path.write_text("hello")
    with pytest.raises(InputError) as e:
        io.load_image(str(path))
    assert e.value.problem == "cannot read the image (not in a format PIL can identify: not an image, or damaged)"
    assert "BufferedReader" not in str(e.value) and "name=" not in str(e.value)


@pytest.mark.parametrize("side", [9500, 20000])           # over the limit (PIL warns), over twice it (PIL raises)
def test_an_image_over_the_pixel_limit_says_its_pixels_and_the_limit(tmp_path, side):
    path = tmp_path / "big.png"
    path.write_bytes(png_header(side, side))
    limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(InputError) as e:
        io.load_image(str(path))
    assert e.value.problem == (f"has {side * side} pixels, over PIL's limit of {limit} (its guard against "
                               "decompression bombs), so it is not decoded; downscale it")
    assert f"shrink it to at most {limit} pixels" in e.value.fix and "DOS attack" not in str(e.value)


def test_the_pixel_limit_is_pils_as_the_caller_set_it(tmp_path, monkeypatch):
    path = tmp_path / "small.png"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(InputError, match="has 600 pixels, over PIL's limit of 100 "):
        io.load_image(str(path))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600)
    assert io.load_image(str(path)).shape == (20, 30, 3)


def test_run_skips_specials_with_their_reasons(tmp_path, capsys):
    folder = make_folder(str(tmp_path / "imgs"), 5)
    add_specials(folder)
    (tmp_path / "imgs" / "big.png").write_bytes(png_header(9500, 9500))
    (tmp_path / "imgs" / "text.png").write_text("hello")
    with deadline(120, "dataset.run"):
        dataset.run(folder, str(tmp_path / "out"), backbone=synthetic(), **{**SMALL, "method": "exact"})
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    reasons = {d["file"]: d["reason"] for d in s["skipped"]}
    assert sorted(reasons) == ["big.png", "fifo.png", "text.png", "zero.png"] and s["images"] == 5
    assert reasons["fifo.png"] == FIFO_REASON and reasons["zero.png"] == DEVICE_REASON
    assert reasons["big.png"].startswith("has 90250000 pixels, over PIL's limit of ")
    assert reasons["text.png"].startswith("cannot read the image (not in a format PIL can identify")
    err = capsys.readouterr().err
    assert "BufferedReader" not in err and f"skipping fifo.png: {FIFO_REASON}" in err


def test_cli_dataset_with_a_fifo_and_a_device_link_finishes(tmp_path):
    folder = make_folder(str(tmp_path / "imgs"), 3)
    add_specials(folder)
    exact = TINY[:TINY.index("--method")] + TINY[TINY.index("--batch-size"):]
    r = _cli(folder, *exact, "--out", str(tmp_path / "out"), timeout=180)    # hung here before
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["skipped"] == [{"file": "fifo.png", "reason": FIFO_REASON}, {"file": "zero.png", "reason": DEVICE_REASON}]
    assert s["images"] == 3
    assert f"skipping fifo.png: {FIFO_REASON}" in r.stderr and f"skipping zero.png: {DEVICE_REASON}" in r.stderr


def test_a_fifo_in_out_is_refused_not_waited_on(tmp_path):
    """OUT's own small files read back (a shard's meta.json, summary.json on a re-export) go through the same
    guard: a FIFO in their place is one line, at once."""
    from spectral_jax.dataset import export, store

    for name in ("meta.json", "summary.json"):
        os.mkfifo(tmp_path / name)
    (tmp_path / "eigvecs.npz").write_bytes(b"")
    with deadline(30, "reading OUT's files"):
        with pytest.raises(InputError, match=r"unreadable meta.json: is not a regular file but a FIFO"):
            store._meta(str(tmp_path))
        with pytest.raises(InputError, match=r"incomplete export \(summary.json: is not a regular file but a FIFO"):
            export.load_result(str(tmp_path))
