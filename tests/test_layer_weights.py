"""Layer weights (`spectral_jax.layer_weights`): per-layer numbers become the solvers' per-group weights exactly as
the math says, the rules read only the graphs and are deterministic and scale-invariant, and `sweep` solves each
layer subset of one forward."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectral_jax import graphs as G
from spectral_jax import layer_weights as LW
from spectral_jax.options import GraphSpec, LayerWeights
from spectral_jax.solvers.exact import layer_solves, layer_spectra
from spectral_jax import pipeline, solvers
from spectral_jax.errors import InputError
from spectral_jax.taps import LayerTap, Taps

jax.config.update("jax_default_matmul_precision", "float32")

GRID = (6, 6)
N = GRID[0] * GRID[1]


def _taps(layers=3, heads=2, d=8, seed=0, batch=1):
    rng = np.random.default_rng(seed)
    mk = lambda: rng.standard_normal((batch, heads, N, d)).astype(np.float32)
    return Taps({l: LayerTap(mk(), mk(), mk(), GRID) for l in range(layers)})


def _top(a, k):
    vals, vecs = np.linalg.eigh(a)
    return vals[::-1][:k], vecs[:, ::-1][:, :k]


def _sym(p):
    return 0.5 * (p + np.swapaxes(p, -1, -2))


def test_weights_match_a_dense_weighted_construction():
    """exact with layer weights w = top-K of Σ_l w_l Σ_h sym(P_lh) / Σ(w_l·H), built densely with numpy."""
    taps = _taps()
    gs, gl = pipeline.graph_groups(taps, GraphSpec("qk"), 0)
    w_layer = np.array([0.5, 0.0, 2.0])
    w, per = LW.for_groups(gs, gl, w_layer, 5)
    np.testing.assert_allclose(per, w_layer / w_layer.sum())
    assert w[0].shape == (3, 2)
    res = solvers.exact.exact(gs, 5, weights=w)
    p = np.asarray(gs[0].dense(), np.float64)                         # [L, H, N, N]
    a = np.einsum("l,lhij->ij", w_layer, _sym(p)) / (w_layer.sum() * 2)
    vals, vecs = _top(a, 5)
    np.testing.assert_allclose(res.eigvals[0], vals, rtol=1e-5, atol=1e-6)
    x = res.eigvecs[0].reshape(5, -1).T
    np.testing.assert_allclose(np.abs(np.sum(x * vecs, 0)), 1.0, atol=1e-4)   # same vectors up to sign
    # and not the uniform solution: the weights changed it
    uni = solvers.exact.exact(gs, 5)
    assert np.abs(uni.eigvals[0] - vals).max() > 1e-3
    # via the pipeline: the same numbers, and a mapping layer → weight
    r2 = pipeline.solve(taps, "qk", 5, layer_weights={0: 0.5, 2: 2.0})
    np.testing.assert_allclose(r2.eigvals[0], vals, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r2.info["layer_weights"], per, atol=1e-6)


def test_scaling_all_weights_changes_nothing():
    taps = _taps(seed=1)
    a = pipeline.solve(taps, "vv", 4, layer_weights=[1.0, 2.0, 3.0])
    b = pipeline.solve(taps, "vv", 4, layer_weights=[10.0, 20.0, 30.0])
    np.testing.assert_allclose(a.eigvals, b.eigvals, rtol=1e-6)
    np.testing.assert_allclose(a.eigvecs, b.eigvecs, atol=1e-5)


def _planted(seed=0):
    """Layer 0: a smooth lattice (layout: every patch to its neighbours — a slowly decaying spectrum); layer 1: two
    groups (left/right halves) — a few large eigenvalues then a drop; as dense graphs with 2 heads each."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.arange(GRID[0]), np.arange(GRID[1]), indexing="ij")
    pos = np.stack([yy.ravel(), xx.ravel()], 1).astype(np.float64)
    d2 = ((pos[:, None] - pos[None]) ** 2).sum(-1)
    lattice = np.exp(-d2 / 2.0)
    side = (xx.ravel() >= GRID[1] // 2)
    groups = np.where(side[:, None] == side[None], 1.0, 0.02) + 0.01 * rng.random((N, N))
    heads = lambda m: np.stack([m * (1 + 0.05 * rng.random((N, N))) for _ in range(2)])
    p = np.stack([heads(lattice), heads(groups)])
    p = p / p.sum(-1, keepdims=True)
    return G.dense(jnp.asarray(p, jnp.float32), GRID), [(0, 1)]


def test_eigengap_rule_prefers_the_layer_with_groups_and_is_scale_invariant():
    g, gl = _planted()
    layers, res = layer_solves([g], gl, 6)
    spectra = np.stack([r.eigvals[0] for r in res])
    np.testing.assert_array_equal(layer_spectra([g], gl, 6), spectra)
    gap = LW.eigengap(spectra)
    assert layers == [0, 1] and gap[1] > gap[0] + 0.3, gap
    w = LW.rule_weights("eigengap", spectra)
    assert w[1] > 0.8 and abs(w.sum() - 1) < 1e-12
    # scaling one layer's graphs by c (not row-stochastic any more) changes no rule's weights
    scaled = G.dense(g.p * jnp.asarray([3.0, 1.0])[:, None, None, None], GRID)
    rules = lambda gg, rule: LW.for_groups([gg], gl, rule, 6, spectra=partial(layer_spectra, [gg], gl, 6))[1]
    for rule in LW.RULES:
        w1 = rules(g, rule)
        w2 = rules(scaled, rule)
        w3 = rules(g, rule)                                           # deterministic: the same call twice
        np.testing.assert_allclose(w1, w2, rtol=1e-4, atol=1e-6, err_msg=rule)
        np.testing.assert_array_equal(w1, w3, err_msg=rule)
    np.testing.assert_array_equal(rules(g, "select"), [0.0, 1.0])
    with pytest.raises(ValueError, match="spectra"):                  # a rule needs the solver's spectra
        LW.for_groups([g], gl, "eigengap", 6)
    # `per_layer` (what gd's summary records, without graphs) is the weighting `for_groups` gives the solvers
    spectra = layer_spectra([g], gl, 6, [0, 1])
    for rule in ("uniform", "geometric", "eigengap", [3.0, 1.0]):
        name, w = LW.per_layer([0, 1], rule, spectra=spectra)
        assert name == (rule if isinstance(rule, str) else "given")
        np.testing.assert_array_equal(w, LW.for_groups([g], gl, rule, 6, spectra=spectra)[1], err_msg=str(rule))
    with pytest.raises(ValueError, match="spectra"):
        LW.per_layer([0, 1], "eigengap")


def test_head_agreement():
    g, _ = _planted()
    same = G.dense(jnp.stack([g.p[1, 0], g.p[1, 0]])[None], GRID)       # two identical heads
    assert LW.head_agreement(same) == pytest.approx(1.0, abs=1e-5)
    one = G.dense(g.p[1, :1][None], GRID)
    assert LW.head_agreement(one) == 1.0
    rng = np.random.default_rng(3)
    a, b = (rng.random((N, N)) ** 8 for _ in range(2))                     # unrelated sparse-ish graphs
    pair = np.stack([a / a.sum(1, keepdims=True), b / b.sum(1, keepdims=True)])[None]
    assert LW.head_agreement(G.dense(jnp.asarray(pair, jnp.float32), GRID)) < 0.3


@pytest.mark.parametrize("spec, needle", [
    ([1.0, 2.0], "one per tapped layer"), ([1.0, -1.0, 0.0], "≥ 0"), ([0.0, 0.0, 0.0], "not all 0"),
    ([1.0, float("nan"), 1.0], "finite"), ("bogus", "not a rule"), ({7: 1.0}, "not tapped"), (object(), "rule name"),
])
def test_bad_weights_name_the_problem(spec, needle):
    with pytest.raises(InputError, match=needle):
        LayerWeights.parse(spec).resolve([0, 1, 2])


def test_parse_accepts_rules_and_strings():
    assert LayerWeights.parse("EigenGap").resolve([0, 1]) == "eigengap"
    np.testing.assert_array_equal(LayerWeights.parse("1,0,2").resolve([3, 5, 7]), [1 / 3, 0.0, 2 / 3])
    with pytest.raises(InputError, match="both given"):
        pipeline.solve(_taps(), "qk", 3, weights=[np.ones((3, 2))], layer_weights="uniform")


def test_sweep_shares_the_graphs_and_matches_each_subset_alone():
    taps = _taps(layers=4, seed=2)
    out = pipeline.sweep(taps, [1, range(2, 4), (0, 3)], "qk", 4)
    assert [r.info["layers"] for r in out] == [[1], [2, 3], [0, 3]]
    for r, layers in zip(out, ([1], [2, 3], [0, 3])):
        alone = pipeline.solve(Taps({l: taps.layers[l] for l in layers}), "qk", 4)
        np.testing.assert_allclose(r.eigvals, alone.eigvals, rtol=1e-5, atol=1e-6)
        assert r.rq.shape == (1, 2 * len(layers), 4)
    each = pipeline.sweep(taps, None, "vv", 3)
    assert [r.info["layers"] for r in each] == [[0], [1], [2], [3]]
    two = pipeline.sweep(_taps(layers=2, batch=2), None, "qk", 3)         # two images: a Result of B = 2 each
    assert len(two) == 2 and two[0].num_images == 2
    with pytest.raises(InputError, match="not tapped"):
        pipeline.sweep(taps, [9], "qk", 3)
    with pytest.raises(InputError, match="not a layer"):
        pipeline.sweep(taps, [[]], "qk", 3)


@pytest.mark.parametrize("graph", ["qk", "knn-qk"])
def test_sweep_of_several_images_says_each_results_layers(graph):
    """A sweep over several images lost `info["layers"]` (only under info["per_image"]) while one image kept it:
    every result of a sweep now carries the subset it was solved on — in info and in its provenance, with one
    uniform weight row per image — however many images, per-image or joint graph."""
    taps = _taps(layers=3, batch=2, seed=5)
    subsets = [(0, 2), (1,)]
    kw = dict(k_intra=6, k_inter=4) if graph.startswith("knn") else {}
    out = pipeline.sweep(taps, [list(sub) for sub in subsets], graph, 3, **kw)
    for res, sub in zip(out, subsets):
        assert res.num_images == 2 and res.info["layers"] == list(sub), res.info
        p = res.provenance
        assert (p.graph, p.layers, p.timesteps) == (graph, sub, ())
        np.testing.assert_array_equal(p.layer_weights, np.full((2, len(sub)), 1 / len(sub)))
        if graph == "qk":                                   # each image's result is the one-image sweep's
            for b in range(2):
                one = Taps({l: LayerTap(*(x[b:b + 1] for x in (t.q, t.k, t.v)), t.grid)
                            for l, t in taps.layers.items()})
                alone = pipeline.sweep(one, [list(sub)], graph, 3)[0]
                assert alone.info["layers"] == list(sub) and alone.provenance.layers == sub
                np.testing.assert_allclose(res.eigvals[b], alone.eigvals[0], rtol=1e-5, atol=1e-6)


def test_knn_layer_weights_and_subset():
    taps = _taps(layers=2, batch=2, seed=4)
    res = pipeline.solve(taps, "knn-vv", 4, layer_weights="eigengap", k_intra=6, k_inter=4)
    assert res.joint and len(res.info["layer_weights"]) == 2
    gs, gl = pipeline.graph_groups(taps, GraphSpec("knn-vv", k_intra=6, k_inter=4), None)
    sub, kept = LW.subset(gs, gl, [1])
    assert kept == [(1,)] and sub[0].batch_shape == (1,)
    np.testing.assert_allclose(np.asarray(sub[0].dense()[0]), np.asarray(gs[0].dense()[1]), atol=1e-7)


def test_weight_on_a_coarse_layer_only_solves_on_its_grid():
    """Multi-grid taps (a UNet): all weight on the coarse layer must not leave the base-grid metric singular."""
    rng = np.random.default_rng(5)
    mk = lambda n: rng.standard_normal((1, 2, n, 4)).astype(np.float32)
    taps = Taps({0: LayerTap(mk(N), mk(N), mk(N), GRID), 1: LayerTap(mk(9), mk(9), mk(9), (3, 3))})
    res = pipeline.solve(taps, "qk", 4, layer_weights=[0.0, 1.0])
    assert res.eigvecs.shape == (1, 4, 3, 3)
    alone = pipeline.solve(Taps({1: taps.layers[1]}), "qk", 4)
    np.testing.assert_allclose(res.eigvals, alone.eigvals, rtol=1e-5)
    gs, gl = pipeline.graph_groups(taps, GraphSpec("qk"), 0)
    assert LW.base_grid(gs, LW.for_groups(gs, gl, [1.0, 1.0], 4)[0]) == GRID


def test_analyze_api_takes_layer_weights():
    """`analyze(..., layer_weights=)`: checked before the model runs, recorded in the result."""
    from spectral_jax.models import Backbone

    rng = np.random.default_rng(7)
    proj = jnp.asarray(rng.standard_normal((3, 8 * 8 * 3, 2, 4)), jnp.float32)      # per layer: patch → 2 heads × 4

    def fn(params, images, layers):
        b, h, w, _ = images.shape
        p = images.reshape(b, h // 8, 8, w // 8, 8, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, 8 * 8 * 3)
        out = {}
        for l in layers or range(3):
            x = jnp.einsum("bnp,phd->bhnd", p, params[l])
            out[l] = (x, jnp.tanh(x), x ** 2)
        return out

    bb = Backbone.from_function("synthetic", fn, proj, patch_size=8, num_layers=3, size=48)
    img = (rng.random((48, 48, 3)) * 255).astype(np.uint8)
    res = pipeline.analyze(img, backbone=bb, graph="vv", num_eigs=4, layer_weights="select")
    assert res.info["layer_weights"].count(1.0) == 1 and sum(res.info["layer_weights"]) == pytest.approx(1.0)
    with pytest.raises(InputError, match="one per tapped layer"):
        pipeline.analyze(img, backbone=bb, graph="vv", num_eigs=4, layers="0,1", layer_weights=[1, 2, 3])


def test_geometric_rule_reads_only_the_layer_indices():
    """"geometric": w_l ∝ 2^l of the layers' own indices (not their positions), summing to 1, finite at any depth,
    with no spectra asked for (no solve); gd takes it (it reads no graph) where it refuses "select"."""
    from spectral_jax.dataset import Settings

    g, gl = _planted()
    w, per = LW.for_groups([g], gl, "geometric", 6, spectra=lambda layers: pytest.fail("geometric read spectra"))
    np.testing.assert_allclose(per, [1 / 3, 2 / 3])
    np.testing.assert_allclose(np.asarray(w[0]).sum(1), [1 / 3, 2 / 3], rtol=1e-6)     # each layer's heads share it
    np.testing.assert_allclose(LW.depth_weights("geometric", [3, 11]), [2 ** 3, 2 ** 11] / np.float64(2056))
    deep = LW.depth_weights("geometric", range(2000))
    assert np.isfinite(deep).all() and deep[-1] == pytest.approx(0.5) and deep.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(LW.rule_weights("geometric", np.ones((4, 3))), [1 / 15, 2 / 15, 4 / 15, 8 / 15])
    assert Settings(method="gd", layer_weights="geometric").layer_weights.rule == "geometric"
    with pytest.raises(InputError, match="reads the whole-dataset graph"):
        Settings(method="gd", layer_weights="select")
