"""The command line on today's encoders (DINOv3, SigLIP 2 FixRes and NaFlex) with seeded random weights: `extract`
→ `solve`, `analyze` and `dataset` run end to end at small sizes, and report the families' own grids and
prefixes (DINOv3's CLS + 4 registers never reach ACTS.npz, which holds patch tokens only)."""

import json

import numpy as np
import pytest
from PIL import Image

from spectral_jax.cli import main

# name → (size, expected grid of the 48×64 image at that size, heads)
# (FixRes shares NaFlex's encoder; its table resize is covered by test_siglip2's parity tests.)
MODELS = {"dinov3_vits16": ("32", [2, 2], 6), "siglip2_b16_naflex": ("32x48", [2, 3], 12)}


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(1).random((48, 64, 3)) * 255).astype(np.uint8)).save(path)
    return str(path)


@pytest.mark.parametrize("name", list(MODELS))
def test_extract_solve_analyze(name, image_file, tmp_path, capsys):
    size, grid, heads = MODELS[name]
    acts = tmp_path / "acts.npz"
    assert main(["extract", image_file, "--model", name, "--weights", "random", "--size", size,
                 "--layers", "0,-1", "--out", str(acts)]) == 0
    capsys.readouterr()
    with np.load(acts) as f:
        assert f["layer11/q"].shape == (1, heads, grid[0] * grid[1], 64) and list(f["layer0/grid"]) == grid
    assert main(["solve", str(acts), "--graph", "qk", "--num-eigs", "3", "--out", str(tmp_path / "r.npz")]) == 0
    assert json.loads(capsys.readouterr().out)["num_eigs"] == 3
    assert np.load(tmp_path / "r.npz")["eigvecs"].shape == (1, 3, *grid)
    out = tmp_path / "report"
    assert main(["analyze", image_file, "--model", name, "--weights", "random", "--size", size, "--layers", "0,-1",
                 "--num-eigs", "3", "--out", str(out)]) == 0
    assert json.loads((out / "photo" / "summary.json").read_text())["model"] == name
    assert np.load(out / "photo" / "result.npz")["eigvecs"].shape == (1, 3, *grid)


@pytest.mark.parametrize("name", list(MODELS))
def test_dataset(name, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray((rng.random((40, 56, 3)) * 255).astype(np.uint8)).save(folder / f"im{i}.png")
    out = tmp_path / "out"
    assert main(["dataset", str(folder), "--model", name, "--weights", "random", "--size", "32", "--layers", "-1",
                 "--num-eigs", "3", "--batch-size", "3", "--min-cos", "-1", "--out", str(out)]) == 0   # random
    # weights: a model's cosines may all lie under the default 0.1, a graph without edges, refused
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["images"] == 3
    with np.load(out / "eigvecs.npz") as f:
        assert f["eigvecs"].shape == (3, 3, 2, 2)
