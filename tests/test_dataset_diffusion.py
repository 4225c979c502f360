"""Dataset level on diffusion backbones (issue #22 items 2 and 5): one kNN graph per (layer, timestep) on its own
grid, resampled to the table grid; the exact whole-dataset solve against a dense reference built independently
from the backbone's taps; a one-image dataset run against `solve` on the same taps (knn-qk and knn-vv); gd end to
end; the `main_cls` recipe against the official numbers; the command line through the console script.

Models: sd_tiny (SD 1.x's UNet layout: at 64² inputs the latent is 8², so layers 7, 10 and 13 sit on 2×2, 4×4 and
8×8 grids) and pixart_tiny (one grid), random weights, tiny images.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg

import spectral_jax as sj
from spectral_jax import dataset
from spectral_jax.errors import InputError

TS = (10, 200)
CLI = os.path.join(os.path.dirname(sys.executable), "spectral-jax")
# model: (size, layers, k_intra, k_inter): sd_tiny on three grids, pixart_tiny on one
CASES = {"sd_tiny": (64, (7, 10, 13), 2, 3), "pixart_tiny": (32, (0, 2), 3, 3)}
KIND = {"sd_tiny": "knn-qk", "pixart_tiny": "knn-vv"}      # the exact-vs-dense test: one graph kind each


def square_folder(root: str, n: int, side: int, seed: int = 0) -> str:
    """n square PNGs (side², two kinds of upper half), so that the dataset's S×S squash and `io` agree exactly."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    for i in range(n):
        a = (rng.random((side, side, 3)) * 255).astype(np.uint8)
        a[: side // 2] = a[: side // 2] // 4 + 100 * (i % 2)
        Image.fromarray(a).save(os.path.join(root, f"img{i:03d}.png"))
    return root


def image_taps(model: str, folder: str, size: int, layers, seed: int = 0):
    """Each image's taps on its own (batch 1, as the dataset's batch_size=1 runs see it), through
    `Backbone.taps`: {layer: (q, k, v) `[n, T·H, N, D]` numpy}, grids {layer: (h, w)}, the backbone."""
    from spectral_jax import io

    bb = sj.load_backbone(model, "random", timesteps=list(TS), seed=seed)
    files = sorted(os.listdir(folder))
    per = []
    for f in files:
        x = bb.preprocess_image(io.load_image(os.path.join(folder, f)), (size, size))[None]
        per.append(bb.taps(x, list(layers)).patches())
    out = {l: tuple(np.concatenate([np.asarray(getattr(t.layers[l], a)) for t in per]) for a in "qkv")
           for l in layers}
    return out, {l: tuple(per[0].layers[l].grid) for l in layers}, bb


def knn_dense(a: np.ndarray, b: np.ndarray, n: int, k_intra: int, k_inter: int, min_cos: float) -> np.ndarray:
    """sym(P) of the kNN graph, brute force in float64: a, b `[n·per, F]`; each row's k_intra largest cosines in
    its image and k_inter in the others (ties to the lower column), cos ≤ min_cos dropped, S = ½(A + Aᵀ),
    P = D⁻¹ S, returned ½(P + Pᵀ) `[N, N]`."""
    an = a / np.linalg.norm(a, axis=1, keepdims=True)
    bn = b / np.linalg.norm(b, axis=1, keepdims=True)
    cos = an @ bn.T
    m = cos.shape[0]
    per = m // n
    img = np.arange(m) // per
    adj = np.zeros((m, m))
    for i in range(m):
        own = np.flatnonzero(img == img[i])
        other = np.flatnonzero(img != img[i])
        for cols, k in ((own, k_intra), (other, k_inter)):
            if k:
                top = cols[np.argsort(-cos[i, cols], kind="stable")[:k]]
                keep = top[cos[i, top] > min_cos]
                adj[i, keep] += cos[i, keep]
    s = 0.5 * (adj + adj.T)
    deg = s.sum(1)
    p = np.where(deg[:, None] > 0, s / np.where(deg > 0, deg, 1)[:, None], 0)
    return 0.5 * (p + p.T)


def pool(n_in: int, n_out: int) -> np.ndarray:
    """Adaptive average pooling along one axis `[n_out, n_in]` (torch's bins), written out again here."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        lo, hi = (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


def dense_reference(taps, grids, n: int, kind: str, k_intra: int, k_inter: int, min_cos: float, weights: dict):
    """(A, B) of the generalised problem on the finest grid: Σ_{l,t} w_l/T c_l G_lᵀ sym(P_{l,t}) G_l and
    Σ_{l,t} w_l/T c_l G_lᵀ G_l (c_l = N0/N_l, G_l the pooling of every image to layer l's grid), weights summing
    to 1, each (layer, timestep) graph built from that timestep's heads concatenated."""
    base = max(grids.values(), key=lambda g: g[0] * g[1])
    n0 = base[0] * base[1]
    a_mat, b_mat = np.zeros((n * n0, n * n0)), np.zeros((n * n0, n * n0))
    total = sum(weights.values())
    for l, (q, k, v) in taps.items():
        h, w = grids[l]
        g1 = np.kron(pool(base[0], h), pool(base[1], w))                   # one image [h·w, n0]
        g = np.kron(np.eye(n), g1)                                          # image-major nodes
        c = n0 / (h * w)
        x, y = (q, k) if kind == "knn-qk" else (v, v)
        heads = x.shape[1] // len(TS)
        for t in range(len(TS)):
            sl = slice(t * heads, (t + 1) * heads)
            fa = np.transpose(x[:, sl], (0, 2, 1, 3)).reshape(n * h * w, -1).astype(np.float64)
            fb = np.transpose(y[:, sl], (0, 2, 1, 3)).reshape(n * h * w, -1).astype(np.float64)
            ki, ko = min(k_intra, h * w), min(k_inter, (n - 1) * h * w)
            s = knn_dense(fa, fb, n, ki, ko, min_cos)
            wt = weights[l] / total / len(TS)
            a_mat += wt * c * g.T @ s @ g
            b_mat += wt * c * g.T @ g
    return a_mat, b_mat, base


def captured(a_mat, b_mat, x: np.ndarray) -> float:
    """tr((XᵀBX)⁻¹ XᵀAX) / (sum of the top-K generalised eigenvalues): the fraction of the optimum that the span
    of x `[M0, K]` reaches (1 at the optimum, basis-free)."""
    k = x.shape[1]
    vals = scipy.linalg.eigh(a_mat, b_mat, eigvals_only=True)[::-1][:k]
    got = np.trace(np.linalg.solve(x.T @ b_mat @ x, x.T @ a_mat @ x))
    return float(got / vals.sum())


def as_nodes(eigvecs: np.ndarray) -> np.ndarray:
    """`[n, K, h, w]` → `[n·h·w, K]` (image-major nodes)."""
    n, k, h, w = eigvecs.shape
    return np.transpose(eigvecs, (0, 2, 3, 1)).reshape(n * h * w, k)


@pytest.mark.parametrize("model", sorted(CASES))
def test_exact_solve_reaches_the_dense_optimum_of_per_timestep_graphs(tmp_path, model):
    """The dataset exact solve on diffusion taps reaches ≥ 0.999 of the optimum of the dense problem built here
    from `Backbone.taps` alone: one kNN graph per (layer, timestep), resampled to the finest grid, layer weights
    shared by the timesteps (w_l / T), sd_tiny's three grids included."""
    size, layers, ki, ko = CASES[model]
    folder = square_folder(str(tmp_path / "imgs"), 3, size)
    weights = {layers[0]: 4.0, layers[1]: 2.0, layers[2]: 1.0} if model == "sd_tiny" else None   # 32/res-like
    lw = None if weights is None else ",".join(f"{l}:{w:g}" for l, w in weights.items())
    kw = dict(model=model, weights="random", size=size, batch_size=1, num_eigs=4, k_intra=ki, k_inter=ko,
              layers=",".join(map(str, layers)), figure_images=0, model_options={"timesteps": TS}, layer_weights=lw,
              graph=KIND[model])
    res = dataset.run(folder, str(tmp_path / "out"), **kw)
    s = res.summary()
    assert s["timesteps"] == list(TS) and s["model_options"] == {"timesteps": list(TS)}
    assert res.provenance.timesteps == TS and res.provenance.layers == tuple(sorted(layers))
    taps, grids, _ = image_taps(model, folder, size, layers)
    if model == "sd_tiny":
        assert sorted(grids.values()) == [(2, 2), (4, 4), (8, 8)]            # three grids: the multi-grid problem
    assert ("generalised problem" in s["objective_kind"]) == (model == "sd_tiny")   # B-orthonormal, not Σ λ
    full = weights or {l: 1.0 for l in layers}
    a_mat, b_mat, base = dense_reference(taps, grids, 3, KIND[model], ki, ko, 0.1, full)
    assert tuple(res.eigvecs.shape[2:]) == base
    assert captured(a_mat, b_mat, as_nodes(res.eigvecs).astype(np.float64)) >= 0.999
    if model != "sd_tiny":
        return
    # the caches hold the per-(layer, timestep) graphs (stored [L·T, …]) and the merged features: a resume reads
    # them back into the same problem; other timesteps are another problem, refused
    again = dataset.run(folder, str(tmp_path / "out"), resume=True, **{**kw, "num_eigs": 3})
    assert again.summary()["cached"] == ["graph"]
    np.testing.assert_allclose(again.eigvals[0], res.eigvals[0, :3], rtol=1e-4, atol=1e-6)
    (tmp_path / "out" / "checkpoints" / "graph.npz").unlink()
    third = dataset.run(folder, str(tmp_path / "out"), resume=True, **kw)
    assert third.summary()["cached"] == ["features"]
    np.testing.assert_allclose(third.eigvals, res.eigvals, rtol=1e-5, atol=1e-7)
    with pytest.raises(InputError, match="other settings"):
        dataset.run(folder, str(tmp_path / "out"), resume=True, **{**kw, "model_options": {"timesteps": (10, 300)}})


def test_one_image_dataset_run_matches_the_single_image_knn_solve(tmp_path):
    """One image, batch 1: the dataset exact solve and `solve(taps, "knn-qk" / "knn-vv")` on that image's taps
    (the same per-(layer, timestep) graphs, `graphs.from_taps`) give the same eigenvalues and subspace."""
    size, layers, ki, _ = CASES["sd_tiny"]
    folder = square_folder(str(tmp_path / "imgs"), 1, size)
    from spectral_jax import io

    bb = sj.load_backbone("sd_tiny", "random", timesteps=list(TS), seed=0)
    x = bb.preprocess_image(io.load_image(os.path.join(folder, "img000.png")), (size, size))[None]
    taps = bb.taps(x, list(layers))
    assert taps.timesteps == TS
    for kind in ("knn-qk", "knn-vv"):
        res = dataset.run(folder, str(tmp_path / f"out-{kind}"), model="sd_tiny", weights="random", size=size,
                          batch_size=1, num_eigs=4, k_intra=ki, graph=kind, layers=",".join(map(str, layers)),
                          figure_images=0, model_options={"timesteps": TS})
        one = sj.solve(taps, kind, num_eigs=4, k_intra=ki, k_inter=0)
        np.testing.assert_allclose(res.eigvals[0], one.eigvals[0], rtol=1e-4, atol=1e-5)
        u, v = as_nodes(res.eigvecs), as_nodes(one.eigvecs)
        qu, qv = np.linalg.qr(u)[0], np.linalg.qr(v)[0]
        assert np.linalg.svd(qu.T @ qv, compute_uv=False).min() >= 0.999, kind
        assert one.provenance.timesteps == res.provenance.timesteps == TS


def test_from_taps_builds_one_knn_graph_per_layer_and_timestep():
    """`graphs.from_taps` on diffusion taps: a kNN group `[L, T]`; graph (l, t) is the kNN graph of timestep t's
    heads alone (the same graph as from those heads' taps with no timesteps)."""
    from spectral_jax import graphs as G
    from spectral_jax.taps import LayerTap, Taps

    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(2, 2 * 3, 16, 4)).astype(np.float32) for _ in range(3))   # T = 2, H = 3
    taps = Taps({0: LayerTap(q, k, v, (4, 4)), 1: LayerTap(q[:, ::-1].copy(), k, v, (4, 4))}, timesteps=(5, 50))
    (g,) = G.from_taps(taps, "knn-qk", k_intra=4, k_inter=3)
    assert g.batch_shape == (2, 2)
    for t in range(2):
        sl = slice(3 * t, 3 * t + 3)
        (one,) = G.from_taps(Taps({0: LayerTap(q[:, sl], k[:, sl], v[:, sl], (4, 4))}), "knn-qk", k_intra=4,
                             k_inter=3)
        np.testing.assert_array_equal(np.asarray(g.idx[0, t]), np.asarray(one.idx[0]))
        np.testing.assert_allclose(np.asarray(g.w[0, t]), np.asarray(one.w[0]), rtol=1e-6)


def test_gd_runs_end_to_end_on_sd_tiny(tmp_path):
    """method gd on sd_tiny (two timesteps, three grids): finite table on the finest grid, the steps taken, the
    timesteps in the summary."""
    size, layers, ki, ko = CASES["sd_tiny"]
    folder = square_folder(str(tmp_path / "imgs"), 4, size)
    with pytest.warns(RuntimeWarning, match="not converged"):          # one epoch: no verdict on the loss yet
        res = dataset.run(folder, str(tmp_path / "out"), model="sd_tiny", weights="random", size=size,
                          batch_size=2, method="gd", epochs=1, num_eigs=3, k_intra=ki, k_inter=ko,
                          layers=",".join(map(str, layers)), figure_images=0, model_options={"timesteps": TS},
                          layer_weights="7:4,10:2,13:1")
    assert res.eigvecs.shape == (4, 3, 8, 8) and np.isfinite(res.eigvecs).all()
    assert res.summary()["steps"] == 2 and res.summary()["timesteps"] == list(TS)
    assert np.isfinite(res.summary()["objective"]) and res.summary()["objective"] > 0


def test_main_cls_recipe_matches_the_official_setting():
    """The recipe's layers and 32/res weights against the official main_cls.py as ../shared/REFERENCE.md states
    it (7 mid/decoder self-attention layers, 32/res, top-50 intra + top-50 inter, cos ≤ 0.1 dropped) and the
    UNet's actual grids at 512² (sd_tiny has SD 1.x's layout; traced, nothing computed)."""
    import jax

    from spectral_jax import recipes
    from spectral_jax.dataset.settings import Settings

    official_res = {6: 8, 7: 16, 8: 16, 9: 16, 10: 32, 11: 32, 12: 32}      # mid (8²), up_blocks.1 (16²), .2 (32²)
    for model in ("sd14", "sd15", "sd21_base", "sd_tiny"):
        f = recipes.main_cls(model)
        assert f["layers"] == ",".join(map(str, official_res)) and len(official_res) == 7
        assert f["layer_weights"] == ",".join(f"{l}:{32 / r:g}" for l, r in official_res.items())
        assert (f["k_intra"], f["k_inter"], f["min_cos"], f["size"]) == (50, 50, 0.1, 512)
    bb = sj.load_backbone("sd_tiny", "random", timesteps=[10])
    x = jax.ShapeDtypeStruct((1, 512, 512, 3), np.float32)
    taps = jax.eval_shape(lambda p, x: bb.apply(p, x, tuple(official_res), False), bb.params, x)
    assert {l: t.grid[0] for l, t in taps.layers.items()} == official_res
    grids = {l: side for l, _, side in recipes.unet_layer_grids("sd15")}
    assert max(grids.values()) == 64 and all(grids[l] < 64 for l in official_res)   # the 4096-token layers left out
    s = Settings(model="sd15", **recipes.recipe_fields("main_cls", "sd15"))
    w = s.layer_weights.resolve(sorted(official_res))
    np.testing.assert_allclose(w, [4 / 13] + [2 / 13] * 3 + [1 / 13] * 3)   # 32/res, summing to 1
    gd = recipes.recipe_fields("main_cls", "sd15", "gd")
    assert (gd["batch_size"], gd["inner_steps"], gd["lr"], gd["ema"], gd["preset"]) == (40, 5, 1e-2, 0.99, "paper")
    with pytest.raises(InputError, match="no UNet"):
        recipes.main_cls("pixart_tiny")


def test_settings_model_options_checked_once_without_jax():
    """model_options: the family's load options, normalised (timesteps a tuple), in the result fields (hence the
    fingerprint and the caches' keys); an option the family does not take, or a bad timestep, is one line."""
    from spectral_jax.dataset.settings import Settings

    s = Settings(model="sd_tiny", model_options={"timesteps": np.array([10, 200]), "latent": "sample"})
    assert s.model_options == (("latent", "sample"), ("timesteps", (10, 200)))
    assert s.result_fields()["model_options"] == {"latent": "sample", "timesteps": [10, 200]}
    assert s.load_options() == {"latent": "sample", "timesteps": (10, 200), "seed": 0}
    assert Settings(model="sd_tiny", model_options={"timesteps": "5,50"}).model_options == (("timesteps", (5, 50)),)
    for opts, msg in (({"timesteps": [1000]}, "training timesteps"), ({"seed": 3}, "run's own"),
                      ({"attn_chunk": 0}, "≥ 1"), ({"timesteps": [2.5]}, "integers")):
        with pytest.raises(InputError, match=msg):
            Settings(model="sd_tiny", model_options=opts)
    with pytest.raises(InputError, match="not a load option"):
        Settings(model="dinov2_vits14", model_options={"timesteps": [10]})


def _cli(*args, timeout=900):
    env = dict(os.environ, JAX_PLATFORMS="cpu", SPECTRAL_JAX_TEST_MODELS="1")
    return subprocess.run([CLI, "dataset", *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_cli_recipe_and_timesteps_through_the_console_script(tmp_path):
    """`spectral-jax dataset --model sd_tiny --recipe main_cls --timesteps …`: the recipe's layers and weights,
    overridden flags (size, k) taken, the timesteps in the one-line summary's run folder."""
    folder = square_folder(str(tmp_path / "imgs"), 2, 64)
    out = tmp_path / "out"
    r = _cli(folder, "--model", "sd_tiny", "--weights", "random", "--recipe", "main_cls", "--size", "64",
             "--k-intra", "1", "--k-inter", "1", "--num-eigs", "3", "--timesteps", "10,200", "--batch-size", "1",
             "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["layers"] == "6,7,8,9,10,11,12" and s["timesteps"] == [10, 200] and s["recipe"] == "main_cls"
    assert s["layer_weights"]["weights"] == pytest.approx(                                     # 32/res over 13
        {"6": 4 / 13, "7": 2 / 13, "8": 2 / 13, "9": 2 / 13, "10": 1 / 13, "11": 1 / 13, "12": 1 / 13}, rel=1e-12)
    assert s["k_intra"] == 1 and s["k_inter"] == 1 and s["min_cos"] == 0.1 and s["grid"] == [4, 4]


@pytest.mark.parametrize("case", ["timestep", "vit", "recipe", "table"])
def test_cli_bad_family_options_one_line_exit_2(tmp_path, case):
    """Bad diffusion input: one line, exit 2, no OUT — a timestep outside the model's range, a family flag given to
    a ViT, the recipe on a model without a UNet, and layer weights that leave the table's (finest) grid without
    weight (the multi-grid metric would be singular), the last refused before any forward runs."""
    folder = square_folder(str(tmp_path / "imgs"), 2, 64)
    args = {"timestep": ["--model", "sd_tiny", "--weights", "random", "--timesteps", "10,5000"],
            "vit": ["--model", "dinov2_vits14", "--weights", "random", "--timesteps", "10"],
            "recipe": ["--model", "dinov2_vits14", "--weights", "random", "--recipe", "main_cls"],
            "table": ["--model", "sd_tiny", "--weights", "random", "--size", "64", "--layers", "7,13",
                      "--layer-weights", "7:1,13:0", "--timesteps", "10", "--k-intra", "1", "--k-inter", "1",
                      "--num-eigs", "2"]}[case]
    r = _cli(folder, *args, "--out", str(tmp_path / "out"))
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("spectral-jax dataset: error:"), r.stderr
    assert case != "table" or "table's grid 8×8" in r.stderr
    assert not (tmp_path / "out").exists()


def test_multigrid_knn_groups_above_dense_max_match_the_dense_solve():
    """kNN groups on three grids (8², 4², 2²; diffusion-like `[L, T]` batch shapes) solved matrix-free
    (dense_max=0: LOBPCG on the sparse graphs with the resampling metric, nothing N×N) agree with the dense
    generalised solve."""
    from spectral_jax import graphs as G
    from spectral_jax.solvers.exact import exact

    rng = np.random.default_rng(1)
    n, gs = 5, []
    for side, layers in ((8, 1), (4, 2), (2, 1)):
        per = side * side
        centers = rng.normal(size=(3, 6))
        lab = (np.arange(per) * 3 // per)
        x = np.stack([[np.concatenate([centers[lab] + 0.7 * rng.normal(size=(per, 6)) for _ in range(n)])
                       for _ in range(2)] for _ in range(layers)]).astype(np.float32)     # [L, T, n·per, 6]
        gs.append(G.knn(x, x, (side, side), n, k_intra=min(5, per), k_inter=4, min_cos=0.0))
    assert [g.batch_shape for g in gs] == [(1, 2), (2, 2), (1, 2)]
    w = [np.full(g.batch_shape, 32.0 / g.grid[0], np.float32) for g in gs]
    dense = exact(gs, 5, w)
    sparse = exact(gs, 5, w, dense_max=0)
    assert dense.method == "exact-dense" and sparse.method == "exact-lobpcg"
    np.testing.assert_allclose(sparse.eigvals[0], dense.eigvals[0], rtol=1e-3, atol=1e-4)
    qu, qv = np.linalg.qr(as_nodes(dense.eigvecs))[0], np.linalg.qr(as_nodes(sparse.eigvecs))[0]
    assert np.linalg.svd(qu.T @ qv, compute_uv=False).min() >= 0.999


# ------------------------------------------------------------------------------------- fresh timesteps per gd step
# The official code draws a fresh noise timestep and noise every optimisation step. `Backbone.conditioned` sets them
# in any diffusion backbone's params (data: nothing recompiles); `timestep_draw="fresh"` makes the dataset gd draw
# them inside its compiled step from (seed, the step's global index).

FRESH = dict(model="pixart_tiny", weights="random", size=32, batch_size=2, method="gd", num_eigs=3, k_intra=3,
             k_inter=3, layers="0,2", graph="knn-vv", figure_images=0, model_options={"timesteps": TS},
             timestep_draw="fresh", checkpoint_every=2)


def recording(bb):
    """`bb` with an `apply` that reports, each time the compiled step runs it, the timesteps and the noise key the
    params it was given hold (`jax.debug.callback`): (backbone, the list they are appended to)."""
    import dataclasses

    import jax

    seen = []

    def apply(p, x, layers, hidden=False):
        jax.debug.callback(lambda t, k: seen.append((tuple(np.asarray(t).tolist()), tuple(np.asarray(k).tolist()))),
                           p["timesteps"], p["noise_key"])
        return bb.apply(p, x, layers, hidden)

    return dataclasses.replace(bb, apply=apply), seen


def test_conditioned_sets_timesteps_and_noise_as_data():
    """`Backbone.conditioned`: other timesteps, or another noise key, change the taps and compile nothing new (same
    shapes and dtypes), under jit too (traced values); a count other than the params', params without timesteps,
    float timesteps or a key of another kind are one `InputError`; a `from_function` backbone (no noise key) keeps
    its params but for the timesteps."""
    import jax
    import jax.numpy as jnp

    from spectral_jax.models import Backbone

    bb = sj.load_backbone("pixart_tiny", "random", timesteps=list(TS), seed=0)
    x = np.random.default_rng(0).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
    run = jax.jit(bb.apply, static_argnums=(2, 3))
    base = np.asarray(run(bb.params, x, (0,), False).layers[0].q)
    compiled = run._cache_size()
    p_t = bb.conditioned(bb.params, [600, 10])
    p_k = bb.conditioned(bb.params, noise_key=jax.random.key(7))
    assert tuple(np.asarray(p_t["timesteps"])) == (600, 10) and p_t["timesteps"].dtype == jnp.int32
    np.testing.assert_array_equal(p_t["noise_key"], bb.params["noise_key"])
    np.testing.assert_array_equal(p_k["noise_key"], jax.random.key_data(jax.random.key(7)))
    for p in (p_t, p_k):
        assert np.abs(np.asarray(run(p, x, (0,), False).layers[0].q) - base).max() > 1e-4
    assert run._cache_size() == compiled
    traced = jax.jit(lambda p, t, k: Backbone.conditioned(p, t, k))(bb.params, jnp.asarray([3, 4], jnp.int32),
                                                                    jax.random.key_data(jax.random.key(1)))
    assert tuple(np.asarray(traced["timesteps"])) == (3, 4)
    for call, msg in ((lambda: bb.conditioned(bb.params, [1, 2, 3]), "hold 2 timesteps"),
                      (lambda: bb.conditioned({"w": np.zeros(3)}, [1]), "hold no timesteps"),
                      (lambda: bb.conditioned(bb.params, [1.5, 2.0]), "integers"),
                      (lambda: bb.conditioned(bb.params, noise_key=np.zeros(3, np.uint32)), "key")):
        with pytest.raises(InputError, match=msg):
            call()
    user = Backbone.from_function("mine", lambda p, im, layers, ts: None, {"w": np.ones(2)}, patch_size=8,
                                  num_layers=1, timesteps=[5])
    p_u = user.conditioned(user.params, [9], jax.random.key(2))
    assert set(p_u) == {"params", "timesteps"} and tuple(np.asarray(p_u["timesteps"])) == (9,)


def test_fresh_timesteps_each_gd_step_reproduce_and_resume(tmp_path, caplog):
    """gd with timestep_draw="fresh" on pixart_tiny: every step's forward sees other timesteps (in [0, t_max]) and
    another noise key, exactly `step.fresh_conditioning(seed, step)`; the step is traced once for all steps and
    runs; a run stopped after 2 of 4 steps and resumed sees the same sequence and ends at the same table as the
    uninterrupted run; the summary says how the timesteps were drawn, and resuming as "fixed" is refused."""
    import jax

    from spectral_jax.dataset.step import fresh_conditioning
    from test_dataset import traces

    folder = square_folder(str(tmp_path / "imgs"), 4, 32)
    rec, seen = recording(sj.load_backbone("pixart_tiny", "random", timesteps=list(TS), seed=0))
    with jax.log_compiles(True), caplog.at_level("WARNING", logger="jax"):
        with pytest.warns(RuntimeWarning, match="not converged"):
            a = dataset.run(folder, str(tmp_path / "a"), backbone=rec, epochs=2, **FRESH)
        whole = list(seen)
        with pytest.warns(RuntimeWarning, match="not converged"):
            dataset.run(folder, str(tmp_path / "b"), backbone=rec, epochs=1, **FRESH)
            b = dataset.run(folder, str(tmp_path / "b"), backbone=rec, epochs=2, resume=True, **FRESH)
        assert traces(caplog, "dataset_step") == 1                  # 12 steps in three runs, one trace
    expect = [fresh_conditioning(0, s, len(TS), 250) for s in range(4)]
    assert whole == [(tuple(np.asarray(t).tolist()), tuple(np.asarray(k).tolist())) for t, k in expect]
    assert len({t for t, _ in whole}) == 4 and len({k for _, k in whole}) == 4       # new timesteps and noise
    assert all(0 <= t <= 250 for ts, _ in whole for t in ts) and {t for ts, _ in whole for t in ts} != set(TS)
    assert seen[4:] == whole                                         # resumed: the same sequence
    np.testing.assert_array_equal(b.eigvecs, a.eigvecs)
    assert not np.array_equal(np.asarray(fresh_conditioning(1, 0, 2, 250)[0]), np.asarray(expect[0][0]))
    s = a.summary()
    assert s["timesteps"] is None and s["timestep_draw"] == "fresh" and s["timestep_range"] == [0, 250]
    assert s["timesteps_per_step"] == 2 and s["steps"] == 4
    with pytest.raises(InputError, match="other settings"):
        dataset.run(folder, str(tmp_path / "a"), backbone=rec, epochs=3, resume=True,
                    **{**FRESH, "timestep_draw": "fixed"})


def test_fresh_refused_for_exact_and_models_without_timesteps(tmp_path):
    """Settings: fresh under method exact (one objective), timestep_max with fixed draws or outside the model's
    range, an unknown draw: one line each; a backbone without timesteps is refused when the run starts, before
    anything is written."""
    from spectral_jax.dataset.settings import Settings

    for kw, msg in ((dict(timestep_draw="fresh"), "one fixed objective"),
                    (dict(method="gd", timestep_max=100), "fresh only"),
                    (dict(method="gd", timestep_draw="fresh", timestep_max=1000), r"\[0, 999\]"),
                    (dict(method="gd", timestep_draw="each"), "choose one of fixed, fresh")):
        with pytest.raises(InputError, match=msg):
            Settings(model="sd_tiny", **kw)
    from test_dataset import SMALL, make_folder, synthetic

    folder = make_folder(str(tmp_path / "imgs"), 4)
    with pytest.raises(InputError, match="has no timesteps"):
        dataset.run(folder, str(tmp_path / "out"), backbone=synthetic(), **{**SMALL, "timestep_draw": "fresh"})
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["exact", "vit", "timesteps", "t_max"])
def test_cli_timestep_draw_refusals_one_line_exit_2(tmp_path, case):
    """--timestep-draw fresh through the console script: with --method exact, on a ViT, beside --timesteps (a fixed
    list), and with --t-max outside the model's range: one line, exit 2, no OUT."""
    folder = square_folder(str(tmp_path / "imgs"), 2, 64)
    base = ["--model", "sd_tiny", "--weights", "random", "--timestep-draw", "fresh"]
    args, msg = {"exact": (base, "one fixed objective"),
                 "vit": (["--model", "dinov2_vits14", "--weights", "random", "--method", "gd", "--timestep-draw",
                          "fresh"], "dinov2_vits14 has no timesteps"),
                 "timesteps": ([*base, "--method", "gd", "--timesteps", "10,200"], "fixes them for the run"),
                 "t_max": ([*base, "--method", "gd", "--t-max", "1000"], "999")}[case]
    r = _cli(folder, *args, "--out", str(tmp_path / "out"))
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("spectral-jax dataset: error:"), r.stderr
    assert msg in r.stderr and not (tmp_path / "out").exists()


@pytest.mark.slow  # a console-script sd_tiny gd run (~35 s); the recipe rule and the fresh draws (pixart) stay in CI
def test_main_cls_gd_draws_fresh_timesteps_by_default(tmp_path):
    """--recipe main_cls --method gd: the official fresh timesteps over [0, 299] (main_cls.py's noise_max_t 300)
    by default, in the recipe's fields and through the console script's summary; exact keeps them fixed."""
    from spectral_jax import recipes
    from spectral_jax.dataset.settings import Settings

    gd = recipes.recipe_fields("main_cls", "sd15", "gd")
    assert (gd["timestep_draw"], gd["timestep_max"]) == ("fresh", 299)
    assert "timestep_draw" not in recipes.recipe_fields("main_cls", "sd15", "exact")
    assert Settings(model="sd15", method="gd", **gd).t_max == 299
    folder = square_folder(str(tmp_path / "imgs"), 2, 64)
    r = _cli(folder, "--model", "sd_tiny", "--weights", "random", "--recipe", "main_cls", "--method", "gd",
             "--size", "64", "--k-intra", "1", "--k-inter", "1", "--num-eigs", "2", "--num-timesteps", "1",
             "--batch-size", "2", "--epochs", "1", "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["timestep_draw"] == "fresh" and s["timestep_range"] == [0, 299] and s["timesteps_per_step"] == 1
    assert s["timesteps"] is None and s["recipe"] == "main_cls" and s["steps"] == 1


def test_cli_timestep_draw_rule_beside_the_recipe():
    """How the command line reads --timestep-draw (`cli.dataset._timestep_draw`, on the parsed arguments and the
    recipe's fields): the recipe's fresh yields to --timesteps or --schedule (they fix the timesteps), takes
    --t-max as its range; a typed fresh keeps --t-max; fixed drops timestep_max."""
    from spectral_jax import recipes
    from spectral_jax.cli import build_parser
    from spectral_jax.cli.dataset import _timestep_draw

    gd = recipes.recipe_fields("main_cls", "sd15", "gd")
    args = lambda *a: build_parser().parse_args(["dataset", "F", "--model", "sd15", "--out", "O", *a])
    assert _timestep_draw(args(), gd) == {"timestep_draw": "fresh"}                  # the recipe's 299 stays
    assert _timestep_draw(args("--t-max", "250"), gd) == {"timestep_draw": "fresh", "timestep_max": 250}
    for fixing in (("--timesteps", "10,200"), ("--schedule", "constant")):
        assert _timestep_draw(args(*fixing), gd) == {"timestep_draw": "fixed", "timestep_max": None}
    assert _timestep_draw(args("--timestep-draw", "fixed"), gd) == {"timestep_draw": "fixed", "timestep_max": None}
    assert _timestep_draw(args("--timestep-draw", "fresh", "--t-max", "40"), {}) == {"timestep_draw": "fresh",
                                                                                      "timestep_max": 40}
    assert _timestep_draw(args(), {}) == {"timestep_draw": "fixed", "timestep_max": None}
