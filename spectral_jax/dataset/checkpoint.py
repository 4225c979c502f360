"""Checkpoints of a dataset run: orbax under OUT/checkpoints, every `checkpoint_every` steps and at the end,
committed atomically by orbax (a step folder appears only when complete), the two newest kept.

Each holds the `step.State` and a JSON meta: the run's fingerprint (`fingerprint`: the settings that define the
result, the backbone's provenance, and each image file's name and content digest, `file_digests`), its history and
seconds so far, and for gd the learning rates its steps ran at (`lr_history`). A resumed run must have the same
fingerprint but for gd's lr (`check_resumable`, `check_same`): an image replaced,
edited, added or removed since is refused in one line naming it — the run is not recomputed behind the user's back,
and nothing cached is ever reported for other images. What a resume reads back is checked (`read_meta`,
`Checkpoints.restore`): unreadable, inconsistent or non-finite data is one `InputError` naming the step folder,
and nothing is removed; a state holding NaN or Inf is never saved (`Checkpoints.save`). The epoch permutation and
position follow from seed and step, so it continues to bit-for-bit the result of an uninterrupted run on the same
device layout and lr. A gd run resumed at another --lr (the way on from a divergence: its kept checkpoints are
finite) goes on from its state at the new lr, and the meta and summary say from which step each lr ran.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from spectral_jax.dataset.layout import Geometry, gather
from spectral_jax.dataset.settings import Settings
from spectral_jax.errors import InputError
from spectral_jax.io import digest, open_regular

FOLDER = "checkpoints"


class Restored(NamedTuple):
    """What a checkpoint gives back."""

    state: object               # `step.State`
    history: list               # [[loss_first, loss, objective, images], ...] one per step so far
    seconds: float              # the run's seconds before this process


def steps(ckdir: str) -> list[int]:
    """The committed checkpoint steps in `ckdir`, ascending (none: [])."""
    if not os.path.isdir(ckdir):
        return []
    return sorted(int(d) for d in os.listdir(ckdir) if d.isdigit() and os.path.isdir(os.path.join(ckdir, d)))


def damaged(path: str, why: str, fix: str | None = None) -> InputError:
    """The error of a checkpoint or cache file that cannot be used: it names `path` and says how to go on."""
    return InputError(path, f"is damaged ({why})", fix or "run again without --resume into a fresh --out (or "
                      "delete the checkpoints folder to start over); nothing was changed")


def _step_fix(ckdir: str, step: int) -> str:
    """How to go on from a damaged step: the step before it, where one is kept, or a fresh run."""
    before = [s for s in steps(ckdir) if s < step]
    return (f"delete {os.path.join(ckdir, str(step))} to resume from step {before[-1]}, or " if before else "") + \
        "run again without --resume into a fresh --out; nothing was changed"


def read_meta(ckdir: str, step: int) -> dict:
    """The JSON meta of checkpoint `step`, checked: a dict with the fingerprint ("config", a dict), the history
    (`step` rows of 4 finite numbers), the seconds (finite, ≥ 0) and the step. Anything else: one `InputError`
    naming the step folder (`damaged`)."""
    where = os.path.join(ckdir, str(step))
    try:
        with open_regular(os.path.join(where, "meta", "metadata"), "metadata file") as f:
            meta = json.load(f)
    except InputError as e:                     # missing, or not a regular file (a FIFO is refused, not waited on)
        raise damaged(where, f"unreadable metadata: {e.problem}", _step_fix(ckdir, step)) from None
    except (OSError, ValueError) as e:
        raise damaged(where, f"unreadable metadata: {type(e).__name__}", _step_fix(ckdir, step)) from None
    why = _meta_problem(meta, step)
    if why:
        raise damaged(where, why, _step_fix(ckdir, step))
    return meta


def _meta_problem(meta, step: int) -> str | None:
    """What is wrong with the meta of checkpoint `step` (None: nothing)."""
    def number(x):
        return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)

    if not isinstance(meta, dict):
        return f"metadata is a {type(meta).__name__}, not an object"
    if not isinstance(meta.get("config"), dict):
        return "metadata without the run's settings (\"config\")"
    if meta.get("step") != step or isinstance(meta.get("step"), bool):
        return f"metadata of step {meta.get('step')!r} in the folder of step {step}"
    h = meta.get("history")
    if not isinstance(h, list) or len(h) != step or not all(
            isinstance(r, list) and len(r) == 4 and all(number(v) for v in r) for r in h):
        return f"its history is not {step} rows of 4 finite numbers"
    if not number(meta.get("seconds")) or meta["seconds"] < 0:
        return "its seconds are not a finite number ≥ 0"
    lrs = meta.get("lr_history")
    if lrs is not None and not (
            isinstance(lrs, list) and lrs and all(
                isinstance(r, list) and len(r) == 2 and isinstance(r[0], int) and not isinstance(r[0], bool)
                and number(r[1]) and r[1] > 0 for r in lrs)
            and lrs[0][0] == 0 and all(a[0] < b[0] for a, b in zip(lrs, lrs[1:])) and lrs[-1][0] < step):
        return f"its lr history is not [[first step, lr > 0], ...] from step 0, ascending, before step {step}"
    sums = meta.get("state_checksum", [])
    if not isinstance(sums, list) or not all(isinstance(v, int) and 0 <= v < 2 ** 32 for v in sums):
        return "its state checksum is not a list of 32-bit numbers"
    return None


def state_checksum(state) -> list[int]:
    """One 32-bit number per leaf of `state` (`jax.tree.leaves` order): Σ_i bits_i · (2i + 1) mod 2³² over the bit
    patterns of the leaf's values, i the flat index. Integer arithmetic, so the sharding and the order of the sum do
    not change it; any one flipped bit does (2ᵇ times an odd number is never 0 mod 2³²). Computed where the arrays
    live (nothing gathered but the numbers); every process must call it."""
    return [int(v) for v in gather(_checksums(state)[0])]


class NonFinite(RuntimeError):
    """`Checkpoints.save` refused a state holding NaN or Inf (a diverged run): nothing was written."""


@jax.jit
def _checksums(state) -> tuple[jax.Array, jax.Array]:
    """(`state_checksum`'s numbers `[leaves]` uint32, whether every floating leaf is finite: a bool scalar)."""
    def one(x):
        if x.dtype == jnp.bool_ or x.dtype.itemsize not in (1, 2, 4):
            bits = x.astype(jnp.uint32)
        else:
            bits = lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize])
            bits = bits.astype(jnp.uint32)
        flat, stride = jnp.zeros(x.shape, jnp.uint32), 1
        for d in reversed(range(x.ndim)):
            flat = flat + lax.broadcasted_iota(jnp.uint32, x.shape, d) * jnp.uint32(stride % 2 ** 32)
            stride *= x.shape[d]
        return jnp.sum(bits * (2 * flat + 1), dtype=jnp.uint32)

    leaves = jax.tree.leaves(state)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)]))
    return jnp.stack([one(x) for x in leaves]), finite


def file_digests(root: str, files: list[str]) -> dict[str, str]:
    """{file: the first 128 bits of the sha256 of its bytes, hex} for the images `files` under `root`, in order;
    a file that cannot be opened, or is not a regular file (a FIFO, a link to a device: never waited on nor read),
    gets one fixed marker (the run reports it as unreadable). Several processes: process p hashes files p, p + P, …
    and the digests are gathered to every process (every process must call it). Reads every byte of every regular
    file; it does not look at names or times (a copied or touched folder still resumes, an image edited in place
    does not)."""
    procs, me = jax.process_count(), jax.process_index()
    mine = np.zeros((-(-len(files) // procs), 16), np.uint8)
    for j, i in enumerate(range(me, len(files), procs)):
        mine[j] = np.frombuffer(_digest(os.path.join(root, files[i])), np.uint8)
    if procs > 1:
        from jax.experimental import multihost_utils

        every = np.asarray(multihost_utils.process_allgather(mine))            # [P, ⌈n/P⌉, 16]
    else:
        every = mine[None]
    return {f: every[i % procs, i // procs].tobytes().hex() for i, f in enumerate(files)}


_UNREADABLE = hashlib.sha256(b"\0unreadable file").digest()[:16]


def _digest(path: str) -> bytes:
    """`io.digest` of `path`; `_UNREADABLE` for a file that cannot be opened or read, or is not a regular file (a
    FIFO, a device, a socket: refused by `io.open_regular` without waiting on it or reading it; the run lists it as
    skipped when it fails to read it as an image)."""
    try:
        return digest(path, "image")
    except (OSError, InputError):
        return _UNREADABLE


def fingerprint(backbone, layers: str, settings: Settings, geom: Geometry, digests: dict[str, str]) -> dict:
    """What defines a run's result, JSON-ready: a resumed run must match it key for key. `digests`: {file: content
    digest} of the images in order (`file_digests`). "timesteps": the backbone's timesteps as resolved (a diffusion
    model's default drawn from the seed shows its values; [] for none) — what decides the features; with
    timestep_draw "fresh" only their count, "timesteps_per_step" —, so model_options leave out the "timesteps" they
    were given (`_resolved`): `--timesteps` set to exactly the timesteps a run drew resumes it. A text embedding
    file (a diffusion model's `text_embedding` option) counts by its content too: its model_options carry
    "text_embedding_sha256" (`_digest`), so a file changed under the same path is another run — and another
    features cache (`whole.cache_key` reads model_options) — not a resume that reuses features made with the old
    one. Defaults count as what they resolve to: a gd run's "lr" is the one its
    steps use (`step.learning_rate`: None → the preset's dataset default; a resume may change it, `lr_history`),
    layer_weights None is "uniform" (every layer equal, what None gives both methods) — `--layer-weights uniform`
    resumes a run that left them out, and the other way round (`_resolved`, `check_resumable`)."""
    fields = settings.result_fields()
    if settings.method == "gd":
        from spectral_jax.dataset.step import learning_rate

        fields["lr"] = learning_rate(settings, geom)
    te = fields["model_options"].get("text_embedding")
    if te is not None:
        fields["model_options"] = {**fields["model_options"], "text_embedding_sha256": _digest(te).hex()}
    return _resolved({"model": backbone.name, "weights": backbone.weights, "layers": layers,
                      "size": list(geom.size), "files": dict(digests), "num_images": len(digests),
                      "rows": geom.rows, "k_intra_effective": geom.k_intra, "k_inter_effective": geom.k_inter,
                      **fields, "timesteps": [int(t) for t in getattr(backbone, "timesteps", ()) or ()]})


def _resolved(record: dict) -> dict:
    """A fingerprint or cache key with its model_options' "timesteps" left out where it holds the resolved ones
    ("timesteps"): the resolved timesteps decide the features, whether given or drawn from the seed. Records
    written before (model_options with the timesteps given beside the resolved ones) read the same; one without
    resolved timesteps is kept as it is. With "timestep_draw" "fresh" only their count decides (every step draws
    its own): "timesteps" becomes "timesteps_per_step", and fingerprints written before, holding the values the
    backbone was loaded with, read the same. layer_weights None reads as "uniform", the rule None stands for."""
    if "layer_weights" in record and record["layer_weights"] is None:
        record = {**record, "layer_weights": "uniform"}
    mo = record.get("model_options")
    if record.get("timestep_draw") == "fresh" and isinstance(record.get("timesteps"), list):
        record = {**{k: v for k, v in record.items() if k != "timesteps"},
                  "timesteps_per_step": len(record["timesteps"])}
        if isinstance(mo, dict):
            record["model_options"] = {k: v for k, v in mo.items() if k != "timesteps"}
    if "timesteps" in record and isinstance(mo, dict) and "timesteps" in mo:
        record = {**record, "model_options": {k: v for k, v in mo.items() if k != "timesteps"}}
    return record


def check_resumable(out: str, fp: dict, meta: dict) -> None:
    """Refuse to resume a run made with other images or settings (`check_same`); `meta` as `read_meta` gives. A gd
    run's lr is not compared: a resume may change it (`lr_history` records from which step each lr ran)."""
    old = meta["config"]
    if fp.get("method") == "gd" and old.get("method") == "gd":
        old = {**old, "lr": fp.get("lr")}
    check_same(out, old, fp)


def lr_history(meta: dict, default_lr: float) -> list[list]:
    """[[first step, lr], ...]: the learning rates the steps of a gd checkpoint ran at (`meta` as `read_meta`
    gives), each from its first step to the next one's. A checkpoint made before the meta held it ran at one lr:
    its fingerprint's, or `default_lr` (the preset's default for the run's settings, `step.learning_rate` of lr
    None) where that fingerprint did not hold the resolved lr."""
    lrs = meta.get("lr_history")
    if lrs is not None:
        return [[int(a), float(b)] for a, b in lrs]
    lr = meta["config"].get("lr")
    return [[0, float(default_lr if lr is None else lr)]]


def check_same(out: str, old: dict, new: dict, graph: str | None = None) -> None:
    """Refuse to go on from `old` (what a checkpoint or cache was made with) to `new` (this run's): the images
    that changed named first (up to three of each kind: changed content, added, removed), then up to four settings
    that differ. A field `old` lacks that was added since (`settings.ADDED_FIELDS`) is read at the value runs had
    before it existed; model_options' timesteps beside the resolved ones are left out on both sides (`_resolved`).

    graph: the path of the graph cache `old` is the record of (OUT/checkpoints/graph.npz, graph-rows or a part of
    the search in graph-parts), None for anything else. Where only fields that decide the graph and not the
    features differ (k, min_cos, block, edge weights, search, …: those outside `whole.cache_key`'s features key),
    the fix says that deleting that path keeps the cached features; where the features differ too, it does not
    (deleting the graph alone would not do)."""
    from spectral_jax.dataset.settings import ADDED_FIELDS

    old = _resolved({**{k: v for k, v in ADDED_FIELDS.items() if k in new}, **old})
    new = _resolved(new)
    images = _files_change(old.get("files"), new.get("files")) if old.get("files") != new.get("files") else ""
    follow = {"files"} | ({"num_images", "rows"} if images else set())         # what the image files decide
    diff = sorted(k for k in set(new) | set(old) if k not in follow and new.get(k) != old.get(k))
    if not diff and not images:
        return
    settings = ", ".join(f"{k} {old.get(k)!r} → {new.get(k)!r}" for k in diff[:4])
    if images:
        raise InputError(out, f"was made from other images: {images}" + (f"; and other settings: {settings}"
                                                                         if settings else ""),
                         "run without --resume into a fresh --out (or delete its checkpoints folder to start "
                         "over), or put the images back as they were")
    if graph is not None:
        from spectral_jax.dataset.whole import cache_key

        if not set(diff) & set(cache_key("features", new)):
            raise InputError(out, f"was made with other settings: {settings} (the graph's only: its cached "
                             "features still hold)", f"delete {graph} to build the graph again from the cached "
                             "features, or resume with the same settings, or choose another --out")
    raise InputError(out, "was made with other settings: " + settings,
                     "resume with the same folder and settings, or choose another --out")


def _files_change(old, new) -> str:
    """"img1.png changed, 2 added (a.png, b.png), …" between two {file: digest}."""
    if not isinstance(old, dict):
        return "its image contents were not recorded"
    new = new or {}

    def some(names):
        return ", ".join(names[:3]) + (", …" if len(names) > 3 else "")

    changed = [f for f in new if f in old and old[f] != new[f]]
    added = [f for f in new if f not in old]
    removed = [f for f in old if f not in new]
    parts = [f"{some(changed)} changed since" if changed else "",
             f"{len(added)} added ({some(added)})" if added else "",
             f"{len(removed)} removed ({some(removed)})" if removed else ""]
    return "; ".join(p for p in parts if p) or "the images are in another order"


def refuse_unasked_resume(out: str, done: list[int]) -> None:
    """OUT holds an earlier run's checkpoints and --resume was not given: say how to go on."""
    raise InputError(out, f"holds the checkpoints of an earlier run (step {done[-1]})",
                     f"pass --resume to continue (or re-export) it, delete {os.path.join(out, FOLDER)} "
                     "to start over, or choose another --out")


class Checkpoints:
    """An orbax `CheckpointManager` over `ckdir` (asynchronous saves; `close` waits for them)."""

    def __init__(self, ckdir: str):
        import orbax.checkpoint as ocp

        self._ocp, self.ckdir = ocp, ckdir
        self.manager = ocp.CheckpointManager(ckdir, options=ocp.CheckpointManagerOptions(
            max_to_keep=2, cleanup_tmp_directories=True, enable_async_checkpointing=True))

    def restore(self, step: int, abstract, num_images: int) -> Restored:
        """The state (laid out as `abstract`: shapes, dtypes, shardings), history and seconds of `step`, checked:
        the meta (`read_meta`), the state's step counter, finite table, EMA and optimizer state, statuses in
        {0, 1, 2} and 0 past the `num_images` images. Anything orbax cannot read or that fails a check: one
        `InputError` naming the step folder (`damaged`); nothing is removed. Every process must call it."""
        ocp, where = self._ocp, os.path.join(self.ckdir, str(step))
        meta = read_meta(self.ckdir, step)
        try:
            got = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                     meta=ocp.args.JsonRestore()))
        except Exception as e:                  # orbax/tensorstore: JSONDecodeError, KeyError, ValueError, …
            first = (str(e).strip().splitlines() or [""])[0][:160]
            raise damaged(where, f"orbax cannot read it: {type(e).__name__}" + (f": {first}" if first else ""),
                          _step_fix(self.ckdir, step)) from None
        state = got["state"]
        status = gather(state.status)
        sums = meta.get("state_checksum")
        why = ("its state's bytes changed since it was saved (checksum)" if sums is not None and
               state_checksum(state) != sums else
               "its state is of another step" if int(gather(state.step)) != step else
               "its image statuses are not 0, 1 or 2" if not np.isin(status, (0, 1, 2)).all() or
               status[num_images:].any() else
               None)
        for name, leaf in [("table", state.table), ("ema", state.ema)] + [
                ("optimizer state", x) for x in jax.tree.leaves(state.opt)]:
            if why is None and np.issubdtype(leaf.dtype, np.floating) and not np.isfinite(gather(leaf)).all():
                why = f"its {name} holds NaN or infinite values"
        if why:
            raise damaged(where, why, _step_fix(self.ckdir, step))
        return Restored(state, list(meta["history"]), meta["seconds"])

    def save(self, step: int, state, fp: dict, history: list, seconds: float, lrs: list | None = None) -> None:
        """Checkpoint `step` (asynchronously): the state and the meta (fingerprint `fp`, history, seconds; for gd,
        lrs: `lr_history`, the lr each span of steps ran at). A state
        holding NaN or Inf (a diverged run: `restore` would call it damaged) is not saved: `NonFinite` is raised,
        the same on every process (every process must call it)."""
        sums, finite = (gather(a) for a in _checksums(state))
        if not bool(finite):
            raise NonFinite(f"the state of step {step} holds NaN or Inf")
        # orbax writes the meta on a thread of its own, later: a copy, so that the rows the run appends meanwhile
        # do not end up in this step's history
        meta = {"config": fp, "history": [list(r) for r in history], "seconds": seconds, "step": step,
                "state_checksum": [int(v) for v in sums]}
        if lrs is not None:
            meta["lr_history"] = [[int(a), float(b)] for a, b in lrs]
        ocp = self._ocp
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Wait for the saves and orbax's clean-up of unfinished ones, then close the manager."""
        # orbax removes the temporary folders of unfinished saves on a thread of its own that `close` does not wait
        # for: a run that stops early (a damaged checkpoint) would exit under it, and that thread's traceback would
        # follow the one-line error on stderr
        cleanup = getattr(self.manager, "_maybe_await_cleanup_tmp_directory", None)
        if cleanup is not None:
            try:
                cleanup()
            except Exception:       # noqa: BLE001 — a failed clean-up leaves temporary folders, no result is lost
                pass
        self.manager.close()


__all__ = ["Checkpoints", "FOLDER", "Restored", "check_resumable", "check_same", "damaged", "file_digests",
           "fingerprint", "lr_history", "read_meta", "refuse_unasked_resume", "steps"]
