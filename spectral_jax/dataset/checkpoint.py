"""Checkpoints of a dataset run: orbax under OUT/checkpoints, every `checkpoint_every` steps and at the end,
committed atomically by orbax (a step folder appears only when complete), the two newest kept.

Each holds the `step.State` and a JSON meta: the run's fingerprint (`fingerprint`: the settings that define the
result, the backbone's provenance, the file list's hash), its history and seconds so far. A resumed run must have
the same fingerprint (`check_resumable`); the epoch permutation and position follow from seed and step, so it
continues to bit-for-bit the result of an uninterrupted run on the same device layout.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import NamedTuple

from spectral_jax.dataset.layout import Geometry
from spectral_jax.dataset.settings import Settings
from spectral_jax.errors import InputError

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


def read_meta(ckdir: str, step: int) -> dict:
    """The JSON meta of checkpoint `step` (one `InputError` line when it cannot be read)."""
    path = os.path.join(ckdir, str(step), "meta", "metadata")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(os.path.join(ckdir, str(step)), f"unreadable checkpoint metadata ({type(e).__name__})",
                         "delete that step folder to resume from the one before, or start a new --out") from None


def fingerprint(backbone, layers: str, settings: Settings, geom: Geometry, files: list[str]) -> dict:
    """What defines a run's result, JSON-ready: a resumed run must match it key for key."""
    return {"model": backbone.name, "weights": backbone.weights, "layers": layers, "size": list(geom.size),
            "files_sha256": hashlib.sha256("\n".join(files).encode()).hexdigest(), "num_images": len(files),
            "rows": geom.rows, "k_intra_effective": geom.k_intra, "k_inter_effective": geom.k_inter,
            **settings.result_fields()}


def check_resumable(out: str, fp: dict, meta: dict) -> None:
    """Refuse to resume a run made with other settings (the first four differences named)."""
    old = meta.get("config", {})
    diff = sorted(k for k in set(fp) | set(old) if fp.get(k) != old.get(k))
    if diff:
        raise InputError(out, "was made with other settings: " + ", ".join(
            f"{k} {old.get(k)!r} → {fp.get(k)!r}" for k in diff[:4]),
            "resume with the same folder and settings, or choose another --out")


def refuse_unasked_resume(out: str, done: list[int]) -> None:
    """OUT holds an earlier run's checkpoints and --resume was not given: say how to go on."""
    raise InputError(out, f"holds the checkpoints of an earlier run (step {done[-1]})",
                     f"pass --resume to continue (or re-export) it, delete {os.path.join(out, FOLDER)} "
                     "to start over, or choose another --out")


class Checkpoints:
    """An orbax `CheckpointManager` over `ckdir` (asynchronous saves; `close` waits for them)."""

    def __init__(self, ckdir: str):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.manager = ocp.CheckpointManager(ckdir, options=ocp.CheckpointManagerOptions(
            max_to_keep=2, cleanup_tmp_directories=True, enable_async_checkpointing=True))

    def restore(self, step: int, abstract) -> Restored:
        """The state (laid out as `abstract`: shapes, dtypes, shardings), history and seconds of `step`."""
        ocp = self._ocp
        got = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                 meta=ocp.args.JsonRestore()))
        return Restored(got["state"], list(got["meta"]["history"]), got["meta"]["seconds"])

    def save(self, step: int, state, fp: dict, history: list, seconds: float) -> None:
        meta = {"config": fp, "history": history, "seconds": seconds, "step": step}
        ocp = self._ocp
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


__all__ = ["Checkpoints", "FOLDER", "Restored", "check_resumable", "fingerprint", "read_meta",
           "refuse_unasked_resume", "steps"]
