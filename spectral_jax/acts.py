"""ACTS.npz: the on-disk form of a forward pass's taps (the `extract` → `solve` contract of docs/design.md).

Keys, per tapped layer i: `layer{i}/q`, `layer{i}/k`, `layer{i}/v` float32 `[B, H, h*w, D]` (patch tokens only,
raw projections), `layer{i}/grid` int `[2]`; plus `model` (str) and `image_size` int `[2]` (H, W in pixels), each
grid (rows, columns) of the image's aspect up to one cell's rounding per side (`_check_grid`).
Optional: `layer{i}/hidden` float32 `[B, h*w, C]`; `timesteps` int `[T]` (diffusion models): then the heads axis
holds T·H graphs, timestep-major (graph index = t·H + head), and `num_heads` gives H: an int, or one int per
tapped layer in layer order where H differs between layers (SD 2.x).
"""

from __future__ import annotations

import math
import os
import re
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np

from spectral_jax.errors import InputError
from spectral_jax.files import save_npz
from spectral_jax.taps import LayerTap, Taps

_KEY = re.compile(r"^layer(\d+)/(q|k|v|grid|hidden)$")


@dataclass(frozen=True)
class Acts:
    """A loaded ACTS file: patch-token taps plus provenance."""

    taps: Taps
    model: str
    image_size: tuple[int, int]
    timesteps: tuple[int, ...] = ()


def save_acts(path: str, taps: Taps, model: str, image_size: tuple[int, int],
              timesteps: tuple[int, ...] | None = None, num_heads=None, inputs=()) -> str:
    """Write `taps` (prefix tokens dropped) to `path` in the ACTS format, atomically; returns the path written.

    timesteps: the diffusion timesteps folded into the heads axis (T·H graphs, timestep-major); None: the taps' own
    (`taps.timesteps`: () for a ViT's, none written), so what `load_acts` reads back builds the same graphs. Given
    beside taps that carry timesteps, they must be those. num_heads: H, an int or one per layer in layer order (only
    with timesteps); None: each layer's heads axis over T (one int where the layers agree), as `extract` writes.
    What would not load is refused here, one `InputError`: timesteps × num_heads against each layer's heads axis,
    each layer's grid against `image_size` (`_check_grid`).
    """
    fix = "pass the taps of one forward with its image_size (H, W) and timesteps (or leave timesteps, num_heads None)"
    taps = taps.patches()
    own = tuple(taps.timesteps)
    steps = own
    if timesteps is not None:
        given = np.asarray(timesteps)
        steps = _ints(path, "timesteps", given, "[n]", fix, low=0) if given.size else ()
    if own and steps != own:
        raise InputError(f"timesteps {list(steps)}", f"differ from the taps' own {list(own)} (the graphs of their "
                         "heads axis)", "leave timesteps None: the taps' are saved")
    size = _ints(path, "image_size", np.asarray(image_size), "[2]", fix)
    arrays: dict[str, np.ndarray] = {"model": np.array(model), "image_size": np.asarray(size, np.int64)}
    graphs = {i: int(t.q.shape[1]) for i, t in taps.layers.items()}
    if steps:
        if num_heads is None:
            per = [graphs[i] // len(steps) for i in sorted(graphs)]
            num_heads = per[0] if len(set(per)) == 1 else per
        heads = np.asarray(num_heads)
        _check_heads(path, steps, heads, graphs, fix)
        arrays["timesteps"], arrays["num_heads"] = np.asarray(steps, np.int64), heads.astype(np.int64)
    elif num_heads is not None:
        raise InputError(f"num_heads {num_heads!r}", "is given without timesteps (an ACTS file holds num_heads only "
                         "beside timesteps)", "drop num_heads, or pass the timesteps folded into the heads axis")
    for i, t in taps.layers.items():
        _check_grid(path, i, tuple(int(g) for g in t.grid), size, fix)
        for name in ("q", "k", "v"):
            arrays[f"layer{i}/{name}"] = np.asarray(getattr(t, name), np.float32)
        arrays[f"layer{i}/grid"] = np.asarray(t.grid, np.int64)
        if i in taps.hidden:
            arrays[f"layer{i}/hidden"] = np.asarray(taps.hidden[i], np.float32)
    return save_npz(path, arrays, inputs)


# Limits on what an ACTS file may declare, checked before an array is read (see `load_acts`).
MAX_ABS = 1e15  # |activation| cap: real q/k/v/hidden stay far below 1e5; at ≤ 1e15 every scaled q·kᵀ (≤ 1e30·√D)
# and squared norm (≤ 1e30·D) stays finite in float32 for D < 3e8, so the graphs and the solve stay finite.
_DEFLATE_MAX_RATIO = 1032  # deflate cannot expand its input more than ~1032× (zlib technical details)
_META = ("model", "image_size", "timesteps", "num_heads")


def _name(key: str) -> str:
    return repr(key if len(key) <= 60 else key[:57] + "...")


def check_npz_headers(path: str, fix: str) -> None:
    """Read each member's .npy header (nothing else) and refuse, before any array is allocated: members that are
    not .npy arrays, object arrays (pickles), and arrays whose declared size is not the member's uncompressed size
    (`ZipInfo.file_size`), or whose uncompressed size the stored bytes cannot hold (stored: ≤ the compressed size;
    deflated: ≤ 1032× it; either ≤ the file's own size). So `np.load` allocates at most what the file can hold."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0,
               (3, 0): np.lib.format.read_array_header_2_0}  # 3.0 = 2.0 with a utf-8 header (ASCII in practice)
    size = os.path.getsize(path)
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                if info.filename == key or info.is_dir():
                    raise InputError(path, f"member {_name(info.filename)} is not a .npy array", fix)
                ratio = {zipfile.ZIP_STORED: 1, zipfile.ZIP_DEFLATED: _DEFLATE_MAX_RATIO}.get(info.compress_type)
                if ratio is None:
                    raise InputError(path, f"array {_name(key)} uses zip compression method {info.compress_type} "
                                     "(numpy writes stored or deflated members)", fix)
                if info.compress_size > size or info.file_size > ratio * info.compress_size + 64:
                    raise InputError(path, f"array {_name(key)} claims {info.file_size} bytes from "
                                     f"{info.compress_size} stored bytes in a {size}-byte file (damaged or crafted)",
                                     fix)
                with z.open(info) as fp:
                    version = np.lib.format.read_magic(fp)
                    if version not in readers:
                        raise ValueError(f"npy version {version}")
                    shape, _, dtype = readers[version](fp)
                    header = fp.tell()
                if dtype.hasobject:
                    raise InputError(path, f"array {_name(key)} holds Python objects (loading it would unpickle "
                                     "code); refused", fix)
                declared = math.prod(shape) * dtype.itemsize
                if dtype.itemsize == 0 or declared != info.file_size - header:
                    raise InputError(path, f"array {_name(key)} declares shape {tuple(shape)} of {dtype} "
                                     f"({declared} bytes) but holds {info.file_size - header} bytes "
                                     "(damaged or crafted)", fix)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, RuntimeError, NotImplementedError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(path, f"not a readable .npz archive ({type(e).__name__})", fix) from None


def read_npz(path: str, what: str, fix: str) -> dict[str, np.ndarray]:
    """Every array of the .npz at `path` ({name: array}), read after `check_npz_headers`, pickles refused. A
    folder, FIFO or device (`io.open_regular`: named as such, never read), a damaged header or an archive numpy
    cannot read: one `InputError` naming `path` as `what` ("ACTS .npz file", …) with `fix`. Checks no contents."""
    from spectral_jax.io import open_regular

    with open_regular(path, what, fix):
        pass
    check_npz_headers(path, fix)
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile, zlib.error, EOFError, RuntimeError) as e:
        raise InputError(path, f"not a readable .npz archive ({type(e).__name__})", fix) from None


def _ints(path: str, key: str, a: np.ndarray, shape: str, fix: str, low: int = 1) -> tuple[int, ...]:
    """`a` as a tuple of ints ≥ `low`; `shape` "[2]", "[n]" (one or more) or "scalar or [n]" says what is allowed."""
    ok_shape = {"[2]": a.shape == (2,), "[n]": a.ndim == 1 and a.size >= 1,
                "scalar or [n]": a.ndim == 0 or (a.ndim == 1 and a.size >= 1)}[shape]
    if a.dtype.kind not in "iu" or not ok_shape:
        raise InputError(path, f"{key} must be an integer array of shape {shape}, got {a.dtype} {a.shape}", fix)
    if int(a.min()) < low:
        raise InputError(path, f"{key} must hold ints ≥ {low}, got {int(a.min())}", fix)
    return tuple(int(x) for x in a.reshape(-1))


def _floats(path: str, key: str, a: np.ndarray, legend: str, ndim: int, fix: str) -> None:
    """Refuse `a` unless it is a floating array of rank `ndim`, no empty axis, finite, |x| ≤ MAX_ABS."""
    if a.ndim != ndim or not np.issubdtype(a.dtype, np.floating):
        raise InputError(path, f"{key} must be a floating-point {legend} array, got {a.dtype} {a.shape}", fix)
    if 0 in a.shape:
        raise InputError(path, f"{key} has an empty axis: shape {a.shape} ({legend})", fix)
    top = np.max(np.abs(a))
    if not np.isfinite(top):
        raise InputError(path, f"{key} contains NaN or Inf", "re-extract the activations (check the image and the "
                         "model's weights)")
    top = float(top)  # compared as a Python float: MAX_ABS overflows float16
    if top > MAX_ABS:
        raise InputError(path, f"{key} holds |x| = {top:.3g} > {MAX_ABS:.0e}, beyond any real activation "
                         "(the graphs would overflow)", "re-extract the activations (check the image and the "
                         "model's weights)")


def _check_heads(path: str, steps: tuple[int, ...], num_heads: np.ndarray, graphs: dict[int, int], fix: str) -> None:
    """num_heads (an int ≥ 1, or one per layer in layer order) such that each layer's heads axis holds T·H graphs,
    timestep-major (graphs: layer → graphs on its heads axis); else one `InputError` (`save_acts`, `load_acts`)."""
    heads = _ints(path, "num_heads", num_heads, "scalar or [n]", fix)
    if len(heads) == 1:
        heads = heads * len(graphs)
    elif len(heads) != len(graphs):
        raise InputError(path, f"num_heads has {len(heads)} entries for {len(graphs)} layers", fix)
    for h, i in zip(heads, sorted(graphs)):
        if graphs[i] != len(steps) * h:
            raise InputError(path, f"layer{i} has {graphs[i]} graphs on its heads axis but {len(steps)} timesteps "
                             f"× {h} heads = {len(steps) * h}", fix)


def _check_grid(path: str, layer: int, grid: tuple[int, int], size: tuple[int, int], fix: str) -> None:
    """A layer's grid (h, w) has the aspect of the image (H, W) up to rounding of one cell per side, else one
    `InputError` (a transposed grid would scramble the pixels): |h·W − w·H| < H + W. A grid ≈ image/stride per side
    with each side rounded up or down (a patch grid; a UNet's repeated halving with padding, ceil(ceil(x)/2) =
    ceil(x/2)) is within it: h = H/s + e, w = W/s + f with |e|, |f| < 1 give |h·W − w·H| = |e·W − f·H| < W + H.
    size (0, 0): unknown (a file without image_size), nothing to check."""
    if size == (0, 0):
        return
    if abs(grid[0] * size[1] - grid[1] * size[0]) >= size[0] + size[1]:
        raise InputError(path, f"layer{layer}/grid {list(grid)} (rows, columns) does not have the aspect of "
                         f"image_size {list(size)} (H, W), even up to one cell's rounding (transposed?)", fix)


def load_acts(path: str) -> Acts:
    """Read and validate an ACTS file; any problem raises `InputError` naming the file and the fix.

    Nothing is allocated before every member's .npy header has been checked against the member's size
    (`check_npz_headers`); pickles are refused. Then every array is checked against the format in the module
    docstring: q/k/v float `[B, H, h*w, D]` with B, H, D ≥ 1, finite, |x| ≤ `MAX_ABS`; grid two ints ≥ 1 of the
    image's aspect (`_check_grid`: a transposed grid is refused);
    hidden float `[B, h*w, C]`; model a string; image_size two ints ≥ 1; timesteps ints ≥ 0 `[T]` together with
    num_heads (an int ≥ 1 or one per layer) such that each layer's heads axis is T·H.
    """
    fix = "write it with `spectral-jax extract IMAGE --model NAME --out ACTS.npz`"
    data = read_npz(path, "ACTS .npz file", fix)
    layers: dict[int, dict[str, np.ndarray]] = {}
    for key, arr in data.items():
        m = _KEY.match(key)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = arr
        elif key not in _META:
            raise InputError(path, f"unexpected array {_name(key)}", fix)
    if not layers:
        raise InputError(path, "holds no layer{i}/q, k, v arrays", fix)

    model = "unknown"
    if "model" in data:
        a = data["model"]
        if a.dtype.kind not in "US" or a.ndim != 0:
            raise InputError(path, f"model must be a string, got {a.dtype} {a.shape}", fix)
        model = a.item().decode("utf-8", "replace") if a.dtype.kind == "S" else a.item()
    size = _ints(path, "image_size", data["image_size"], "[2]", fix) if "image_size" in data else (0, 0)
    if ("timesteps" in data) != ("num_heads" in data):
        raise InputError(path, "has timesteps without num_heads or num_heads without timesteps (both or neither)",
                         fix)
    steps = ()
    if "timesteps" in data:
        steps = _ints(path, "timesteps", data["timesteps"], "[n]", fix, low=0)

    taps, hidden, batch = {}, {}, None
    for i in sorted(layers):
        d = layers[i]
        missing = [n for n in ("q", "k", "v", "grid") if n not in d]
        if missing:
            raise InputError(path, f"layer{i} lacks {', '.join(missing)}", fix)
        grid = _ints(path, f"layer{i}/grid", d["grid"], "[2]", fix)
        _check_grid(path, i, grid, size, fix)
        tokens = grid[0] * grid[1]
        q, k, v = d["q"], d["k"], d["v"]
        for name, a in (("q", q), ("k", k), ("v", v)):
            _floats(path, f"layer{i}/{name}", a, "[B, heads, h*w, head_dim]", 4, fix)
            if a.shape[2] != tokens:
                raise InputError(path, f"layer{i}/{name} has {a.shape[2]} tokens but grid {grid} needs {tokens}", fix)
        if not (q.shape == k.shape and v.shape[:3] == q.shape[:3]):
            raise InputError(path, f"layer{i} q/k/v shapes disagree: {q.shape}, {k.shape}, {v.shape}", fix)
        if batch is None:
            batch = q.shape[0]
        elif q.shape[0] != batch:
            raise InputError(path, f"layer{i} has batch {q.shape[0]}, other layers {batch}", fix)
        taps[i] = LayerTap(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32), grid, 0)
        if "hidden" in d:
            h = d["hidden"]
            _floats(path, f"layer{i}/hidden", h, "[B, h*w, C]", 3, fix)
            if h.shape[:2] != (batch, tokens):
                raise InputError(path, f"layer{i}/hidden has shape {h.shape}, expected [{batch}, {tokens}, C]", fix)
            hidden[i] = h.astype(np.float32)
    if steps:
        _check_heads(path, steps, data["num_heads"], {i: t.q.shape[1] for i, t in taps.items()}, fix)
    return Acts(Taps(taps, hidden, steps), model, size, steps)
