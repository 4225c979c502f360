"""Past one process: the row-sharded kNN operator and the distributed LOBPCG (`spectral_jax.solvers.distributed`)
on a synthetic N = 10⁶ kNN graph in P = 1, 2, 4 local processes (jax.distributed on localhost, one CPU device
each, gloo collectives).

    python benchmarks/bench_scale.py            # N = 10⁶: memory and products for P = 1, 2, 4, the solve for
                                                # P = 1 (--solve-procs); N = 10⁵ solves for P = 1, 2, 4; weak
                                                # scaling at N/P = 25 000
    python benchmarks/bench_scale.py --tiny     # N = 4096: a smoke test (tests/test_distributed.py)
    python benchmarks/bench_scale.py --search-memory    # the sharded kNN search's memory per process in P = 2
                                                # processes: features read into memory against tiles read from a
                                                # synthetic on-disk store (`whole.search_sharded`)

Graph (`synthetic_rows`): one layer, k slots per node; node i is in cluster i mod C; a slot points inside the
node's cluster with probability 0.95 → 0.5 (by cluster, so the top-C eigenvalues are distinct), else anywhere;
weights uniform in [0.1, 1]. Rows are drawn in fixed blocks from (seed, block), so every P builds the same graph,
each process only its own rows (never the whole graph: `distributed.from_rows`).

Per process: the bytes of graph (idx, w, deg) and operator (outgoing cols, coef; incoming tsrc, tdst, tval) it
holds; the compiled product's temporary memory per device (XLA's memory analysis: the all-gathered X plus the
per-row-block work); its resident set after JAX started (baseline), after graph + operator were built (growth
over the baseline), and its peak (VmHWM) over the solve; seconds to build the operator; seconds per product A X (X `[N, 2·(K + guard)]`, what one LOBPCG iteration applies) and per solve; the
iterations; the eigenvalues. Process 0's eigenvectors are gathered to compare the subspaces with P = 1 (mean
principal-angle cosine). Results → benchmarks/results/scale.md (+ scale.json), with a projection for COCO val2017
on 8 GPUs and ImageNet val on 4 hosts × 8 GPUs (assumptions stated there). A run rewrites the sections (and JSON
keys) it measures and keeps the others (`write_kept`), so the two modes, and any section added by hand, share the
file.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
BLOCK = 4096          # rows per random block (`synthetic_rows`): the graph does not depend on P


def synthetic_rows(n: int, k: int, first: int, count: int, seed: int = 0, clusters: int = 8):
    """Rows [first, first + count) of the synthetic graph: idx `[count, k]` int32, w `[count, k]` float32 (the
    same rows for any split: each block of `BLOCK` rows is drawn from (seed, block))."""
    share = np.linspace(0.95, 0.5, clusters)
    idx, w = [], []
    for b in range(first // BLOCK, -(-(first + count) // BLOCK)):
        rng = np.random.default_rng([seed, b])
        rows = np.arange(b * BLOCK, min((b + 1) * BLOCK, n))
        lab = rows % clusters
        inside = rng.random((len(rows), k)) < share[lab][:, None]
        same = lab[:, None] + clusters * rng.integers(0, -(-n // clusters), (len(rows), k))
        same = np.where(same < n, same, lab[:, None])
        keep = (rows >= first) & (rows < first + count)
        idx.append(np.where(inside, same, rng.integers(0, n, (len(rows), k))).astype(np.int32)[keep])
        w.append(rng.uniform(0.1, 1.0, (len(rows), k)).astype(np.float32)[keep])
    return np.concatenate(idx), np.concatenate(w)


def _rss_mib(field: str = "VmRSS") -> float:
    return C._status_kib(field) / 1024.0


def _start(args: dict) -> None:
    """A worker's start: jax.distributed over local processes (args: procs, pid, port) when there are several,
    float32 matmuls, the backend up."""
    import jax

    if args["procs"] > 1:
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args['port']}", num_processes=args["procs"],
                                   process_id=args["pid"])
    jax.config.update("jax_default_matmul_precision", "float32")
    jax.numpy.zeros(1).block_until_ready()


def worker(args: dict) -> dict:
    """One process of a run (args: n, k, num_eigs, procs, pid, port, maxiter, tol, out)."""
    _start(args)
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from spectral_jax.solvers import distributed as dist

    base = _rss_mib()
    n, k, procs, pid = args["n"], args["k"], args["procs"], args["pid"]
    mesh = jax.make_mesh((procs,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    per = n // procs
    t0 = time.perf_counter()
    idx, w = synthetic_rows(n, k, pid * per, per, args["seed"])
    rows = NamedSharding(mesh, P(None, "data"))
    idx = jax.make_array_from_process_local_data(rows, idx[None], (1, n, k))
    w = jax.make_array_from_process_local_data(rows, w[None], (1, n, k))
    g = dist.from_rows(idx, w, (1, n), 1, mesh)
    op = jax.block_until_ready(dist.operator([g]))
    del idx, w
    build_s = time.perf_counter() - t0
    built = _rss_mib()
    kb = args["num_eigs"] + dist.GUARD
    x = dist._start(op, 2 * kb, 1)
    temp = dist._matvec.lower(op, x).compile().memory_analysis().temp_size_in_bytes
    t = C.time_fn(lambda: op.matvec(x).block_until_ready(), repeats=3, warmup=1)
    del x
    rec = {"n": n, "k": k, "procs": procs, "pid": pid, "graph_bytes": g.nbytes_per_device,
           "operator_bytes": op.nbytes_per_device, "rss_base_mib": base, "rss_built_mib": built,
           "build_s": build_s, "matvec_s": t["median_s"], "matvec_cols": 2 * kb, "matvec_temp_bytes": int(temp),
           "gathered_x_bytes": op.rows * 2 * kb * 4, "solved": bool(args["solve"])}
    if not args["solve"]:
        return rec
    import warnings

    with warnings.catch_warnings():                     # compile every program of the solve (one iteration)
        warnings.simplefilter("ignore", RuntimeWarning)
        dist.lobpcg(op, args["num_eigs"], tol=1e-30, maxiter=1, seed=0)
    C.reset_peak_rss()
    sol = dist.lobpcg(op, args["num_eigs"], tol=args["tol"], maxiter=args["maxiter"], seed=0)
    peak = _rss_mib("VmHWM")
    vecs = dist.gather_rows(sol.eigvecs, n)
    if pid == 0:
        np.save(args["out"], vecs)
    c = sol.convergence
    return dict(rec, rss_peak_solve_mib=peak, solve_s=sol.seconds, iterations=c.iterations, converged=c.converged,
                max_residual=c.max_residual, eigvals=sorted(map(float, sol.eigvals), reverse=True))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(procs: int, child: dict, timeout: float) -> tuple[list[dict], float]:
    """`procs` processes of this script (`--child`, each its own pid and a shared port added to `child`), run to the
    end → (their last stdout lines as JSON, wall seconds)."""
    port = _free_port()
    env = dict(os.environ, **C.CHILD_ENV, JAX_PLATFORMS="cpu", OPENBLAS_NUM_THREADS="1")
    env.pop("XLA_FLAGS", None)
    ps = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child",
                            json.dumps(dict(child, procs=procs, pid=pid, port=port))], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for pid in range(procs)]
    t0 = time.perf_counter()
    try:
        outs = [p.communicate(timeout=timeout) for p in ps]
    finally:
        for p in ps:
            if p.poll() is None:
                p.kill()
                p.wait()
    wall = time.perf_counter() - t0
    if any(p.returncode for p in ps):
        raise RuntimeError("\n".join(e[-2000:] for _, e in outs))
    return [json.loads(o.strip().splitlines()[-1]) for o, _ in outs], wall


def run_point(n: int, k: int, procs: int, num_eigs: int, maxiter: int, tol: float, tmp: str, solve: bool,
              seed: int = 0, timeout: float = 1500) -> dict:
    """One run of `procs` processes; their records and the path of process 0's eigenvectors."""
    out = os.path.join(tmp, f"vecs_{n}_{procs}.npy")
    recs, wall = _launch(procs, dict(n=n, k=k, num_eigs=num_eigs, maxiter=maxiter, tol=tol, out=out, seed=seed,
                                     solve=solve), timeout)
    return {"n": n, "k": k, "procs": procs, "wall_s": wall, "records": recs, "vecs": out if solve else None}


# --------------------------------------------------------------------------------------------------- the search

SEARCH = dict(images=128, grid=(14, 14), width=2048, layers=2, k_intra=10, k_inter=10, row_mib=16, col_mib=16,
              shard_images=16)


def write_store(ck: str, procs: int, s: dict, seed: int = 0) -> None:
    """A synthetic feature store (`dataset.store` shards of `shard_images` images, a0 `[L, m·h·w, F]` float32:
    8 planted classes of images plus noise), process p's images [p·n/P, (p+1)·n/P) written as its shards."""
    from spectral_jax.dataset import store

    per, share = s["grid"][0] * s["grid"][1], s["images"] // procs
    centers = np.random.default_rng(seed).normal(size=(8, s["layers"], s["width"])).astype(np.float32)
    for p in range(procs):
        for first in range(p * share, (p + 1) * share, s["shard_images"]):
            m = min(s["shard_images"], (p + 1) * share - first)
            rng = np.random.default_rng([seed, first])
            x = centers[np.repeat(np.arange(first, first + m) % 8, per)].transpose(1, 0, 2)
            x = x + rng.normal(size=x.shape).astype(np.float32)
            store.write_shard(ck, {"bench": "scale"}, first, np.ones(m, bool), {}, {"a0": x}, p)


def _anon_peak():
    """A thread sampling RssAnon (anonymous resident memory: not the store's memory-mapped pages, which the kernel
    may drop) every 5 ms → (stop() → peak MiB)."""
    import threading

    peak, done = [0], threading.Event()

    def loop():
        while not done.is_set():
            peak[0] = max(peak[0], C._status_kib("RssAnon") or 0)
            time.sleep(0.005)

    th = threading.Thread(target=loop, daemon=True)
    th.start()

    def stop():
        done.set()
        th.join()
        return max(peak[0], C._status_kib("RssAnon") or 0) / 1024.0

    return stop


def search_worker(args: dict) -> dict:
    """One process of the sharded search from a store (args: ck, procs, pid, port, mode "tiled" | "in-memory",
    the `SEARCH` sizes, out): the graph rows of its images, its peak memory over the search."""
    _start(args)
    import jax
    from jax.sharding import PartitionSpec as P

    from spectral_jax.dataset import Settings, store, whole
    from spectral_jax.dataset.layout import Geometry, global_array
    from spectral_jax.solvers import distributed as dist

    procs, pid, s = args["procs"], args["pid"], args["search"]
    grid, n = tuple(s["grid"]), s["images"]
    per, share = grid[0] * grid[1], n // procs
    mesh = jax.make_mesh((procs,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    shards = []
    for name in store.finished(args["ck"]):                       # this process's shards, memory-mapped, unread
        lo, hi = store.span(name)
        if pid * share <= lo < (pid + 1) * share:
            path = os.path.join(store.folder(args["ck"]), name)
            shards.append(store.Shard(path, lo, hi - lo, np.ones(hi - lo, bool), {},
                                      {"a0": np.load(os.path.join(path, "a0.npy"), mmap_mode="r")}))
    st = whole.Streamed(store.FeatureStore(shards, pid * share, share, {"a0": per}), np.ones(n, bool), {}, 0)
    settings = Settings(graph="knn-vv", method="exact")
    geom = Geometry(((grid, tuple(range(s["layers"]))),), grid, (14 * grid[0], 14 * grid[1]), n, 64, procs,
                    s["k_intra"], s["k_inter"])
    import gc

    gc.collect()
    base, base_anon = _rss_mib(), C._status_kib("RssAnon") / 1024.0
    C.reset_peak_rss()
    stop = _anon_peak()
    t0 = time.perf_counter()
    if args["mode"] == "tiled":
        g = whole.search_sharded(st, settings, geom, mesh, s["row_mib"] << 20, s["col_mib"] << 20)[0]
    else:                       # the search before: this process's rows in memory, then `knn_sharded` on them
        a = whole.local_features(st, settings, geom).a[0]
        a = global_array(mesh, P(None, "data"), a, (a.shape[0], a.shape[1] * procs, a.shape[2]))
        k_intra, k_inter = whole.G.clamp_k(s["k_intra"], s["k_inter"], grid, n)
        g = dist.knn_sharded(a, a, grid, n, k_intra, k_inter, settings.min_cos, settings.block, mesh=mesh)
    jax.block_until_ready(g.deg)
    seconds = time.perf_counter() - t0
    anon = stop()
    peak = _rss_mib("VmHWM")
    np.savez(args["out"] + f"-{pid}.npz", idx=whole._local_rows(g.idx), w=whole._local_rows(g.w))
    return {"procs": procs, "pid": pid, "mode": args["mode"], "rss_base_mib": base, "rss_peak_mib": peak,
            "anon_base_mib": base_anon, "anon_peak_mib": anon, "search_s": seconds,
            "features_mib": s["layers"] * share * per * s["width"] * 4 / C.MIB,
            "graph_rows_mib": g.nbytes_per_device / C.MIB}


def search_memory(args, tmp: str) -> dict:
    """Both searches (in memory, tiled) in `args.search_procs` processes on one synthetic store; their records and
    whether their graphs agree (same neighbours, weights within float32 rounding)."""
    s0 = dict(SEARCH, width=args.search_width, layers=args.search_layers)
    out = {"sizes": dict(s0, images=list(args.search_images)), "runs": []}
    for procs, images in [(p, i) for i in args.search_images for p in args.search_procs]:
        s = dict(s0, images=images)
        ck = os.path.join(tmp, f"store-{procs}-{images}")
        write_store(ck, procs, s)
        got = {}
        for mode in ("in-memory", "tiled"):
            load = _load()
            recs, wall = _launch(procs, {"ck": ck, "mode": mode, "search": s, "out": os.path.join(tmp, mode),
                                         "search_child": True}, 1500)
            rows = [np.load(os.path.join(tmp, f"{mode}-{p}.npz")) for p in range(procs)]
            got[mode] = {x: np.concatenate([r[x] for r in rows], axis=1) for x in ("idx", "w")}
            out["runs"].append({"procs": procs, "images": images, "mode": mode, "records": recs, "wall_s": wall,
                                "load_start": load, "load_end": _load()})
            print(f"search N={images * s['grid'][0] * s['grid'][1]} P={procs} {mode}: {wall:.0f} s, peak RSS "
                  f"{max(r['rss_peak_mib'] for r in recs):.0f} MiB", flush=True)
        a, b = got["in-memory"], got["tiled"]
        out["runs"][-1]["slots_exchanged"] = int(np.count_nonzero(a["idx"] != b["idx"]))
        out["runs"][-1]["slots"] = int(a["idx"].size)
        out["runs"][-1]["max_weight_diff"] = float(np.abs(a["w"] - b["w"]).max())
        import shutil

        shutil.rmtree(ck)
    return out


def search_md(res: dict) -> str:
    """The scale.md section of `search_memory`'s measurements."""
    s = res["sizes"]
    per = s["grid"][0] * s["grid"][1]
    rows = []
    for r in res["runs"]:
        recs = r["records"]
        rows.append([f"{r['images'] * per:,}", r["procs"], r["mode"], f"{recs[0]['features_mib']:.0f}",
                     f"{recs[0]['graph_rows_mib']:.1f}",
                     f"{max(x['rss_peak_mib'] for x in recs):.0f}",
                     f"{max(x['rss_peak_mib'] - x['rss_base_mib'] for x in recs):.0f}",
                     f"{max(x['anon_peak_mib'] - x['anon_base_mib'] for x in recs):.0f}",
                     f"{max(x['search_s'] for x in recs):.1f}", f"{r['load_start']} → {r['load_end']}",
                     "" if "slots" not in r else
                     f"{r['slots_exchanged']:,} of {r['slots']:,} slots with another neighbour; every slot's weight "
                     f"within {r['max_weight_diff']:.1e}"])
    growth = {}
    for r in res["runs"]:
        growth.setdefault(r["mode"], []).append((r["images"] * per, max(x["anon_peak_mib"] - x["anon_base_mib"]
                                                                        for x in r["records"])))
    reading = "; ".join(f"{mode}: " + ", ".join(f"{g:.0f} MiB at N = {nn:,}" for nn, g in pts)
                        for mode, pts in growth.items())
    return "\n".join([
        "## The sharded search's memory per process (features read in tiles from the store)", "",
        f"`python benchmarks/bench_scale.py --search-memory --search-images "
        f"{' '.join(map(str, s['images']))}` — a synthetic store (`write_store`: "
        f"{' and '.join(map(str, s['images']))} images of {s['grid'][0]}×{s['grid'][1]} = {per} tokens, "
        f"F = {s['width']}, "
        f"L = {s['layers']} layers, float32, knn-vv, k = {s['k_intra']} + {s['k_inter']}; shards of "
        f"{s['shard_images']} images), searched by P local processes (jax.distributed, one CPU device each, gloo) "
        "on the sharded path: \"in-memory\" is the search before this change (each process's N/P·F·L rows read into "
        "memory, `whole.local_features`, then `distributed.knn_sharded`'s ring of whole key blocks); \"tiled\" is "
        f"`whole.search_sharded` (`distributed.knn_tiled`: query tiles of ≤ {s['row_mib']} MiB and key tiles of "
        f"≤ {s['col_mib']} MiB read memory-mapped from the process's shards, the key tiles passed round the mesh). "
        "Per process (the larger of the P): peak RSS = VmHWM over the search (reset before it; it includes the "
        "store's memory-mapped pages the search touched, which the kernel can drop); growth = that minus the RSS "
        "before the search; anon growth = the peak of RssAnon (sampled every 5 ms: the process's own memory, not "
        "the mapped store) minus RssAnon before the search. Load average (1/5/15 min) at the start → end of each "
        "run in the table. The graphs: the tiled search computes a cosine in a key tile of another width, which "
        "XLA's CPU matmul may round differently by a float32 ulp or so, so neighbours whose cosines tie within that "
        "rounding can be exchanged — a slot whose neighbour differs then has the same weight (the cosine) within "
        "that rounding; otherwise the neighbours are the same (tests/test_distributed.py).", "",
        C.table(["N", "P", "search", "features MiB/proc (N/P·F·L·4)", "graph rows MiB/proc",
                 "peak RSS MiB (max proc)",
                 "RSS growth MiB", "anon growth MiB", "search s", "load", "graph vs in-memory"], rows), "",
        f"Reading: the process's own memory over the search (anon growth) — {reading}. The in-memory search holds "
        "its N/P·F·L rows and the search's copies of them (unit-normalised rows and key block, the block in "
        "flight), so it grows with N/P; the tiled one holds its tiles, the running top-k and the graph rows, so "
        "it does not (XLA's figure for a key-tile step is the same at 4× the nodes: tests/test_distributed.py). "
        "Its RSS growth still grows by about the store pages it touched (memory-mapped, reclaimable). Time: the "
        "tiled search reads each key tile once per query tile and runs more, smaller matmuls; on this loaded "
        "2-core machine it took longer (the search s column).", "",
    ])


def alignment(u: np.ndarray, v: np.ndarray) -> float:
    """Mean cosine of the principal angles between span(u) and span(v) `[N, K]`."""
    qu, _ = np.linalg.qr(np.asarray(u, np.float64))
    qv, _ = np.linalg.qr(np.asarray(v, np.float64))
    return float(np.linalg.svd(qu.T @ qv, compute_uv=False).mean())


# --------------------------------------------------------------------------------------------------- projection

ASSUME = dict(
    bytes_per_edge_col=16.0,   # device memory traffic per stored edge and vector column of a product: two gathers
                               # (4 B each: the outgoing slot and the incoming edge) + the segment-sum's read and
                               # write of the local rows (8 B), coef/indices amortised over K
    hbm_eff=1.5e12,            # B/s: ~45 % of an H100's 3.35 TB/s for random 4-B gathers of whole rows
    nvlink=300e9,              # B/s per GPU for all-gather / reduce-scatter inside a host (NVLink/NVSwitch, bus bw)
    ib=50e9,                   # B/s per GPU between hosts (one 400 Gb/s NIC per GPU)
    iterations=100,            # LOBPCG iterations assumed for a real dataset graph (see the text)
    num_eigs=20, guard=4, layers=12, k=100,
)


def project(n: float, devices: int, per_host: int, a: dict = ASSUME) -> dict:
    """Memory per device and time per product / per solve of the distributed solve on `devices` GPUs."""
    kb = a["num_eigs"] + a["guard"]
    cols = 2 * kb
    edges = n * a["layers"] * a["k"]
    graph = edges * 8 + n * a["layers"] * 4                  # idx + w, deg
    oper = edges * (8 + 12)                                  # outgoing cols + coef, incoming tsrc + tdst + tval
    transient = n * cols * 4 + 2 * (n / devices) * cols * 4  # the all-gathered X + the local Y and one row block
    state = 12 * (n / devices) * kb * 4                      # LOBPCG's x, ax, p, q, aq, s, as (≈ 12 Kb-wide blocks)
    compute = edges / devices * cols * a["bytes_per_edge_col"] / a["hbm_eff"]
    comm_bytes = n * cols * 4 * (devices - 1) / devices      # all_gather of X, per device
    remote = 0.0 if devices <= per_host else (devices - per_host) / devices
    comm = comm_bytes * (1 - remote) / a["nvlink"] + comm_bytes * remote / a["ib"]
    mv = compute + comm
    return {"n": n, "devices": devices, "graph_gb": graph / devices / 1e9, "operator_gb": oper / devices / 1e9,
            "transient_gb": transient / 1e9, "state_gb": state / 1e9,
            "total_gb": (graph / devices + oper / devices + transient + state) / 1e9,
            "matvec_compute_ms": compute * 1e3, "matvec_comm_ms": comm * 1e3, "matvec_ms": mv * 1e3,
            "solve_s": a["iterations"] * mv + 2 * mv}


# --------------------------------------------------------------------------------------------------- report

NOTE = ("- s / product on this CPU: both halves read rows of the all-gathered X: C X at the outgoing slots' "
        "columns (random rows), Cᵀ X at the incoming edges' sources (in source order) followed by a segment-sum into "
        "the local rows. XLA's CPU gather of random rows of a 96 MB X (N = 10⁶, 24 columns) leaves the cache, and "
        "it, more than the scatter-add, is what a product costs here (measured separately at N = 10⁶, P = 1, load "
        "≈ 11-14: the outgoing gather alone 6.7 s, the replaced global scatter-add alone 3.3 s). Against the "
        "replaced product (gathers + scatter-add into [N, K] + psum_scatter), P = 1, the two alternated on this "
        "machine (medians, load ≈ 9-13): 0.16 s against 0.28 s at N = 10⁵, 9.1 s against 8.7 s at N = 10⁶; with the "
        "incoming edges sorted by destination instead (random gathers on both halves) 18.5 s against 12.5 s, hence "
        "source order. What the incoming edges buy is memory and traffic with P: no second [N, K] buffer per device "
        "and no reduce-scatter (half the bytes each device moves per product); they cost 12 B per edge of stored "
        "operator (falling as 1/P) and a build of two sorts and one all-to-all.")


def _load() -> str:
    return "(" + ", ".join(f"{x:.2f}" for x in os.getloadavg()) + ")"


def report(runs: list[dict], weak: list[dict], info: dict, args, calib: dict) -> str:
    solved = [r for r in runs + weak if r["vecs"] is not None]
    ref = {r["n"]: np.load(r["vecs"]) for r in solved if r["procs"] == 1}
    ref_vals = {r["n"]: np.asarray(r["records"][0]["eigvals"]) for r in solved if r["procs"] == 1}
    rows = []
    for r in runs + weak:
        recs = r["records"]
        mib = lambda x: x / C.MIB
        row = [f"{r['n']:,}", r["procs"], f"{mib(recs[0]['graph_bytes']):.1f}",
               f"{mib(recs[0]['operator_bytes']):.1f}",
               f"{mib(max(x['matvec_temp_bytes'] for x in recs)):.1f} ({mib(recs[0]['gathered_x_bytes']):.1f})",
               f"{max(x['rss_built_mib'] - x['rss_base_mib'] for x in recs):.0f}",
               f"{max(x['build_s'] for x in recs):.0f}", f"{max(x['matvec_s'] for x in recs):.3f}"]
        if r["vecs"] is None:
            rows.append(row + [None] * 7)
            continue
        a = alignment(np.load(r["vecs"]), ref[r["n"]]) if r["n"] in ref else None
        dv = (float(np.abs(np.asarray(recs[0]["eigvals"]) - ref_vals[r["n"]]).max() / ref_vals[r["n"]][0])
              if r["n"] in ref else None)
        rows.append(row + [f"{max(x['rss_peak_solve_mib'] for x in recs):.0f}",
                           f"{max(x['solve_s'] for x in recs):.1f}", recs[0]["iterations"],
                           "yes" if all(x["converged"] for x in recs) else "no", f"{recs[0]['max_residual']:.1e}",
                           None if a is None else f"{a:.7f}", None if dv is None else f"{dv:.1e}"])
    heads = ["N", "P", "graph MiB/proc", "operator MiB/proc", "product temp MiB/proc (gathered X)",
             "RSS growth graph+op MiB (max proc)", "build s", "s / product", "peak RSS solve MiB (max proc)", "solve s", "iterations", "converged", "max residual",
             "subspace vs P=1", "max |Δλ|/λ₁ vs P=1"]
    coco = project(1.28e6, 8, 8)
    inet = project(12.8e6, 32, 8)
    prow = lambda name, p: [name, p["devices"], f"{p['graph_gb']:.2f}", f"{p['operator_gb']:.2f}",
                            f"{p['transient_gb']:.2f}", f"{p['state_gb']:.2f}", f"{p['total_gb']:.2f}",
                            f"{p['matvec_compute_ms']:.0f}", f"{p['matvec_comm_ms']:.1f}", f"{p['matvec_ms']:.0f}",
                            f"{p['solve_s']:.0f}"]
    a = ASSUME
    lines = [
        "# Scale: the sharded kNN operator and the distributed LOBPCG", "",
        C.machine_md(info, "P processes share this machine's cores: P = 2, 4 are oversubscribed on 2 cores, so "
                     "their seconds measure the collectives' overhead, not a speed-up"), "",
        f"`python benchmarks/bench_scale.py{' --tiny' if args.tiny else ''}` — synthetic kNN graph (one layer, "
        f"k = {args.k}, 8 planted clusters of unequal strength; `synthetic_rows`), K = {args.num_eigs} "
        f"(+ {4} guard vectors), tol = {args.tol:.2e}, maxiter = {args.maxiter}, seed 0. Each process holds only "
        "its rows (`distributed.from_rows`) and their incoming edges (built once by an all-to-all); a product is "
        "one `shard_map` collective (all_gather X) over gloo on localhost, then gathers and a segment-sum over "
        f"the local rows. Load average (`uptime`, 1/5/15 min) at the start of this run: {args.load_start}, at its "
        f"end: {_load()}.", "",
        "## Strong scaling (fixed N) and weak scaling (fixed N/P)", "",
        (f"At N = {args.n:,} the solve runs for P = {', '.join(map(str, args.solve_procs))}; the other P's rows "
         "measure memory and products only (P processes share 2 cores, several minutes of oversubscribed gloo "
         "products). The solves' agreement with P = 1, iterations and weak scaling are also measured at "
         f"N = {args.solve_n:,} (weak: N/P = {args.solve_n // max(args.procs):,})." if args.n != args.solve_n else
         "Every row is solved."), "",
        C.table(heads, rows), "",
        "- graph/operator MiB/proc: the bytes of the arrays one process holds (graph: idx, w, deg: N·k·8/P + N·4/P; "
        "operator: outgoing cols, coef, N·k·8/P, and incoming tsrc, tdst, tval, 12 B per edge received, padded to "
        "the most any process receives) — they fall as 1/P.",
        "- product temp MiB/proc: XLA's memory analysis of the compiled product A X (X [N, 2·(K + guard)]), its "
        "temporary buffers on one device; in brackets the all-gathered X, N·2·(K + guard)·4 B, the one term that "
        "does not fall with P (a ring of X blocks would remove it: solvers/distributed.py). The rest is O(N/P·K): "
        "the local result and one block of gathered rows.",
        "- RSS growth: the resident set after graph + operator were built minus the one after JAX started "
        "(includes the build's transients still held by the allocator); peak RSS solve: VmHWM over the solve "
        "(reset before it), which adds the product's transients (the column above) and LOBPCG's blocks, plus "
        "JAX/XLA's own resident code.",
        "- build s: searching is not timed (the rows are synthetic); the seconds to place the rows, compute degrees "
        "and coefficients and exchange the incoming edges (two sorts of the local edges and one all-to-all).",
        "- solve s: the timed solve after a one-iteration warm-up solve that compiled its programs (the wall time "
        "per point printed while running includes JAX start, compilation and the gloo rendezvous).",
        "- s / product: one A X with X [N, 2·(K + guard)] (what an iteration applies), median of 3 after a warm-up."
        f" CPU throughput at P = 1: {calib['edge_cols_per_s']:.3g} edge·columns/s.",
        NOTE,
        "- subspace vs P = 1: mean cosine of the principal angles between this run's K eigenvectors (gathered "
        "from the shards) and the P = 1 run's at the same N.", "",
        "## Projection (not measured: no GPU on this machine)", "",
        "Assumptions: the dataset's default graph (12 layers, k = k_intra + k_inter = 100 slots per node), K = 20 "
        f"+ 4 guard, so a product moves X [N, 48]; stored per device: graph N·L·(8k + 4)/D B and operator "
        f"N·L·k·(8 + 12)/D B (outgoing and incoming edges); per product a device streams {a['bytes_per_edge_col']:.0f} B per stored edge and column at an "
        f"effective {a['hbm_eff'] / 1e12:.1f} TB/s (random row gathers on an H100-class HBM, ≈ 45 % of peak), and "
        f"receives N·48·4·(D−1)/D B (the all_gather of X) at {a['nvlink'] / 1e9:.0f} GB/s inside a host "
        f"(NVLink) and {a['ib'] / 1e9:.0f} GB/s per GPU between hosts (a 400 Gb/s NIC per GPU), for the share of "
        f"rows on other hosts; {a['iterations']} LOBPCG iterations (the N = 10⁶ synthetic needed the iterations "
        "measured above; a real dataset graph's top spectrum is more clustered — coco100's ARPACK needed 124 "
        "operator applications — so 100 block iterations is a conservative guess); solve = (iterations + 2) "
        "products (Rayleigh–Ritz on 3·(K + guard) columns is negligible). Features and the kNN search are not "
        "counted (issue #24 item 2).", "",
        C.table(["dataset", "GPUs", "graph GB/dev", "operator GB/dev", "product transient GB/dev",
                 "LOBPCG state GB/dev", "total GB/dev", "product compute ms", "product comm ms", "ms / product",
                 "solve s"],
                [prow("COCO val2017 (1.28 M tokens × 12 layers), 1 host × 8 GPUs", coco),
                 prow("ImageNet val (12.8 M tokens × 12 layers), 4 hosts × 8 GPUs", inet)]), "",
        f"The product's all-gathered X (N·48·4 B) is the one term that does not fall with D: "
        f"{1.28e6 * 48 * 4 / 1e9:.2f} GB at COCO's N, {12.8e6 * 48 * 4 / 1e9:.2f} GB at ImageNet's — below an "
        "80 GB GPU's memory at both; a ppermute ring over row blocks would bound it by N/D at the same traffic "
        "(not implemented: solvers/distributed.py).", "",
    ]
    return "\n".join(lines)


def merge_sections(old: str, new: str) -> str:
    """`new` Markdown laid over `old`: a "## " section of `new` replaces the section of the same heading in `old`
    (in old's place), sections only in `new` follow, sections only in `old` are kept where they were; the text
    before the first section is new's when it has any, else old's. So a run rewrites what it measured and keeps
    what other runs (or hands) wrote."""
    import re

    def split(text):
        parts = re.split(r"(?m)^(?=## )", text)
        return parts[0], {q.splitlines()[0].strip(): q for q in parts[1:]}

    old_pre, old_secs = split(old)
    new_pre, new_secs = split(new)
    secs = {h: new_secs.get(h, q) for h, q in old_secs.items()}
    secs.update({h: q for h, q in new_secs.items() if h not in secs})
    body = [q if q.endswith("\n") else q + "\n" for q in secs.values()]
    pre = new_pre if new_pre.strip() else old_pre
    return (pre if pre.endswith("\n") or not pre else pre + "\n") + "\n".join(q.rstrip("\n") + "\n" for q in body)


def write_kept(md_path: str, md: str, json_path: str, record: dict) -> None:
    """Write `md` over the file at md_path keeping the sections it does not hold (`merge_sections`), and `record`'s
    keys over the JSON at json_path keeping the others."""
    old = open(md_path).read() if os.path.isfile(md_path) else ""
    C.write(md_path, merge_sections(old, md))
    try:
        prev = json.load(open(json_path)) if os.path.isfile(json_path) else {}
    except ValueError:
        prev = {}
    C.write(json_path, json.dumps({**prev, **record}, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="N = 4096, P = 1, 2 (solved), weak at 2048: a smoke test")
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--num-eigs", type=int, default=8)
    p.add_argument("--solve-n", type=int, default=100_000, help="N of the solves (strong and weak scaling)")
    p.add_argument("--maxiter", type=int, default=60)
    p.add_argument("--tol", type=float, default=3.4527e-4)
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--solve-procs", type=int, nargs="*", default=[1], help="the P's that solve at N (the others "
                   "measure memory and products only)")
    p.add_argument("--search-memory", action="store_true", help="only the sharded search's memory per process: "
                   "features in memory against tiles read from a synthetic store (its own section of scale.md)")
    p.add_argument("--search-procs", type=int, nargs="+", default=[2])
    p.add_argument("--search-images", type=int, nargs="+", default=[SEARCH["images"]])
    p.add_argument("--search-width", type=int, default=SEARCH["width"])
    p.add_argument("--search-layers", type=int, default=SEARCH["layers"])
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child = json.loads(args.child)
        print(json.dumps(search_worker(child) if child.get("search_child") else worker(child)))
        return
    if args.tiny:
        args.n, args.solve_n, args.procs = 4096, 4096, [1, 2]
        args.search_images, args.search_width = [16], 64
    args.load_start = _load()
    name = "scale_tiny" if args.tiny else "scale"
    md, js = (os.path.join(args.out, f"{name}.{x}") for x in ("md", "json"))
    if args.search_memory:
        with tempfile.TemporaryDirectory() as tmp:
            res = search_memory(args, tmp)
        write_kept(md, search_md(res), js, {"search_memory": res})
        print(f"wrote {md} / .json")
        return
    runs, weak = [], []

    def point(n, procs, solve, into):
        into.append(run_point(n, args.k, procs, args.num_eigs, args.maxiter, args.tol, tmp, solve))
        print(f"N={n} P={procs} solve={solve}: {into[-1]['wall_s']:.0f} s", flush=True)
        r1 = runs[0]["records"][0]
        calib = {"edge_cols_per_s": runs[0]["n"] * args.k * r1["matvec_cols"] / r1["matvec_s"]}
        info = C.machine()
        strip = lambda rs: [{k: v for k, v in r.items() if k != "vecs"} for r in rs]
        write_kept(md, report(runs, weak, info, args, calib), js, {
            "machine": info, "args": {k: v for k, v in vars(args).items() if k != "child"}, "strong": strip(runs),
            "weak": strip(weak), "calibration": calib, "assumptions": ASSUME,
            "projection": {"coco_val2017_8gpu": project(1.28e6, 8, 8), "imagenet_val_4x8gpu": project(12.8e6, 32, 8)}})

    with tempfile.TemporaryDirectory() as tmp:
        for procs in args.procs:                        # memory and products at N (solves too where N = solve_n)
            point(args.n, procs, args.n == args.solve_n or procs in args.solve_procs, runs)
        if args.solve_n != args.n:
            for procs in args.procs:
                point(args.solve_n, procs, True, runs)
        per = args.solve_n // max(args.procs)
        for procs in args.procs:                        # fixed N/P (the largest P's point is the strong run's)
            if per * procs != args.solve_n:
                point(per * procs, procs, True, weak)
    print(f"wrote {os.path.join(args.out, name)}.md / .json")


if __name__ == "__main__":
    main()
