"""Red-team regressions (round 22: options at their extremes; diffusion families end to end), single-image side:

- a kNN graph whose only kept edges are tokens' edges to themselves (knn-vv at k_intra 1 — a token's nearest
  neighbour is itself, cosine 1 — or a min_cos above every other cosine) was solved as the identity: every
  eigenvalue 1, "converged", arbitrary maps. It is now one `InputError` naming the options, before the solve;
- `analyze` and `extract` left --latent and --text-embedding out of their JSON (two runs that differ only there
  gave indistinguishable records); they now record them as `dataset`'s model_options do;
- `solve --layers` refused negative indices, which extract, analyze and dataset take (-1: the last layer); they
  now count back from the file's model's depth (registered models).

(gd's divergence, saturation and collapse: tests/test_gd_convergence.py; the dataset's:
tests/test_dataset_gd_guard.py.)
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

import spectral_jax as sj
from spectral_jax.errors import InputError
from spectral_jax.taps import LayerTap, Taps


def _taps(rng, batch=1, grid=(4, 4), dim=8):
    n = grid[0] * grid[1]
    q, k, v = (rng.normal(size=(batch, 2, n, dim)).astype(np.float32) for _ in range(3))
    return Taps({i: LayerTap(q, k, v, grid) for i in (0, 1)})


@pytest.mark.parametrize("kw,named", [({"k_intra": 1}, "k_intra 1, min_cos 0.1"),
                                      ({"min_cos": 0.9999}, "k_intra 50, min_cos 0.9999")])
def test_a_knn_graph_of_self_edges_only_is_refused(rng, kw, named):
    taps = _taps(rng)
    with pytest.raises(InputError, match=rf"^{named}: leave no edge between two tokens in any knn-vv graph .* — "
                                         r"raise k_intra \(--k-intra\) to 2 or more, or lower min_cos$"):
        sj.solve(taps, "knn-vv", 3, **kw)
    res = sj.solve(taps, "knn-vv", 3, k_intra=2)                       # one more neighbour: a real graph
    assert res.convergence.converged and not np.allclose(res.eigvals, 1.0)


def test_the_joint_knn_graph_of_several_images_names_k_inter_and_counts_edges_between_them(rng):
    taps = _taps(rng, batch=2)
    with pytest.raises(InputError, match=r"^k_intra 1, k_inter 0, min_cos 0.1: leave no edge"):
        sj.solve(taps, "knn-vv", 3, k_intra=1, k_inter=0)
    res = sj.solve(taps, "knn-vv", 3, k_intra=1, k_inter=2)   # edges to the other image only
    assert res.num_images == 2 and not np.allclose(res.eigvals, 1.0)


def test_analyze_and_extract_record_the_latent_and_the_text_embedding(tmp_path, capsys, rng):
    from spectral_jax.cli import main

    img, te = tmp_path / "a.png", tmp_path / "te.npy"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(img)
    np.save(te, rng.normal(size=(1, 77, 32)).astype(np.float32))
    want = {"latent": "sample", "text_embedding": str(te.resolve()),
            "text_embedding_sha256": hashlib.sha256(te.read_bytes()).digest()[:16].hex()}
    family = ["--model", "sd_tiny", "--weights", "random", "--size", "64", "--layers", "0", "--timesteps", "10",
              "--latent", "sample", "--text-embedding", str(te)]
    assert main(["extract", str(img), *family, "--out", str(tmp_path / "a.npz")]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {k: line.get(k) for k in want} == want and line["timesteps"] == [10]
    assert main(["analyze", str(img), *family, "--num-eigs", "3", "--out", str(tmp_path / "an")]) == 0
    one = json.loads((tmp_path / "an" / "a" / "summary.json").read_text())
    assert {k: one.get(k) for k in want} == want
    assert main(["extract", str(img), "--model", "dinov2_vits14", "--weights", "random", "--size", "28",
                 "--layers", "0", "--out", str(tmp_path / "d.npz")]) == 0
    vit = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert not {"latent", "text_embedding"} & set(vit)          # a ViT takes neither: nothing recorded


def test_solve_layers_count_back_from_the_models_depth(tmp_path, capsys, rng):
    from spectral_jax.cli import main

    img, acts = tmp_path / "a.png", tmp_path / "a.npz"
    Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(img)
    assert main(["extract", str(img), "--model", "dinov2_vits14", "--weights", "random", "--size", "28",
                 "--layers", "9,11", "--out", str(acts)]) == 0

    def solved(*layers):
        capsys.readouterr()
        assert main(["solve", str(acts), "--graph", "qk", "--num-eigs", "3", *layers,
                     "--out", str(tmp_path / "r.npz")]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    a = solved("--layers=-1,-3", "--layer-weights", "1,0.5")           # 11 weighs 1, 9 weighs 0.5
    b = solved("--layers", "11,9", "--layer-weights", "1,0.5")
    assert a["layers"] == b["layers"] == [9, 11] and a["eigvals"] == b["eigvals"]
    assert main(["solve", str(acts), "--graph", "qk", "--num-eigs", "3", "--layers", "-13",
                 "--out", str(tmp_path / "x.npz")]) == 2
    assert "--layers -13: names layer(s) -13 the file does not hold" in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()
