"""Dataset level, method="exact": the whole-dataset kNN graph against a brute-force dense construction (ties,
padded slots), its sparse operator and exact eigenvectors against numpy `eigh`, the convergence report, the cache
and `--resume`, and 8 fake devices against one.

Synthetic backbone of test_dataset (32×32 inputs → a 4×4 grid, 16 tokens per image).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings

import jax
import numpy as np
import pytest

import spectral_jax as sj
from spectral_jax import dataset, graphs
from spectral_jax.objective import dense_operators, normalised_weights
from spectral_jax.solvers.exact import exact
from spectral_jax.solvers.sparse import knn_operator
from test_dataset import CHILD_HEAD, _dense_knn, _env, make_folder, run_two_processes, synthetic
from sjtest import xla_flags

EXACT = dict(size=32, batch_size=4, num_eigs=6, k_intra=5, k_inter=5, figure_images=0, method="exact")


def _alignment(u: np.ndarray, x: np.ndarray) -> float:
    """Smallest cosine of the principal angles between the column spaces of u and x `[N, K]`."""
    qu, qx = np.linalg.qr(u)[0], np.linalg.qr(x)[0]
    return float(np.linalg.svd(qu.T @ qx, compute_uv=False).min())


def test_whole_dataset_knn_matches_dense_with_ties_and_padding(rng):
    """Features with exact ties (duplicated tokens across images) and two padded slots (valid False)."""
    grid, n_img, per = (2, 3), 6, 6
    base = rng.normal(size=(2, n_img * per, 5)).astype(np.float32)
    base[:, per:2 * per] = base[:, :per]                # image 1 = image 0: tied cosines everywhere
    valid = np.array([True, True, True, False, True, False])
    g = graphs.knn(base, base, grid, n_img, k_intra=3, k_inter=4, block=5, valid=valid)
    dense = np.asarray(g.dense())
    for layer in range(2):
        ref = _dense_knn(base[layer], base[layer], n_img, per, 3, 4, valid)
        # ties may pick different (equally near) neighbours: compare the degree structure and the chosen cosines
        img = np.arange(n_img * per) // per
        dead = ~valid[img]
        assert (dense[layer][dead] == 0).all() and (dense[layer][:, dead] == 0).all()
        np.testing.assert_allclose(dense[layer].sum(1)[~dead], 1.0, atol=1e-6)
        w = np.sort(np.asarray(g.w[layer])[~dead], axis=1)
        an = base[layer] / np.linalg.norm(base[layer], axis=1, keepdims=True)
        cos = an @ an.T
        for i in np.flatnonzero(~dead):
            same = np.flatnonzero((img == img[i]) & ~dead)
            other = np.flatnonzero((img != img[i]) & ~dead)
            want = np.concatenate([np.sort(cos[i, same])[::-1][:3], np.sort(cos[i, other])[::-1][:4]])
            want = np.sort(np.where(want > 0.1, want, 0.0))
            np.testing.assert_allclose(w[np.searchsorted(np.flatnonzero(~dead), i)], want, atol=1e-6)
    # without ties the graph is the dense construction exactly
    a = rng.normal(size=(2, n_img * per, 5)).astype(np.float32)
    g = graphs.knn(a, a, grid, n_img, k_intra=3, k_inter=4, block=5, valid=valid)
    for layer in range(2):
        np.testing.assert_allclose(np.asarray(g.dense())[layer], _dense_knn(a[layer], a[layer], n_img, per, 3, 4,
                                                                           valid), atol=1e-6)


def test_bfloat16_features_give_nearly_the_same_graph(rng):
    a = rng.normal(size=(2, 8 * 16, 32)).astype(np.float32)
    g32 = graphs.knn(a, a, (4, 4), 8, k_intra=5, k_inter=5)
    g16 = graphs.knn(a.astype(jax.numpy.bfloat16), a.astype(jax.numpy.bfloat16), (4, 4), 8, k_intra=5, k_inter=5)
    assert g16.w.dtype == np.float32
    same = (np.sort(np.asarray(g16.idx), -1) == np.sort(np.asarray(g32.idx), -1)).mean()
    assert same > 0.9, same


def test_sparse_operator_and_exact_eigvecs_match_eigh(rng):
    grid, n_img = (4, 4), 10
    a = rng.normal(size=(3, n_img * 16, 8)).astype(np.float32)
    g = graphs.knn(a, a, grid, n_img, k_intra=5, k_inter=6, valid=np.arange(n_img) != 4)
    lw = np.array([1.0, 0.5, 2.0], np.float32)
    ws = normalised_weights([g], [lw])
    dense = np.asarray(dense_operators([g], ws, grid, n_img)[0], np.float64)
    op = knn_operator([g], ws)
    np.testing.assert_allclose(op.dense(), dense, atol=1e-6)
    z = rng.normal(size=(160, 4)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(op.matvec(z)), dense @ z, atol=1e-5)
    vals, vecs = np.linalg.eigh(dense)
    for solver, method in (("auto", "exact-arpack"), ("lobpcg", "exact-lobpcg-sparse")):   # the CPU default: ARPACK
        res = exact(g, 6, [lw], dense_max=0, sparse_solver=solver)
        c = res.convergence
        assert res.method == method and c.converged and c.iterations > 0
        assert len(c.residuals) == 6 and c.max_residual <= c.tol
        x = np.transpose(res.eigvecs, (1, 0, 2, 3)).reshape(6, -1).T
        assert _alignment(vecs[:, ::-1][:, :6], x) >= 0.999
        np.testing.assert_allclose(res.eigvals[0], vals[::-1][:6], rtol=1e-4, atol=1e-5)
        again = exact(g, 6, [lw], dense_max=0, sparse_solver=solver)
        np.testing.assert_array_equal(again.eigvecs, res.eigvecs)               # deterministic per seed
    other = exact(g, 6, [lw], dense_max=0, seed=1)
    assert _alignment(other.eigvecs.transpose(1, 0, 2, 3).reshape(6, -1).T, x) >= 0.999


def test_convergence_report_when_maxiter_is_too_small(rng):
    a = rng.normal(size=(2, 20 * 16, 8)).astype(np.float32)
    g = graphs.knn(a, a, (4, 4), 20, k_intra=5, k_inter=6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = exact(g, 8, dense_max=0, maxiter=2)
    c = res.convergence
    assert c.iterations == 2 and not c.converged      # ARPACK failed too: LOBPCG's report
    assert res.method == "exact-lobpcg-sparse" and "maxiter=2" in res.info["arpack"]
    assert c.max_residual > c.tol
    assert any("maxiter=2" in str(w.message) for w in caught)


def test_run_exact_writes_outputs_and_resume_skips_the_forward(tmp_path):
    folder = make_folder(str(tmp_path / "imgs"), 10)
    ext = synthetic()
    res = dataset.run(folder, str(tmp_path / "out"), backbone=ext, **{**EXACT, "figure_images": 10})
    s = res.summary()
    assert res.eigvecs.shape == (10, 6, 4, 4) and s["method"] == "dataset-exact" and s["images"] == 10
    assert s["convergence"]["converged"] and len(s["convergence"]["residuals"]) == 6 and s["cached"] == []
    assert s["k_inter"] == 5 and s["edges"] > 0
    # the run IS a Result: the whole-dataset solve's own fields (eigvals as solved, not read back from summary.json)
    assert isinstance(res, sj.Result) and isinstance(res, dataset.DatasetResult) and res.num_images == 10
    assert res.joint and res.eigvals.shape == (10, 6) and res.eigvals.dtype == np.float32
    assert res.rq.shape[0] == 10 and res.rq.shape[2] == 6 and res.rq.shape[1] >= 1 and res.objective.shape == (10,)
    assert res.method.startswith("exact") and res.convergence.converged and res.convergence.residuals
    p = res.provenance                 # what it was solved on: graph, the synthetic backbone's 2 layers, equal weights
    assert p.graph == "knn-qk" and p.layers == (0, 1) and p.timesteps == ()
    np.testing.assert_allclose(p.layer_weights, np.full((10, 2), 0.5))
    assert (res.eigvals == res.eigvals[0]).all() and (res.objective == res.objective[0]).all()   # one joint solve
    vals = res.eigvals[0]
    assert np.all(np.diff(vals) <= 0)
    # rq and objective are those of the eigvecs on the solved graph: Σ_l w_l R_{l,k} = λ_k, Σ_k λ_k = objective
    np.testing.assert_allclose(res.objective[0], vals.astype(np.float64).sum(), rtol=1e-4, atol=1e-5)
    assert vals.astype(np.float64).tolist() == s["eigvals"] and res.objective[0] == s["objective"]
    assert s["convergence"].items() >= res.convergence.as_dict().items() and res.orth_error == s["orth_error"]
    u = np.transpose(res.eigvecs, (0, 2, 3, 1)).reshape(-1, 6)
    np.testing.assert_allclose(u.T @ u, np.eye(6), atol=1e-4)                  # orthonormal over all pixels
    assert (tmp_path / "out" / "eigvecs.png").exists()
    back = dataset.load_result(str(tmp_path / "out"))
    np.testing.assert_array_equal(back.eigvecs, res.eigvecs)
    # load_result round-trips the Result's fields
    assert isinstance(back, sj.Result) and type(back) is dataset.DatasetResult and back.names == res.names
    for f in ("eigvals", "rq", "objective", "table"):
        np.testing.assert_array_equal(getattr(back, f), getattr(res, f), err_msg=f)
    assert back.convergence == res.convergence and back.orth_error == res.orth_error and back.joint
    assert back.method == res.method and back.steps == res.steps and back.probs is None
    np.testing.assert_array_equal(back.segments.labels, res.segments.labels)
    with pytest.raises(dataset.InputError, match="--resume"):
        dataset.run(folder, str(tmp_path / "out"), backbone=ext, **EXACT)
    with pytest.raises(dataset.InputError, match="other settings"):
        dataset.run(folder, str(tmp_path / "out"), backbone=ext, resume=True, **{**EXACT, "graph": "knn-vv"})
    again = dataset.run(folder, str(tmp_path / "out"), backbone=ext, resume=True, **{**EXACT, "num_eigs": 4})
    assert again.summary()["cached"] == ["graph"] and again.summary()["seconds_forward"] == 0
    np.testing.assert_allclose(np.abs(again.eigvecs), np.abs(res.eigvecs[:, :4]), atol=1e-4)
    (tmp_path / "out" / "checkpoints" / "graph.npz").unlink()                # features kept: no forward either
    third = dataset.run(folder, str(tmp_path / "out"), backbone=ext, resume=True, **EXACT)
    assert third.summary()["cached"] == ["features"]
    np.testing.assert_array_equal(third.eigvecs, res.eigvecs)


def test_run_exact_matches_eigh_of_the_whole_dataset_graph(tmp_path):
    """The run's eigenvectors (192 nodes: the dense path) and LOBPCG on the sparse operator of the run's cached graph
    (forced with dense_max=0) against numpy eigh of the dense operator."""
    folder = make_folder(str(tmp_path / "imgs"), 12)
    res = dataset.run(folder, str(tmp_path / "out"), backbone=synthetic(), **{**EXACT, "graph": "knn-vv"})
    with np.load(tmp_path / "out" / "checkpoints" / "graph.npz") as f:
        g = graphs.KnnGraph(f["idx0"], f["w0"], f["deg0"], (4, 4), (2,), 12)
    dense = np.asarray(dense_operators([g], normalised_weights([g], None), (4, 4), 12)[0], np.float64)
    vals, vecs = np.linalg.eigh(dense)
    x = np.transpose(res.eigvecs, (1, 0, 2, 3)).reshape(6, -1).T
    assert _alignment(vecs[:, ::-1][:, :6], x) >= 0.999
    sparse = exact(g, 6, dense_max=0)
    assert _alignment(vecs[:, ::-1][:, :6], np.transpose(sparse.eigvecs, (1, 0, 2, 3)).reshape(6, -1).T) >= 0.999


def test_layer_weight_rule_is_applied_to_the_whole_dataset_graph(tmp_path):
    """layer_weights="eigengap": the summary names the rule and the per-layer weights (sum 1), and the eigenvectors
    are those of the dense operator Σ_l w_l sym(P_l) with exactly those weights (not the uniform one); a rule with
    --method gd is refused before anything runs."""
    folder = make_folder(str(tmp_path / "imgs"), 12)
    res = dataset.run(folder, str(tmp_path / "out"), backbone=synthetic(),
                      **{**EXACT, "graph": "knn-vv", "layer_weights": "eigengap"})
    chosen = res.summary()["layer_weights"]
    assert chosen["rule"] == "eigengap" and set(chosen["weights"]) == {"0", "1"}
    w = np.array([chosen["weights"]["0"], chosen["weights"]["1"]])
    assert abs(w.sum() - 1) < 1e-5 and abs(w[0] - w[1]) > 1e-3      # the two layers' spectra differ
    with np.load(tmp_path / "out" / "checkpoints" / "graph.npz") as f:
        g = graphs.KnnGraph(f["idx0"], f["w0"], f["deg0"], (4, 4), (2,), 12)
    x = np.transpose(res.eigvecs, (1, 0, 2, 3)).reshape(6, -1).T
    ours = np.array(res.summary()["eigvals"])
    for ws, agree in ((w, True), (np.array([0.5, 0.5]), False)):
        dense = np.asarray(dense_operators([g], normalised_weights([g], [ws]), (4, 4), 12)[0], np.float64)
        vals, vecs = np.linalg.eigh(dense)
        assert (np.abs(vals[::-1][:6] - ours).max() < 1e-5) == agree
        if agree:
            assert _alignment(vecs[:, ::-1][:, :6], x) >= 0.999
    with pytest.raises(dataset.InputError, match="reads the whole-dataset graph"):
        dataset.run(folder, str(tmp_path / "gd"), backbone=synthetic(),
                    **{**EXACT, "method": "gd", "layer_weights": "select"})
    assert not (tmp_path / "gd").exists()


def test_exact_refuses_num_eigs_not_below_the_whole_graph(tmp_path):
    folder = make_folder(str(tmp_path / "imgs"), 2)
    with pytest.raises(dataset.InputError, match="32 nodes of the whole dataset"):
        dataset.run(folder, str(tmp_path / "out"), backbone=synthetic(), **{**EXACT, "num_eigs": 32})
    assert not (tmp_path / "out").exists()


def test_eight_devices_give_the_one_device_eigvecs(tmp_path):
    """8 fake CPU devices vs 1: the kNN rows are searched per device (the same float operations per row) and the
    solve runs on the gathered graph, so the graphs are equal; the eigenvectors agree to LOBPCG's accuracy."""
    folder = make_folder(str(tmp_path / "imgs"), 12)
    child = CHILD_HEAD + textwrap.dedent(f"""
        from test_dataset_exact import EXACT
        assert len(jax.devices()) == 8, jax.devices()
        kw = dict(backbone=synthetic(), **{{**EXACT, "batch_size": 8}})
        one = dataset.run({folder!r}, {str(tmp_path / "one")!r}, mesh=dataset.make_mesh(jax.devices()[:1]), **kw)
        eight = dataset.run({folder!r}, {str(tmp_path / "eight")!r}, **kw)
        assert one.summary()["devices"] == 1 and eight.summary()["devices"] == 8
        np.savez({str(tmp_path / "v.npz")!r}, one=one.eigvecs, eight=eight.eigvecs)
    """)
    eight = xla_flags("--xla_force_host_platform_device_count=8")
    r = subprocess.run([sys.executable, "-c", child], env=_env(XLA_FLAGS=eight),
                       capture_output=True, timeout=600)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    t = np.load(tmp_path / "v.npz")
    for name in ("idx0", "w0"):
        a = np.load(tmp_path / "one" / "checkpoints" / "graph.npz")[name]
        b = np.load(tmp_path / "eight" / "checkpoints" / "graph.npz")[name]
        assert b.shape[1] == 16 * 16 and a.shape[1] == 16 * 12             # 12 images padded to 16 on 8 devices
        np.testing.assert_allclose(b[:, :a.shape[1]], a, atol=1e-6)
    np.testing.assert_allclose(t["eight"], t["one"], atol=1e-4)


def test_two_processes_give_the_one_process_graph_and_eigvecs(tmp_path):
    """Two processes on localhost (1 CPU device each, gloo collectives): each reads only its half of the images
    (a contiguous range: the mesh splits the rows by image) and searches its rows; on the gathered path (asked for:
    with several processes the default is the sharded one, test_dataset_sharded) the graph is gathered and both
    solve it. Against this process on one device: the same graph, the same eigenvectors."""
    folder = make_folder(str(tmp_path / "imgs"), 12)
    out = str(tmp_path / "multi")
    run_two_processes(folder, out, "**EXACT, exact_solver='gathered'", head="from test_dataset_exact import EXACT\n")
    single = dataset.run(folder, str(tmp_path / "single"), backbone=synthetic(),
                         mesh=dataset.make_mesh(jax.devices()[:1]), **EXACT)
    multi = dataset.load_result(out)
    for name in ("idx0", "w0", "deg0"):
        np.testing.assert_array_equal(np.load(f"{out}/checkpoints/graph.npz")[name],
                                      np.load(tmp_path / "single" / "checkpoints" / "graph.npz")[name])
    np.testing.assert_allclose(multi.eigvecs, single.eigvecs, atol=1e-5)
    assert [json.load(open(f"{out}.read{i}.json")) for i in range(2)] == [list(range(6)), list(range(6, 12))]
