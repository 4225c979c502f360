"""The row-sharded kNN operator and the distributed LOBPCG (`spectral_jax.solvers.distributed`): the product
against the dense Σ_l w_l sym(P_l); on 1, 2, 8 fake CPU devices and in 2 local processes (jax.distributed) the
eigenpairs against float64 `numpy.linalg.eigh` and ARPACK (`exact`) on the same graph, with layer weights; the
sharded search (a ring of key blocks) against `graphs.knn` and the all-gathered search, on fake devices and
in 2 processes, and its memory; the convergence record; `benchmarks/bench_scale.py --tiny`.

float32, measured: with tol = 1e-5 the relative residuals reach ≤ 1e-5, eigenvalues agree with float64 to ≲ 1e-6
of λ_max and the subspaces to a mean principal-angle cosine ≥ 0.99999; tighter tols stall around 1e-5 (the
rounding of the products), which `test_a_run_that_cannot_reach_tol_says_so` relies on to fail honestly.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sjtest import subspace_alignment, xla_flags
from test_dataset import _env, _free_port

from spectral_jax import graphs
from spectral_jax.solvers import distributed as dist

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
LAYER_W = (0.7, 0.3)
K = 6
TOL = 1e-5


def small_graph(num_images: int = 6, grid=(7, 7), layers: int = 2, seed: int = 0) -> graphs.KnnGraph:
    """A kNN graph over `num_images` images of planted-class features (4 classes): `layers` graphs, 6 + 6
    neighbours. 6 images of 7×7 = 294 nodes: not a multiple of 4 or 8 devices (padding is exercised)."""
    rng = np.random.default_rng(seed)
    per = grid[0] * grid[1]
    labels = rng.integers(0, 4, num_images)
    centers = rng.normal(size=(4, 16))
    x = centers[np.repeat(labels, per)][None] + rng.normal(size=(layers, num_images * per, 16))
    x = jnp.asarray(x, jnp.float32)
    return graphs.knn(x, x, grid, num_images, 6, 6)


def dense_reference(g: graphs.KnnGraph, lw) -> np.ndarray:
    """Σ_l w_l ½(P_l + P_lᵀ) in float64 from `KnnGraph.dense()` (w normalised)."""
    p = np.asarray(g.dense(), np.float64)
    lw = np.asarray(lw, np.float64) / np.sum(lw)
    return sum(w * 0.5 * (pl + pl.T) for w, pl in zip(lw, p))


def top(a: np.ndarray, k: int):
    e, v = np.linalg.eigh(a)
    return e[::-1][:k], v[:, ::-1][:, :k]



def _on_eight_devices(child: str, out) -> dict:
    """Run `child` (Python source saving an npz at `out`) in a fresh process with 8 fake CPU devices; its arrays."""
    eight = xla_flags("--xla_force_host_platform_device_count=8")
    r = subprocess.run([sys.executable, "-c", child], env=_env(XLA_FLAGS=eight),
                       capture_output=True, timeout=900)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    return np.load(out)


def _wait_all(procs) -> None:
    """Wait for child processes (600 s at most), killing any left; all must exit 0 (their stderr tails if not)."""
    try:
        errs = [p.communicate(timeout=600)[1].decode() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-3000:] for e in errs)

def test_product_and_quotients_equal_the_dense_reference():
    """One device: A X and the per-graph quotients against the float64 dense construction, one group and the same
    layers split into two groups (weights per group)."""
    g = small_graph()
    mesh = jax.make_mesh((1,), ("data",))
    a = dense_reference(g, LAYER_W)
    x = np.random.default_rng(1).normal(size=(a.shape[0], 5)).astype(np.float32)
    sg = dist.shard_graph(g, mesh)
    op = dist.operator([sg], [jnp.asarray(LAYER_W)])
    y = np.asarray(op.matvec(x))
    assert np.abs(y - a @ x).max() <= 1e-6 * np.abs(a @ x).max()
    one = lambda l: graphs.KnnGraph(g.idx[l], g.w[l], g.deg[l], g.grid, (), g.num_images)
    split = dist.operator([dist.shard_graph(one(0), mesh), dist.shard_graph(one(1), mesh)],
                          [jnp.float32(LAYER_W[0]), jnp.float32(LAYER_W[1])])
    np.testing.assert_allclose(np.asarray(split.matvec(x)), y, rtol=0, atol=1e-6)
    picked = dist.operator([sg.select([1]), sg.select([0])], [jnp.float32(LAYER_W[1]), jnp.float32(LAYER_W[0])])
    np.testing.assert_allclose(np.asarray(picked.matvec(x)), y, rtol=0, atol=1e-6)
    q = np.asarray(op.quotients(x))                                            # [L, K]
    p = np.asarray(g.dense(), np.float64)
    want = np.einsum("nk,lnm,mk->lk", x, p, x)
    np.testing.assert_allclose(q, want, rtol=1e-5)


def test_a_run_that_cannot_reach_tol_says_so():
    """maxiter=2 at tol 1e-9 (below what float32 reaches): converged False, a RuntimeWarning, iterations 2; the
    residuals in the record are the measured ones (above tol). Same seed twice: identical results."""
    g = small_graph()
    op = dist.operator([dist.shard_graph(g, jax.make_mesh((1,), ("data",)))], [jnp.asarray(LAYER_W)])
    with pytest.warns(RuntimeWarning, match="stopped at maxiter=2"):
        s = dist.lobpcg(op, K, tol=1e-9, maxiter=2, chunk=1)
    c = s.convergence
    assert not c.converged and c.iterations == 2 and c.max_residual > 1e-9 and len(c.residuals) == K
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        t = dist.lobpcg(op, K, tol=1e-9, maxiter=2, chunk=1)
    np.testing.assert_array_equal(np.asarray(s.eigvecs), np.asarray(t.eigvecs))
    np.testing.assert_array_equal(s.eigvals, t.eigvals)


def test_bad_arguments_are_refused():
    op = dist.operator([dist.shard_graph(small_graph(), jax.make_mesh((1,), ("data",)))])
    from spectral_jax.errors import InputError

    with pytest.raises(InputError):
        dist.lobpcg(op, op.num_nodes)                     # K must be below the nodes (options.check_num_eigs)
    with pytest.raises(ValueError, match="tol"):
        dist.lobpcg(op, K, tol=0.0)


CHILD = """
import os, sys, json
import jax
jax.config.update("jax_default_matmul_precision", "float32")
import numpy as np, jax.numpy as jnp
from spectral_jax import graphs
from spectral_jax.solvers import distributed as dist
from test_distributed import small_graph, LAYER_W, K, TOL
"""


def _check_solve(s, vecs, a, tol=TOL):
    """Converged to `tol` with measured residuals; eigenvalues within 2e-6 · λ_max of float64 `eigh`; subspace
    mean cosine ≥ 0.99999."""
    e, v = top(a, K)
    c = s["res"]
    assert bool(s["converged"]) and c.max() <= tol and len(c) == K, (s["converged"], c)
    assert np.abs(np.sort(s["vals"])[::-1] - e).max() <= 2e-6 * e[0], (s["vals"], e)
    assert subspace_alignment(vecs, v) >= 0.99999


def scatter_product(op, x):
    """The product as it was before the incoming-edge lists (the reference `_local_apply` is compared with):
    all_gather X, Σ c X[j] over the outgoing slots, Cᵀ X by a global scatter-add into `[N, K]` and a
    psum_scatter to the owner rows."""
    from jax.sharding import PartitionSpec as P

    ax = op.axis

    def local(cols, coef, lw, x):
        x_all = jax.lax.all_gather(x, ax, axis=0, tiled=True)
        c = (coef * lw[:, None, None]).transpose(0, 2, 1).reshape(-1, coef.shape[1])
        j = cols.transpose(0, 2, 1).reshape(-1, cols.shape[1])

        def slot(carry, s):
            y, t = carry
            return (y + s[1][:, None] * x_all[s[0]], t.at[s[0]].add(s[1][:, None] * x)), None

        (y, t), _ = jax.lax.scan(slot, (jnp.zeros_like(x), jnp.zeros_like(x_all)), (j, c))
        return y + jax.lax.psum_scatter(t, ax, scatter_dimension=0, tiled=True)

    f = jax.jit(jax.shard_map(local, mesh=op.mesh, in_specs=(P(None, ax), P(None, ax), P(), P(ax)),
                              out_specs=P(ax)))
    x = jax.device_put(jnp.asarray(x, jnp.float32), op.spec())
    return f, (op.cols, op.coef, op.lw, x)


def hub_rows(n: int, k: int, seed: int = 0):
    """idx, w `[1, n, k]` of a graph with a hub: every node's first slot points at node 0 (in-degree n), the
    others at random distinct nodes; weights uniform in [0.1, 1]. Incoming edges are then very uneven over the
    devices (device 0 receives ≥ n)."""
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.choice(np.arange(1, n), k - 1, replace=False) for _ in range(n)])
    idx = np.concatenate([np.zeros((n, 1), np.int64), idx], axis=1).astype(np.int32)
    return idx[None], rng.uniform(0.1, 1.0, (1, n, k)).astype(np.float32)


def dense_from_rows(idx, w) -> np.ndarray:
    """Σ_l ½(P_l + P_lᵀ) / L in float64 from edge rows idx, w `[L, n, k]` (distinct neighbours per row)."""
    out = 0.0
    for il, wl in zip(idx, w):
        a = np.zeros((il.shape[0],) * 2)
        np.add.at(a, (np.repeat(np.arange(il.shape[0]), il.shape[1]), il.reshape(-1)), wl.reshape(-1))
        s = 0.5 * (a + a.T)
        p = s / s.sum(1, keepdims=True)
        out = out + 0.5 * (p + p.T) / len(idx)
    return out


def test_incoming_edge_product_equals_the_scatter_product_and_memory_falls_with_devices(tmp_path):
    """8 fake CPU devices, meshes of 1, 2, 4, 8: the product (incoming edges: gathers and a segment-sum over each
    device's own rows) equals the scatter-add + psum_scatter product it replaced and float64 dense
    Σ w sym(P), on the planted graph with layer weights and on a hub graph (every row points at node 0: device 0
    receives far more edges than the others); the incoming lists hold each edge once; the compiled product's
    per-device temporary memory (XLA's memory analysis) is the all-gathered X `[N, K]` plus O(N/D · K) — below
    the replaced product's, which held two `[N, K]` buffers."""
    out = str(tmp_path / "r.npz")
    child = CHILD + textwrap.dedent(f"""
        from jax.sharding import NamedSharding, PartitionSpec as P
        from test_distributed import scatter_product, hub_rows
        assert len(jax.devices()) == 8
        g = small_graph()
        hidx, hw = hub_rows(120, 5)
        res = {{}}
        for d in (1, 2, 4, 8):
            mesh = jax.make_mesh((d,), ("data",), devices=jax.devices()[:d])
            hub = dist.from_rows(*(jax.device_put(np.pad(a, ((0, 0), (0, dist.padded_nodes(120, d) - 120), (0, 0))),
                                                  NamedSharding(mesh, P(None, "data"))) for a in (hidx, hw)),
                                 (1, 120), 1, mesh)
            for name, op in (("g", dist.operator([dist.shard_graph(g, mesh)], [jnp.asarray(LAYER_W)])),
                             ("hub", dist.operator([hub]))):
                x = np.random.default_rng(1).normal(size=(op.rows, 24)).astype(np.float32)
                x[op.num_nodes:] = 0
                res[f"{{name}}_y{{d}}"] = np.asarray(op.matvec(x))[:op.num_nodes]
                f, a = scatter_product(op, x)
                res[f"{{name}}_ref{{d}}"] = np.asarray(f(*a))[:op.num_nodes]
                res[f"{{name}}_edges{{d}}"] = int(np.count_nonzero(np.asarray(op.tval)))
                res[f"{{name}}_out{{d}}"] = int(np.count_nonzero(np.asarray(op.coef)))
                xs = jax.device_put(jnp.asarray(x), op.spec())
                res[f"{{name}}_temp{{d}}"] = dist._matvec.lower(op, xs).compile().memory_analysis().temp_size_in_bytes
                res[f"{{name}}_oldtemp{{d}}"] = f.lower(*a).compile().memory_analysis().temp_size_in_bytes
                res[f"{{name}}_rows{{d}}"] = op.rows
        np.savez({out!r}, **res)
    """)
    t = _on_eight_devices(child, out)
    g = small_graph()
    x = np.random.default_rng(1).normal(size=(296, 24)).astype(np.float32)
    dense = {"g": dense_reference(g, LAYER_W), "hub": dense_from_rows(*hub_rows(120, 5))}
    for name, a in dense.items():
        for d in (1, 2, 4, 8):
            y, ref = t[f"{name}_y{d}"], t[f"{name}_ref{d}"]
            want = a @ x[:a.shape[0]].astype(np.float64)
            assert np.abs(y - ref).max() <= 1e-6 * np.abs(ref).max(), (name, d)
            assert np.abs(y - want).max() <= 1e-6 * np.abs(want).max(), (name, d)
            assert t[f"{name}_edges{d}"] == t[f"{name}_out{d}"]                    # each edge once, incoming
            n_all, n_dev = int(t[f"{name}_rows{d}"]), int(t[f"{name}_rows{d}"]) // d
            temp = int(t[f"{name}_temp{d}"])
            assert temp <= 4 * 24 * (n_all + 4 * n_dev) + 4096, (name, d, temp)
            if d > 1:
                assert temp < int(t[f"{name}_oldtemp{d}"]), (name, d, temp, int(t[f"{name}_oldtemp{d}"]))


def test_one_two_eight_devices_agree_with_eigh_and_arpack(tmp_path):
    """8 fake CPU devices; meshes of 1, 2 (rows split evenly: 294 = 2·147) and 8 (rows padded to 296; 4 devices
    would pad to the same 296, the same path): the product equals the dense reference; the solve (layer weights
    0.7/0.3) agrees with float64 eigh, with ARPACK (`exact` on the whole graph) and with the 1-device solve; the
    sharded search (`knn_sharded`, 8 images of 4×4 on 8 devices) has `graphs.knn`'s neighbours row for row."""
    out = str(tmp_path / "r.npz")
    child = CHILD + textwrap.dedent(f"""
        from spectral_jax.solvers.exact import exact
        assert len(jax.devices()) == 8
        g = small_graph()
        x = np.random.default_rng(1).normal(size=(g.num_nodes, 5)).astype(np.float32)
        res = {{}}
        for d in (1, 2, 8):
            mesh = jax.make_mesh((d,), ("data",), devices=jax.devices()[:d])
            op = dist.operator([dist.shard_graph(g, mesh)], [jnp.asarray(LAYER_W)])
            assert op.rows % d == 0 and tuple(op.cols.sharding.spec)[:2] == (None, "data")
            assert len(op.cols.addressable_shards) == d and op.cols.addressable_shards[0].data.shape[1] == op.rows // d
            res[f"y{{d}}"] = np.asarray(op.matvec(np.pad(x, ((0, op.rows - g.num_nodes), (0, 0)))))[:g.num_nodes]
            s = dist.lobpcg(op, K, tol=TOL, seed=0)
            res[f"vecs{{d}}"] = dist.gather_rows(s.eigvecs, g.num_nodes)
            res[f"vals{{d}}"], res[f"res{{d}}"] = s.eigvals, np.asarray(s.convergence.residuals)
            res[f"conv{{d}}"] = s.convergence.converged
            res[f"pad{{d}}"] = np.abs(dist.gather_rows(s.eigvecs)[g.num_nodes:]).max(initial=0.0)
        r = exact(g, K, [jnp.asarray(LAYER_W)], dense_max=0, sparse_solver="arpack", tol=TOL)
        res["arpack"] = r.eigvals[0]
        # the sharded search vs graphs.knn
        rng = np.random.default_rng(3)
        a = jnp.asarray(rng.normal(size=(2, 8 * 16, 12)), jnp.float32)
        mesh = jax.make_mesh((8,), ("data",))
        whole = graphs.knn(a, a, (4, 4), 8, 5, 4)
        sh = dist.knn_sharded(a, a, (4, 4), 8, 5, 4, mesh=mesh)
        assert tuple(sh.idx.sharding.spec)[:2] == (None, "data")
        for name in ("idx", "w", "deg"):
            res["knn_" + name] = np.asarray(getattr(sh, name)) - np.asarray(getattr(whole, name))
        res["knn_deg_scale"] = np.abs(np.asarray(whole.deg)).max()
        np.savez({out!r}, **res)
    """)
    t = _on_eight_devices(child, out)
    g = small_graph()
    a = dense_reference(g, LAYER_W)
    x = np.random.default_rng(1).normal(size=(g.num_nodes, 5)).astype(np.float32)
    e, _ = top(a, K)
    for d in (1, 2, 8):
        assert np.abs(t[f"y{d}"] - a @ x).max() <= 1e-6 * np.abs(a @ x).max(), d
        _check_solve(dict(vals=t[f"vals{d}"], res=t[f"res{d}"], converged=t[f"conv{d}"]), t[f"vecs{d}"], a)
        assert subspace_alignment(t[f"vecs{d}"], t["vecs1"]) >= 0.99999
        assert t[f"pad{d}"] == 0.0                                             # padded rows stay zero
    assert np.abs(t["arpack"] - e).max() <= 2e-6 * e[0]
    assert np.abs(np.sort(t["vals8"])[::-1] - t["arpack"]).max() <= 2e-6 * e[0]
    # the same neighbours; weights within a few float32 ulps (the ring's key tiles round by their shape: see
    # test_ring_search_equals_the_gathered_search_and_graphs_knn_and_its_memory_falls), degrees (sums of them)
    # within 8 float32 ulps of the largest degree (a fixed 1e-6 failed at LLVM -O0 with 1.43e-6, about 1.5 ulps)
    deg_tol = 8 * np.finfo(np.float32).eps * float(t["knn_deg_scale"])
    assert np.all(t["knn_idx"] == 0) and np.abs(t["knn_w"]).max() <= 5e-7 and np.abs(t["knn_deg"]).max() <= deg_tol


def test_two_processes_give_the_one_process_solve(tmp_path):
    """Two local processes (jax.distributed, 1 CPU device each, gloo collectives), each holding half of the rows:
    the same eigenpairs as one process, and float64 eigh's."""
    port, procs = _free_port(), []
    for i in range(2):
        child = textwrap.dedent(f"""
            import jax
            jax.distributed.initialize(coordinator_address="127.0.0.1:{port}", num_processes=2, process_id={i})
        """) + CHILD + textwrap.dedent(f"""
            mesh = jax.make_mesh((2,), ("data",))
            g = small_graph()
            sg = dist.shard_graph(g, mesh)
            assert len(sg.idx.addressable_shards) == 1 and sg.idx.addressable_shards[0].data.shape[1] == 147
            op = dist.operator([sg], [jnp.asarray(LAYER_W)])
            s = dist.lobpcg(op, K, tol=TOL, seed=0)
            vecs = dist.gather_rows(s.eigvecs, g.num_nodes)
            np.savez({str(tmp_path)!r} + "/p{i}.npz", vecs=vecs, vals=s.eigvals,
                     res=np.asarray(s.convergence.residuals), converged=s.convergence.converged)
        """)
        procs.append(subprocess.Popen([sys.executable, "-c", child], env=_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE))
    _wait_all(procs)
    g = small_graph()
    a = dense_reference(g, LAYER_W)
    op = dist.operator([dist.shard_graph(g, jax.make_mesh((1,), ("data",)))], [jnp.asarray(LAYER_W)])
    one = dist.lobpcg(op, K, tol=TOL, seed=0)
    v1 = dist.gather_rows(one.eigvecs, g.num_nodes)
    p = [dict(np.load(tmp_path / f"p{i}.npz")) for i in range(2)]
    np.testing.assert_array_equal(p[0]["vecs"], p[1]["vecs"])                 # both processes hold the same answer
    _check_solve(p[0], p[0]["vecs"], a)
    assert subspace_alignment(p[0]["vecs"], v1) >= 0.99999
    # each within 2e-6 · λ_max of float64 eigh (`_check_solve`), so within twice that of each other: two processes
    # sum in another order than one (measured 2.4e-6 with the suite's fusion emitters off, 2026-12-07)
    e = top(a, K)[0]
    assert np.abs(np.sort(one.eigvals)[::-1] - e).max() <= 2e-6 * e[0]
    assert np.abs(np.sort(p[0]["vals"]) - np.sort(one.eigvals)).max() <= 4e-6 * one.eigvals.max()


def test_to_result_is_an_exact_like_result():
    """`to_result`: a `Result` whose eigvals/eigvecs are the solve's sorted largest first, rq per group, objective
    Σ w R, and the convergence record."""
    g = small_graph()
    op = dist.operator([dist.shard_graph(g, jax.make_mesh((1,), ("data",)))], [jnp.asarray(LAYER_W)])
    s = dist.lobpcg(op, K, tol=TOL)
    r = dist.to_result(s, op, g.grid, g.num_images)
    assert r.eigvecs.shape == (6, K, 7, 7) and r.method == "exact-lobpcg-distributed" and r.joint
    assert np.all(np.diff(r.eigvals[0]) <= 0) and r.convergence.converged
    assert r.rq.shape == (6, 2, K) and r.orth_error < 1e-5
    np.testing.assert_allclose(r.objective[0], np.sum(np.asarray(LAYER_W)[:, None] * r.rq[0]), rtol=1e-5)
    np.testing.assert_allclose(np.sum(np.asarray(LAYER_W)[:, None] * r.rq[0], axis=0), r.eigvals[0], rtol=1e-5)


@pytest.mark.slow          # a benchmark's smoke run (CI time): python -m pytest -m slow tests/test_distributed.py
def test_bench_scale_tiny_runs(tmp_path):
    """`benchmarks/bench_scale.py --tiny` end to end (N = 4096 in 1 and 2 local processes): it writes its table,
    the 2-process run converged and gives the 1-process subspace."""
    import json

    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_scale.py"), "--tiny", "--out",
                        str(tmp_path)], env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.load(open(tmp_path / "scale_tiny.json"))
    two = next(x for x in d["strong"] if x["procs"] == 2)["records"]
    assert len(two) == 2 and all(x["converged"] and x["max_residual"] <= 3.4527e-4 for x in two)
    one = next(x for x in d["strong"] if x["procs"] == 1)["records"][0]
    assert two[0]["graph_bytes"] * 2 == one["graph_bytes"]
    # the incoming edges are padded to the most a process receives, rounded up to its rows: within 10 % of 1/P
    assert one["operator_bytes"] <= two[0]["operator_bytes"] * 2 <= 1.1 * one["operator_bytes"]
    # tol 3.45e-4 here (not the 1e-5 above): eigenvalue errors ~ residual² / gap, measured 1.3e-6 of λ₁
    assert np.abs(np.subtract(two[0]["eigvals"], one["eigvals"])).max() <= 5e-6 * one["eigvals"][0]
    md = open(tmp_path / "scale_tiny.md").read()
    assert "| 4,096 | 2 |" in md and "ImageNet val" in md


def test_bench_scale_rewrites_its_own_sections_and_keeps_the_others(tmp_path):
    """`benchmarks/bench_scale.py`'s results writer (`write_kept`): a rerun replaces the preamble and the sections
    it measured, in their places, keeps a section it does not write (a hand-added one, or the other mode's) and
    the JSON keys it does not write; a second identical write changes nothing."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import bench_scale
    finally:
        sys.path.pop(0)
    md, js = str(tmp_path / "scale.md"), str(tmp_path / "scale.json")
    with open(md, "w") as f:
        f.write("# Scale\n\nold preamble\n\n## Strong scaling\n\nold table\n\n## By hand\n\nkept text\n")
    with open(js, "w") as f:
        f.write('{"strong": 1, "ring": {"kept": true}}')
    run = "# Scale\n\nnew preamble\n\n## Strong scaling\n\nnew table\n\n## Projection\n\nnew projection\n"
    bench_scale.write_kept(md, run, js, {"strong": 2})
    text = open(md).read()
    assert [x for x in text.splitlines() if x.startswith("## ")] == ["## Strong scaling", "## By hand", "## Projection"]
    assert "new preamble" in text and "new table" in text and "kept text" in text and "old" not in text
    import json

    assert json.load(open(js)) == {"strong": 2, "ring": {"kept": True}}
    bench_scale.write_kept(md, "## Search\n\nsearch table\n", js, {"search_memory": {}})   # the other mode
    again = open(md).read()
    assert again.startswith(text.rstrip("\n")) and again.endswith("## Search\n\nsearch table\n")
    bench_scale.write_kept(md, "## Search\n\nsearch table\n", js, {"search_memory": {}})
    assert open(md).read() == again


def test_layer_spectra_equal_exact_layer_spectra():
    """Per-layer spectra for the layer-weight rules: each layer's own distributed solve vs `exact.layer_spectra`
    (dense, float64-accurate LAPACK) on the whole graph, layer order ascending."""
    from spectral_jax.solvers.exact import layer_spectra

    g = small_graph()
    sg = dist.shard_graph(g, jax.make_mesh((1,), ("data",)))
    ours = dist.layer_spectra([sg], [(3, 5)], K, tol=TOL)
    want = layer_spectra([g], [(3, 5)], K)
    assert ours.shape == want.shape == (2, K)
    np.testing.assert_allclose(ours, want, rtol=0, atol=2e-6 * float(want.max()))


def test_sharded_graph_rows_cache_is_read_back_on_resume(tmp_path):
    """The sharded path's graph cache (`whole.solve_sharded`, one process, `--solver sharded`) through the console
    script: the run writes its rows to OUT/checkpoints/graph-rows; `--resume` reads them back instead of reading
    the features and searching ("graph" in summary.json's cached, no features-read line) and gives the same
    eigenvectors and edges; `--resume` with another
    --k-inter is one line naming the setting, exit 2, the summary left as it was; a damaged rows file is one line
    naming it, exit 2."""
    from test_dataset import make_folder
    from test_dataset_badinput import SCRIPT, _one_line_exit_2
    from test_dataset_sharded import CLI

    imgs = make_folder(str(tmp_path / "imgs"), 8)
    out = str(tmp_path / "out")
    run = lambda *extra: subprocess.run([SCRIPT, "dataset", imgs, *CLI, "--solver", "sharded", "--out", out,
                                         *extra], env=_env(TQDM_DISABLE="1"), capture_output=True, text=True,
                                        timeout=600)
    read = lambda: (np.load(os.path.join(out, "eigvecs.npz"))["eigvecs"],
                    open(os.path.join(out, "summary.json")).read())
    r = run()
    assert r.returncode == 0, r.stderr[-3000:]
    rows = os.path.join(out, "checkpoints", "graph-rows", "rows-0-of-1.npz")
    assert os.path.isfile(rows) and not os.path.exists(os.path.join(out, "checkpoints", "graph.npz"))
    assert not os.path.exists(os.path.join(out, "checkpoints", "graph-parts"))   # the per-layer parts: gone
    v1, s1 = read()
    import json

    assert "graph" not in json.loads(s1)["cached"]
    r = run("--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    v2, s2 = read()
    s2 = json.loads(s2)
    assert "graph" in s2["cached"] and s2["exact_solver"]["path"] == "sharded" and "features read" not in r.stderr
    assert s2["edges"] == json.loads(s1)["edges"] > 0
    np.testing.assert_array_equal(v2, v1)
    before = open(os.path.join(out, "summary.json")).read()
    r = run("--resume", "--k-inter", "5")
    _one_line_exit_2(r, "other settings", "k_inter_effective")
    assert open(os.path.join(out, "summary.json")).read() == before
    with open(rows, "r+b") as f:
        f.truncate(100)
    r = run("--resume")
    _one_line_exit_2(r, "graph-rows", "damaged")
    assert open(os.path.join(out, "summary.json")).read() == before


def gathered_search(mesh, per, k_intra, k_inter, min_cos=0.1, block=512):
    """The sharded search as it was before the ring (the reference `_search` is compared with): each device
    all-gathers every layer's keys `[L, N, F]` and runs `graphs._knn_rows` on its rows against them."""
    from jax.sharding import PartitionSpec as P

    def local(a_loc, b_loc, valid):
        b_all = jax.lax.all_gather(b_loc, "data", axis=1, tiled=True)
        row0 = jax.lax.axis_index("data") * a_loc.shape[1]
        return graphs._knn_rows(a_loc, b_loc, b_all, row0, valid, per, k_intra, k_inter, min_cos, block)[:2]

    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(None, "data"), P(None, "data"), P()),
                                 out_specs=(P(None, "data"),) * 2))


RING_CASES = (  # name, images, grid, F, k_intra, k_inter, rounded features (exact ties), valid images
    ("plain", 8, (4, 4), 12, 5, 4, False, None),
    ("ties", 8, (3, 5), 7, 4, 30, True, None),                  # k_inter 30 > the 15 columns of a block at 8 devices
    ("invalid", 8, (4, 4), 12, 5, 40, False, (1, 0, 1, 0, 0, 0, 1, 0)),       # 32 valid columns < 40: −inf slots
)


def test_ring_search_equals_the_gathered_search_and_graphs_knn_and_its_memory_falls(tmp_path):
    """`knn_sharded`'s ring (key blocks passed round the mesh by ppermute, a running top-k) on 1, 2, 4 and 8 fake
    CPU devices against `graphs.knn` and the all-gathered search it replaced (`gathered_search`): one device is
    `graphs.knn` bit for bit; on more, the cosines come from key tiles of another width, which XLA's CPU matmul may
    round differently (a few float32 ulps), so: weights within 5e-7, and slot for slot the chosen neighbours'
    float64 cosines within 1e-6 — identical lists where no two candidates tie within rounding (asserted on
    continuous features, and degrees within 1e-6 of the largest), candidates of (near-)equal cosine possibly
    exchanged on rounded features ("ties"; the gathered search passes the same checks). Slots without a candidate
    (invalid images) carry the columns the gathered search gives them, in both of its regimes (all columns in one
    chunk: the lowest masked ones; several chunks, forced by a small `kernels.INTER_BUDGET`: 0). XLA's memory
    analysis of the compiled search: per-device temporaries fall with the devices, and lie below the gathered
    search's by at least the (D−1)/D·N·F·L keys it all-gathered."""
    out = str(tmp_path / "r.npz")
    child = CHILD + textwrap.dedent(f"""
        from jax.sharding import NamedSharding, PartitionSpec as P
        from spectral_jax import kernels
        from test_distributed import gathered_search, RING_CASES
        assert len(jax.devices()) == 8
        res = {{}}

        def run(name, nimg, grid, f, ki, ko, rounded, valid, seed):
            x = np.random.default_rng(seed).normal(size=(2, nimg * grid[0] * grid[1], f))
            a = jnp.asarray(np.round(x) if rounded else x, jnp.float32)
            v = None if valid is None else np.asarray(valid, bool)
            whole = graphs.knn(a, a, grid, nimg, ki, ko, valid=v)
            res[name + "_a"], res[name + "_deg"] = np.asarray(a), np.asarray(whole.deg)
            res[name + "_idx"], res[name + "_w"] = np.asarray(whole.idx), np.asarray(whole.w)
            for d in (1, 2, 4, 8):
                mesh = jax.make_mesh((d,), ("data",), devices=jax.devices()[:d])
                sh = dist.knn_sharded(a, a, grid, nimg, ki, ko, valid=v, mesh=mesh)
                assert tuple(sh.idx.sharding.spec)[:2] == (None, "data")
                res[f"{{name}}_idx{{d}}"], res[f"{{name}}_w{{d}}"] = np.asarray(sh.idx), np.asarray(sh.w)
                res[f"{{name}}_deg{{d}}"] = np.asarray(sh.deg)
                rows = NamedSharding(mesh, P(None, "data"))
                vv = jnp.ones(nimg, bool) if v is None else jnp.asarray(v)
                gi, gw = gathered_search(mesh, grid[0] * grid[1], ki, ko)(*(jax.device_put(a, rows),) * 2, vv)
                res[f"{{name}}_gidx{{d}}"], res[f"{{name}}_gw{{d}}"] = np.asarray(gi), np.asarray(gw)

        for i, case in enumerate(RING_CASES):
            run(*case, seed=i)
        # several column chunks in the inter-image search on 1 and 2 devices, one on 4 and 8 (new shapes: retraced)
        kernels.INTER_BUDGET = 1 << 16
        run("chunked", 8, (8, 8), 10, 5, 70, False, (1, 0, 0, 0, 0, 0, 0, 1), seed=9)
        kernels.INTER_BUDGET = 1 << 24
        nimg, per, f = 16, 16, 32
        for d in (1, 2, 4, 8):
            mesh = jax.make_mesh((d,), ("data",), devices=jax.devices()[:d])
            a = jax.ShapeDtypeStruct((2, nimg * per, f), jnp.float32, sharding=NamedSharding(mesh, P(None, "data")))
            v = jax.ShapeDtypeStruct((nimg,), jnp.bool_, sharding=NamedSharding(mesh, P()))
            mem = lambda c: c.compile().memory_analysis().temp_size_in_bytes
            res[f"temp{{d}}"] = mem(dist._search.lower(a, a, v, per, 5, 8, 0.1, 512, mesh, "data"))
            res[f"gtemp{{d}}"] = mem(gathered_search(mesh, per, 5, 8).lower(a, a, v))
        np.savez({out!r}, **res)
    """)
    t = _on_eight_devices(child, out)
    for name in [c[0] for c in RING_CASES] + ["chunked"]:
        ref_i, ref_w, ref_d = t[name + "_idx"], t[name + "_w"], t[name + "_deg"]
        u = t[name + "_a"].astype(np.float64)
        u /= np.linalg.norm(u, axis=-1, keepdims=True)
        cos64 = lambda idx: np.einsum("lnf,lnkf->lnk", u, np.take_along_axis(u[:, None], idx[..., None], axis=2))
        assert np.count_nonzero(ref_w) > 0.5 * ref_w.size if name in ("plain", "ties") else np.count_nonzero(ref_w)
        np.testing.assert_array_equal(t[name + "_idx1"], ref_i)                  # one device: graphs.knn's own search
        np.testing.assert_array_equal(t[name + "_w1"], ref_w)
        edge = ref_w != 0
        for d in (2, 4, 8):
            ring_i, ring_w, gi = t[f"{name}_idx{d}"], t[f"{name}_w{d}"], t[f"{name}_gidx{d}"]
            for i, w, what in ((ring_i, ring_w, "ring"), (gi, t[f"{name}_gw{d}"], "gathered")):
                assert np.abs(w - ref_w).max() <= 5e-7, (name, d, what)
                assert np.array_equal(w != 0, edge), (name, d, what)
                assert np.abs(cos64(i) - cos64(ref_i))[edge].max() <= 1e-6, (name, d, what)
            if name != "ties":                                                 # continuous features: no ties
                np.testing.assert_array_equal(ring_i[edge], ref_i[edge], err_msg=f"{name} {d}")
                np.testing.assert_array_equal(ring_i, gi, err_msg=f"{name} {d}")   # no-edge slots included
                assert np.abs(t[f"{name}_deg{d}"] - ref_d).max() <= 1e-6 * ref_d.max(), (name, d)
        if name in ("invalid", "chunked"):                                     # slots without a candidate exist
            assert np.count_nonzero(~edge) >= 6 * ref_w.shape[1] // 4
        if name == "chunked":                                                  # both regimes were exercised
            assert np.any(t["chunked_gidx2"][~edge] == 0) and not np.array_equal(t["chunked_gidx8"], t["chunked_gidx2"])
        if name == "ties":                                                     # exchanged tied candidates happen
            assert any(not np.array_equal(t[f"ties_idx{d}"], ref_i) for d in (2, 4, 8))
    temps = [int(t[f"temp{d}"]) for d in (1, 2, 4, 8)]
    assert all(x > y for x, y in zip(temps, temps[1:])), temps
    keys = 2 * 16 * 16 * 32 * 4
    for d in (2, 4, 8):
        ring, gathered = int(t[f"temp{d}"]), int(t[f"gtemp{d}"])
        assert ring + (d - 1) * keys // d <= gathered, (d, ring, gathered)


def test_tiled_search_from_the_store_equals_the_ring_and_its_memory_does_not_grow_with_n(tmp_path):
    """The sharded path's search from the on-disk store (`whole.search_sharded` → `distributed.knn_tiled`: query
    and key tiles read memory-mapped from the shards, key tiles passed round the mesh) on 2 fake CPU devices,
    knn-qk in bfloat16 with two unreadable images, tiles of 3 query and 1 key image (a partial last query tile)
    against `knn_sharded` on the same features in memory: the same neighbours slot for slot (the slots
    without a candidate included), weights within a float32 ulp, a progress bar counting the query tiles; with
    whole-block tiles (the default sizes here) the same graph bit for bit. Resumable by layer: with a checkpoint
    folder each layer's rows are kept as a part; with layer 1's part removed, a second search reads only layer 1's
    features and gives the same graph; a part made with other settings, or torn, is one `InputError` naming it. XLA's
    memory analysis of a compiled key-tile step: the same temporaries at 4× the nodes, and below the whole-block
    search's."""
    out = str(tmp_path / "r.npz")
    child = CHILD + textwrap.dedent(f"""
        from jax.sharding import NamedSharding, PartitionSpec as P
        import os, shutil
        from spectral_jax.dataset import Settings, store, whole
        from spectral_jax.dataset.layout import Geometry
        from spectral_jax.errors import InputError
        assert len(jax.devices()) == 8
        nimg, grid, f, ki, ko = 8, (3, 3), 12, 4, 20
        per = grid[0] * grid[1]
        rng = np.random.default_rng(7)
        a, b = (jnp.asarray(rng.normal(size=(2, nimg * per, f)), jnp.bfloat16) for _ in range(2))
        valid = np.array([1, 1, 0, 1, 1, 1, 0, 1], bool)
        ck, key = {str(tmp_path)!r} + "/ck", {{"run": 1}}
        for first in (0, 4):
            rows = slice(first * per, (first + 4) * per)
            store.write_shard(ck, key, first, valid[first:first + 4], {{}}, {{"a0": a[:, rows], "b0": b[:, rows]}})
        expect = {{"a0": ("uint16", (2, 4 * per, f)), "b0": ("uint16", (2, 4 * per, f))}}
        shards = [store.read_shard(f"{{store.folder(ck)}}/{{n}}", key, ck, expect) for n in store.finished(ck)]
        st = whole.Streamed(store.FeatureStore(shards, 0, nimg, {{"a0": per, "b0": per}}), valid, {{}}, 0)
        settings = Settings(graph="knn-qk", features_dtype="bfloat16", method="exact")
        res = {{}}
        for d in (2,):
            mesh = jax.make_mesh((d,), ("data",), devices=jax.devices()[:d])
            geom = Geometry(((grid, (0, 1)),), grid, (42, 42), nimg, 64, d, ki, ko)
            ring = dist.knn_sharded(a, b, grid, nimg, ki, ko, valid=valid, mesh=mesh)
            img = per * f * 2

            class Bar:                                  # counts what a tqdm bar would show
                def reset(self, total): self.total, self.n = total, 0
                def set_description(self, what): self.what = what
                def update(self, m): self.n += m

            bar = Bar()
            tiled = whole.search_sharded(st, settings, geom, mesh, row_bytes=3 * img, col_bytes=img, bar=bar)[0]
            res["bar"] = [bar.total, bar.n]
            block = whole.search_sharded(st, settings, geom, mesh)[0]
            # a search stopped after layer 0 (its part kept, layer 1's gone) resumes at layer 1, reading only it
            kw = dict(row_bytes=3 * img, col_bytes=img, ckdir=ck, key={{"graph": 1, "processes": 1, "process": 0}})
            whole.search_sharded(st, settings, geom, mesh, **kw)
            res["parts"] = sorted(os.listdir(f"{{ck}}/{{store.PARTS}}"))
            shutil.rmtree(f"{{ck}}/{{store.PARTS}}/" + whole._sharded_part(0, 1))
            reads, rows = [], st.store.rows
            st.store.rows = lambda name, layer, *a: reads.append(layer) or rows(name, layer, *a)
            again = whole.search_sharded(st, settings, geom, mesh, **kw)[0]
            res["reads"], res["again_idx"], res["again_w"] = sorted(set(reads)), np.asarray(again.idx), np.asarray(again.w)
            for name, why in (("other", {{**kw, "key": {{"graph": 2, "processes": 1, "process": 0}}}}), ("damaged", kw)):
                if name == "damaged":                   # a torn part (its CRC-32 no longer matches)
                    with open(f"{{ck}}/{{store.PARTS}}/" + whole._sharded_part(0, 0) + "/w.npy", "r+b") as fh:
                        fh.seek(-4, 2)
                        fh.write(bytes([255, 255, 255, 127]))
                try:
                    whole.search_sharded(st, settings, geom, mesh, **why)
                    res[name] = "no error"
                except InputError as e:
                    res[name] = str(e)
            st.store.rows = rows
            for name, g in (("ring", ring), ("tiled", tiled), ("block", block)):
                assert tuple(g.idx.sharding.spec)[:2] == (None, "data")
                res[f"{{name}}_idx{{d}}"], res[f"{{name}}_w{{d}}"] = np.asarray(g.idx), np.asarray(g.w)
        mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
        mem = lambda c: c.compile().memory_analysis().temp_size_in_bytes
        sds = lambda *s, dt=jnp.float32: jax.ShapeDtypeStruct(s, dt, sharding=NamedSharding(mesh, P("data")))
        v = jax.ShapeDtypeStruct((64,), jnp.bool_, sharding=NamedSharding(mesh, P()))
        best = (sds(4 * 2 * 16, 8, dt=jnp.int32), sds(4 * 2 * 16, 8))
        for m in (4, 16):                           # images per device; tiles of 2 images, 16 tokens each
            res[f"tile{{m}}"] = mem(dist._tile_inter.lower(sds(4 * 2 * 16, 64), sds(4 * 2 * 16, 64), best, v, 0, 0,
                                                           n=m * 16, per=16, k=8, block=512, mesh=mesh, axis="data"))
        whole_a = jax.ShapeDtypeStruct((1, 4 * 16 * 16, 64), jnp.float32, sharding=NamedSharding(mesh, P(None, "data")))
        res["block"] = mem(dist._search.lower(whole_a, whole_a, v, 16, 0, 8, 0.1, 512, mesh, "data"))
        np.savez({out!r}, **res)
    """)
    t = _on_eight_devices(child, out)
    assert list(t["bar"]) == [4, 4]                 # 2 layers × 2 query tiles (3 + 1 of 4 images per device)
    assert list(t["parts"]) == ["g0-l0-p0-of-1", "g0-l1-p0-of-1"] and list(t["reads"]) == [1]
    np.testing.assert_array_equal(t["again_idx"], t["tiled_idx2"])
    np.testing.assert_array_equal(t["again_w"], t["tiled_w2"])
    assert "other" in str(t["other"]) and "settings" in str(t["other"]), str(t["other"])
    assert "g0-l0-p0-of-1" in str(t["damaged"]) and "w" in str(t["damaged"]), str(t["damaged"])
    for d in (2,):
        ri, rw = t[f"ring_idx{d}"], t[f"ring_w{d}"]
        assert np.count_nonzero(rw) > 0.4 * rw.size and np.count_nonzero(rw == 0) >= 2 * 9 * 24 * 2
        np.testing.assert_array_equal(t[f"block_idx{d}"], ri)
        np.testing.assert_array_equal(t[f"block_w{d}"], rw)
        np.testing.assert_array_equal(t[f"tiled_idx{d}"], ri)
        assert np.abs(t[f"tiled_w{d}"] - rw).max() <= 1.2e-7, d
    assert int(t["tile4"]) == int(t["tile16"]) < int(t["block"]), (int(t["tile4"]), int(t["tile16"]), int(t["block"]))


@pytest.mark.slow  # two processes; the ring on 1/2/4/8 fake devices is above, and test_dataset_sharded runs it in two processes
def test_ring_search_in_two_processes_gives_graphs_knn(tmp_path):
    """Two local processes (jax.distributed, 1 CPU device each, gloo): `knn_sharded`'s ring passes the key blocks
    between the processes (`ppermute` over the CPU collectives); each process holds only its half of the rows, and
    the rows gathered afterwards have `graphs.knn`'s neighbours (weights within a few float32 ulps)."""
    port, procs = _free_port(), []
    for i in range(2):
        child = textwrap.dedent(f"""
            import jax
            jax.distributed.initialize(coordinator_address="127.0.0.1:{port}", num_processes=2, process_id={i})
        """) + CHILD + textwrap.dedent(f"""
            a = jnp.asarray(np.random.default_rng(5).normal(size=(2, 8 * 36, 16)), jnp.float32)
            sh = dist.knn_sharded(a, a, (6, 6), 8, 5, 12, mesh=jax.make_mesh((2,), ("data",)))
            assert len(sh.idx.addressable_shards) == 1 and sh.idx.addressable_shards[0].data.shape[1] == 144
            rows = lambda x: np.swapaxes(dist.gather_rows(jnp.swapaxes(x, 0, 1)), 0, 1)
            np.savez({str(tmp_path)!r} + "/p{i}.npz", idx=rows(sh.idx), w=rows(sh.w), a=np.asarray(a))
        """)
        procs.append(subprocess.Popen([sys.executable, "-c", child], env=_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE))
    _wait_all(procs)
    p = [dict(np.load(tmp_path / f"p{i}.npz")) for i in range(2)]
    whole = graphs.knn(jnp.asarray(p[0]["a"]), jnp.asarray(p[0]["a"]), (6, 6), 8, 5, 12)
    for q in p:
        np.testing.assert_array_equal(q["idx"], np.asarray(whole.idx))
        assert np.abs(q["w"] - np.asarray(whole.w)).max() <= 5e-7
    assert np.count_nonzero(p[0]["w"]) > 0.5 * p[0]["w"].size
