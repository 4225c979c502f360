"""`run`: the dataset solver from a folder to OUT — check, build, compile, step, checkpoint, export.

Shape legend
    B  images per batch    (H, W)  model-input size    K  eigenvectors    (h, w)  base grid
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from spectral_jax import folder as F
from spectral_jax.dataset import checkpoint, export, inputs, step, summary, whole
from spectral_jax.dataset.export import DatasetResult
from spectral_jax.dataset.layout import (AXIS, batch_indices, gather, geometry, global_array, local_slots,
                                         make_mesh, nonfinite_reason, same_everywhere)
from spectral_jax.dataset.settings import Settings
from spectral_jax.options import layer_order
from spectral_jax.errors import InputError


class Folder(NamedTuple):
    """The images of a run and where its outputs go."""

    folder: str                 # FOLDER as given
    root: str                   # FOLDER, absolute
    files: list                 # image files relative to root, sorted (image i is files[i])
    ignored: list               # [{"file", "reason"}] non-image files
    out: str
    ckdir: str                  # OUT/checkpoints, absolute
    done: list                  # committed checkpoint steps
    digests: dict               # {file: content digest} of `files`, in order (`checkpoint.file_digests`)
    made_out: bool              # this run made OUT (process 0; False elsewhere)
    lock: object                # the `files.FolderLock` on OUT held for the run (process 0; None elsewhere)


class Trained(NamedTuple):
    """What the steps of this process leave for the export."""

    state: step.State
    history: list
    steps_run: int
    failed: dict                # {image index: why it could not be read}
    seconds: float              # the loop's wall time
    seconds_before: float       # the run's seconds in earlier processes (from the checkpoint resumed)
    lrs: list                   # [[first step, lr], ...] the lr each span of the steps ran at (`_lr_history`)


def run(folder: str, out: str, settings: Settings | None = None, *, backbone=None, mesh: Mesh | None = None,
        resume: bool = False, progress: bool = False, **options) -> DatasetResult:
    """Solve the dataset-level table for the images in `folder` (recursively) and write OUT (`out`):
    eigvecs.npz (`DatasetResult.save`), eigvecs.png (`viz.dataset_figure`), summary.json and checkpoints/ (orbax).

    settings: a `Settings` (or its fields as keywords, `options`, which also override a given `settings`);
    backbone: a `models.Backbone` (default `models.load_backbone(settings.model, settings.weights)`); mesh: default
    all devices (`make_mesh`); resume: continue the run in `out` (a finished run is re-exported); progress: a bar.

    Bad input raises `InputError` before the backbone runs and before anything is written: every option's type and
    range (`Settings`), OUT outside FOLDER, writable and not a file, FOLDER not in (or equal to) OUT/checkpoints or
    an exported file (`inputs.check_out`), no image file one the run writes, through a link (`inputs.check_files`),
    OUT holding an earlier run's checkpoints (exact: its cached features or graph) without `resume` (all of these
    before the backbone loads), a folder with no image that decodes (`folder.first_readable`), K and k against a
    batch's graph (`inputs.check_graph_size`). Should no image be readable during the run all the same (files
    changed underneath), it stops after the first epoch with that `InputError` and leaves nothing behind (a folder
    made by this run is removed, else its checkpoints/). A run that fails before its first checkpoint leaves
    nothing; one that fails later keeps its checkpoints, and `resume=True` continues from the last. gd: a step whose
    loss (or, at a checkpoint, state) is not finite stops the run there in one `InputError` naming --lr
    (`_diverged`; no checkpoint holding NaN is written, the earlier ones stay); a first epoch whose graphs hold no
    edge between two tokens is refused as exact refuses it (`whole.no_edge`: --min-cos), leaving nothing.

    One run at a time per OUT: OUT is locked (`files.FolderLock`, an exclusive flock on the folder, by process 0,
    the one that writes) before anything else is read or written there, for the whole run; OUT in use by another
    run is one `InputError` at once (with that run's pid), on every process. The kernel drops the lock when the
    process ends, however it ends. `resume` goes on only from the same images — each file's content digest is in
    the fingerprint (`checkpoint.file_digests`): an image replaced, edited, added or removed since is refused in one
    line naming it, never recomputed silently; checkpoints and caches read back are checked, and a damaged one is
    one `InputError` naming the file, leaving OUT as it was.
    """
    t_start = time.perf_counter()
    settings = settings.replace(**options) if settings is not None else Settings(**options)
    same = {**{f.name: repr(getattr(settings, f.name)) for f in dataclasses.fields(settings)}, "resume": resume,
            "backbone": None if backbone is None else repr(getattr(backbone, "name", None))}
    where = _open_folder(os.fspath(folder), os.fspath(out), resume, same, exact=settings.method == "exact")
    try:
        return _run(where, settings, backbone, mesh, resume, progress, t_start)
    finally:
        if where.lock is not None:
            where.lock.release(remove_empty=True)       # an OUT this run made and left empty goes too


def _run(where: Folder, settings: Settings, backbone, mesh: Mesh | None, resume: bool, progress: bool,
         t_start: float) -> DatasetResult:
    """`run` once OUT is locked (`_open_folder`)."""
    backbone = backbone if backbone is not None else _load_backbone(settings)
    layers = backbone.layers(settings.layers)
    if settings.layer_weights is not None:   # checked against the tapped layers; numbers paired with --layers' order
        settings = settings.replace(layer_weights=settings.layer_weights.bound(
            layer_order(settings.layers, backbone.num_layers), "--layer-weights"))
    layers_name = "all" if layers is None else ",".join(map(str, layers))
    from spectral_jax import io

    size = io.target_size(settings.size, settings.size, backbone.patch_size)
    mesh = mesh if mesh is not None else make_mesh()
    ndev = mesh.devices.size
    if settings.batch_size % ndev:
        raise InputError("--batch-size", f"{settings.batch_size} is not a multiple of the {ndev} devices",
                         f"pass --batch-size {-(-settings.batch_size // ndev) * ndev}")
    fit = -(-len(where.files) // ndev) * ndev
    if settings.method == "exact" and settings.batch_size > fit:    # a forward never wider than the folder: its
        settings = settings.replace(batch_size=fit)                 # padded slots would cost time and memory only
    geom = geometry(backbone, layers, settings, size, len(where.files), ndev)
    _check_table_weight(settings, geom)
    inputs.check_graph_size(settings, [g for g, _ in geom.groups], len(where.files), geom.base)
    from spectral_jax.dataset.cluster import check_count

    check_count(settings.segments, len(where.files) * geom.base[0] * geom.base[1])
    meta = checkpoint.read_meta(where.ckdir, where.done[-1]) if where.done else None
    ran = None                      # a resumed gd run's lr history: [[first step, lr], ...]
    if meta is not None and settings.method == "gd":
        default = step.learning_rate(settings.replace(lr=None), geom)
        ran = checkpoint.lr_history(meta, default)
        if settings.lr is None and ran[-1][1] != default:       # a resume keeps the run's lr (None where that is
            settings = settings.replace(lr=ran[-1][1])          # the default: the same compiled step)
    fp = checkpoint.fingerprint(backbone, layers_name, settings, geom, where.digests)   # defaults resolved
    if meta is not None:
        checkpoint.check_resumable(where.out, fp, meta)

    if settings.method == "exact":
        return _run_exact(where, settings, geom, backbone, layers, layers_name, fp, mesh, t_start, progress)

    per_epoch = -(-len(where.files) // settings.batch_size)
    total = settings.epochs * per_epoch
    start = where.done[-1] if where.done else 0
    if start > total and jax.process_index() == 0:    # steps cannot be taken back: the longer run is exported
        _say(f"spectral-jax dataset: --epochs {settings.epochs}: the run in {where.out} has already taken {start} "
             f"steps ({start / per_epoch:g} epochs); exporting it as it is")
    t0 = time.perf_counter()                    # compile before anything is written: a failure leaves no output
    abstract = step.abstract_state(settings, geom, mesh)
    compiled = step.compile_step(backbone, layers, settings, geom, mesh, abstract,
                                 _batch_spec(mesh, settings.batch_size, size)) if start < total else None
    compile_s = time.perf_counter() - t0

    lrs = _lr_history(step.learning_rate(settings, geom), ran, start, total)
    trained = _train(where, settings, geom, mesh, backbone, compiled, abstract, fp, lrs, start, total, per_epoch,
                     t_start, progress)
    return _export(where, settings, geom, backbone, layers_name, trained, per_epoch, t_start, compile_s)


def _open_folder(folder: str, out: str, resume: bool, same: dict | None = None, exact: bool = False) -> Folder:
    """FOLDER scanned and checked to hold a readable image, none of its files one the run writes
    (`inputs.check_files`), OUT checked (`inputs.check_out`), locked (`_lock_out`) and its checkpoints listed
    (refused without `resume`, as is an exact run's cached features or graph — for gd with `resume` too:
    `_refuse_unasked_cache`), the images'
    content digests taken — all before the backbone loads. With several
    processes, `same` (the run's settings) and the images listed must be every process's (`layout.same_everywhere`,
    before anything is read). The lock is released here when a check fails; otherwise the caller releases it
    (`Folder.lock`)."""
    if not os.path.isdir(folder):
        raise InputError(folder, "no such folder", "pass a folder of .jpg/.jpeg/.png/.webp images")
    inputs.check_out(folder, out)
    lock = _lock_out(out)
    made_out = lock is not None and lock.made       # only process 0 removes what a failed run leaves
    try:
        ckdir = os.path.abspath(os.path.join(out, checkpoint.FOLDER))
        done = checkpoint.steps(ckdir)
        if done and not resume:
            checkpoint.refuse_unasked_resume(out, done)
        if not resume or not exact:     # a gd run, resumed or not, would replace an exact run's results beside
            _refuse_unasked_cache(out, ckdir, exact)        # its cache (a gd run never writes one)
        files, ignored = F.scan(folder, exclude=inputs.written(out))
        inputs.check_files(folder, files, out)
        same_everywhere({**(same or {}), "files": list(files)})
        found, why = F.first_readable(folder, files)
        if found is None:
            raise inputs.no_images(folder, files, why)
        digests = checkpoint.file_digests(folder, files)
    except BaseException:
        if lock is not None:
            lock.release(remove_empty=True)
        raise
    return Folder(folder, os.path.abspath(folder), files, ignored, out, ckdir, done, digests, made_out, lock)


def _lock_out(out: str):
    """OUT locked for this run (`files.FolderLock`, made when missing) by process 0 — the process that writes —
    and its verdict shared with the other processes (a collective: every process calls it), so that all of them
    go on or all raise the same `InputError`. Returns the lock (None on processes other than 0)."""
    from spectral_jax import files

    lock, err = None, None
    if jax.process_index() == 0:
        try:
            lock = files.FolderLock(out, "another spectral-jax dataset run",
                                    "wait for it to finish, or choose another --out")
        except InputError as e:
            err = e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        text = json.dumps(None if err is None else [err.what, err.problem, err.fix]).encode()[:4095]
        buf = np.zeros(4096, np.uint8)
        buf[:len(text)] = np.frombuffer(text, np.uint8)
        got = np.asarray(multihost_utils.broadcast_one_to_all(buf))
        said = json.loads(got.tobytes().rstrip(b"\0").decode(errors="replace") or "null")
        if said is not None and err is None:
            err = InputError(*said)
    if err is not None:
        raise err
    if lock is not None:            # what an export killed outright left (`files.OutputFile`'s staging): no run
        files.sweep(out, (".png", ".npz", ".json"))      # holds it, and none other writes here now
    return lock


def _check_table_weight(settings: Settings, geom) -> None:
    """Layer weights given as numbers must put some weight on the table's grid (the finest tapped, `geom.base`):
    the groups on coarser grids see the table pooled, so without a layer on it the problem has no unique solution
    there (the resampling metric B is singular). One `InputError` before the backbone runs. (A rule's weights are
    read from the graphs; where one leaves the finest grid without weight the solve moves to the finest grid that
    has some, `whole.solve`.)"""
    lw = settings.layer_weights
    if lw is None or lw.rule is not None:
        return
    layers = sorted(l for _, ls in geom.groups for l in ls)
    w = dict(zip(layers, lw.resolve(layers, what="--layer-weights")))
    on_base = [l for grid, ls in geom.groups if tuple(grid) == tuple(geom.base) for l in ls]
    if not any(w[l] > 0 for l in on_base):
        raise InputError("--layer-weights", f"put no weight on the layers of the table's grid {geom.base[0]}×"
                         f"{geom.base[1]} (layers {','.join(map(str, on_base))}), the finest tapped one",
                         "give one of them a weight > 0, or leave them out of --layers")


def _load_backbone(settings: Settings):
    """`models.load_backbone(model, weights, **settings.load_options())`: the family's load options
    (`Settings.model_options`; for diffusion models the timesteps — default `DEFAULT_NUM_TIMESTEPS` drawn from the
    run's seed over [0, `DEFAULT_T_MAX`] —, latent, text embedding, and the run's seed as the noise seed)."""
    from spectral_jax import models

    return models.load_backbone(settings.model, settings.weights, **settings.load_options())


def _lr_history(lr: float, ran: list | None, start: int, total: int) -> list[list]:
    """[[first step, lr], ...] the run's steps ran and will run at: `ran`, the checkpoint's (`checkpoint.lr_history`;
    None for a new run) and, where steps remain to run at another lr than its last (a resume at a lowered --lr
    after a divergence), [start, `lr`] after it — said in one line on process 0."""
    if ran is None:
        return [[0, lr]]
    lrs = ran
    if start < total and lrs[-1][1] != lr:
        if jax.process_index() == 0:
            _say(f"spectral-jax dataset: resuming after step {start}: steps {start + 1} on run at lr {lr:g}, steps "
                 f"{lrs[-1][0] + 1}–{start} ran at lr {lrs[-1][1]:g} (summary.json's lr_history records each)")
        lrs = [*lrs, [start, lr]]
    return lrs


def _backbone_record(backbone, layers_name: str, settings: Settings) -> dict:
    """The summary's backbone fields: model, weights, layers, the recipe (if any) and, for diffusion backbones,
    "timesteps" the run used
    (resolved: the default schedule drawn from the seed shows its values) and "model_options" as given (the noise
    seed is the summary's "seed") and "timestep_draw"; with `timestep_draw="fresh"` "timesteps" is None (each step
    drew its own), "timesteps_per_step" and "timestep_range" say how, and "model_options" leave out the timesteps
    the backbone was loaded with (only their count is read: no step ran them)."""
    out = {"model": backbone.name, "weights": backbone.weights, "layers": layers_name}
    steps = tuple(getattr(backbone, "timesteps", ()) or ())
    if steps:
        out.update(timesteps=[int(t) for t in steps], model_options=settings.options_json(),
                   timestep_draw=settings.timestep_draw)
    if steps and settings.timestep_draw == "fresh":
        out.update(timesteps=None, timesteps_per_step=len(steps), timestep_range=[0, settings.t_max],
                   model_options={k: v for k, v in out["model_options"].items() if k != "timesteps"})
    if settings.recipe is not None:
        out["recipe"] = settings.recipe
    return out


def _batch_spec(mesh: Mesh, b: int, size: tuple[int, int]):
    """Abstract (x `[B, H, W, 3]` sharded by image, idx `[B]` replicated, valid `[B]` sharded)."""
    rep, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))
    return (jax.ShapeDtypeStruct((b, *size, 3), jnp.float32, sharding=rows),
            jax.ShapeDtypeStruct((b,), jnp.int32, sharding=rep),
            jax.ShapeDtypeStruct((b,), jnp.bool_, sharding=rows))


def _train(where: Folder, settings: Settings, geom, mesh: Mesh, backbone, compiled, abstract, fp: dict, lrs: list,
           start: int, total: int, per_epoch: int, t_start: float, progress: bool) -> Trained:
    """Steps `start` … `total` − 1: read each batch ahead (`folder.Prefetcher`), step, checkpoint every
    `checkpoint_every` steps (with `lrs`, `_lr_history`) and at the end. A failure before the first checkpoint
    removes what the run made."""
    made_out, made_ck = where.made_out, not os.path.exists(where.ckdir)
    ckpt = checkpoint.Checkpoints(where.ckdir)
    history, seconds_before = [], 0.0
    if where.done:
        try:                                            # a damaged checkpoint: one line, OUT left as it is
            state, history, seconds_before = ckpt.restore(where.done[-1], abstract, len(where.files))
        except BaseException:
            ckpt.close()
            raise
    else:
        state = step.init_state(settings, geom, mesh)
    params = jax.tree.map(lambda a: global_array(mesh, P(), np.asarray(a), np.shape(a)), backbone.params)
    b, hw, pre = settings.batch_size, geom.size, backbone.preprocess
    slots = local_slots(NamedSharding(mesh, P(AXIS)), b)
    failed: dict[int, str] = {}

    def produce(s):
        idx = batch_indices(settings.seed, s, len(where.files), b)
        x, ok, bad = F.read_slots(where.root, where.files, idx[slots], hw, pre)
        return idx, x, ok, bad

    bar = _bar(progress, total, start)
    t_loop = time.perf_counter()
    steps_run, last_saved = 0, (where.done[-1] if where.done else None)
    finished = unreadable = linked = False
    try:
        with F.Prefetcher(produce, range(start, total), depth=settings.prefetch) as batches:
            for s, (idx, x, ok, bad) in batches:
                failed.update(bad)                      # reported once each at the export (`_report_skipped`)
                state, m, nonfinite = compiled(state, params, global_array(mesh, P(AXIS), x, (b, *hw, 3)),
                                               global_array(mesh, P(), idx, (b,)),
                                               global_array(mesh, P(AXIS), ok, (b,)))
                failed.update({int(i): nonfinite_reason(backbone.name, int(layer))
                               for i, layer in zip(idx, gather(nonfinite)) if i >= 0 and layer >= 0})
                m = step.Metrics(*(float(np.asarray(gather(v))) for v in m))
                if not np.isfinite([m.loss_first, m.loss, m.objective]).all():      # replicated: every process
                    raise _diverged(settings, geom, s, "loss", last_saved, where.ckdir,
                                    graphs=s == 0 and not np.isfinite(m.loss_first))
                history.append([round(m.loss_first, 7), round(m.loss, 7), round(m.objective, 7), int(m.images)])
                linked = linked or m.links > 0
                steps_run += 1
                if bar is not None:
                    bar.set_postfix_str(f"epoch {s // per_epoch + 1}/{settings.epochs} loss {m.loss:.4f}")
                    bar.update(1)
                if s + 1 == per_epoch and not any(h[3] for h in history[:per_epoch]):
                    unreadable = True                   # a whole epoch without one readable image: stop here
                    break
                if s + 1 == per_epoch and start == 0 and not linked:
                    break                               # a whole epoch without an edge between two tokens
                if (s + 1) % settings.checkpoint_every == 0 or s + 1 == total:
                    try:
                        ckpt.save(s + 1, state, fp, history, seconds_before + time.perf_counter() - t_start, lrs)
                    except checkpoint.NonFinite:
                        raise _diverged(settings, geom, s, "state", last_saved, where.ckdir) from None
                    last_saved = s + 1
        ckpt.wait()
        finished = True
    finally:
        if bar is not None:
            bar.close()
        ckpt.close()
        if not finished and last_saved is None:         # failed before the first checkpoint: leave nothing behind
            inputs.discard(where.out if made_out else where.ckdir if made_ck else None, jax.process_index())
    trained = Trained(state, history, steps_run, failed, time.perf_counter() - t_loop, seconds_before, lrs)
    if unreadable or not (gather(state.status)[:len(where.files)] == step.READ).any():
        # no image was ever read: the checkpoints hold nothing worth resuming, and would block the next run
        inputs.discard(where.out if made_out else where.ckdir, jax.process_index())
        first = next(iter(sorted(failed.items())), None)
        raise inputs.no_images(where.folder, where.files,
                               f"{where.files[first[0]]}: {first[1]}" if first else
                               F.first_readable(where.root, where.files[:1])[1]
                               or f"{where.files[0]}: could not be read during the run")
    if start == 0 and not linked:                   # no graph had an edge: nothing to solve, as exact refuses it
        inputs.discard(where.out if made_out else where.ckdir, jax.process_index())
        raise whole.no_edge(settings.min_cos, "lower --min-cos (-1 keeps every neighbour found)")
    return trained


def _diverged(settings: Settings, geom, s: int, what: str, kept: int | None, ckdir: str,
              graphs: bool = False) -> InputError:
    """The error of a run whose step `s` (0-based) left float32 (`what`: its "loss", or the "state" a checkpoint
    would have held): lr too large — or, at the run's first step before any update (`graphs`), the graphs. kept:
    the last checkpoint written (its steps stay, finite: a resume at a lower lr goes on from it)."""
    if graphs:
        return InputError("graphs", "the loss at the run's first step, before any update, is not finite: the "
                          "batch's graphs hold NaN or Inf (features not finite?), not a learning-rate problem",
                          "check the images and the backbone (--model, --weights), or use --method exact")
    default = step.learning_rate(settings.replace(lr=None), geom)
    return InputError(f"dataset gd-{settings.preset}",
                      f"diverged: the {what} left float32 (NaN or Inf) at step {s + 1} at lr "
                      f"{step.learning_rate(settings, geom):g}",
                      f"lower --lr (the preset's default is {default:.2g})" +
                      ("" if kept is None else f" and pass --resume to go on from step {kept}, the last checkpoint "
                       f"(finite), or delete {ckdir} to start over") + ", or use --method exact" +
                      ("" if kept is None else " into a fresh --out"))


def _export(where: Folder, settings: Settings, geom, backbone, layers_name: str, trained: Trained, per_epoch: int,
            t_start: float, compile_s: float) -> DatasetResult:
    """The debiased EMA table → `DatasetResult` (+ summary); process 0 writes OUT (`export.write`). Every process
    takes part in the gathers."""
    steps_now = int(np.asarray(gather(trained.state.step)))
    if steps_now == 0:
        raise InputError(where.out, "has no steps to export", "run at least one epoch")
    n = len(where.files)
    ema = gather(trained.state.ema)[:n]
    status = gather(trained.state.status)[:n]
    table = ema / (1.0 - settings.ema ** steps_now) if settings.ema > 0 else ema
    ok = status == step.READ
    names = [f for f, g in zip(where.files, ok) if g]
    eigvecs, probs = export.table_arrays(settings.preset, table[ok])
    saturated = spread = None
    if settings.preset == "paper" and ok.any():     # the read images' maps: padded and unread ones left out
        from spectral_jax.solvers.gd import saturation, spread as spread_of

        saturated, spread = saturation(probs), spread_of(probs)
    verdict = summary.gd_verdict(trained.history, per_epoch, saturated=saturated, spread=spread,
                                 since=trained.lrs[-1][0])
    weights = step.layer_weights_record(settings, geom)
    t = time.perf_counter()
    res = DatasetResult.from_table(eigvecs, names, table[ok], probs, summary.make(
        settings, geom,
        summary.Progress(trained.history, steps_now, trained.steps_run, where.done[-1] if where.done else None,
                         per_epoch),
        summary.Timings(t - t_start, trained.seconds_before + t - t_start, trained.seconds, compile_s),
        backbone=_backbone_record(backbone, layers_name, settings),
        lrs=trained.lrs, names=names, files=where.files,
        skipped=_skipped(where, status, trained.failed, backbone.preprocess, geom.size), ignored=where.ignored,
        machine={"devices": geom.devices, "processes": jax.process_count(), "backend": jax.default_backend()},
        folder=where.root, convergence=verdict.convergence, layer_weights=weights), where.out,
        convergence=verdict.convergence,
        provenance=_provenance(settings, geom, backbone, weights, settings.batch_size, None, len(names)))
    if jax.process_index() == 0:
        _report_skipped(res.summary()["skipped"])
        _warn_unconverged(verdict)
        res = export.write(res, where.root, settings.figure_images)
    return res


def _warn_unconverged(verdict: summary.GdVerdict) -> None:
    """A RuntimeWarning (one line: why and the fix, as `summary.gd_verdict` decided them) when the minibatch run has
    not converged; nothing when it has."""
    if verdict.why is not None:
        warnings.warn(f"dataset gd: not converged after {verdict.convergence.iterations} steps: {verdict.why}; "
                      f"{verdict.fix}, or use --method exact", RuntimeWarning, stacklevel=4)


def _provenance(settings: Settings, geom, backbone, layer_weights: dict | None, images: int, graph_info: dict | None,
                num_images: int):
    """What the dataset's eigenvectors were solved on (`solvers.result.Provenance`): the graph kind, the tapped
    layers, each layer's weight as the run used it (layer_weights: {"rule", "weights": {layer: w}} — exact's
    `solved.layer_weights`, gd's `step.layer_weights_record` —, the same row for each of `num_images`; None where
    it did not say), the backbone's timesteps (none with `timestep_draw="fresh"`: every step drew its own, as the
    summary's "timestep_draw" and "timestep_range" say) and the graph's options: graph_options the ones a
    `GraphSpec` of the kind reads (k_intra, k_inter as asked — the default filled in —, min_cos, graph_dtype: the
    features dtype; "edge_weights" too where they are not the cosine), graph_record how the graph was built as
    summary.json says it ("k_used" per layer group after the caps for graphs of `images` images — the whole
    dataset's for exact, a batch's for gd —, "edge_weights", "knn_search": graph_info's, `whole.graph_report`; for
    gd, whose batches are searched exactly, and a graph cached before that record existed: the settings')."""
    from spectral_jax.solvers.result import Provenance

    tapped = sorted(l for _, ls in geom.groups for l in ls)
    used = None if layer_weights is None else layer_weights["weights"]
    rows = None if used is None else np.tile([[float(used[str(l)]) for l in tapped]], (num_images, 1))
    k_intra, k_inter = settings.k
    options = {"k_intra": k_intra, "k_inter": k_inter, "min_cos": settings.min_cos,
               "graph_dtype": settings.features_dtype}
    if settings.edge_weights != "cosine":      # not a graph a GraphSpec builds: attribution must not take it for one
        options["edge_weights"] = settings.edge_weights
    info = graph_info or {}
    record = {"k_used": geom.k_used(images),
              "edge_weights": info.get("edge_weights", {"kind": settings.edge_weights}),
              "knn_search": info.get("knn_search", {"asked": settings.search, "used": "exact", "recall_min": 1.0})}
    steps = () if settings.timestep_draw == "fresh" else tuple(getattr(backbone, "timesteps", ()) or ())
    return Provenance(settings.graph, tapped, rows, steps, options, record)


def _cached(ckdir: str) -> list[str]:
    """What OUT/checkpoints (`ckdir`) holds of an exact run's cache: "features" (finished shards), "graph"."""
    from spectral_jax.dataset import store

    return (["features"] if store.finished(ckdir) else []) + (
        ["graph"] if os.path.isfile(os.path.join(ckdir, whole.GRAPH)) else [])


def _refuse_unasked_cache(out: str, ckdir: str, exact: bool) -> None:
    """OUT holds an exact run's cached features or graph and --resume was not given (or the run is gd): say how to
    go on — for an exact run, --resume reuses them; a gd run cannot, with or without --resume (it would replace
    that run's results beside its cache)."""
    cache = _cached(ckdir)
    if cache:
        ck = os.path.join(out, checkpoint.FOLDER)
        raise InputError(out, f"holds the cached {' and '.join(cache)} of an earlier {'' if exact else 'exact '}run",
                         f"pass --resume to reuse them (or re-export), delete {ck} to start over, or choose another "
                         "--out" if exact else f"delete {ck} to start over, or choose another --out")


def _run_exact(where: Folder, settings: Settings, geom, backbone, layers, layers_name: str, fp: dict, mesh: Mesh,
               t_start: float, progress: bool) -> DatasetResult:
    """method="exact" (`whole.solve`): the memory estimate checked first (`memory.check`: refused in one line before
    anything is written), features (a shard per batch, `store`) and graph cached in OUT/checkpoints, then the exact
    solve and the export. A run that fails before its first shard leaves nothing behind."""
    from spectral_jax.dataset import memory, store

    cache = _cached(where.ckdir)             # refused without `resume` before the backbone loaded (`_open_folder`)
    made_out, made_ck = where.made_out, not os.path.exists(where.ckdir)
    estimate = memory.check(memory.estimate_run(backbone, layers, settings, geom, mesh, jax.process_count()))
    bar = _bar(progress, len(where.files), 0)
    finished = False
    try:
        solved = whole.solve(backbone, layers, settings, geom, where.root, where.files, where.ckdir, fp, mesh,
                             settings.layer_weights, bar)
        finished = True
    finally:
        if bar is not None:
            bar.close()
        if not finished and not cache and not store.finished(where.ckdir):
            inputs.discard(where.out if made_out else where.ckdir if made_ck else None, jax.process_index())
    n = len(where.files)
    ok = solved.valid[:n]
    if solved.result is None:
        inputs.discard(where.out if made_out else where.ckdir if made_ck else None, jax.process_index())
        first = next(iter(sorted(solved.failed.items())), None)
        raise inputs.no_images(where.folder, where.files, f"{where.files[first[0]]}: {first[1]}" if first
                               else f"{where.files[0]}: could not be read during the run")
    from spectral_jax.dataset.whole import padded_images

    res = dataclasses.replace(solved.result, provenance=_provenance(
        settings, geom, backbone, solved.layer_weights, padded_images(geom.num_images, geom.devices),
        solved.graph_info, solved.result.num_images))
    geom = dataclasses.replace(geom, base=tuple(res.eigvecs.shape[2:]))     # a rule may move it (`whole.solve`)
    names = [f for f, g in zip(where.files, ok) if g]
    skipped = [{"file": where.files[i], "reason": solved.failed.get(i, "could not be read during the run")}
               for i in np.flatnonzero(~ok)]
    out = DatasetResult.from_solve(res.select(np.flatnonzero(ok)), names, summary.make_exact(
        settings, geom, res, solved, time.perf_counter() - t_start,
        backbone=_backbone_record(backbone, layers_name, settings),
        names=names, files=where.files, skipped=skipped, ignored=where.ignored,
        machine={"devices": geom.devices, "processes": jax.process_count(), "backend": jax.default_backend()},
        folder=where.root, memory=estimate), where.out)
    if jax.process_index() == 0:
        _report_skipped(skipped)
        out = export.write(out, where.root, settings.figure_images)
    return out



def _skipped(where: Folder, status: np.ndarray, failed: dict, pre, size) -> list[dict]:
    """[{"file", "reason"}] of the images left out: unreadable, or whose taps held NaN or Inf (`step.NONFINITE`),
    the reason read again where this process did not see the failure (another process's slot, or an earlier
    run's)."""
    out = []
    for i in np.flatnonzero((status == step.UNREADABLE) | (status == step.NONFINITE)):
        why = failed.get(int(i))
        if why is None and status[i] == step.NONFINITE:
            why = "the backbone gave NaN or Inf for it (in an earlier run of this OUT)"
        elif why is None:
            try:
                F.read_image(os.path.join(where.root, where.files[i]), size, pre)
                why = "could not be read during the run"
            except InputError as e:
                why = e.problem
        out.append({"file": where.files[i], "reason": why})
    return out


def _report_skipped(skipped: list[dict]) -> None:
    """One stderr line per skipped image, once, from the list summary.json gets (so the two agree, whichever
    process or earlier run of a resumed OUT met the image)."""
    for d in skipped:
        _say(f"spectral-jax dataset: skipping {d['file']}: {d['reason']}")


def _bar(progress: bool, total: int, start: int):
    if not progress or jax.process_index() != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=min(start, total), desc="dataset", unit="batch", leave=False, disable=None)


def _say(msg: str) -> None:
    try:
        from tqdm.auto import tqdm

        tqdm.write(msg, file=sys.stderr)
    except ImportError:  # pragma: no cover
        print(msg, file=sys.stderr)


__all__ = ["run"]
