"""The options of every solve, in one place and without JAX: the constants, the graph and solver specs, the one
`num_eigs` rule and the one `LayerWeights` value.

    g = GraphSpec("vv", tau=0.05)                 # frozen, checked on construction: InputError (one line) if bad
    s = GdSpec(preset="paper", steps=500)         # or ExactSpec(tol=1e-5)
    sj.solve(taps, graph=g, solver=s, num_eigs=10)
    sj.solve(taps, "vv", 10, "gd", tau=0.05, preset="paper", steps=500)        # the same: flat keywords
    LayerWeights.parse("11:1,10:0.5").resolve([3, 10, 11])   # float64 [0, 1/3, 2/3] (a missing layer weighs 0)

Every entry point (`pipeline.solve`, `sweep`, `attribution`, `analyze`, `dataset.Settings` and the CLI) takes its
options as these objects or as today's flat keywords, which it turns into them once, where it enters
(`specs`); later layers take the objects as given. Importing this module imports no JAX (the CLI and
`dataset.Settings` refuse a bad option before JAX loads).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np

from spectral_jax.errors import InputError, is_integer

GRAPH_KINDS = ("qk", "vv", "knn-qk", "knn-vv")      # per-image attention / value graphs, and their kNN versions
DATASET_GRAPHS = ("knn-qk", "knn-vv")               # the graphs a dataset run can join over images
METHODS = ("exact", "gd")
PRESETS = ("eigen", "paper")                        # gd's kinds of table (`solvers.gd`)
PARAMS = ("table", "conv")                          # gd's parameterisations ("conv": paper preset only)
SPARSE_SOLVERS = ("auto", "arpack", "lobpcg")       # exact's solver of a large kNN problem (`solvers.exact`)
STORAGE_DTYPES = ("float32", "bfloat16")            # what graphs store q/k, unit v and kNN features in
RULES = ("uniform", "eigengap", "select", "geometric")  # the layer-weight rules (`spectral_jax.layer_weights`)
GRAPH_RULES = ("eigengap", "select")                # the rules that read each layer's graph (its own spectrum)
TOL = float(np.sqrt(np.finfo(np.float32).eps))      # exact's relative residual: what float32 reaches (3.45e-4)
DEFAULT_K = 50          # k_intra / k_inter when not given (then capped by the tokens available)
DEFAULT_NUM_EIGS = 20
MAXITER = 400           # exact: ARPACK restarts (CPU) / LOBPCG iterations (accelerators) at most
DENSE_MAX = 8192        # exact: base nodes up to which A is materialised (`solvers.exact.dense_fits`)


# ------------------------------------------------------------------------------------------------ scalar checks


def check_num_eigs(num_eigs, nodes: int | None = None, what: str = "num_eigs") -> int:
    """The one K rule: an integer with 2 ≤ K (the first eigenvector is the trivial one) and, where the graph is
    known, K < its `nodes`. Returns K as an int."""
    if not is_integer(num_eigs) or num_eigs < 2:
        raise InputError(f"{what} {num_eigs!r}", "must be an integer ≥ 2 (the first eigenvector is trivial)",
                         "pass e.g. 20")
    if nodes is not None and num_eigs >= nodes:
        raise InputError(f"{what} {num_eigs}", f"must be smaller than the {nodes} graph nodes",
                         f"pass {max(2, min(20, nodes - 1))} or fewer, or a larger size" if nodes > 2 else
                         "pass a larger size: the image gives too few patches")
    return int(num_eigs)


def check_seed(seed, what: str = "seed") -> int:
    """An integer in [0, 2³²) (numpy's generators refuse negative seeds)."""
    if not is_integer(seed) or not 0 <= seed < 2 ** 32:
        raise InputError(f"{what} {seed!r}", "must be an integer in [0, 2³²)", "pass e.g. 0")
    return int(seed)


TAU_MIN = float(1 / np.finfo(np.float32).max)   # below it 1/τ, the vv graph's logit scale, overflows float32


def tau_ok(v: float) -> bool:
    """Whether a vv/features temperature τ is usable: > 0 with 1/τ a finite float32 (τ ≥ `TAU_MIN` ≈ 2.9e-39)."""
    return v > 0 and 1.0 / v <= float(np.finfo(np.float32).max)


def _real(what: str, v, ok, rule: str, example, none: bool = False):
    """`v` as a float if it is a number (not a bool) for which ok(v) holds; None passes where `none`."""
    if v is None and none:
        return None
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(v)) or not ok(float(v)):
        raise InputError(f"{what} {v!r}", f"must be {rule}", f"pass e.g. {what}={example}")
    return float(v)


def _int(what: str, v, lo: int, example, none: bool = False):
    if v is None and none:
        return None
    if not is_integer(v) or v < lo:
        raise InputError(f"{what} {v!r}", f"must be an integer ≥ {lo}", f"pass e.g. {what}={example}")
    return int(v)


def _choice(what: str, v, choices: Sequence[str]) -> str:
    if not isinstance(v, str) or v not in choices:
        raise InputError(f"{what} {v!r}", f"unknown {what}", f"choose one of {', '.join(choices)}")
    return v


# ------------------------------------------------------------------------------------------------ specs


@dataclasses.dataclass(frozen=True)
class GraphSpec:
    """How the graphs are built from taps (`graphs.from_taps`): kind ("qk", "vv", "knn-qk", "knn-vv"), tau (the vv
    graph's temperature, > 0), k_intra / k_inter (kNN neighbours inside / outside a token's image, ≥ 0, not both 0;
    capped by the tokens available), min_cos (kNN edges at or below it are dropped, in [-1, 1)), dtype (what the
    graphs store q/k, unit v and kNN features in: "float32" or "bfloat16"; products and the solve stay float32)."""

    kind: str = "qk"
    tau: float = 0.1
    k_intra: int = DEFAULT_K
    k_inter: int = DEFAULT_K
    min_cos: float = 0.1
    dtype: str = "float32"

    def __post_init__(self):
        _choice("graph", self.kind, GRAPH_KINDS)
        set_ = lambda k, v: object.__setattr__(self, k, v)
        set_("tau", _real("tau", self.tau, tau_ok, f"a finite number ≥ {TAU_MIN:.3g} (1/tau, the vv graph's "
                          "scale, a finite float32)", 0.1))
        set_("k_intra", _int("k_intra", self.k_intra, 0, DEFAULT_K))
        set_("k_inter", _int("k_inter", self.k_inter, 0, DEFAULT_K))
        if self.k_intra + self.k_inter == 0:
            raise InputError("k_intra/k_inter 0/0", "leave the kNN graph no edges", "pass e.g. k_intra=50")
        set_("min_cos", _real("min_cos", self.min_cos, lambda v: -1 <= v < 1, "in [-1, 1)", 0.1))
        _choice("graph_dtype", self.dtype, STORAGE_DTYPES)
        # a field set away from its default that this kind does not read would be ignored (tau beside qk, k_intra
        # beside vv, …): refused as the flat keywords are (`check_graph_reads`)
        check_graph_reads(self.kind, [k for k in ("tau", "k_intra", "k_inter", "min_cos")
                                      if getattr(self, k) != _GRAPH_DEFAULTS[k]])

    @property
    def joint(self) -> bool:
        """A kNN graph: one graph over all images' tokens (one joint solve), not one problem per image."""
        return self.kind.startswith("knn")

    def reads(self) -> dict:
        """The options this kind reads, under their `GRAPH_OPTIONS` names (graph_dtype for dtype) — what makes two
        graphs of one kind differ; recorded in `Result.provenance` and checked by `pipeline.attribution`."""
        return {k: getattr(self, "dtype" if k == "graph_dtype" else k) for k in GRAPH_READS[self.kind]}

    def build_kwargs(self) -> dict:
        """The keywords of `graphs.from_taps` besides the kind."""
        return dict(tau=self.tau, k_intra=self.k_intra, k_inter=self.k_inter, min_cos=self.min_cos,
                    dtype=self.dtype)


_GRAPH_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GraphSpec)}


@dataclasses.dataclass(frozen=True)
class ExactSpec:
    """The exact solver's options (`solvers.exact`): tol (the relative residual to stop at; None: `TOL`), maxiter
    (ARPACK restarts / LOBPCG iterations), dense_max (base nodes up to which A is materialised), sparse_solver
    (kNN groups on one grid above dense_max: "auto", "arpack" or "lobpcg"), batch_images (`pipeline.solve`'s
    batched path: None from the memory budget, 0 one image at a time, or images per call)."""

    tol: float | None = None
    maxiter: int = MAXITER
    dense_max: int = DENSE_MAX
    sparse_solver: str = "auto"
    batch_images: int | None = None

    method = "exact"

    def __post_init__(self):
        object.__setattr__(self, "tol", _real("tol", self.tol, lambda v: v > 0,
                                              "a finite number > 0 (a relative residual)", 1e-4, none=True))
        object.__setattr__(self, "maxiter", _int("maxiter", self.maxiter, 1, MAXITER))
        object.__setattr__(self, "dense_max", _int("dense_max", self.dense_max, 0, DENSE_MAX))
        _choice("sparse_solver", self.sparse_solver, SPARSE_SOLVERS)
        object.__setattr__(self, "batch_images", _int("batch_images", self.batch_images, 0, 8, none=True))

    def record(self) -> dict:
        """The fields as JSON values, for a result's summary (`pipeline.solve` records them)."""
        return _fields(self)

    def kwargs(self) -> dict:
        """The options `solvers.exact.exact` reads, tol resolved (None → `TOL`)."""
        return dict(tol=TOL if self.tol is None else self.tol, maxiter=self.maxiter, dense_max=self.dense_max,
                    sparse_solver=self.sparse_solver)


@dataclasses.dataclass(frozen=True)
class GdSpec:
    """The gradient solver's options (`solvers.gd`): preset ("eigen" | "paper"), param ("table"; "conv" with the
    paper preset), steps (None: 150 eigen, 1000 paper), lr (None: the preset's default), optimizer (an optax
    `GradientTransformation` replacing the preset's, or None), sample (fraction of graphs per step in (0, 1], None
    all), lam (the paper loss's orthogonality weight, ≥ 0; None: 1; the paper preset only), tol (the convergence
    threshold, None: the preset's),
    progress (a bar, or a callable; not compared), chunks (compiled calls the steps are split into, ≥ 1),
    materialize (build the graphs' dense P once: None when they fit `dense_max` nodes per grid and `dense_bytes`
    in all, True always, False never), dense_max (≥ 0), dense_bytes (> 0)."""

    preset: str = "eigen"
    param: str = "table"
    steps: int | None = None
    lr: float | None = None
    optimizer: object = None
    sample: float | None = None
    lam: float | None = None
    tol: float | None = None
    progress: object = dataclasses.field(default=False, compare=False)
    chunks: int = 20
    materialize: bool | None = None
    dense_max: int = 4096
    dense_bytes: float = 2.0 ** 30

    method = "gd"

    def __post_init__(self):
        _choice("preset", self.preset, PRESETS)
        if self.param not in PARAMS or (self.preset == "eigen" and self.param != "table"):
            raise InputError(f"param {self.param!r}", "does not fit the preset",
                             "eigen takes 'table'; paper 'table' or 'conv'")
        set_ = lambda k, v: object.__setattr__(self, k, v)
        set_("steps", _int("steps", self.steps, 1, 300, none=True))
        set_("lr", _real("lr", self.lr, lambda v: v > 0, "a finite number > 0", 0.01, none=True))
        set_("sample", _real("sample", self.sample, lambda v: 0 < v <= 1, "a fraction in (0, 1]", 0.25, none=True))
        set_("lam", _real("lam", self.lam, lambda v: v >= 0, "a finite number ≥ 0", 1.0, none=True))
        if self.lam is not None and self.preset != "paper":
            raise InputError(f"lam {self.lam}", "weighs the paper loss's orthogonality term: the eigen preset has "
                             "none (it would be ignored)", "drop it, or pass preset='paper'")
        set_("tol", _real("tol", self.tol, lambda v: v > 0, "a finite number > 0", 0.01, none=True))
        if self.optimizer is not None and not (callable(getattr(self.optimizer, "init", None))
                                               and callable(getattr(self.optimizer, "update", None))):
            raise InputError(f"optimizer {type(self.optimizer).__name__}", "is not an optax GradientTransformation",
                             "pass e.g. optax.adam(1e-2), or None for the preset's")
        set_("chunks", _int("chunks", self.chunks, 1, 20))
        if self.materialize not in (None, True, False):
            raise InputError(f"materialize {self.materialize!r}", "must be None, True or False",
                             "pass e.g. materialize=False")
        set_("dense_max", _int("dense_max", self.dense_max, 0, 4096))
        set_("dense_bytes", _real("dense_bytes", self.dense_bytes, lambda v: v > 0, "a finite number > 0", 2 ** 30))

    def record(self) -> dict:
        """The fields as JSON values, for a result's summary (`pipeline.solve` records them): progress left out (how
        a run is shown), an optimizer by its name ("optax" and its type; None for the preset's). None stands for the
        preset's default; the solver's info says what it resolved to (steps, lr)."""
        out = _fields(self, skip=("progress", "optimizer"))
        out["optimizer"] = None if self.optimizer is None else f"optax {type(self.optimizer).__name__}"
        return out

    def kwargs(self) -> dict:
        """Every field, as keywords (`solvers.gd.gd(graphs, K, **spec.kwargs())` is `gd(graphs, K, options=spec)`)."""
        return _fields(self)


def _fields(spec, skip=()) -> dict:
    """A spec's fields {name: value}, but those in `skip`."""
    return {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name not in skip}


SolverSpec = ExactSpec | GdSpec
SOLVER_SPECS = {"exact": ExactSpec, "gd": GdSpec}
GRAPH_OPTIONS = ("tau", "k_intra", "k_inter", "min_cos", "graph_dtype")
GRAPH_READS = {"qk": ("graph_dtype",), "vv": ("tau", "graph_dtype"),      # the options each graph kind reads
               "knn-qk": ("k_intra", "k_inter", "min_cos", "graph_dtype"),
               "knn-vv": ("k_intra", "k_inter", "min_cos", "graph_dtype")}


def check_graph_reads(kind: str, given, flags: bool = False) -> None:
    """Graph options (`GRAPH_OPTIONS` names) given for a graph kind that does not read them (tau beside a qk or kNN
    graph, k_intra/k_inter/min_cos beside qk or vv): an `InputError` naming them (as --flags with `flags`), not a
    silent default."""
    unread = [k for k in given if k not in GRAPH_READS.get(kind, GRAPH_OPTIONS)]
    if unread:
        names = ", ".join("--" + k.replace("_", "-") if flags else k for k in unread)
        readers = sorted({g for g, reads in GRAPH_READS.items() if unread[0] in reads})
        one = len(unread) == 1
        raise InputError(names, f"{'is' if one else 'are'} not read by the {kind} graph ({'it' if one else 'they'} "
                         "would be ignored)", f"drop {'it' if one else 'them'}, or use the {' or '.join(readers)} graph")
SOLVER_OPTIONS = {m: tuple(f.name for f in dataclasses.fields(c)) for m, c in SOLVER_SPECS.items()}


def solver_spec(method: str, spec: SolverSpec | None = None, **fields) -> SolverSpec:
    """A solver's options → its spec (`ExactSpec` / `GdSpec`), once, where they enter: `solvers.exact.exact`,
    `solvers.gd.gd`, and through `specs` every pipeline entry point.

    method: "exact" or "gd"; spec: that method's spec object, or None to build one from `fields`, the spec's field
    names as keywords (`SOLVER_OPTIONS[method]`). A name that is not a field of the method's spec is one
    `InputError` naming it and listing the valid ones; fields beside a `spec` are too (which would win?), except
    progress beside a `GdSpec` (how a run is shown, not what it solves; not compared), which replaces the spec's."""
    cls = SOLVER_SPECS[_choice("method", method, METHODS)]
    unknown = [k for k in fields if k not in SOLVER_OPTIONS[method]]
    if unknown:
        raise InputError(", ".join(unknown), f"{'is not an option' if len(unknown) == 1 else 'are not options'} "
                         f"of the {method} solver", f"pass only {cls.__name__} fields: "
                         f"{', '.join(SOLVER_OPTIONS[method])}")
    if spec is None:
        return cls(**fields)
    if not isinstance(spec, cls):
        raise InputError(f"options {type(spec).__name__}", f"is not the {method} solver's {cls.__name__}",
                         f"pass options={cls.__name__}(...), or its fields as keywords")
    progress = fields.pop("progress", None) if cls is GdSpec else None
    if fields:
        raise InputError(", ".join(fields), f"are given beside options={cls.__name__}(...)",
                         "set them in the spec, or pass them without it")
    return spec if progress is None else dataclasses.replace(spec, progress=progress)


def specs(graph="qk", method="exact", solver=None, **flat) -> tuple[GraphSpec, SolverSpec]:
    """The flat keywords of a pipeline entry point → (GraphSpec, solver spec), once, where they enter.

    graph: a kind or a `GraphSpec`; solver: an `ExactSpec`/`GdSpec` (then `method` must agree or be its default);
    flat: `GRAPH_OPTIONS` (graph_dtype is GraphSpec's dtype) and the solver's `SOLVER_OPTIONS` (`solver_spec`). A
    flat option given beside the object it belongs to is refused (which would win?), as is one the chosen method or
    graph kind does not read (it would be ignored, `check_graph_reads`; progress is dropped for exact, which shows
    none). An unknown keyword is the
    caller's TypeError."""
    unknown = sorted(set(flat) - set(GRAPH_OPTIONS) - {o for os in SOLVER_OPTIONS.values() for o in os})
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {', '.join(unknown)}")
    gkw = {k: flat.pop(k) for k in GRAPH_OPTIONS if k in flat}
    if isinstance(graph, GraphSpec):
        if gkw:
            raise InputError(", ".join(gkw), "are given beside graph=GraphSpec(...)", "set them in the GraphSpec")
        gspec = graph
    else:
        if isinstance(graph, str) and graph in GRAPH_READS:
            check_graph_reads(graph, gkw)
        if "graph_dtype" in gkw:
            gkw["dtype"] = gkw.pop("graph_dtype")
        if gkw.get("dtype", "") is None:
            gkw["dtype"] = "float32"
        gspec = GraphSpec(graph, **gkw)
    progress = flat.pop("progress", None)
    if solver is not None:
        if not isinstance(solver, (ExactSpec, GdSpec)):
            raise InputError(f"solver {type(solver).__name__}", "is not an ExactSpec or a GdSpec",
                             "pass e.g. solver=ExactSpec() or solver=GdSpec(preset='paper')")
        if method not in (None, "exact", solver.method) or flat:
            raise InputError(", ".join(flat) or f"method {method!r}", "are given beside solver=",
                             "set them in the solver spec")
        method = solver.method
    else:
        method = _choice("method", "exact" if method is None else method, METHODS)
        other = [k for k in flat if k not in SOLVER_OPTIONS[method]]
        if other:
            raise InputError(", ".join(other), f"apply to the other method, not {method!r} (they would be ignored)",
                             f"drop them, or pass method={'gd' if method == 'exact' else 'exact'!r}")
    if progress is not None and method == "gd":
        flat["progress"] = progress
    return gspec, solver_spec(method, solver, **flat)


# ------------------------------------------------------------------------------------------------ layer weights


def _weights_error(what: str, shown, problem: str = "need finite weights ≥ 0, not all 0 (a weight under ~1e-308 "
                   "is 0)") -> InputError:
    return InputError(what, f"{problem}, got {shown}", "pass e.g. 11:1,10:0.5 or 1,0.5 (only their ratios count), "
                      f"or a rule: {', '.join(RULES)}")


@dataclasses.dataclass(frozen=True)
class LayerWeights:
    """How much each tapped layer's graphs weigh (every head, every timestep of a layer alike): exactly one of

    - rule: a name in `RULES`, read from each layer's own graphs (`spectral_jax.layer_weights`);
    - pairs: ((layer, weight), ...) — a layer not named weighs 0;
    - numbers: (weight, ...) — one per tapped layer, paired with the layers in the order they were given
      (`--layers 11,3 --layer-weights 1,0.5` gives layer 11 the 1; "all": ascending).

    One text syntax for `analyze`, `dataset` and the CLI (`parse`): "eigengap", "11:1,10:0.5" or "1,0.5". Weights
    are finite, ≥ 0 and not all 0; only their ratios count (`resolve` normalises in float64). Hashable."""

    rule: str | None = None
    pairs: tuple[tuple[int, float], ...] | None = None
    numbers: tuple[float, ...] | None = None

    @classmethod
    def parse(cls, spec, what: str = "layer_weights") -> "LayerWeights | None":
        """None → None; a `LayerWeights` as is; a str: a rule name (any case), "L:W,L:W" pairs or "W,W" numbers; a
        mapping layer → weight (pairs); a sequence or 1-d array of numbers. One `InputError` line otherwise."""
        if spec is None or isinstance(spec, LayerWeights):
            return spec
        if isinstance(spec, str):
            text = spec.strip()
            if text.lower() in RULES:
                return cls(rule=text.lower())
            parts = [p.strip() for p in text.split(",") if p.strip()]
            pairs = numbers = None
            try:
                if parts and all(":" in p for p in parts):
                    pairs = [(int(l), float(w)) for l, w in (p.split(":", 1) for p in parts)]
                elif parts and not any(":" in p for p in parts):
                    numbers = [float(p) for p in parts]
            except ValueError:
                pass
            if pairs is not None:
                return cls._checked_pairs(pairs, text, what)
            if numbers is not None:
                return cls._checked_numbers(numbers, text, what)
            raise InputError(f"{what} {spec!r}", "is not a rule, LAYER:WEIGHT pairs or numbers (not a rule name or "
                             "a list of numbers)", f"pass one of {', '.join(RULES)}, pairs (--layer-weights "
                             "11:1,10:0.5) or one number per tapped layer (1,0.5)")
        if isinstance(spec, Mapping):
            if not all(is_integer(k) for k in spec):
                raise InputError(f"{what} {dict(spec)!r}", "has keys that are not layer indices",
                                 "map integer layers to weights, e.g. {11: 1.0, 10: 0.5}")
            return cls._checked_pairs([(int(k), v) for k, v in spec.items()], dict(spec), what)
        if isinstance(spec, tuple) and spec and all(isinstance(p, tuple) and len(p) == 2 for p in spec):
            return cls._checked_pairs(list(spec), spec, what)
        try:
            items = np.asarray(spec, object)
            items = items.reshape(1) if items.ndim == 0 else items        # one number: one tapped layer
            if items.ndim != 1 or any(isinstance(x, (bool, np.bool_, str, bytes)) for x in items):
                raise TypeError
            nums = [float(x) for x in items]
        except (TypeError, ValueError):
            raise InputError(f"{what} {spec!r}", "is not a rule name or a list of numbers",
                             f"pass one of {', '.join(RULES)}, a mapping layer → weight, or one number per "
                             "tapped layer") from None
        return cls._checked_numbers(nums, items.tolist(), what)

    @classmethod
    def _checked_numbers(cls, nums, shown, what) -> "LayerWeights":
        w = np.asarray(nums, np.float64)
        if not w.size or not np.all(np.isfinite(w)) or (w < 0).any() or not w.max() > 0:
            raise _weights_error(what, shown)
        return cls(numbers=tuple(float(x) for x in w))

    @classmethod
    def _checked_pairs(cls, pairs, shown, what) -> "LayerWeights":
        layers = [int(l) if is_integer(l) else l for l, _ in pairs]
        if not all(is_integer(l) for l in layers):
            raise InputError(f"{what} {shown!r}", "has keys that are not layer indices",
                             "map integer layers to weights, e.g. 11:1,10:0.5")
        twice = sorted({l for l in layers if layers.count(l) > 1})
        if twice:
            raise InputError(f"{what} {shown}", f"gives layer {twice[0]} twice", "give each layer one weight")
        if any(l < 0 for l in layers):      # -1 would silently be another layer than --layers -1 names
            raise InputError(f"{what} {shown}", f"names layer {min(layers)}: LAYER:W pairs take layer indices ≥ 0",
                             "name each layer by its index from 0, e.g. 11:1 for the last of 12 layers")
        try:
            w = [float(v) for _, v in pairs]
            if any(isinstance(v, (bool, np.bool_, str, bytes)) for _, v in pairs):
                raise TypeError
        except (TypeError, ValueError):
            raise InputError(f"{what} {shown!r}", "has weights that are not numbers",
                             "map layers to numbers, e.g. 11:1,10:0.5") from None
        w = np.asarray(w, np.float64)
        if not w.size or not np.all(np.isfinite(w)) or (w < 0).any() or not w.max() > 0:
            raise _weights_error(what, shown)
        return cls(pairs=tuple(sorted(zip(layers, (float(x) for x in w)))))

    @classmethod
    def of(cls, layers: Sequence[int], weights) -> "LayerWeights":
        """Pairs of `layers` `[L]` and `weights` `[L]` (e.g. a resolved weighting, to record or pass on)."""
        return cls._checked_pairs(list(zip((int(l) for l in layers), np.asarray(weights, np.float64))),
                                  "", "layer_weights")

    def resolve(self, tapped: Sequence[int], order: Sequence[int] | None = None,
                what: str = "layer_weights") -> str | np.ndarray:
        """Against the tapped layers: the rule name, or float64 `[L]` in ascending layer order, scaled by the
        largest then summing to 1 (1e-45 or 1e308 give the same weights as 1). order: the tapped layers in the order
        the user named them (numbers pair with it; None: ascending). Pairs naming an untapped layer, or a count of
        numbers other than the tapped layers', are one `InputError` line."""
        tapped = sorted({int(l) for l in tapped})
        if self.rule is not None:
            return self.rule
        if self.pairs is not None:
            bad = [l for l, _ in self.pairs if l not in tapped]
            if bad:
                raise InputError(f"{what} {self}", f"names layer{'s' * (len(bad) > 1)} {', '.join(map(str, bad))}, "
                                 "which are not tapped", f"weigh tapped layers only ({', '.join(map(str, tapped))}), "
                                 "or tap them")
            given = dict(self.pairs)
            w = np.array([given.get(l, 0.0) for l in tapped], np.float64)
        else:
            order = tapped if order is None else list(dict.fromkeys(int(l) for l in order))
            if len(self.numbers) != len(order) or sorted(order) != tapped:
                raise InputError(f"{what} ({len(self.numbers)} numbers)", f"need one per tapped layer "
                                 f"({len(tapped)}: {tapped})", f"pass {len(tapped)} numbers, LAYER:W pairs, or a "
                                 f"rule: {', '.join(RULES)}")
            by = dict(zip(order, self.numbers))
            w = np.array([by[l] for l in tapped], np.float64)
        if not w.max() > 0:
            raise _weights_error(what, str(self), "put no weight on any tapped layer")
        w = w / w.max()
        return w / w.sum()

    def bound(self, order: Sequence[int], what: str = "layer_weights") -> "LayerWeights":
        """These weights checked against the tapped layers `order` (in the order the user named them, `layer_order`)
        and made independent of that order: numbers become pairs with those layers; rules and pairs stay. The one
        place where a layer selection meets its weights (analyze, the dataset and the CLI call it once, where they
        learn the tapped layers)."""
        if self.rule is not None:
            return self
        w = self.resolve(order, order, what)
        return self if self.pairs is not None else LayerWeights(
            pairs=tuple(zip(sorted({int(l) for l in order}), (float(x) for x in w))))

    def to_json(self):
        """The rule name, [[layer, weight], ...] or [weight, ...]."""
        if self.rule is not None:
            return self.rule
        return [list(p) for p in self.pairs] if self.pairs is not None else list(self.numbers)

    def __str__(self) -> str:
        if self.rule is not None:
            return self.rule
        if self.pairs is not None:
            return ",".join(f"{l}:{w:g}" for l, w in self.pairs)
        return ",".join(f"{w:g}" for w in self.numbers)


def as_flag(e: InputError) -> InputError:
    """The same error naming the command-line flag (`tau 0.0` → `--tau 0.0`), for the CLI, which builds these specs
    from its flags."""
    import re

    flag = lambda m: "--" + m.group(0).replace("_", "-")
    name, _, rest = e.what.partition(" ")
    if name.endswith(","):                              # "steps, lr": names only, each a flag
        name, rest = e.what, ""
    if not name.startswith("--"):                       # "k_intra/k_inter 0/0": each name a flag
        name = re.sub(r"(?<![\w-])[a-z][a-z_]*", flag, name)
    fix = re.sub(r"\b([a-z][a-z_]*)=(['\"]?)([^'\",\s)]*)\2",          # "method='gd'" → "--method gd"
                 lambda m: "--" + m.group(1).replace("_", "-") + " " + m.group(3), e.fix)
    return InputError(f"{name} {rest}".strip(), e.problem, fix)


def layer_order(layers, num_layers: int) -> list[int]:
    """The tapped layers in the order the user named them (`LayerWeights.resolve`'s order): "all"/None →
    ascending; "11,3", an int or a list → as given, negative indices from the end. Assumes a selection already
    checked (`models.parse_layers`: in range, each layer once)."""
    if layers is None or (isinstance(layers, str) and layers.strip().lower() == "all"):
        return list(range(num_layers))
    if isinstance(layers, str):
        items = [int(s) for s in layers.split(",") if s.strip()]
    elif is_integer(layers):
        items = [int(layers)]
    else:
        items = [int(i) for i in layers]
    return [i % num_layers for i in items]


__all__ = ["DATASET_GRAPHS", "DEFAULT_K", "DEFAULT_NUM_EIGS", "DENSE_MAX", "ExactSpec", "GRAPH_KINDS", "GdSpec",
           "GRAPH_RULES", "GraphSpec", "LayerWeights", "MAXITER", "METHODS", "PARAMS", "PRESETS", "RULES", "SPARSE_SOLVERS",
           "STORAGE_DTYPES", "TOL", "as_flag", "check_num_eigs", "check_seed", "layer_order", "solver_spec", "specs"]
