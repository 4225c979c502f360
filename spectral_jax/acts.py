"""ACTS.npz: the on-disk form of a forward pass's taps (the `extract` → `solve` contract of DESIGN.md).

Keys, per tapped layer i: `layer{i}/q`, `layer{i}/k`, `layer{i}/v` float32 `[B, H, h*w, D]` (patch tokens only,
raw projections), `layer{i}/grid` int `[2]`; plus `model` (str) and `image_size` int `[2]` (H, W in pixels).
Optional: `layer{i}/hidden` float32 `[B, h*w, C]`; `timesteps` int `[T]` (diffusion models): then the heads axis
holds T·H graphs, timestep-major (graph index = t·H + head), and `num_heads` gives H: an int, or one int per
tapped layer in layer order where H differs between layers (SD 2.x).
"""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass

import numpy as np

from spectral_jax.errors import InputError
from spectral_jax.files import save_npz, write_atomic  # noqa: F401  (write_atomic: re-exported)
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

    timesteps/num_heads: for diffusion taps whose heads axis holds T·H graphs (timestep-major).
    """
    arrays: dict[str, np.ndarray] = {"model": np.array(model), "image_size": np.asarray(image_size, np.int64)}
    if timesteps is not None:
        arrays["timesteps"] = np.asarray(timesteps, np.int64)
        arrays["num_heads"] = np.asarray(num_heads, np.int64)
    taps = taps.patches()
    for i, t in taps.layers.items():
        for name in ("q", "k", "v"):
            arrays[f"layer{i}/{name}"] = np.asarray(getattr(t, name), np.float32)
        arrays[f"layer{i}/grid"] = np.asarray(t.grid, np.int64)
        if i in taps.hidden:
            arrays[f"layer{i}/hidden"] = np.asarray(taps.hidden[i], np.float32)
    return save_npz(path, arrays, inputs)


def load_acts(path: str) -> Acts:
    """Read and validate an ACTS file; any problem raises `InputError` naming the file and the fix."""
    fix = "write it with `spectral-jax extract IMAGE --model NAME --out ACTS.npz`"
    if not os.path.isfile(path):
        raise InputError(path, "no such file", fix)
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise InputError(path, f"not a readable .npz archive ({type(e).__name__})", fix) from None
    layers: dict[int, dict[str, np.ndarray]] = {}
    for key, arr in data.items():
        m = _KEY.match(key)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = arr
        elif key not in ("model", "image_size", "timesteps", "num_heads"):
            raise InputError(path, f"unexpected array {key!r}", fix)
    if not layers:
        raise InputError(path, "holds no layer{i}/q, k, v arrays", fix)
    taps, hidden, batch = {}, {}, None
    for i in sorted(layers):
        d = layers[i]
        missing = [n for n in ("q", "k", "v", "grid") if n not in d]
        if missing:
            raise InputError(path, f"layer{i} lacks {', '.join(missing)}", fix)
        grid = tuple(int(g) for g in np.asarray(d["grid"]).reshape(-1))
        if len(grid) != 2 or min(grid) < 1:
            raise InputError(path, f"layer{i}/grid must be two positive ints, got {d['grid']!r}", fix)
        q, k, v = d["q"], d["k"], d["v"]
        for name, a in (("q", q), ("k", k), ("v", v)):
            if a.ndim != 4:
                raise InputError(path, f"layer{i}/{name} must be [B, heads, h*w, head_dim], got shape {a.shape}", fix)
            if not np.issubdtype(a.dtype, np.floating):
                raise InputError(path, f"layer{i}/{name} must be floating point, got {a.dtype}", fix)
            if a.shape[2] != grid[0] * grid[1]:
                raise InputError(path, f"layer{i}/{name} has {a.shape[2]} tokens but grid {grid} needs "
                                 f"{grid[0] * grid[1]}", fix)
            if not np.all(np.isfinite(a)):
                raise InputError(path, f"layer{i}/{name} contains NaN or Inf", "re-extract the activations "
                                 "(check the image and the model's weights)")
        if not (q.shape == k.shape and v.shape[:3] == q.shape[:3]):
            raise InputError(path, f"layer{i} q/k/v shapes disagree: {q.shape}, {k.shape}, {v.shape}", fix)
        if batch is None:
            batch = q.shape[0]
        elif q.shape[0] != batch:
            raise InputError(path, f"layer{i} has batch {q.shape[0]}, other layers {batch}", fix)
        taps[i] = LayerTap(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32), grid, 0)
        if "hidden" in d:
            hidden[i] = d["hidden"].astype(np.float32)
    model = str(data["model"]) if "model" in data else "unknown"
    size = tuple(int(s) for s in np.asarray(data.get("image_size", [0, 0])).reshape(-1)[:2])
    steps = tuple(int(t) for t in np.asarray(data.get("timesteps", [])).reshape(-1))
    return Acts(Taps(taps, hidden), model, size, steps)
