"""Red-team findings on the diffusion families end to end: `sj.analyze` loads the model with its seed (timesteps,
noise, random weights follow it as on the command line) and takes the diffusion load options; a dataset run
resumed with a text embedding changed under the same path is refused, not fed the old features."""

import json

import numpy as np
import pytest

import spectral_jax as sj
from spectral_jax.errors import InputError
from spectral_jax.models import load_backbone

IMG = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)


def test_analyze_loads_the_model_with_its_seed_and_takes_the_load_options(monkeypatch):
    """`sj.analyze(model="sd_tiny", seed=7)` loaded the model with seed 0 (its timesteps, noise and random weights
    were seed 0's where the CLI's are seed 7's) and recorded 7; timesteps= was a TypeError. The end-to-end
    agreement with `spectral-jax analyze --seed` is measured in the closing note; here, what reaches the loader."""
    from spectral_jax import models

    seen = []

    class Loaded(Exception):
        pass

    def spy(name, weights=None, **kw):
        seen.append((name, weights, kw))
        raise Loaded

    monkeypatch.setattr(models, "load_backbone", spy)
    for kw in ({"seed": 7}, {"timesteps": [10, 100], "latent": "mean"}):
        with pytest.raises(Loaded):
            sj.analyze(IMG, model="sd_tiny", weights="random", num_eigs=3, size=64, **kw)
    assert seen[0] == ("sd_tiny", "random", {"dtype": seen[0][2]["dtype"], "seed": 7})
    assert seen[1][2]["timesteps"] == [10, 100] and seen[1][2]["latent"] == "mean" and seen[1][2]["seed"] == 0
    monkeypatch.undo()
    with pytest.raises(InputError, match="^timesteps: not an option of ViT models"):
        sj.analyze(IMG, model="dinov2_vits14", weights="random", num_eigs=3, size=28, timesteps=[10])
    with pytest.raises(InputError, match="^timesteps: is not used with a backbone given"):
        sj.analyze(IMG, backbone=object(), num_eigs=3, size=64, timesteps=[10])


def test_dataset_resume_refuses_a_text_embedding_changed_under_its_path(tmp_path):
    """The resume was accepted (images_cached 4) and gave the old embedding's eigenvectors bit for bit."""
    from PIL import Image

    from spectral_jax import dataset

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.roll(IMG, 9 * i, axis=1)).save(folder / f"{i}.png")
    te = tmp_path / "te.npy"
    np.save(te, np.random.default_rng(0).normal(size=(1, 77, 32)).astype(np.float32))
    settings = dict(model="sd_tiny", weights="random", graph="knn-vv", size=64, layers="0,1", num_eigs=3,
                    k_intra=4, k_inter=4, model_options={"timesteps": (10, 100), "text_embedding": str(te)})
    dataset.run(str(folder), str(tmp_path / "out"), **settings)
    np.save(te, np.random.default_rng(1).normal(size=(1, 77, 32)).astype(np.float32))
    with pytest.raises(InputError, match="was made with other settings: model_options .*text_embedding_sha256"):
        dataset.run(str(folder), str(tmp_path / "out"), resume=True, **settings)


def test_solve_cli_caps_k_per_grid_not_by_the_coarsest(tmp_path, capsys):
    """`spectral-jax solve --graph knn-vv` on sd_tiny's layers 0 (8×8) and 6 (1×1 at 64 px): the default k_intra
    was capped to the 1×1 grid's one token for every layer, and --k-intra 10 was refused ("exceeds the 1 tokens")."""
    from PIL import Image

    from spectral_jax.cli import main

    img = tmp_path / "a.png"
    Image.fromarray(IMG).save(img)
    acts = tmp_path / "acts.npz"
    assert main(["extract", str(img), "--model", "sd_tiny", "--weights", "random", "--size", "64",
                 "--layers", "0,6", "--timesteps", "10", "--out", str(acts)]) == 0
    capsys.readouterr()
    for extra, k_intra in (([], 50), (["--k-intra", "10"], 10)):
        out = tmp_path / f"r{k_intra}.npz"
        assert main(["solve", str(acts), "--graph", "knn-vv", "--num-eigs", "3", *extra, "--out", str(out)]) == 0
        s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert s["provenance"]["graph_options"]["k_intra"] == k_intra, s["provenance"]
