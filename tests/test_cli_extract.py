"""`spectral-jax extract`: writes a valid ACTS file; bad input → one line on stderr, exit 2, no file."""

import json

import numpy as np
import pytest
from PIL import Image

from spectral_jax.acts import load_acts
from spectral_jax.cli import main


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))


@pytest.fixture
def image(tmp_path):
    rgb = (np.random.default_rng(0).random((60, 80, 3)) * 255).astype(np.uint8)
    path = tmp_path / "cat.png"
    Image.fromarray(rgb).save(path)
    return str(path)


def test_extract_writes_acts(image, tmp_path, capsys):
    out = tmp_path / "acts" / "a.npz"
    rc = main(["extract", image, "--model", "dino_vits16", "--weights", "random", "--size", "48",
               "--layers", "0,11", "--hidden", "--out", str(out)])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip())
    assert summary["layers"] == [0, 11] and summary["grid"] == [3, 4] and summary["heads"] == 6
    assert summary["image_size"] == [48, 64] and summary["seconds"] > 0
    acts = load_acts(str(out))
    assert acts.model == "dino_vits16" and acts.image_size == (48, 64)
    assert sorted(acts.taps.layers) == [0, 11]
    tap = acts.taps.layers[11]
    assert tap.q.shape == (1, 6, 12, 64) and tap.grid == (3, 4) and tap.num_prefix == 0  # CLS dropped
    assert acts.taps.hidden[0].shape == (1, 12, 384)
    assert np.abs(tap.k).max() > 0
    assert [p.name for p in out.parent.iterdir()] == ["a.npz"]  # nothing temporary left


def test_extract_all_layers_exact_size(image, tmp_path, capsys):
    out = tmp_path / "b.npz"
    assert main(["extract", image, "--model", "dino_vits16", "--weights", "random", "--size", "32x48",
                 "--out", str(out)]) == 0
    acts = load_acts(str(out))
    assert sorted(acts.taps.layers) == list(range(12)) and acts.taps.layers[5].grid == (2, 3)


@pytest.mark.parametrize("argv, message", [
    (["--model", "dinov9_huge"], "unknown model — choose one of: dino_vits16"),
    (["--model", "dinov2_vitb14"], "huggingface-cli download facebook/dinov2-base"),
    (["--model", "dino_vits16", "--weights", "random", "--layers", "0,12"], "the model has layers 0..11"),
    (["--model", "dino_vits16", "--weights", "random", "--layers", "one"], "not a comma-separated list"),
    (["--model", "dino_vits16", "--weights", "random", "--size", "big"], "not S or HxW"),
    (["--model", "dino_vits16", "--weights", "random", "--size", "40x48"], "multiple of the patch size 16"),
])
def test_bad_input_exits_2_without_output(image, tmp_path, capsys, argv, message):
    out = tmp_path / "x.npz"
    assert main(["extract", image, *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("spectral-jax extract: error:")
    assert not out.exists()


def test_unreadable_image_exits_2(tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "x.npz"
    assert main(["extract", str(bad), "--model", "dino_vits16", "--weights", "random", "--out", str(out)]) == 2
    assert "broken.jpg: cannot read the image" in capsys.readouterr().err
    assert not out.exists()


def test_family_flag_refused_names_the_models_that_take_it(image, tmp_path):
    """A family flag the model's family does not take (--latent on a ViT) is one line, exit 2, nothing written;
    the fix lists exactly the registered models whose family takes it (read from the registry, not a fixed list),
    and the check runs before any model loads (the console script, no weights needed)."""
    import os
    import subprocess
    import sys

    from spectral_jax.models.registry import FAMILIES, get_spec, names

    out = tmp_path / "o" / "x.npz"
    exe = os.path.join(os.path.dirname(sys.executable), "spectral-jax")
    r = subprocess.run([exe, "extract", image, "--model", "dino_vits16", "--latent", "sample", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "--latent: does not apply to dino_vits16" in r.stderr
    takers = [n for n in names() if "latent" in FAMILIES[get_spec(n).family].options]
    assert takers and r.stderr.rstrip().endswith(", ".join(takers))
    assert "dino_vits16," not in r.stderr.split("takes it:")[1]
    assert not out.exists() and not out.parent.exists()
