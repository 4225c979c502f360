"""Where everything of a dataset run lives: the static shapes (`Geometry`), the device mesh, which image sits in
which batch slot at which step, and which process reads which slots.

The mesh is 1-D over all devices of all processes, axis 'data' (`make_mesh`), process-major, so each process's
devices hold one contiguous range of batch slots. Slot j of step t holds image `epoch_order(seed, epoch)[t·B + j]`
(−1: a padded slot of an epoch's last batch), a deterministic function of (seed, step), so a resumed run continues
with the same batches. Multi-host: `init_distributed`; a process reads only its own slots (`local_slots`) and hands
them over with `jax.make_array_from_process_local_data` (`global_array`); `gather` brings a result back.

Shape legend
    B  images per batch    R  table rows (images, padded to a multiple of lcm(ROW_ALIGN, D))    D  devices
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from spectral_jax import graphs
from spectral_jax.dataset.settings import Settings
from spectral_jax.errors import InputError

AXIS = "data"
ROW_ALIGN = 64          # table rows are padded to a multiple of lcm(64, D): the same shape for 1, 2, 4, 8, … devices


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Static shapes of a run: layer groups (layers sharing a grid and q/k/v shapes, `graphs.group_layers`), the
    base grid (the finest), the input size, images, table rows, devices, the effective k — the k asked for, capped
    by the tokens of the finest grid in one graph (the whole dataset for exact, a batch for gd): the largest any
    group uses; each group caps it again by its own grid's tokens (`k_of`, as `graphs.from_taps` does) —, and
    `steps`: the diffusion timesteps folded into every layer's heads axis (None: taps without timesteps, one kNN
    graph per layer; T: one per (layer, timestep), a group's graphs `[L, T]`, `graph_shape`)."""

    groups: tuple            # ((grid, (layer, ...)), ...)
    base: tuple[int, int]
    size: tuple[int, int]
    num_images: int
    rows: int
    devices: int
    k_intra: int
    k_inter: int
    steps: int | None = None

    def graph_shape(self, layers) -> tuple[int, ...]:
        """The batch shape of a group's kNN graphs: `[L]`, or `[L, T]` with timesteps."""
        return (len(layers),) if self.steps is None else (len(layers), self.steps)

    @property
    def graphs_per_layer(self) -> int:
        """kNN graphs of one layer: its timesteps (1 without)."""
        return 1 if self.steps is None else self.steps

    @property
    def grids(self) -> int:
        """Distinct grids the tapped layers sit on (1 for a ViT or DiT; a UNet's several: a multi-grid solve)."""
        return len({tuple(g) for g, _ in self.groups})

    def k_of(self, grid, images: int) -> tuple[int, int]:
        """(k_intra, k_inter) of a group on `grid` in a graph of `images` images (padded slots included): the run's
        k capped by that grid's tokens (`graphs.clamp_k`), so a coarse grid's few tokens never cap a finer one's."""
        return graphs.clamp_k(self.k_intra, self.k_inter, tuple(grid), images)

    def k_used(self, images: int) -> list[dict]:
        """summary.json's record of the k each layer group's graphs were built with (`k_of`), JSON-ready:
        [{"grid": [h, w], "layers": [...], "k_intra", "k_inter"}] in the groups' order."""
        return [dict(zip(("grid", "layers", "k_intra", "k_inter"), (list(g), list(ls), *self.k_of(g, images))))
                for g, ls in self.groups]


def tapped(apply, params, x, layers, what: str = "the backbone"):
    """The forward's taps of the batch x `[B, H, W, 3]`, checked where they arrive (the one entry of both methods:
    `geometry`, `whole.stream_features`, `step.batch_graphs`) → (the taps of the patch tokens, `nonfinite` `[B]`
    int32: per image the first tapped layer whose q, k or v holds NaN or Inf, −1 where all are finite).

    Shapes are checked while tracing, so `geometry`'s `eval_shape` refuses them before anything runs or is written:
    every layer's q, k, v `[B, heads, P + h·w, D]` (P its prefix tokens, (h, w) its grid; q and k alike), else one
    `InputError` naming `what`, the layer, and the expected vs the actual shape — a wrong token count would
    otherwise be mis-aligned silently with the grid. Finiteness costs one reduction per tap inside the caller's
    jitted program; it does not drop anything itself (the callers mask those images and zero their features)."""
    taps = apply(params, x, layers, False)
    b = x.shape[0]
    for i, t in sorted(taps.layers.items()):
        tokens = t.num_prefix + t.grid[0] * t.grid[1]
        for name, a in (("q", t.q), ("k", t.k), ("v", t.v)):
            s = tuple(a.shape)
            if not (len(s) == 4 and s[0] == b and s[2] == tokens and (name != "k" or s == tuple(t.q.shape))):
                want = f"{tuple(t.q.shape)} as q" if name == "k" else f"({b}, heads, {tokens}, dim)"
                raise InputError(what, f"layer {i}'s {name} has shape {s}, expected {want}: batch {b}, "
                                 f"{t.num_prefix} prefix + {t.grid[0]}×{t.grid[1]} patch tokens",
                                 "return q, k, v as [B, heads, prefix + h·w, D] for every layer (Backbone."
                                 "from_function: num_prefix= counts CLS/register tokens)")
    taps = taps.patches()
    if not taps.layers:                                 # `geometry` refuses a backbone that taps nothing
        return taps, jnp.full((b,), -1, jnp.int32)
    finite = jnp.stack([jnp.all(jnp.isfinite(a), axis=(1, 2, 3)) for _, t in sorted(taps.layers.items())
                        for a in (t.q, t.k, t.v)]).reshape(len(taps.layers), 3, b).all(1)        # [L, B]
    ids = jnp.asarray(sorted(taps.layers), jnp.int32)
    return taps, jnp.where(finite.all(0), -1, ids[jnp.argmin(finite, axis=0)])


def nonfinite_reason(backbone: str, layer: int) -> str:
    """Why an image whose taps hold NaN or Inf (`tapped`) is skipped: summary.json's reason and the stderr line's."""
    return f"backbone {backbone!r} gave NaN or Inf for it (layer {layer})"


def geometry(backbone, layers, settings: Settings, size: tuple[int, int], num_images: int, devices: int
             ) -> Geometry:
    """The run's `Geometry` from the backbone's taps traced abstractly (`jax.eval_shape`, nothing computed); taps
    of the wrong shape are one `InputError` here (`tapped`)."""
    x = jax.ShapeDtypeStruct((settings.batch_size, *size, 3), jnp.float32)
    taps, _ = jax.eval_shape(lambda p, x: tapped(backbone.apply, p, x, layers, f"backbone {backbone.name!r}"),
                             backbone.params, x)
    groups = tuple(graphs.group_layers(taps))
    if not groups:
        raise InputError(f"model {backbone.name!r}", "taps no layers", "pass --layers all or a list of layer indices")
    steps = timesteps_of(backbone, taps)
    base = max((g for g, _ in groups), key=lambda hw: hw[0] * hw[1])
    align = ROW_ALIGN * devices // math.gcd(ROW_ALIGN, devices)
    # capped by the finest grid only: each group caps it by its own tokens where its graph is built (`k_of`)
    k_intra, k_inter = graphs.clamp_k(*settings.k, base, graph_images(settings, num_images))
    return Geometry(groups, tuple(base), tuple(size), num_images, -(-num_images // align) * align, devices,
                    k_intra, k_inter, steps)


def timesteps_of(backbone, taps) -> int | None:
    """T, the diffusion timesteps folded into every tapped layer's heads axis (`Taps.timesteps`, else the
    backbone's `timesteps`), or None for a backbone without them. Every layer's heads axis must be a multiple of T
    (timestep-major, graph index t·H + head), else one `InputError` naming the backbone and the layer."""
    steps = tuple(taps.timesteps or getattr(backbone, "timesteps", ()) or ())
    if not steps:
        return None
    for i, t in sorted(taps.layers.items()):
        if t.q.shape[1] % len(steps):
            raise InputError(f"backbone {backbone.name!r}", f"layer {i} has {t.q.shape[1]} graphs on its heads axis, "
                             f"not a multiple of its {len(steps)} timesteps",
                             "fold the timesteps into the heads axis as [B, T·H, N, D], timestep-major")
    return len(steps)


def graph_images(settings: Settings, num_images: int) -> int:
    """Images of one graph: the whole dataset (exact) or a batch (gd)."""
    return num_images if settings.method == "exact" else settings.batch_size


def make_mesh(devices: Sequence | None = None) -> Mesh:
    """A 1-D mesh ('data') over `devices` (default: all devices of all processes), process-major, so that each
    process's devices hold one contiguous range of batch slots."""
    devs = sorted(devices if devices is not None else jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devs), (AXIS,))


def init_distributed(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> None:
    """`jax.distributed.initialize` (call before anything else touches JAX). With no arguments JAX detects the
    cluster (SLURM, TPU pods, …); else all three (`inputs.check_cluster`, which also refuses process 0's port
    taken). CPU processes exchange data over gloo (the default of this JAX). A failure to start or join is one
    `InputError` line (JAX's own message in it); a peer that never comes waits JAX's initialization timeout. JAX's
    preemption service is turned off first (its SIGTERM handler would make a `kill` a no-op)."""
    from spectral_jax.dataset.inputs import check_cluster

    check_cluster(coordinator, num_processes, process_id)
    kw = {k: v for k, v in dict(coordinator_address=coordinator, num_processes=num_processes,
                                 process_id=process_id).items() if v is not None}
    # JAX's preemption service (TPU maintenance events) installs a C++ SIGTERM handler that only logs: a `kill`
    # or a scheduler's stop would then be ignored. The run has no use for it; the CLI's own handler stops it cleanly.
    jax.config.update("jax_enable_preemption_service", False)
    try:
        jax.distributed.initialize(**kw)
    except (RuntimeError, ValueError) as e:
        what = f"--coordinator {coordinator}" if coordinator is not None else "the cluster (found by JAX)"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(what, f"could not start or join it ({first})",
                         "start it before anything else uses JAX, with the same --coordinator and --num-processes "
                         "on every process and a free port (or check the cluster's environment)") from None


def cluster_from_env(environ=None) -> str | None:
    """The launcher whose environment says this process is one of several (what `jax.distributed.initialize()`
    with no arguments reads): "SLURM" (SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS > 1, SLURM_PROCID,
    SLURM_LOCALID: `srun`), "Open MPI" (OMPI_MCA_orte_hnp_uri: `mpirun`), "JAX_COORDINATOR_ADDRESS"; None for a
    lone process (a one-task SLURM job included). Does not start anything."""
    import os

    env = os.environ if environ is None else environ
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(v in env for v in slurm) and env["SLURM_NTASKS"].strip().isdigit() and int(env["SLURM_NTASKS"]) > 1:
        return "SLURM"
    if "OMPI_MCA_orte_hnp_uri" in env:
        return "Open MPI"
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    return None


# What a collective or the coordination service raises when another process of the run is gone (gloo on CPU: the
# peer's socket closed; NCCL / the coordination service: a heartbeat timeout or an unreachable task).
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "heartbeat timeout",
              "Gloo AllGather failed", "Gloo AllReduce failed", "Gloo ReduceScatter failed", "Gloo Broadcast failed",
              "Gloo AllToAll failed", "NCCL", "coordination service")


def lost_peer(e: BaseException) -> str | None:
    """With several processes: the first line of `e` when it says another process of the run is gone (a
    collective failed on a closed connection, a heartbeat timed out; `_PEER_LOST`), else None (one process: always
    None). The caller stops this process at once (`cli.dataset`): JAX's own shutdown would wait for the dead
    process's heartbeat and then abort with a page of logs."""
    if jax.process_count() < 2 or not isinstance(e, (RuntimeError, ValueError)):
        return None
    text = str(e)
    if not any(s in text for s in _PEER_LOST):
        return None
    return (text.strip().splitlines() or [type(e).__name__])[0]


class PeerFailed(RuntimeError):
    """Raised on every other process when one process's own part of a shared step failed (`fail_together`): that
    process raises its own error and says why; the others stop here rather than wait at a collective it will never
    join."""


def fail_together(err: BaseException | None, what: str) -> None:
    """After a step each process ran on its own (err: its exception, or None): one all-gather of who failed, so that
    no process waits at a later collective for one that has left. This process re-raises err; every other one
    raises `PeerFailed` naming the first process that failed and `what`. Nothing with one process but re-raising
    err. Every process must call it."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        failed = np.asarray(multihost_utils.process_allgather(np.array([err is not None], np.int32))).reshape(-1)
    else:
        failed = np.array([err is not None])
    if err is not None:
        raise err
    if failed.any():
        bad = int(np.flatnonzero(failed)[0])
        raise PeerFailed(f"process {bad}'s {what} failed (it said why on its stderr)")


def epoch_order(seed: int, epoch: int, num_images: int) -> np.ndarray:
    """The image order of `epoch`: a permutation of range(num_images) drawn from (seed, epoch) alone."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EC7, int(epoch)])).permutation(num_images)


def batch_indices(seed: int, step: int, num_images: int, batch_size: int) -> np.ndarray:
    """Image index of each slot of global step `step` `[B]` int32; −1 pads the last batch of an epoch."""
    per_epoch = -(-num_images // batch_size)
    epoch, t = divmod(int(step), per_epoch)
    idx = epoch_order(seed, epoch, num_images)[t * batch_size:(t + 1) * batch_size]
    return np.concatenate([idx, np.full(batch_size - len(idx), -1)]).astype(np.int32)


def local_slots(sharding: NamedSharding, batch_size: int) -> np.ndarray:
    """The batch slots this process's devices hold under `sharding` (one contiguous range, in order)."""
    starts = sorted({(s[0].start or 0, s[0].stop if s[0].stop is not None else batch_size)
                     for s in sharding.addressable_devices_indices_map((batch_size,)).values()})
    slots = np.concatenate([np.arange(a, b) for a, b in starts])
    if len(slots) and not np.array_equal(slots, np.arange(slots[0], slots[0] + len(slots))):
        raise RuntimeError(f"this process's batch slots are not contiguous: {slots}")
    return slots


def global_array(mesh: Mesh, spec: P, local: np.ndarray, shape: tuple) -> jax.Array:
    """One global array of `shape` from this process's part `local` (laid out by `spec` over `mesh`)."""
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), local, shape)


def gather_json(obj) -> list:
    """Every process's `obj` (JSON-ready; other values by their repr), in process order: each process's JSON bytes
    padded to the longest and all-gathered. Every process must call it."""
    import json

    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return [json.loads(json.dumps(obj, default=repr))]
    mine = np.frombuffer(json.dumps(obj, default=repr).encode(), np.uint8)
    size = int(np.max(multihost_utils.process_allgather(np.array([mine.size], np.int32))))
    rows = np.asarray(multihost_utils.process_allgather(np.pad(mine, (0, size - mine.size), constant_values=32)))
    return [json.loads(row.tobytes().decode()) for row in rows.reshape(-1, size)]


def gather_reasons(reasons: dict) -> dict:
    """{image: why} of every process, each passing its own (`gather_json`); every process must call it."""
    if jax.process_count() == 1:
        return dict(reasons)
    out = {}
    for every in gather_json({str(i): w for i, w in reasons.items()}):
        out.update({int(i): w for i, w in every.items()})
    return out


def same_everywhere(fields: dict) -> None:
    """Every process's `fields` ({name: JSON-ready value}) must equal process 0's: else one `InputError`, on every
    process, naming the first process that differs and up to four of the fields (the images listed, "files", by
    their count and first difference). One process: nothing to compare. Every process must call it (an all-gather
    of the JSON, `gather_json`)."""
    if jax.process_count() == 1:
        return
    every = gather_json(fields)
    first = every[0]
    for p, other in enumerate(every[1:], 1):
        diff = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
        if not diff:
            continue

        def shown(k):
            a, b = first.get(k), other.get(k)
            if k == "files" and isinstance(a, list) and isinstance(b, list):
                at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                return (f"files: {len(a)} images ≠ {len(b)}, the first difference at {at}: "
                        f"{a[at] if at < len(a) else '—'} ≠ {b[at] if at < len(b) else '—'}")
            return f"{k} {a} ≠ {b}"

        raise InputError(f"process {p} of {len(every)}", "was started with other flags or another folder than "
                         f"process 0 ({'; '.join(shown(k) for k in diff[:4])})", "start every process with the same "
                         "flags and FOLDER (only --process-id differs)")


def gather(x) -> np.ndarray:
    """A (possibly multi-process) array as one host numpy array; every process must call it."""
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


__all__ = ["AXIS", "Geometry", "PeerFailed", "ROW_ALIGN", "batch_indices", "epoch_order", "gather", "gather_json",
           "geometry", "global_array", "same_everywhere",
           "fail_together", "gather_reasons", "graph_images", "init_distributed", "lost_peer", "cluster_from_env", "local_slots", "make_mesh", "nonfinite_reason",
           "tapped", "timesteps_of"]
