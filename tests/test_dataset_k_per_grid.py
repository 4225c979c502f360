"""Each layer group of a dataset run takes its own k, capped by its own grid's tokens (`Geometry.k_of`, as
`graphs.from_taps` caps a single image's groups), not by the coarsest tapped grid's: on the exact path and the gd
(minibatch) path, recorded per group in summary.json ("k_used"); a given k is refused only when it fits no group
(above the finest grid's tokens); a graph cached with the old coarse cap is refused on resume, not mixed in; and a
gd run records its layer weights as an exact run does.

Model: sd_tiny, random weights, 64² inputs: layer 0 sits on an 8×8 grid (64 tokens), layer 6 on 1×1 (one token).
Before, adding layer 6 capped layer 0's graph at k_intra 1, k_inter 3 too: 2 080 edges instead of 42 000, a graph
in pieces, every eigenvalue 1.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

import spectral_jax as sj
from spectral_jax import dataset
from spectral_jax.dataset import inputs, layout, step
from spectral_jax.dataset.settings import Settings
from spectral_jax.errors import InputError
from test_dataset_diffusion import square_folder

TS = (10, 100)
BASE = dict(model="sd_tiny", weights="random", size=64, graph="knn-vv", num_eigs=5, figure_images=0,
            model_options={"timesteps": TS})


def _graph(out) -> dict:
    with np.load(os.path.join(out, "checkpoints", "graph.npz")) as f:
        return {k: f[k] for k in f.files}


def test_exact_fine_grid_keeps_its_k_beside_a_one_token_grid(tmp_path):
    """The repro: --layers 0,6 gives layer 0's 8×8 graphs k 50/50, the same edges as --layers 0 alone (layer 6's
    1×1 graphs get 1/3, all their grid has); the eigenvalues are not all 1 (a connected graph); summary.json keeps
    k_intra/k_inter (the largest used) and records each group's. A graph cached with the old coarse cap (k 1/3)
    is refused on --resume in one line, not mixed in."""
    folder = square_folder(str(tmp_path / "imgs"), 4, 64)
    bb = sj.load_backbone("sd_tiny", "random", timesteps=list(TS))            # loaded once for the three runs
    one = dataset.run(folder, str(tmp_path / "l0"), layers="0", backbone=bb, **BASE).summary()
    both = dataset.run(folder, str(tmp_path / "l06"), layers="0,6", backbone=bb, **BASE).summary()
    assert one["k_used"] == [{"grid": [8, 8], "layers": [0], "k_intra": 50, "k_inter": 50}]
    assert both["k_used"] == [{"grid": [8, 8], "layers": [0], "k_intra": 50, "k_inter": 50},
                              {"grid": [1, 1], "layers": [6], "k_intra": 1, "k_inter": 3}]
    assert (both["k_intra"], both["k_inter"]) == (one["k_intra"], one["k_inter"]) == (50, 50)
    g0, g06 = _graph(tmp_path / "l0"), _graph(tmp_path / "l06")
    assert g06["idx0"].shape == g0["idx0"].shape == (2, 4 * 64, 100)       # [L·T, n·h·w, k_intra + k_inter]
    assert g06["idx1"].shape == (2, 4, 4)
    np.testing.assert_array_equal(g06["idx0"], g0["idx0"])
    np.testing.assert_array_equal(g06["w0"], g0["w0"])
    assert both["edges"] > one["edges"] > 20_000
    ev = np.asarray(both["eigvals"])
    assert ev[1] < 0.9 and both["objective"] < 5 - 0.5, ev          # not K disconnected pieces
    # a cache written before the fix (its key: the coarse cap) is refused, naming k, not read as this run's graph
    path = tmp_path / "l06" / "checkpoints" / "graph.npz"
    d = _graph(tmp_path / "l06")
    key = json.loads(str(d["key"]))
    key.update(k_intra_effective=1, k_inter_effective=3)
    d["key"] = np.array(json.dumps(key, sort_keys=True))
    np.savez(path, **d)
    with pytest.raises(InputError, match="k_inter_effective 3 → 50, k_intra_effective 1 → 50"):
        dataset.run(folder, str(tmp_path / "l06"), layers="0,6", resume=True, backbone=bb, **BASE)


def test_a_given_k_is_capped_per_grid_and_refused_only_above_the_finest():
    """k_intra 10 with grids 8×8 and 1×1 runs (the 1×1 group takes its one token); 65 > 64 tokens of the finest
    grid fits no group and is refused, naming it; likewise k_inter above the other images' tokens there."""
    s = Settings(model="sd_tiny", size=64, num_eigs=5, k_intra=10, layers="0,6")
    inputs.check_graph_size(s, [(8, 8), (1, 1)], 4, (8, 8))
    inputs.check_graph_size(s.replace(k_intra=64, k_inter=192), [(8, 8), (1, 1)], 4, (8, 8))
    with pytest.raises(InputError, match=r"--k-intra: 65 is more than the 64 tokens of an image on the finest tapped "
                                         r"grid 8×8"):
        inputs.check_graph_size(s.replace(k_intra=65), [(8, 8), (1, 1)], 4, (8, 8))
    with pytest.raises(InputError, match=r"--k-inter: 193 is more than the 192 tokens"):
        inputs.check_graph_size(s.replace(k_inter=193), [(8, 8), (1, 1)], 4, (8, 8))
    geom = layout.Geometry((((8, 8), (0,)), ((1, 1), (6,))), (8, 8), (64, 64), 4, 64, 1, 10, 50, 2)
    assert geom.k_used(4) == [{"grid": [8, 8], "layers": [0], "k_intra": 10, "k_inter": 50},
                              {"grid": [1, 1], "layers": [6], "k_intra": 1, "k_inter": 3}]


def test_gd_batch_graphs_take_each_grid_its_own_k():
    """The gd step's graphs (`step.batch_graphs`, a batch of 2): the 8×8 group k 50 + 50, the 1×1 group 1 + 1."""
    bb = sj.load_backbone("sd_tiny", "random", timesteps=list(TS))
    s = Settings(model="sd_tiny", method="gd", batch_size=2, size=64, layers="0,6", graph="knn-vv", num_eigs=3)
    layers = bb.layers(s.layers)
    geom = layout.geometry(bb, layers, s, (64, 64), 4, 1)
    assert (geom.k_intra, geom.k_inter) == (50, 50)
    x = jnp.asarray(np.random.default_rng(0).random((2, 64, 64, 3)), jnp.float32)
    gs, _ = step.batch_graphs(bb.apply, layers, s, geom, None, bb.params, x, jnp.ones(2, bool))
    assert [g.grid for g in gs] == [(8, 8), (1, 1)]
    assert gs[0].idx.shape == (1, 2, 2 * 64, 100) and gs[1].idx.shape == (1, 2, 2, 2)
    assert int((np.asarray(gs[0].w) > 0).sum()) > 2 * 2 * 64 * 10      # far more than k 1 + 1 would leave


@pytest.mark.filterwarnings("ignore:dataset gd. not converged:RuntimeWarning")     # one epoch: no verdict yet
def test_gd_recipe_run_records_layer_weights_and_each_groups_k(tmp_path):
    """A gd run of the main_cls recipe (k 8/8 given: above the coarse grids' tokens, capped there per group)
    records the 32/res layer weights it applied, as an exact run does, and each group's k of its batch of 2."""
    from spectral_jax.recipes import recipe_fields

    folder = square_folder(str(tmp_path / "imgs"), 4, 64)
    kw = {**recipe_fields("main_cls", "sd_tiny", "gd"), "recipe": "main_cls", "method": "gd", "size": 64,
          "batch_size": 2, "epochs": 1, "inner_steps": 1, "k_intra": 8, "k_inter": 8, "num_eigs": 3,
          "weights": "random", "model": "sd_tiny", "graph": "knn-vv", "figure_images": 0}
    s = dataset.run(folder, str(tmp_path / "out"), **kw).summary()
    assert s["layer_weights"]["rule"] == "given" and s["layer_weights"]["weights"] == pytest.approx({
        "6": 4 / 13, "7": 2 / 13, "8": 2 / 13, "9": 2 / 13, "10": 1 / 13, "11": 1 / 13, "12": 1 / 13}, rel=1e-12)
    assert (s["k_intra"], s["k_inter"]) == (8, 8)
    assert s["k_used"] == [{"grid": [1, 1], "layers": [6], "k_intra": 1, "k_inter": 1},     # batch of 2: one
                           {"grid": [2, 2], "layers": [7, 8, 9], "k_intra": 4, "k_inter": 4},   # other image's
                           {"grid": [4, 4], "layers": [10, 11, 12], "k_intra": 8, "k_inter": 8}]  # tokens at most
    geom = layout.Geometry((((4, 4), (6, 7)), ((2, 2), (8,))), (4, 4), (64, 64), 4, 64, 1, 8, 8, 2)
    plain = Settings(model="sd_tiny", method="gd", layers="6,7,8")          # None: every graph alike
    assert step.layer_weights_record(plain, geom) == {"rule": "uniform", "weights": {
        "6": 1 / 3, "7": 1 / 3, "8": 1 / 3}}
    assert step.layer_weights_record(plain.replace(layer_weights="geometric"), geom) == {
        "rule": "geometric", "weights": {"6": 1 / 7, "7": 2 / 7, "8": 4 / 7}}
