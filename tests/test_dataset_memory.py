"""The memory estimate's model terms (weights, the loader's copy, the forward's activations), its abstract
`estimate_model`, the refusal of a run whose forward does not fit, and the sharded path's per-process figure.

1. Against a measured tiny run (a child process; the random DINOv2-S at 224², batch 4): the weights term is the
   params' bytes; the resident growth of loading them is weights + load within 25 %; the resident growth of one
   call of the run's own compiled forward lies within [0.8, 1.6] × XLA's memory analysis, below the forward term
   (XLA's figure × CPU_FORWARD_FACTOR) and below the analytic `jaxpr_peak` bound.
2. A run whose forward exceeds SPECTRAL_JAX_MAX_MEMORY (the limit set between the estimates at --batch-size 1 and
   8) is refused through the console script: exit 2, one line naming the forward as the largest part and a smaller
   --batch-size as the fix, nothing written.
3. `abstract_backbone("sd15")` (what `estimate_model` builds) allocates no weights: 3.3 GiB of params as shapes
   with the child's peak resident size under 1.5 GiB; the loader's random draw is back afterwards
   (`convert.abstract_weights` is context-local: another thread draws real weights meanwhile).
4. On the sharded path the graph and operator terms are one process's rows: with 2 (fake) devices standing for 2
   processes, they equal the bytes device 0 holds of `distributed.shard_graph` and `distributed.operator`; a real
   two-process sharded run records that per-process estimate and runs under a limit the one-process gathered
   estimate exceeds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from spectral_jax import dataset
from spectral_jax.dataset import memory, whole
from test_dataset import _env, make_folder
from sjtest import xla_flags
from test_dataset_badinput import SCRIPT, _one_line_exit_2, _tree


def _child(code: str, timeout: int = 600, **env) -> dict:
    """Run `code` in a fresh Python (CPU, one BLAS thread); its last stdout line is JSON."""
    r = subprocess.run([sys.executable, "-c", code], env=_env(OPENBLAS_NUM_THREADS="1", **env), capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


MEASURE = r"""
import gc, json, os, threading, time
import numpy as np
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
from spectral_jax import io, models
from spectral_jax.dataset import memory, whole
from spectral_jax.dataset.layout import geometry, make_mesh
from spectral_jax.dataset.settings import Settings

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

s = Settings(model="dinov2_vits14", size=224, batch_size=4, method="exact", k_intra=3, k_inter=3, num_eigs=3)
jax.block_until_ready(jax.numpy.zeros(3) + 1)
gc.collect(); r0 = rss()
bb = models.load_backbone("dinov2_vits14", "random")
jax.block_until_ready(bb.params); gc.collect(); r1 = rss()
layers, mesh = bb.layers(s.layers), make_mesh()
geom = geometry(bb, layers, s, io.target_size(s.size, s.size, bb.patch_size), 8, 1)
est = memory.estimate_run(bb, layers, s, geom, mesh)
fw = whole._forward(bb, layers, s, geom, mesh)              # the program the estimate compiled
x = jax.device_put(np.random.default_rng(0).standard_normal((4, *geom.size, 3)).astype(np.float32),
                   NamedSharding(mesh, P("data")))
gc.collect(); r2 = rss(); peak, stop = [r2], []

def sample():
    while not stop:
        peak[0] = max(peak[0], rss()); time.sleep(0.0005)

t = threading.Thread(target=sample); t.start()
jax.block_until_ready(fw(bb.params, x)); stop.append(1); t.join()
bound = memory.jaxpr_peak(jax.make_jaxpr(fw)(bb.params, x))
print(json.dumps(dict(est=est, nbytes=sum(int(a.nbytes) for a in jax.tree.leaves(bb.params)), loaded=r1 - r0,
                      ran=peak[0] - r2, bound=bound)))
"""


def test_model_terms_against_a_measured_tiny_run():
    m = _child(MEASURE)
    est = m["est"]
    assert est["weights"] == est["load"] == m["nbytes"] > 80 << 20
    assert est["forward_source"] == "xla" and est["forward_xla"] > 40 << 20
    assert est["forward"] == int(est["forward_xla"] * memory.CPU_FORWARD_FACTOR)
    assert 0.75 <= m["loaded"] / (est["weights"] + est["load"]) <= 1.25, m
    assert 0.8 <= m["ran"] / est["forward_xla"] <= 1.6 and m["ran"] <= est["forward"], m
    assert m["bound"] >= m["ran"], m
    assert est["peak"] == est["load"] + est["weights"] + max(est["forward"], est["features_memory"] + est["graph"]
                                                             + max(est["operator"], est["solver"]))


def test_run_whose_forward_does_not_fit_is_refused_up_front(tmp_path):
    kw = dict(size=224, k_intra=3, k_inter=3, num_eigs=3)
    small, big = (memory.estimate_model("dinov2_vits14", 8, batch_size=b, **kw) for b in (1, 8))
    assert big["forward"] > max(big["weights"], big["features_memory"] + big["graph"] + big["operator"])
    limit = (small["peak"] + big["peak"]) // 2                      # batch 1 fits, batch 8 does not
    imgs = make_folder(str(tmp_path / "imgs"), 8)
    r = subprocess.run([SCRIPT, "dataset", imgs, "--model", "dinov2_vits14", "--weights", "random", "--size", "224",
                        "--method", "exact", "--batch-size", "8", "--num-eigs", "3", "--k-intra", "3", "--k-inter",
                        "3", "--out", str(tmp_path / "out")], env=_env(SPECTRAL_JAX_MAX_MEMORY=str(limit)),
                       capture_output=True, text=True, timeout=600)
    _one_line_exit_2(r, f"the run: needs about {memory.human(big['peak'])} of memory (largest: the forward's "
                        f"activations {memory.human(big['forward'])}",
                     f"but {memory.human(limit)} is available (SPECTRAL_JAX_MAX_MEMORY)",
                     "use a smaller --batch-size", "set SPECTRAL_JAX_MAX_MEMORY if more memory is available")
    assert sorted(os.listdir(tmp_path)) == ["imgs"] and len(_tree(imgs)) == 8       # OUT never made


ABSTRACT = r"""
import json, resource, time
import jax
import numpy as np
from spectral_jax.dataset import memory
from spectral_jax.models import convert


def hwm():
    # this process's peak RSS: VmHWM (per address space, so it starts afresh at exec), not ru_maxrss, which Linux
    # carries across execve from the parent (a pytest worker holding gigabytes)
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


t = time.process_time()
bb = memory.abstract_backbone("sd15")
leaves = jax.tree.leaves(bb.params)
print(json.dumps(dict(
    weights=memory.weights_bytes(bb.params), cpu=time.process_time() - t,
    rss=hwm(),
    abstract=sum(isinstance(x, jax.ShapeDtypeStruct) for x in leaves), leaves=len(leaves),
    timesteps=[int(t) for t in bb.params["timesteps"]], bb_timesteps=list(bb.timesteps),
    restored=bool(np.any(convert.random_leaves({"w": jax.ShapeDtypeStruct((4,), np.float32)})["w"] != 0)))))
"""


def test_estimate_model_builds_the_model_abstractly():
    m = _child(ABSTRACT)
    assert m["weights"] > 3 << 30 and m["rss"] < 1.5 * (1 << 30), m           # 3.3 GiB of shapes, nothing drawn
    assert m["abstract"] == m["leaves"] - 1 and m["timesteps"] == m["bb_timesteps"] and len(m["timesteps"]) == 4
    assert m["restored"] and m["cpu"] < 120, m


SHARDED = r"""
import json
import numpy as np
import jax
from spectral_jax import graphs
from spectral_jax.dataset import memory
from spectral_jax.dataset.layout import make_mesh
from spectral_jax.solvers import distributed as D

n, grid, L, k, K = 8, (4, 4), 3, (5, 5), 4
N = n * grid[0] * grid[1]
rng = np.random.default_rng(0)
idx = rng.integers(0, N, (L, N, sum(k))).astype(np.int32)
w = rng.random((L, N, sum(k))).astype(np.float32)
g = graphs.KnnGraph(idx, w, w.sum(-1), grid, (L,), n)
mesh = make_mesh(jax.devices()[:2])
sg = D.shard_graph(g, mesh)
op = D.operator([sg])
dev0 = jax.devices()[0]
held = lambda *xs: sum(int(s.data.nbytes) for x in xs for s in x.addressable_shards if s.device == dev0)
est = {p: memory.estimate([(grid, L, 24)], n, k=k, num_eigs=K, processes=p, solver_path=path)
       for p, path in ((1, "gathered"), (2, "sharded"))}
print(json.dumps(dict(est=est, graph=held(sg.idx, sg.w, sg.deg), operator=held(op.cols, op.coef),
                      whole=int(idx.nbytes + w.nbytes + w.sum(-1).nbytes))))
"""


def test_sharded_estimate_is_per_process():
    m = _child(SHARDED, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=2"))
    one, two = m["est"]["1"], m["est"]["2"]
    assert two["solver_path"] == "sharded" and two["processes"] == 2
    assert two["graph"] == m["graph"] == m["whole"] // 2 and one["graph"] == 2 * m["whole"]    # host + device copy
    assert two["operator"] == m["operator"]
    assert two["peak"] < one["peak"]


@pytest.mark.slow  # two processes (~30 s); the per-process figure is test_sharded_estimate_is_per_process
def test_two_process_sharded_run_records_its_per_process_estimate(tmp_path):
    """Two processes on the sharded path (`exact_solver="sharded"`): each process's estimate (summary.json's
    "memory") is its own rows' — a quarter of the one-process gathered run's graph term (half the rows, and no host
    copy) — and the run is not refused under a limit below that one-process gathered peak."""
    from spectral_jax import dataset
    from test_dataset import run_two_processes, synthetic
    from test_dataset_exact import EXACT

    folder = make_folder(str(tmp_path / "imgs"), 12)
    one = dataset.run(folder, str(tmp_path / "one"), backbone=synthetic(), **EXACT).summary()["memory"]
    assert one["solver_path"] == "gathered" and one["processes"] == 1
    # the limit: below the gathered peak less its one-process feature tiles, above the sharded figure (checked below)
    limit = one["peak"] - one["features_memory"] - 1
    out = str(tmp_path / "multi")
    run_two_processes(folder, out, "**EXACT, exact_solver='sharded'", head=(
        "from test_dataset_exact import EXACT\nimport os\n"
        f"os.environ['SPECTRAL_JAX_MAX_MEMORY'] = '{limit}'\n"))
    two = json.load(open(os.path.join(out, "summary.json")))["memory"]
    assert two["solver_path"] == "sharded" and two["processes"] == 2 and two["available"] == limit
    assert two["graph"] * 4 == one["graph"] and two["peak"] <= limit < one["peak"]


def test_abstract_weights_is_context_local():
    """`convert.abstract_weights` (what `abstract_backbone` runs the loader in) gives zeros only in its own context:
    a thread drawing random weights meanwhile gets the seeded draw, and so does the caller afterwards."""
    import threading

    import jax
    import numpy as np

    from spectral_jax.models import convert

    leaf = {"block.kernel": jax.ShapeDtypeStruct((3, 4), np.float32)}
    seen, gate = {}, threading.Barrier(2)

    def other():
        gate.wait()
        seen["other"] = convert.random_leaves(leaf, 0)["block.kernel"]

    t = threading.Thread(target=other)
    with convert.abstract_weights():
        t.start()
        gate.wait()
        t.join()
        inside = np.asarray(convert.random_leaves(leaf, 0)["block.kernel"])
    after = convert.random_leaves(leaf, 0)["block.kernel"]
    assert not inside.any() and seen["other"].any()
    np.testing.assert_array_equal(seen["other"], after)


def test_sharded_estimate_takes_the_runs_block():
    """The sharded search's cosine block is the run's --block rows by its key tile: a smaller block, a smaller
    features term (the default is 512, Settings.block's)."""
    groups, kw = [((16, 16), 12, 768)], dict(k=(50, 50), processes=2, solver_path="sharded")
    small, default = (memory.estimate(groups, 5000, block=b, **kw)["features_memory"] for b in (64, 512))
    assert small < default == memory.estimate(groups, 5000, **kw)["features_memory"]
    assert dataset.Settings().block == 512


def test_approximate_estimate_counts_faiss_probes_at_the_widest_try(monkeypatch):
    """An approximate search: one graph's features (as stored, as unit float32 rows, the index's copy); with faiss
    also every row's probed lists (int32, 4 bytes each) at the widest try before the exact search — 10⁶ nodes, 4096
    lists: tries of 24, 48 and 96 lists (192 would probe over 1/32 of the columns); with two processes (the
    gathered path) also its own rows and all images' features of the graphs it searches (`whole.owned_peak`)."""
    from spectral_jax import knn_search

    groups, n, per, width = [((32, 32), 3, 384)], 1000, 1024, 384
    nodes = n * per
    est = {s: memory.estimate(groups, n, graph="knn-vv", k=(10, 10), search=s)["features_memory"]
           for s in ("ivf", "faiss")}
    assert est["ivf"] == nodes * width * (4 + 4 * 2)
    first = knn_search.auto_search(nodes, kind="faiss")
    assert (first.nlist, first.nprobe, knn_search.last_try(nodes, 10, first).nprobe) == (4096, 24, 96)
    assert est["faiss"] == est["ivf"] + nodes * 96 * 4
    # two processes on the gathered path: + its own rows and its share of the group's graphs of all images,
    # gathered — 2 of the 3 layers' at once (process 0: graph 0, then 1 in flight, then 0 and 2; process 1: 0 in
    # flight, 1, then 1 and 2 in flight); three processes: its own and one in flight; one graph: that one
    two = memory.estimate(groups, n, graph="knn-vv", k=(10, 10), search="ivf", processes=2)["features_memory"]
    feats = 3 * nodes * width * 4
    assert two == est["ivf"] + feats // 2 + 2 * feats // 3
    assert [whole.owned_peak(g, p) for g, p in ((3, 2), (3, 3), (1, 2), (4, 2), (5, 2), (8, 4), (0, 2))] == \
        [2, 2, 1, 3, 3, 3, 0]
    for has_faiss in (True, False):
        monkeypatch.setattr(knn_search, "faiss_available", lambda: has_faiss)
        auto = memory.estimate(groups, n, graph="knn-vv", k=(10, 10), search="auto")["features_memory"]
        assert auto == est["faiss" if has_faiss else "ivf"]
