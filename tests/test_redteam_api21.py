"""Red-team regressions (round 21): ACTS files and `solve` inputs that were silently wrong or tracebacks.

- `save_acts` dropped the taps' diffusion timesteps (default None wrote none), so the file built other kNN graphs
  than the taps (4 graphs instead of 16): the taps' own timesteps (and heads) are now the default;
- `load_acts` took a layer grid of another aspect than `image_size` (a transposed grid scrambles the pixels);
- `solve` took hand-built `Taps` unchecked (a 3-D q read as H images, NaN q/k/v an all-NaN result or a
  LinAlgError, batch sizes that differ between layers JAX's scan ValueError) and a source that is neither Taps
  nor graphs gave an AttributeError;
- graph options (kind, tau, ...) beside graphs already built were ignored;
- `load_backbone(seed=-3)` was numpy's ValueError.

Each is now one `InputError` line naming the input and the fix, before any solve work. Synthetic taps (a 4×4 or
4×6 grid, 2 heads); one slow case round-trips a real sd_tiny forward.
"""

from __future__ import annotations

import numpy as np
import pytest

import spectral_jax as sj
from spectral_jax.acts import load_acts, save_acts
from spectral_jax.errors import InputError
from spectral_jax.options import GraphSpec
from spectral_jax.taps import LayerTap, Taps


def _qkv(rng, batch=1, graphs=2, grid=(4, 4), dim=8):
    n = grid[0] * grid[1]
    return [rng.normal(size=(batch, graphs, n, dim)).astype(np.float32) for _ in range(3)]


def _one_line(e, start: str):
    msg = str(e.value)
    assert msg.startswith(start) and " — " in msg and "\n" not in msg, msg
    return msg


# ------------------------------------------------------------------------------------------------ 1. save_acts


def test_save_acts_keeps_the_taps_timesteps_so_the_file_builds_the_same_graphs(tmp_path, rng):
    """Before: timesteps=None wrote none; the loaded taps built one knn graph per layer, not one per timestep."""
    taps = Taps({i: LayerTap(*_qkv(rng, graphs=6), (4, 4)) for i in (0, 1)}, timesteps=(213, 159, 67))  # T=3, H=2
    path = save_acts(str(tmp_path / "a.npz"), taps, "synthetic", (64, 64))          # as documented: no timesteps
    acts = load_acts(path)
    assert acts.timesteps == (213, 159, 67) and acts.taps.timesteps == (213, 159, 67)
    with np.load(path) as f:
        assert f["num_heads"].tolist() == 2                                          # one int: the layers agree
    a, b = sj.solve(taps, "knn-vv", 4), sj.solve(acts.taps, "knn-vv", 4)
    assert a.rq.shape == b.rq.shape == (1, 6, 4)                                     # 2 layers × 3 timesteps
    np.testing.assert_allclose(a.eigvals, b.eigvals, rtol=1e-5, atol=1e-6)


def test_save_acts_heads_per_layer_where_they_differ(tmp_path, rng):
    """SD 2.x: layers with other head counts get one num_heads per layer, as extract writes them."""
    taps = Taps({0: LayerTap(*_qkv(rng, graphs=4), (4, 4)), 3: LayerTap(*_qkv(rng, graphs=6), (4, 4))},
                timesteps=(10, 200))
    path = save_acts(str(tmp_path / "a.npz"), taps, "synthetic", (32, 32))
    with np.load(path) as f:
        assert f["num_heads"].tolist() == [2, 3]
    assert load_acts(path).timesteps == (10, 200)


def test_save_acts_explicit_timesteps_still_written_and_checked(tmp_path, rng):
    """What extract passes (timesteps, num_heads) is written as before; what would not load is refused here."""
    plain = Taps({0: LayerTap(*_qkv(rng, graphs=4), (4, 4))})                        # taps without timesteps
    path = save_acts(str(tmp_path / "a.npz"), plain, "synthetic", (16, 16), timesteps=(10, 20), num_heads=2)
    assert load_acts(path).timesteps == (10, 20)
    assert load_acts(save_acts(str(tmp_path / "v.npz"), plain, "vit", (16, 16))).timesteps == ()
    timed = Taps(plain.layers, timesteps=(10, 20))
    assert load_acts(save_acts(str(tmp_path / "s.npz"), timed, "x", (16, 16), timesteps=[10, 20])).timesteps == (10, 20)
    with pytest.raises(InputError, match=r"^timesteps \[10\]: differ from the taps' own \[10, 20\]") as e:
        save_acts(str(tmp_path / "b.npz"), timed, "x", (16, 16), timesteps=(10,))
    _one_line(e, "timesteps")
    with pytest.raises(InputError, match=r"timesteps \[\]: differ"):                    # () would drop them
        save_acts(str(tmp_path / "b.npz"), timed, "x", (16, 16), timesteps=())
    with pytest.raises(InputError, match=r"layer0 has 4 graphs on its heads axis but 2 timesteps × 3 heads"):
        save_acts(str(tmp_path / "b.npz"), plain, "x", (16, 16), timesteps=(10, 20), num_heads=3)
    with pytest.raises(InputError, match=r"^num_heads 2: is given without timesteps"):
        save_acts(str(tmp_path / "b.npz"), plain, "x", (16, 16), num_heads=2)
    with pytest.raises(InputError, match=r"layer0/grid \[4, 4\] .* image_size \[16, 64\]"):
        save_acts(str(tmp_path / "b.npz"), plain, "x", (16, 64))
    assert not (tmp_path / "b.npz").exists()


# ------------------------------------------------------------------------------------------------ 2. grid aspect


def _write(path, image_size, grids, graphs=2):
    rng = np.random.default_rng(0)
    a = {"model": np.array("synthetic"), "image_size": np.array(image_size, np.int64)}
    for i, g in enumerate(grids):
        for n in "qkv":
            a[f"layer{i}/{n}"] = rng.normal(size=(1, graphs, g[0] * g[1], 8)).astype(np.float32)
        a[f"layer{i}/grid"] = np.array(g, np.int64)
    np.savez(path, **a)
    return str(path)


def test_load_acts_refuses_a_grid_of_another_aspect(tmp_path):
    """Before: [24, 16] beside image_size [224, 336] (16×24 patches of 14) loaded, its pixels scrambled."""
    path = _write(tmp_path / "t.npz", (224, 336), [(16, 24), (24, 16)])
    with pytest.raises(InputError) as e:
        load_acts(path)
    msg = _one_line(e, f"{path}: layer1/grid [24, 16] (rows, columns) does not have the aspect of image_size "
                       "[224, 336]")
    assert "extract" in msg
    assert load_acts(_write(tmp_path / "ok.npz", (224, 336), [(16, 24)])).image_size == (224, 336)
    assert load_acts(_write(tmp_path / "n.npz", (224, 224), [(16, 16)])).taps.layers[0].grid == (16, 16)


@pytest.mark.parametrize("size, grids", [
    ((64, 96), [(8, 12), (4, 6), (2, 3), (1, 2)]),         # sd_tiny at 64x96: latent /8, halved with padding
    ((72, 200), [(9, 25), (5, 13), (3, 7), (2, 4)]),       # sd_tiny at 72x200: every side rounded up
    ((200, 72), [(25, 9), (13, 5), (7, 3), (4, 2)]),
    ((64, 512), [(1, 8), (1, 1)]),                          # the coarsest grids of a long image
    ((700, 840), [(50, 60)]),
])
def test_load_acts_takes_the_grids_real_models_write(tmp_path, size, grids):
    """The grids sd_tiny's UNet writes at non-square sizes (from `spectral-jax extract --size`), rounded per side,
    load: the bound is |h·W − w·H| < H + W."""
    assert sorted(load_acts(_write(tmp_path / "a.npz", size, grids)).taps.layers) == list(range(len(grids)))


def test_load_acts_without_image_size_checks_no_aspect(tmp_path):
    a = dict(np.load(_write(tmp_path / "a.npz", (16, 16), [(4, 4)])))
    del a["image_size"]
    np.savez(tmp_path / "b.npz", **a)
    assert load_acts(str(tmp_path / "b.npz")).image_size == (0, 0)


@pytest.mark.slow
def test_sd_tiny_at_a_non_square_size_round_trips(tmp_path):
    """A real diffusion forward (sd_tiny, 72x200: grids 9×25 … 2×4) saved as documented loads with its timesteps."""
    bb = sj.load_backbone("sd_tiny", "random", seed=0)
    x = bb.preprocess_image(np.zeros((72, 200, 3), np.uint8), (72, 200))[None]
    taps = bb.taps(x)
    acts = load_acts(save_acts(str(tmp_path / "sd.npz"), taps, "sd_tiny", x.shape[1:3]))
    assert acts.timesteps == taps.timesteps != ()
    assert {t.grid for t in acts.taps.layers.values()} == {(9, 25), (5, 13), (3, 7), (2, 4)}


# ------------------------------------------------------------------------------------------------ 3. hand-built taps


TAP_CASES = {
    # batch axis forgotten: read as H images before
    "3-D": (lambda q, k, v: Taps({0: LayerTap(q[0], k[0], v[0], (4, 4))}),
            r"^taps layer 0: q, k, v have shapes \[\(2, 16, 8\), .*expected \[B=1, heads, T=16"),
    "nan": (lambda q, k, v: Taps({0: LayerTap(q * np.nan, k, v, (4, 4))}), r"^taps: layer 0 produced NaN or Inf"),
    "inf-v": (lambda q, k, v: Taps({0: LayerTap(q, k, v, (4, 4)), 2: LayerTap(q, k, v * np.inf, (4, 4))}),
              r"^taps: layer 2 produced NaN or Inf"),
    "huge": (lambda q, k, v: Taps({0: LayerTap(q * 1e20, k, v, (4, 4))}), r"^taps: layer 0 produced \|q\|.* > 1e\+15"),
    "batch": (lambda q, k, v: Taps({0: LayerTap(q, k, v, (4, 4)), 1: LayerTap(*(np.concatenate([a, a]) for a in
                                                                                   (q, k, v)), (4, 4))}),
              r"^taps layer 1: has batch 2, layer 0 has 1"),
    "tokens": (lambda q, k, v: Taps({0: LayerTap(q, k, v, (4, 5))}), r"^taps layer 0: q has shape .*T=20"),
    "k-shape": (lambda q, k, v: Taps({0: LayerTap(q, k[..., :4], v, (4, 4))}), r"^taps layer 0: k has shape"),
    "ints": (lambda q, k, v: Taps({0: LayerTap(q.astype(np.int32), k.astype(np.int32), v, (4, 4))}),
             r"^taps layer 0: q, k, v have dtypes"),
    "timesteps": (lambda q, k, v: Taps({0: LayerTap(q, k, v, (4, 4))}, timesteps=(1, 2, 3)),
                  r"^taps layer 0: q has 2 graphs on its heads axis, not a multiple of the 3 timesteps"),
    "not-a-tap": (lambda q, k, v: Taps({0: (q, k, v)}), r"^taps layer 0: is a tuple, not a LayerTap"),
    "grid": (lambda q, k, v: Taps({0: LayerTap(q, k, v, (16,))}), r"^taps layer 0: has grid \(16,\)"),
    "no-layers": (lambda q, k, v: Taps({}), r"^taps: hold no layers"),
}


@pytest.mark.parametrize("case", TAP_CASES)
@pytest.mark.parametrize("method", [dict(), dict(batch_images=0), dict(method="gd", steps=3)])
def test_hand_built_taps_are_checked_before_the_solve(rng, case, method):
    make, match = TAP_CASES[case]
    with pytest.raises(InputError, match=match) as e:
        sj.solve(make(*_qkv(rng)), "qk", 4, **method)
    _one_line(e, "taps")


def test_good_hand_built_taps_still_solve(rng):
    q, k, v = _qkv(rng, batch=2)
    res = sj.solve(Taps({0: LayerTap(q, k, v, (4, 4)), 1: LayerTap(q, k, v, (4, 4))}), "qk", 4)
    assert res.num_images == 2 and np.all(np.isfinite(res.eigvecs))
    pre = [np.concatenate([rng.normal(size=(2, 2, 1, 8)).astype(np.float32), a], 2) for a in (q, k, v)]
    with_cls = sj.solve(Taps({0: LayerTap(*pre, (4, 4), 1)}), "qk", 4)              # a prefix token is dropped
    np.testing.assert_allclose(with_cls.eigvals, sj.solve(Taps({0: LayerTap(q, k, v, (4, 4))}), "qk", 4).eigvals,
                               rtol=1e-5, atol=1e-6)
    timed = Taps({0: LayerTap(*_qkv(rng, graphs=4, grid=(4, 6)), (4, 6))}, timesteps=(5, 50))   # T·H = 2·2
    assert sj.solve(timed, "knn-vv", 3, k_intra=5).rq.shape == (1, 2, 3)


def test_a_source_neither_taps_nor_graphs_is_one_input_error(rng):
    """Before: AttributeError 'dict' object has no attribute 'num_images' (objective.check_graphs)."""
    q, k, v = _qkv(rng)
    with pytest.raises(InputError, match=r"^source dict: is not a graph .* spectral_jax.solve also takes Taps") as e:
        sj.solve({0: LayerTap(q, k, v, (4, 4))}, "qk", 4)
    _one_line(e, "source")
    g = sj.graphs.attention(q[0, 0], k[0, 0], (4, 4))
    with pytest.raises(InputError, match=r"^source\[1\] ndarray: is not a graph"):
        sj.solve([g, q], num_eigs=4)
    with pytest.raises(InputError, match=r"^source: holds no graph"):
        sj.solve([], num_eigs=4)
    with pytest.raises(InputError, match=r"^graphs list: is not a graph"):       # the solvers' own check too
        sj.solvers.exact.exact([[g]], 4)


# ------------------------------------------------------------------------------------------------ 4. graph options


@pytest.mark.parametrize("kw, named", [
    (dict(graph="vv", tau=0.5), "graph 'vv', tau: are"),
    (dict(graph="vv"), "graph 'vv': is"),
    (dict(tau=0.1), "tau: is"),                                   # given, though its value is the default
    (dict(graph="knn-qk", k_intra=5), "graph 'knn-qk', k_intra: are"),
    (dict(graph_dtype="bfloat16"), "graph_dtype: is"),
    (dict(graph=GraphSpec("qk", dtype="bfloat16")), "graph GraphSpec("),
])
def test_graph_options_beside_graphs_are_refused(rng, kw, named):
    """Before: sj.solve([qk graph], "vv", 4, tau=0.5) solved the qk graph, the options ignored."""
    q, k, _ = _qkv(rng)
    g = sj.graphs.attention(q[0], k[0], (4, 4))
    with pytest.raises(InputError, match="given beside graphs already built") as e:
        sj.solve([g], num_eigs=4, **kw)
    assert _one_line(e, named)


def test_graphs_solve_with_the_default_graph_as_before(rng):
    q, k, _ = _qkv(rng)
    g = sj.graphs.attention(q[0], k[0], (4, 4))
    want = sj.solve([g], num_eigs=4)
    for res in (sj.solve([g], "qk", 4), sj.solve(g, GraphSpec(), 4)):
        np.testing.assert_array_equal(res.eigvecs, want.eigvecs)
    with pytest.warns(RuntimeWarning, match="not converged"):
        assert sj.solve((g,), "qk", 4, "gd", steps=2).num_images == 1
    assert want.provenance is None


# ------------------------------------------------------------------------------------------------ 5. seed


@pytest.mark.parametrize("seed", [-3, 2 ** 32, 1.5, True, "0"])
def test_load_backbone_checks_its_seed(seed):
    """Before: seed=-3 was numpy's ValueError (expected non-negative integer) from inside the loader."""
    with pytest.raises(InputError, match=r"^seed .*: must be an integer in \[0, 2³²\)") as e:
        sj.load_backbone("dinov2_vits14", "random", seed=seed)
    _one_line(e, "seed")


def test_sweep_and_attribution_check_hand_built_taps_as_solve_does():
    """sweep and attribution take Taps too: the same one-line refusals as solve (a 3-D q, NaN, not a Taps)."""
    q = np.random.default_rng(0).random((2, 8, 16, 4)).astype(np.float32)
    flat = Taps({0: LayerTap(q[0], q[0], q[0], (4, 4), 0)})
    nan = Taps({0: LayerTap(q * np.nan, q, q, (4, 4), 0)})
    for call in (sj.attribution, lambda t, *a: sj.sweep(t, None, *a)):
        with pytest.raises(InputError, match=r"taps layer 0: q, k, v have shapes"):
            call(flat, "qk", 3)
        with pytest.raises(InputError, match="layer 0 produced NaN or Inf"):
            call(nan, "qk", 3)
        with pytest.raises(InputError, match="taps dict: is not a Taps"):
            call({0: None}, "qk", 3)
