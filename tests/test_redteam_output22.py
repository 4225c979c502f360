"""Red-team regressions (round 22), a dataset run's OUT against its inputs:

- an image file of FOLDER that is, through a link, an entry the run writes in OUT (an earlier run's
  OUT/eigvecs.png linked into FOLDER, or a folder link into OUT/checkpoints) was read as an image, then replaced;
  now one `InputError` line before any work (`inputs.check_files`), OUT untouched;
- FOLDER = OUT/checkpoints (or inside it) was accepted, and the run wrote its features and graph beside the images;
  now refused in one line (`inputs.check_out`). A FOLDER elsewhere in OUT (OUT/images) stays a valid layout, and
  its sub-folders are read (they were left out: the scan excluded all of OUT, not only what the run writes);
- OUT holding an exact run's cached features or graph without --resume was refused only after the backbone had
  loaded (seconds for a ViT, far more for Stable Diffusion); now before (`loop._open_folder`), same message.
"""

from __future__ import annotations

import os
import shutil

import pytest

from spectral_jax import dataset
from spectral_jax.dataset import loop
from spectral_jax.errors import InputError
from test_dataset import SMALL, make_folder
from test_dataset_badinput import EXT, TINY, _cli, _one_line_exit_2, _tree

EXACT = {**SMALL, "method": "exact"}


def _earlier_out(root) -> str:
    """An earlier run's OUT, without its checkpoints: its eigvecs.png is an image (any PNG will do)."""
    out = str(root / "Y")
    make_folder(out, 1)
    os.rename(os.path.join(out, "img000.png"), os.path.join(out, "eigvecs.png"))
    return out


@pytest.mark.parametrize("how", ["file", "folder"])
def test_an_input_linked_to_what_the_run_writes_is_refused_before_any_work(tmp_path, monkeypatch, how):
    """FOLDER holds zz.png -> OUT/eigvecs.png (or sub/ -> OUT/checkpoints, holding an image): refused naming the
    file, before the backbone runs; OUT is as it was."""
    out = _earlier_out(tmp_path)
    folder = make_folder(str(tmp_path / "ds"), 3)
    if how == "file":
        os.symlink(os.path.join("..", "Y", "eigvecs.png"), os.path.join(folder, "zz.png"))
        named = os.path.join(folder, "zz.png")
    else:
        make_folder(os.path.join(out, "checkpoints"), 1)
        os.symlink(os.path.join("..", "Y", "checkpoints"), os.path.join(folder, "sub"))
        named = os.path.join(folder, "sub", "img000.png")
    before = _tree(out)
    monkeypatch.setattr(loop, "_run", lambda *a, **k: pytest.fail("the run started"))
    with pytest.raises(InputError, match="would overwrite the input") as e:
        dataset.run(folder, out, backbone=EXT, **SMALL)
    assert named in str(e.value) and "--out" in str(e.value)
    assert _tree(out) == before


def test_cli_input_linked_to_the_earlier_eigvecs_png_is_one_line(tmp_path):
    """The finding's repro through the CLI: exit 2, one line, OUT/eigvecs.png unchanged."""
    out = _earlier_out(tmp_path)
    folder = make_folder(str(tmp_path / "ds"), 3)
    os.symlink(os.path.join("..", "Y", "eigvecs.png"), os.path.join(folder, "zz.png"))
    before = _tree(out)
    _one_line_exit_2(_cli(folder, *TINY, "--out", out), "would overwrite the input", "zz.png")
    assert _tree(out) == before


@pytest.mark.parametrize("inside", ["checkpoints", os.path.join("checkpoints", "features")])
def test_folder_in_out_checkpoints_is_refused(tmp_path, monkeypatch, inside):
    """FOLDER = OUT/checkpoints (or below it): the run would write its cache among the images. One line, nothing
    written."""
    out = str(tmp_path / "X")
    folder = make_folder(os.path.join(out, inside), 3)
    before = _tree(out)
    monkeypatch.setattr(loop, "_run", lambda *a, **k: pytest.fail("the run started"))
    with pytest.raises(InputError, match="would write into the input folder"):
        dataset.run(folder, out, backbone=EXT, **EXACT)
    assert _tree(out) == before


def test_folder_elsewhere_in_out_is_accepted_with_its_subfolders(tmp_path):
    """FOLDER = OUT/images (with a sub-folder), the results written beside it: accepted, every image read, the
    images untouched."""
    out = str(tmp_path / "Z")
    folder = make_folder(os.path.join(out, "images"), 3)
    make_folder(os.path.join(folder, "sub"), 1, seed=1)
    before = _tree(folder)
    res = dataset.run(folder, out, backbone=EXT, **EXACT)
    assert res.names == ["img000.png", "img001.png", "img002.png", os.path.join("sub", "img000.png")]
    assert _tree(folder) == before and os.path.isfile(os.path.join(out, "summary.json"))


def test_cached_exact_run_is_refused_before_the_backbone_loads(tmp_path, monkeypatch):
    """OUT holds an exact run's cache (features and graph), no resume: the same line as before, but the backbone
    is never loaded; with resume the run goes on."""
    folder = make_folder(str(tmp_path / "ds"), 3)
    out = str(tmp_path / "out")
    dataset.run(folder, out, backbone=EXT, **EXACT)
    shutil.rmtree(os.path.join(out, "checkpoints", "features"))       # the graph alone is a cache too
    before = _tree(out)
    monkeypatch.setattr(loop, "_load_backbone", lambda settings: pytest.fail("the backbone was loaded"))
    with pytest.raises(InputError, match="holds the cached graph of an earlier run") as e:
        dataset.run(folder, out, **EXACT)
    assert "--resume" in str(e.value) and _tree(out) == before
    monkeypatch.undo()
    assert dataset.run(folder, out, backbone=EXT, resume=True, **EXACT).summary()["cached"] == ["graph"]
    with pytest.raises(InputError, match="holds the cached graph of an earlier exact run") as e:    # gd: its own
        dataset.run(folder, out, backbone=EXT, **{**EXACT, "method": "gd", "epochs": 1})   # results would replace it
    assert "--resume" not in str(e.value) and "to start over" in str(e.value)
