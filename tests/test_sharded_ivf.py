"""The sharded path's approximate search (`distributed.knn_tiled` with an ivf `Search`: each device's IVF index over
its own key block, the indexes passed round the mesh, the recall checked on a seeded sample first) and its use by
`spectral-jax dataset --solver sharded --search auto` (`whole.sharded_search`).

On fake CPU devices: with one device the ring IVF is `graphs.knn`'s IVF (probe "list") bit for bit, knn-vv and
knn-qk (rows other than the columns); on 2 and 4 the intra-image slots are the exact ring's, an unreadable image has
no edges and the sampled recall it reports is the graph's true recall against the exact ring (within 0.05); on 2 a
row's neighbours do not depend on the query tile it is searched in, the run repeats bit for bit, and a recall floor
it cannot reach doubles nprobe, then searches exactly (the exact ring's graph). In 2 processes (slow) the ring IVF
gives one process's 2-device graph. Through the console script (the size threshold lowered in the child):
summary.json's knn_search says ivf with its recall and tries, the graph-rows cache gives the same record on
--resume, and the memory estimate counts the device's blocks. A stopped search resumes from its parts with their
recall.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from sjtest import xla_flags
from test_dataset import _env, _free_port

from spectral_jax import knn_search

FEATURES = """
import numpy as np
nimg, grid, f, ki, ko = 64, (8, 8), 16, 4, 10
per = grid[0] * grid[1]
rng = np.random.default_rng(0)
cent = rng.normal(size=(40, f))
lab = rng.integers(0, 40, nimg * per)
x = (cent[lab] + 0.5 * rng.normal(size=(nimg * per, f))).astype(np.float32)[None].repeat(2, 0)
x[1] = x[1][:, ::-1]                                    # two layers: the same tokens, features reversed
valid = np.ones(nimg, bool)
valid[5] = False
read = lambda which, layer, lo, hi: x[layer, lo * per:hi * per]
"""


def _child(src: str, env: dict | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-c", src], env=_env(**(env or {})), capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_ring_ivf_is_graphs_knn_on_one_device_and_finds_the_exact_neighbours_on_more(tmp_path):
    """`distributed.knn_tiled(search=ivf)` on 1, 2 and 4 fake CPU devices against `graphs.knn`'s IVF and the exact
    ring (the module docstring's first paragraph): 64 images of 8×8 tokens of 40 planted 16-d classes, one image
    unreadable, k_intra 4, k_inter 10, 16 lists per device's index."""
    out = str(tmp_path / "r.npz")
    _child(FEATURES + textwrap.dedent(f"""
        import jax, jax.numpy as jnp
        from spectral_jax import graphs, knn_search
        from spectral_jax.solvers import distributed as dist
        assert len(jax.devices()) == 8
        res = {{}}
        s = knn_search.Search("ivf", nlist=16, nprobe=6, probe="list", recall_rows=400)
        mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
        one = dist.knn_tiled(read, grid, nimg, 2, f, ki, ko, valid=valid, mesh=mesh, search=s)
        ref = graphs.knn(jnp.asarray(x), jnp.asarray(x), grid, nimg, ki, ko, valid=valid, search=s)
        res["one_idx"], res["one_w"] = np.asarray(one.idx), np.asarray(one.w)
        res["ref_idx"], res["ref_w"] = np.asarray(ref.idx), np.asarray(ref.w)
        # knn-qk: the rows (a) are not the columns (b) — the index over b, the rows assigned to its lists
        y = np.ascontiguousarray(x[:, :, ::-1] * np.linspace(0.5, 1.5, f, dtype=np.float32))
        read_qk = lambda which, layer, lo, hi: (x if which == "a" else y)[layer, lo * per:hi * per]
        qk = dist.knn_tiled(read_qk, grid, nimg, 2, f, ki, ko, valid=valid, mesh=mesh, search=s, same=False)
        ref = graphs.knn(jnp.asarray(x), jnp.asarray(y), grid, nimg, ki, ko, valid=valid, search=s)
        res["qk_idx"], res["qk_w"] = np.asarray(qk.idx), np.asarray(qk.w)
        res["qkref_idx"], res["qkref_w"] = np.asarray(ref.idx), np.asarray(ref.w)
        for d in (2, 4):                            # 4 devices: the tiled run and its recall only
            mesh = jax.make_mesh((d,), ("data",), devices=jax.devices()[:d])
            ex = dist.knn_tiled(read, grid, nimg, 2, f, ki, ko, valid=valid, mesh=mesh, rows=3)
            s = knn_search.Search("ivf", nlist=16, nprobe=4, probe="list", recall_rows=400)
            runs = (("tiled", dict(rows=3)), ("block", {{}}), ("again", dict(rows=3)))
            for name, kw in runs[:1 if d == 4 else 3]:
                rep = []
                g = dist.knn_tiled(read, grid, nimg, 2, f, ki, ko, valid=valid, mesh=mesh, search=s, report=rep,
                                   **kw)
                res[f"{{name}}{{d}}_idx"], res[f"{{name}}{{d}}_w"] = np.asarray(g.idx), np.asarray(g.w)
                res[f"{{name}}{{d}}_rep"] = json.dumps(rep)
            res[f"ex{{d}}_idx"], res[f"ex{{d}}_w"] = np.asarray(ex.idx), np.asarray(ex.w)
            if d == 4:
                continue
            # a floor it cannot reach: nprobe doubled, then (a try probing 1/32 of a device's columns) exact
            rep = []
            s = knn_search.Search("ivf", nlist=64, nprobe=1, probe="list", recall_rows=400, min_recall=1.0)
            calls, truth = [], dist._ring_truth
            dist._ring_truth = lambda *a, **kw: calls.append(1) or truth(*a, **kw)
            g = dist.knn_tiled(read, grid, nimg, 2, f, ki, ko, valid=valid, mesh=mesh, rows=3, search=s, report=rep)
            dist._ring_truth = truth
            res[f"floor{{d}}_truths"] = len(calls)
            res[f"floor{{d}}_idx"], res[f"floor{{d}}_w"] = np.asarray(g.idx), np.asarray(g.w)
            res[f"floor{{d}}_rep"] = json.dumps(rep)
        np.savez({out!r}, **res)
        import json
    """).replace("import jax, jax.numpy", "import json, jax, jax.numpy"),
           env={"XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=8")})
    t = np.load(out)
    for name in ("one", "qk"):
        np.testing.assert_array_equal(t[f"{name}_idx"], t[f"{'ref' if name == 'one' else 'qkref'}_idx"])
        np.testing.assert_array_equal(t[f"{name}_w"], t[f"{'ref' if name == 'one' else 'qkref'}_w"])
    assert (t["qk_idx"] != t["one_idx"]).any()
    ki, per = 4, 64
    for d in (2, 4):
        ei, ew = t[f"ex{d}_idx"], t[f"ex{d}_w"]
        ai, aw = t[f"tiled{d}_idx"], t[f"tiled{d}_w"]
        # a row's neighbours do not depend on the query tile (its cosines on the tile's shape: XLA's CPU matmul
        # rounds by shape, a few float32 ulps); a second run is the first bit for bit
        if d == 2:
            np.testing.assert_array_equal(t[f"block{d}_idx"], ai)
            assert np.abs(t[f"block{d}_w"] - aw).max() <= 1e-6
            np.testing.assert_array_equal(t[f"again{d}_idx"], ai)
            np.testing.assert_array_equal(t[f"again{d}_w"], aw)
        np.testing.assert_array_equal(ai[:, :, :ki], ei[:, :, :ki])    # intra-image: exact
        assert not aw[:, 5 * per:6 * per].any() and not np.isin(ai[aw > 0] // per, [5]).any()
        rep = json.loads(str(t[f"tiled{d}_rep"]))
        assert [r["search"] for r in rep] == ["ivf", "ivf"] and all(len(r["tries"]) == 1 for r in rep), rep
        assert all(r["nprobe"] == 4 and r["nlist"] == 16 and r["recall_rows"] == 400 for r in rep), rep
        for layer in range(2):                                          # the true recall of the inter-image part
            hits = tot = 0
            for r in range(0, ei.shape[1], 5):
                e = set(ei[layer, r, ki:][ew[layer, r, ki:] > 0])
                hits += len(e & set(ai[layer, r, ki:][aw[layer, r, ki:] > 0]))
                tot += len(e)
            true = hits / tot
            assert 0.8 < true < 1 and abs(true - rep[layer]["recall"]) < 0.05, (d, layer, true, rep[layer])
        if d == 4:
            continue
        rep = json.loads(str(t[f"floor{d}_rep"]))
        assert all(r["search"] == "exact" and r["recall"] == 1.0 for r in rep), rep
        tries = [x["nprobe"] for x in rep[0]["tries"]]
        assert tries[:2] == [1, 2] and len(tries) >= 2 and all(x["recall"] < 1 for x in rep[0]["tries"]), rep
        assert int(t[f"floor{d}_truths"]) == 2, "the sample's exact search: once per layer, not per try"
        np.testing.assert_array_equal(t[f"floor{d}_idx"], ei)
        np.testing.assert_array_equal(t[f"floor{d}_w"], ew)


# the console script with auto's thresholds lowered (a few hundred tokens stand for 10⁵): auto from 64 tokens, lists
# of ≈ 16 tokens, a first try of 8 cells
LOWERED = ("import sys; from spectral_jax import knn_search as K; "
           "K.AUTO_MIN_COLUMNS, K.AUTO_CELL, K.AUTO_NPROBE = 64, 8, 2; "
           "from spectral_jax.cli import main; sys.exit(main(sys.argv[1:]))")


def test_dataset_sharded_auto_search_is_the_checked_ring_ivf_and_its_record_survives_resume(tmp_path):
    """`spectral-jax dataset --solver sharded` (one process) with --search auto above the (lowered) size: the
    ring IVF — summary.json's knn_search says ivf, the lists and cells it probed, each layer's sampled recall (below 1
    here, above --min-recall) and its tries; one stderr line says so; --resume reads the graph-rows cache back with
    the same record and eigenvectors. The memory estimate counts the device's whole blocks. --search faiss is one
    line, exit 2, nothing written (--search ivf by name: `whole.sharded_search`'s rule, below)."""
    from test_dataset import make_folder
    from test_dataset_badinput import SCRIPT, _one_line_exit_2
    from test_dataset_sharded import CLI

    imgs = make_folder(str(tmp_path / "imgs"), 24)
    out = str(tmp_path / "out")
    cli = [a if a != "28" else "56" for a in CLI]                      # 4×4 tokens: 384 in all
    run = lambda *extra: subprocess.run([sys.executable, "-c", LOWERED, "dataset", imgs, *cli, "--solver", "sharded",
                                         "--min-recall", "0.2", "--out", out, *extra], env=_env(TQDM_DISABLE="1"),
                                        capture_output=True, text=True, timeout=600)
    r = run()
    assert r.returncode == 0, r.stderr[-3000:]
    s1 = json.load(open(os.path.join(out, "summary.json")))
    ks = s1["knn_search"]
    assert s1["exact_solver"]["path"] == "sharded" and ks["asked"] == "auto" and ks["used"] == "ivf", ks
    assert ks["nlist"] == 32 and ks["nprobe"] == 8 and ks["min_recall"] == 0.2, ks
    assert set(ks["recall"]) == {"10", "11"} and 0.2 <= ks["recall_min"] < 1, ks
    assert [[t["nprobe"] for t in layer] for group in ks["tries"] for layer in group] == [[8], [8]], ks
    assert "kNN search ivf" in r.stderr and f"recall {ks['recall_min']:.4f}" in r.stderr, r.stderr
    mem = s1["memory"]
    assert mem["solver_path"] == "sharded" and mem["features_memory"] >= 384 * 384 * (4 + 12), mem
    v1 = np.load(os.path.join(out, "eigvecs.npz"))["eigvecs"]
    r = run("--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    s2 = json.load(open(os.path.join(out, "summary.json")))
    assert "graph" in s2["cached"] and s2["knn_search"] == ks and s2["edges"] == s1["edges"]
    np.testing.assert_array_equal(np.load(os.path.join(out, "eigvecs.npz"))["eigvecs"], v1)
    # --search faiss there: one line, before any work
    r = subprocess.run([SCRIPT, "dataset", imgs, *cli, "--solver", "sharded", "--search", "faiss", "--out",
                        str(tmp_path / "faiss")], env=_env(TQDM_DISABLE="1"), capture_output=True, text=True,
                       timeout=600)
    _one_line_exit_2(r, "--search faiss", "sharded path")
    assert not os.path.exists(tmp_path / "faiss")


@pytest.mark.slow  # two processes (jax.distributed, gloo); the fake-device runs above are in CI
def test_ring_ivf_in_two_processes_gives_the_two_device_graph(tmp_path):
    """Two local processes, one CPU device each: the indexes travel between the processes (`ppermute` of the
    `knn_search.Index` fields over the CPU collectives) and the graph, gathered, is one process's on 2 fake devices:
    the same neighbours, weights within a few float32 ulps; the same sampled recall."""
    port, procs = _free_port(), []
    search = "knn_search.Search('ivf', nlist=16, nprobe=4, probe='list', recall_rows=400, min_recall=0.5)"
    body = FEATURES + textwrap.dedent(f"""
        import json, jax, jax.numpy as jnp
        from spectral_jax import knn_search
        from spectral_jax.solvers import distributed as dist
        mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
        rep = []
        g = dist.knn_tiled(read, grid, nimg, 2, f, ki, ko, valid=valid, mesh=mesh, rows=3, search={search},
                           report=rep)
        rows = lambda x: np.swapaxes(dist.gather_rows(jnp.swapaxes(x, 0, 1)), 0, 1)
    """)
    for i in range(2):
        child = textwrap.dedent(f"""
            import jax
            jax.distributed.initialize(coordinator_address="127.0.0.1:{port}", num_processes=2, process_id={i})
        """) + body + f"np.savez({str(tmp_path)!r} + '/p{i}.npz', idx=rows(g.idx), w=rows(g.w), rep=json.dumps(rep))\n"
        procs.append(subprocess.Popen([sys.executable, "-c", child], env=_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE))
    from test_distributed import _wait_all

    _wait_all(procs)
    _child(body + f"np.savez({str(tmp_path)!r} + '/one.npz', idx=np.asarray(g.idx), w=np.asarray(g.w), "
                  "rep=json.dumps(rep))\n", env={"XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=2")})
    one = np.load(tmp_path / "one.npz")
    for i in range(2):
        p = np.load(tmp_path / f"p{i}.npz")
        np.testing.assert_array_equal(p["idx"], one["idx"])
        assert np.abs(p["w"] - one["w"]).max() <= 5e-7
        assert [r["recall"] for r in json.loads(str(p["rep"]))] == [r["recall"] for r in json.loads(str(one["rep"]))]
    assert all(r["search"] == "ivf" for r in json.loads(str(one["rep"])))


@pytest.mark.slow  # two processes
def test_bench_sharded_search_tiny_runs():
    """`benchmarks/bench_sharded_search.py --features tiny`: both searches run in 2 processes, the IVF's sampled and
    true recall are printed; with --procs 1 --devices 4 --modes ivf one process of 4 fake devices runs the IVF only
    (its tries printed, no true recall)."""
    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                         "bench_sharded_search.py")
    r = subprocess.run([sys.executable, bench, "--features", "tiny", "--per", "256"], env=_env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ivf: " in r.stdout and "true recall against the exact ring" in r.stdout, r.stdout
    true = json.loads(r.stdout.split("(every row): ")[1].splitlines()[0])
    assert len(true) == 2 and all(0.5 < x <= 1 for x in true), r.stdout
    r = subprocess.run([sys.executable, bench, "--features", "tiny", "--per", "256", "--procs", "1", "--devices", "4",
                        "--modes", "ivf"], env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "4096 tokens" in r.stdout and "1 processes, 4 devices" in r.stdout and "tries [[{" in r.stdout, r.stdout
    assert "exact " not in r.stdout and "true recall" not in r.stdout, r.stdout


def test_sharded_search_rule():
    """`whole.sharded_search`: exact (None) for --search exact and, for auto, below `knn_search.AUTO_MIN_COLUMNS`
    tokens; ivf by name at any size, and auto above,
    the checked IVF over a device's N/D columns — auto's lists for N/D and, at its first try, as many columns per row
    over the D indexes as one process's auto probes over all N (≥ 8 cells per index) —, the seed and the floor from
    the settings. From 2²⁰ tokens one process's lists stop at AUTO_MAX_NLIST and grow longer than a device's: there
    ⌈AUTO_NPROBE/D⌉ cells (the rule before) probed half as many columns or fewer (10⁶ tokens on 8 devices: 0.912,
    then the exact ring)."""
    from spectral_jax.dataset import Settings, whole

    big = knn_search.AUTO_MIN_COLUMNS
    assert whole.sharded_search(Settings(), big - 1, 2) is None
    small = whole.sharded_search(Settings(search="ivf"), 384, 1)              # ivf by name: at any size
    assert (small.kind, small.probe, small.min_recall) == ("ivf", "list", knn_search.AUTO_MIN_RECALL)
    assert whole.sharded_search(Settings(search="exact"), 10 * big, 2) is None
    s = whole.sharded_search(Settings(seed=7, min_recall=0.97), 2 * big, 2)
    want = knn_search.auto_search(big, knn_search.Search(seed=7, min_recall=0.97), "ivf")
    assert (s.kind, s.probe, s.nlist, s.seed, s.min_recall) == ("ivf", "list", want.nlist, 7, 0.97)
    assert s.nprobe == knn_search.AUTO_NPROBE // 2
    for nodes, d in ((2 * big, 2), (1003520, 4), (983040, 8), (64 * big, 64), (1 << 24, 16)):
        one = knn_search.plan(nodes, 1, knn_search.auto_search(nodes, knn_search.Search(), "ivf"))
        s = whole.sharded_search(Settings(), nodes, d)
        cap = knn_search.plan(nodes // d, 1, s)["cap"]
        assert s.nprobe == max(8, -(-one["nprobe"] * one["cap"] // (d * cap))), (nodes, d)
        assert s.nprobe * cap * d >= one["nprobe"] * one["cap"] > (s.nprobe - 1) * cap * d or s.nprobe == 8
    # not ⌈256/8⌉ = 32: one process's cells hold 120 tokens, a device's 64
    assert whole.sharded_search(Settings(), 983040, 8).nprobe == 60
    assert whole.sharded_search(Settings(), 64 * big, 64).nprobe == 32        # not 8
    assert whole.sharded_search(Settings(), 4 * big, 64).nprobe == 8          # the floor
    assert whole.sharded_search(Settings(), 2 * big, 2).min_recall == knn_search.AUTO_MIN_RECALL


def test_a_stopped_ring_ivf_search_resumes_with_its_recall(tmp_path):
    """`whole.search_sharded` on 2 fake devices from an on-disk store with auto's threshold lowered: each layer's
    part keeps its measured recall; with layer 1's part removed, a second search reads only layer 1's features, and
    gives the same graph and the same per-layer recall (layer 0's read back from its part, without tries)."""
    out = str(tmp_path / "r.npz")
    _child(textwrap.dedent(f"""
        import json, os, shutil
        import jax, jax.numpy as jnp, numpy as np
        from spectral_jax import knn_search
        knn_search.AUTO_MIN_COLUMNS, knn_search.AUTO_CELL, knn_search.AUTO_NPROBE = 256, 4, 4
        from spectral_jax.dataset import Settings, store, whole
        from spectral_jax.dataset.layout import Geometry
        nimg, grid, f, ki, ko = 16, (4, 4), 12, 3, 8
        per = grid[0] * grid[1]
        rng = np.random.default_rng(3)
        a = jnp.asarray(rng.normal(size=(2, nimg * per, f)), jnp.float32)
        valid = np.ones(nimg, bool)
        ck, key = {str(tmp_path)!r} + "/ck", {{"run": 1}}
        for first in (0, 8):
            rows = slice(first * per, (first + 8) * per)
            store.write_shard(ck, key, first, valid[first:first + 8], {{}}, {{"a0": a[:, rows]}})
        expect = {{"a0": ("float32", (2, 8 * per, f))}}
        shards = [store.read_shard(f"{{store.folder(ck)}}/{{n}}", key, ck, expect) for n in store.finished(ck)]
        st = whole.Streamed(store.FeatureStore(shards, 0, nimg, {{"a0": per}}), valid, {{}}, 0)
        settings = Settings(graph="knn-vv", method="exact", min_recall=0.3)
        mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
        geom = Geometry(((grid, (0, 1)),), grid, (16, 16), nimg, 64, 2, ki, ko)
        kw = dict(ckdir=ck, key={{"graph": 1, "processes": 1, "process": 0}})
        res, infos = {{}}, []
        g = whole.search_sharded(st, settings, geom, mesh, infos=infos, **kw)[0]
        dump = lambda x: json.dumps(x, default=whole._jsonable)
        res["idx"], res["w"], res["info"] = np.asarray(g.idx), np.asarray(g.w), dump(infos)
        part = f"{{ck}}/{{store.PARTS}}/" + whole._sharded_part(0, 0)
        res["part_recall"] = np.load(part + "/recall.npy")
        shutil.rmtree(f"{{ck}}/{{store.PARTS}}/" + whole._sharded_part(0, 1))
        reads, rows = [], st.store.rows
        st.store.rows = lambda name, layer, *x: reads.append(layer) or rows(name, layer, *x)
        infos = []
        g = whole.search_sharded(st, settings, geom, mesh, infos=infos, **kw)[0]
        res["idx2"], res["w2"], res["info2"] = np.asarray(g.idx), np.asarray(g.w), dump(infos)
        res["reads"] = sorted(set(reads))
        np.savez({out!r}, **res)
    """), env={"XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=2")})
    t = np.load(out)
    one, two = json.loads(str(t["info"]))[0], json.loads(str(t["info2"]))[0]
    assert one["search"] == "ivf" and len(one["recall"]) == 2 and all(0.3 <= r < 1 for r in one["recall"]), one
    assert [len(x) for x in one["tries"]] == [1, 1], one
    assert abs(float(t["part_recall"][0]) - one["recall"][0]) < 1e-6
    assert list(t["reads"]) == [1]
    np.testing.assert_array_equal(t["idx2"], t["idx"])
    np.testing.assert_array_equal(t["w2"], t["w"])
    assert two["search"] == "ivf" and np.allclose(two["recall"], one["recall"], atol=1e-6), (one, two)
    assert two["tries"][0] == [] and two["tries"][1] == one["tries"][1], two


def test_memory_estimate_counts_the_ring_ivf_blocks():
    """`memory.estimate` on the sharded path: with the ring IVF (--search ivf; auto from its threshold) a device holds
    its whole block as stored, its unit float32 rows, its index's copy and the index in flight — (N/(P·d))·F·(s·c +
    12) bytes — where the exact ring holds tiles, here less; auto below the threshold is the exact ring's figure.
    (The console test's tiny run is too small for the two to differ.)"""
    from spectral_jax.dataset import memory

    est = lambda search, n=8: memory.estimate([((32, 32), 1, 768)], n, k=(3, 6), num_eigs=4, processes=1,
                                              solver_path="sharded", search=search,
                                              graph="knn-vv")["features_memory"]
    ring = 8 * 1024 * 768 * (4 * 1 + 12)
    assert est("ivf") == ring > est("exact")
    assert est("auto") == est("exact")                      # 8192 tokens: below knn_search.AUTO_MIN_COLUMNS
    big = knn_search.AUTO_MIN_COLUMNS // 1024               # images of 32×32 tokens at the threshold
    assert est("auto", big) == est("ivf", big) == big * 1024 * 768 * 16 > est("exact", big)
