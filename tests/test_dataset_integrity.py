"""Nothing lost at dataset level: one run per OUT, --resume only onto the same images, damaged checkpoints refused.

1. Two runs into one OUT: the second is refused at once (one line naming the first run's pid, exit 2) and OUT holds
   the first run's files only; a killed holder leaves no stale lock; several processes of one run agree (no hang).
2. --resume after an image was replaced, edited in place (its mtime kept), added or removed: refused in one line
   naming the file, OUT untouched — the cached graph of other pictures is never reused. A touched or copied folder
   (same bytes) still resumes.
3. Damaged caches (exact: truncated or CRC-broken npz and feature shards, neighbour indices out of range, NaN,
   wrong row counts) and
   checkpoints (gd: flipped bytes in orbax's state, a meta of `{"config": 5}`, a deleted state/): one `InputError`
   naming the file and a fresh run as the fix, OUT left byte for byte as it was.

`dataset.run` cases use the synthetic backbone of test_dataset (32×32 inputs → a 4×4 grid); CLI cases the installed
console script with the tiny random-weight DINOv2-S at 28×28 of test_dataset_badinput.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile

import numpy as np
import pytest

from spectral_jax import dataset, files
from test_dataset import CHILD_HEAD, SMALL, _env, _free_port, make_folder
from test_dataset_badinput import EXT, TINY, _cli, _one_line_exit_2, _tree
from test_dataset_exact import EXACT

GD = dict(SMALL, epochs=2, checkpoint_every=2)          # 6 images, batches of 4: checkpoints at steps 2 and 4
_GD_ONLY = {"--epochs": 1, "--inner-steps": 1, "--lr": 1, "--ema": 1, "--checkpoint-every": 1, "--preset": 1}


def _exact_args(args):
    """TINY for --method exact: the gd-only flags (and their values) dropped, which exact refuses."""
    out, skip = [], 0
    for a in args:
        if skip:
            skip -= 1
        elif a in _GD_ONLY:
            skip = _GD_ONLY[a]
        else:
            out.append("exact" if a == "gd" else a)
    return out


EXACT_TINY = _exact_args(TINY)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """imgs/ (6 PNGs), exact/ (a finished exact run: features/ shards, graph.npz) and gd/ (a finished gd run,
    checkpoints 2 and 4) of the synthetic backbone; copied by each test before it changes anything."""
    root = tmp_path_factory.mktemp("made")
    imgs = make_folder(str(root / "imgs"), 6)
    exact = dataset.run(imgs, str(root / "exact"), backbone=EXT, **EXACT)
    gd = dataset.run(imgs, str(root / "gd"), backbone=EXT, **GD)
    return root, exact, gd


def _copy(made, tmp_path, *names):
    root = made[0]
    for name in names:
        shutil.copytree(root / name, tmp_path / name, symlinks=True)
    return [str(tmp_path / name) for name in names]


# ------------------------------------------------------------------------------------------------- 1. one run per OUT


HOLDER = """
import sys, time
from spectral_jax import files
lock = files.FolderLock(sys.argv[1], "another spectral-jax dataset run", "wait")
print("locked", flush=True)
time.sleep(600)
"""


def _hold(out):
    """A process holding OUT's lock (as a run does) until killed."""
    p = subprocess.Popen([sys.executable, "-c", HOLDER, out], env=_env(), stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_out_in_use_is_refused_with_the_pid_and_a_killed_holder_leaves_no_lock(made, tmp_path):
    imgs, = _copy(made, tmp_path, "imgs")
    out = str(tmp_path / "out")
    holder = _hold(out)
    try:
        before = _tree(out)
        with pytest.raises(dataset.InputError, match=rf"is in use by another spectral-jax dataset run "
                                                     rf"\(pid {holder.pid}\) — wait for it to finish, or choose"):
            dataset.run(imgs, out, backbone=EXT, **EXACT)
        assert _tree(out) == before                                 # nothing written into the holder's folder
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    res = dataset.run(imgs, out, backbone=EXT, **EXACT)             # the kernel dropped the killed holder's lock
    np.testing.assert_array_equal(res.eigvecs, made[1].eigvecs)
    res = dataset.run(imgs, out, backbone=EXT, resume=True, **EXACT)    # and a run releases its own on return
    assert res.summary()["cached"] == ["graph"]


def test_run_refused_after_locking_a_new_out_removes_it_and_unlocks(made, tmp_path):
    """A run refused by a check after OUT was locked (and made) removes the folder it made and frees the lock."""
    imgs, = _copy(made, tmp_path, "imgs")
    out = tmp_path / "new" / "out"
    with pytest.raises(dataset.InputError, match="--num-eigs"):
        dataset.run(imgs, str(out), backbone=EXT, **{**EXACT, "num_eigs": 96})
    assert not (tmp_path / "new").exists()
    with files.FolderLock(str(out), "x", "y") as lock:               # nobody holds it any more
        assert lock.locked


SLOW_CLI = """
import os, sys, time
from spectral_jax import folder as F
from spectral_jax.cli import main
read = F.read_slots
def read_slots(*a, **k):            # the run holds OUT (it is reading images) until the test says go
    open(sys.argv[1], "w").close()
    t = time.time()
    while not os.path.exists(sys.argv[2]) and time.time() - t < 300:
        time.sleep(0.05)
    return read(*a, **k)
F.read_slots = read_slots
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("method", ["exact", "gd"])
def test_two_cli_runs_into_one_out(tmp_path, method):
    """Run A (3 images) is reading its images; run B (4 other images, the console script) into the same OUT exits 2
    with one line naming A's pid, before any work; A then finishes, and OUT holds A's files only, consistent."""
    a_imgs = make_folder(str(tmp_path / "a"), 3)
    b_imgs = make_folder(str(tmp_path / "b"), 4, seed=7)
    out = str(tmp_path / "out")
    args = EXACT_TINY if method == "exact" else TINY
    reading, go = str(tmp_path / "reading"), str(tmp_path / "go")
    a = subprocess.Popen([sys.executable, "-c", SLOW_CLI, reading, go, "dataset", a_imgs, *args, "--out", out],
                         env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not os.path.exists(reading) and a.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert os.path.exists(reading), a.communicate()[1][-3000:]
        before = _tree(out)
        b = _cli(b_imgs, *args, "--out", out)
        _one_line_exit_2(b, out, f"is in use by another spectral-jax dataset run (pid {a.pid})", "choose another --out")
        assert _tree(out) == before
        open(go, "w").close()
        stdout, stderr = a.communicate(timeout=300)
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
    assert a.returncode == 0, stderr[-3000:]
    assert json.loads(stdout.splitlines()[-1])["images"] == 3
    res = dataset.load_result(out)
    mine = [f"img{i:03d}.png" for i in range(3)]
    assert res.names == mine and res.eigvecs.shape[0] == 3 and res.summary()["images"] == 3
    assert res.summary()["folder"] == os.path.abspath(a_imgs)
    ck = os.path.join(out, "checkpoints")
    if method == "exact":
        assert sorted(os.listdir(ck)) == ["features", "graph.npz"]
        keys = [json.loads(str(np.load(os.path.join(ck, "graph.npz"))["key"]))] + [
            json.load(open(os.path.join(ck, "features", d, "meta.json")))["key"] for d in os.listdir(
                os.path.join(ck, "features"))]
    else:
        keys = [json.load(open(os.path.join(ck, s, "meta", "metadata")))["config"] for s in os.listdir(ck)]
        assert sorted(os.listdir(ck)) == ["2"]                                          # 1 epoch of 2 batches
    assert keys and all(sorted(k["files"]) == mine and k["num_images"] == 3 for k in keys)


def test_two_processes_agree_that_out_is_in_use(made, tmp_path):
    """A run of two processes (jax.distributed on localhost) into a locked OUT: process 0 finds the lock taken,
    and both processes raise the same InputError at once instead of one waiting for the other forever."""
    imgs, = _copy(made, tmp_path, "imgs")
    out = str(tmp_path / "out")
    holder = _hold(out)
    port, procs = _free_port(), []
    try:
        for i in range(2):
            child = textwrap.dedent(f"""
                import jax
                jax.distributed.initialize(coordinator_address="127.0.0.1:{port}", num_processes=2, process_id={i})
            """) + CHILD_HEAD + textwrap.dedent(f"""
                try:
                    dataset.run({imgs!r}, {out!r}, backbone=synthetic(), **{{**SMALL, "method": "exact"}})
                except dataset.InputError as e:
                    print("REFUSED", e)
            """)
            procs.append(subprocess.Popen([sys.executable, "-c", child], env=_env(), stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs + [holder]:
            if p.poll() is None:
                p.kill()
                p.wait()
    said = f"REFUSED {out}: is in use by another spectral-jax dataset run (pid {holder.pid})"
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0 and said in o, (o, e[-3000:])
    assert os.listdir(out) == []


# ------------------------------------------------------------------------------------------------- 2. same images


def _replace(folder, name):
    """`name` gets another picture's bytes (a new mtime)."""
    make_folder(os.path.join(folder, ".other"), 1, seed=3)
    os.replace(os.path.join(folder, ".other", "img000.png"), os.path.join(folder, name))
    os.rmdir(os.path.join(folder, ".other"))


def _edit_in_place(folder, name):
    """One pixel of `name` changed, written over the same file, its mtime put back."""
    from PIL import Image

    path = os.path.join(folder, name)
    st = os.stat(path)
    a = np.asarray(Image.open(path)).copy()
    a[0, 0] = 255 - a[0, 0]
    Image.fromarray(a).save(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_mtime_ns == st.st_mtime_ns


CHANGES = {
    "replaced": (lambda f: _replace(f, "img002.png"), "img002.png changed since"),
    "edited-in-place": (lambda f: _edit_in_place(f, "img004.png"), "img004.png changed since"),
    "added": (lambda f: make_folder(os.path.join(f, "sub"), 1, seed=5), "1 added (sub/img000.png)"),
    "removed": (lambda f: os.remove(os.path.join(f, "img001.png")), "1 removed (img001.png)"),
}


@pytest.mark.parametrize("method", ["exact", "gd"])
@pytest.mark.parametrize("change", sorted(CHANGES))
def test_resume_onto_other_images_is_refused(made, tmp_path, method, change):
    imgs, out = _copy(made, tmp_path, "imgs", method)
    before = _tree(out)
    CHANGES[change][0](imgs)
    kw = EXACT if method == "exact" else GD
    with pytest.raises(dataset.InputError, match=rf"was made from other images: .*{re.escape(CHANGES[change][1])}"
                                                 ".* — run without --resume into a fresh --out"):
        dataset.run(imgs, out, backbone=EXT, resume=True, **kw)
    assert _tree(out) == before
    if change == "replaced":            # what the refusal protects: the result of these images is another one
        fresh = dataset.run(imgs, str(tmp_path / "fresh"), backbone=EXT, **kw)
        assert not np.allclose(fresh.eigvecs, made[1 if method == "exact" else 2].eigvecs, atol=1e-3)


def test_resume_depends_on_the_bytes_not_on_times_or_the_folder(made, tmp_path):
    """Touched images and a copy of the folder elsewhere (the same bytes under the same names) resume from the
    cache (exact) and the checkpoint (gd) to the same result."""
    imgs, exact, gd = _copy(made, tmp_path, "imgs", "exact", "gd")
    moved = shutil.copytree(imgs, str(tmp_path / "elsewhere"))
    for name in os.listdir(moved):
        os.utime(os.path.join(moved, name), ns=(1, 10 ** 18))
    again = dataset.run(moved, exact, backbone=EXT, resume=True, **EXACT)
    assert again.summary()["cached"] == ["graph"]
    np.testing.assert_array_equal(again.eigvecs, made[1].eigvecs)
    more = dataset.run(moved, gd, backbone=EXT, resume=True, **{**GD, "epochs": 3})
    assert more.summary()["resumed_from"] == 4 and more.summary()["steps"] == 6


def test_cli_resume_after_an_image_edited_in_place_is_refused(tmp_path):
    imgs = make_folder(str(tmp_path / "imgs"), 3)
    out = str(tmp_path / "out")
    first = _cli(imgs, *TINY, "--out", out)
    assert first.returncode == 0, first.stderr[-3000:]
    before = _tree(out)
    _edit_in_place(imgs, "img001.png")
    _one_line_exit_2(_cli(imgs, *TINY, "--out", out, "--resume"), out, "other images", "img001.png changed",
                     "without --resume")
    assert _tree(out) == before


# ------------------------------------------------------------------------------------------------- 3. damage


def _rewrite(path, change):
    """The npz at `path` rewritten with `change(arrays)` applied (its key kept unless changed)."""
    with np.load(path) as f:
        d = {k: f[k] for k in f.files}
    change(d)
    with open(path, "wb") as f:
        np.savez(f, **d)


def _flip_member_byte(path, member):
    """One byte inside the stored data of `member` flipped: the zip's CRC-32 no longer matches."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = np.frombuffer(f.read(4), "<u2")
        at = info.header_offset + 30 + int(name_len) + int(extra_len) + info.compress_size - 3
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0xFF]))


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _set(name, index, value):
    def change(d):
        d[name] = d[name].copy()
        d[name][index] = value
    return change


SHARD = "features/images-000000000-000000004"          # the first batch's shard (6 images, batches of 4)
EXACT_DAMAGE = {      # (file, damage, what the line says): the line names the file, or the shard holding it
    "graph-truncated": ("graph.npz", _truncate, "unreadable"),
    "graph-crc": ("graph.npz", lambda p: _flip_member_byte(p, "idx0.npy"), "unreadable: BadZipFile"),
    "graph-not-a-zip": ("graph.npz", lambda p: open(p, "wb").write(b"not a zip"), "unreadable"),
    "idx-huge": ("graph.npz", lambda p: _rewrite(p, _set("idx0", (0, 5, 1), 10 ** 6)), "outside [0, 96)"),
    "idx-negative": ("graph.npz", lambda p: _rewrite(p, _set("idx0", (1, 7, 0), -5)), "outside [0, 96)"),
    "w-nan": ("graph.npz", lambda p: _rewrite(p, _set("w0", (0, 3, 2), np.nan)), "w0 holds weights"),
    "deg-changed": ("graph.npz", lambda p: _rewrite(p, lambda d: d.update(deg0=d["deg0"] * np.float32(1.5))),
                    "deg0 is not the degree"),
    "idx-rows": ("graph.npz", lambda p: _rewrite(p, lambda d: d.update(idx0=d["idx0"][:, :-16])), "idx0 is not"),
    "valid-rows": ("graph.npz", lambda p: _rewrite(p, lambda d: d.update(valid=d["valid"][:-1])), "valid is not"),
    "key-not-object": ("graph.npz", lambda p: _rewrite(p, lambda d: d.update(key=np.array("5"))),
                       "key is not an object"),
    "features-truncated": (f"{SHARD}/a0.npy", _truncate, "a0.npy unreadable"),
    "features-flipped": (f"{SHARD}/a0.npy", lambda p: _flip(p, os.path.getsize(p) - 3),
                         "changed since it was written"),
    "features-nan": (f"{SHARD}/a0.npy", lambda p: _npy_set(p, (1, 2, 3), np.inf), "a0.npy holds NaN"),
    "features-rows": (f"{SHARD}/b0.npy", lambda p: _npy_replace(p, lambda x: x[:, :50]), "b0.npy is float32"),
    "features-no-b": (f"{SHARD}/b0.npy", os.remove, "b0.npy unreadable"),
    "features-meta": (f"{SHARD}/meta.json", _truncate, "unreadable meta.json"),
}


def _npy_set(path, index, value):
    """One value of the .npy at `path` changed, its CRC in the shard's meta.json updated (so that the value check,
    not the CRC, is what finds it)."""
    _npy_replace(path, lambda x: (x.__setitem__(index, value), x)[1])


def _npy_replace(path, change):
    from spectral_jax.dataset import store

    x = change(np.load(path).copy())
    np.save(path, x)
    meta_path = os.path.join(os.path.dirname(path), "meta.json")
    meta = json.load(open(meta_path))
    name = os.path.basename(path)[:-4]
    meta["arrays"][name]["crc32"] = store._crc(np.ascontiguousarray(x))
    json.dump(meta, open(meta_path, "w"))


@pytest.mark.parametrize("case", sorted(EXACT_DAMAGE))
def test_damaged_exact_cache_is_one_line_and_kept(made, tmp_path, case):
    name, damage, needle = EXACT_DAMAGE[case]
    out, = _copy(made, tmp_path, "exact")
    ck = os.path.join(out, "checkpoints")
    if name.startswith("features/"):
        os.remove(os.path.join(ck, "graph.npz"))                 # the features are read when the graph is gone
    damage(os.path.join(ck, name))
    before = _tree(out)
    with pytest.raises(dataset.InputError) as e:
        dataset.run(str(made[0] / "imgs"), out, backbone=EXT, resume=True, **EXACT)
    line = str(e.value)
    named = os.path.join(ck, SHARD if name.startswith("features/") else name)
    assert line.startswith(named + ": is damaged (") and needle in line, line
    assert "run again without --resume into a fresh --out" in line and "\n" not in line
    assert _tree(out) == before


def _flip(path, at):
    with open(path, "r+b") as f:
        f.seek(at % os.path.getsize(path))
        byte = f.read(1)[0]
        f.seek(at % os.path.getsize(path))
        f.write(bytes([byte ^ 0x01]))


def _biggest_chunk(step_dir):
    chunks = os.path.join(step_dir, "state", "ocdbt.process_0", "d")
    return max((os.path.join(chunks, c) for c in os.listdir(chunks)), key=os.path.getsize)


GD_DAMAGE = {         # damage to checkpoint 4 (of steps 2 and 4), what the line says
    "state-json-flipped": (lambda s: _flip(os.path.join(s, "state", "_METADATA"), 100), "orbax cannot read it"),
    "state-data-flipped": (lambda s: _flip(_biggest_chunk(s), os.path.getsize(_biggest_chunk(s)) // 2),
                           "bytes changed since it was saved"),          # mid-array: orbax reads it without error
    "state-deleted": (lambda s: shutil.rmtree(os.path.join(s, "state")), "orbax cannot read it: KeyError"),
    "meta-config-5": (lambda s: open(os.path.join(s, "meta", "metadata"), "w").write('{"config": 5}'),
                      "settings (\"config\")"),
    "meta-not-json": (lambda s: _truncate(os.path.join(s, "meta", "metadata")), "unreadable metadata"),
    "meta-history": (lambda s: _edit_meta(s, lambda m: m["history"].pop()), "history is not 4 rows"),
    "meta-step": (lambda s: _edit_meta(s, lambda m: m.update(step=2)), "metadata of step 2"),
}


def _edit_meta(step_dir, change):
    path = os.path.join(step_dir, "meta", "metadata")
    with open(path) as f:
        meta = json.load(f)
    change(meta)
    with open(path, "w") as f:
        json.dump(meta, f)


@pytest.mark.parametrize("case", sorted(GD_DAMAGE))
def test_damaged_gd_checkpoint_is_one_line_and_kept(made, tmp_path, case):
    damage, needle = GD_DAMAGE[case]
    out, = _copy(made, tmp_path, "gd")
    step4 = os.path.join(out, "checkpoints", "4")
    damage(step4)
    before = _tree(out)
    with pytest.raises(dataset.InputError) as e:
        dataset.run(str(made[0] / "imgs"), out, backbone=EXT, resume=True, **{**GD, "epochs": 3})
    line = str(e.value)
    assert line.startswith(step4 + ": is damaged (") and needle in line and "\n" not in line, line
    assert f"delete {step4} to resume from step 2, or run again without --resume into a fresh --out" in line, line
    assert _tree(out) == before
    if case == "state-deleted":                          # the fix the line names works
        shutil.rmtree(step4)
        res = dataset.run(str(made[0] / "imgs"), out, backbone=EXT, resume=True, **{**GD, "epochs": 3})
        assert res.summary()["resumed_from"] == 2 and res.summary()["steps"] == 6


CLI_DAMAGE = {        # the API cases above cover every kind; these show the one line and exit 2 of each method
    "exact-idx-huge": ("exact", lambda ck: _rewrite(os.path.join(ck, "graph.npz"), _set("idx0", (0, 1, 0), 10 ** 6)),
                       "graph.npz: is damaged (idx0 holds neighbours outside"),
    "gd-state-flipped": ("gd", lambda ck: _flip(os.path.join(ck, "2", "state", "_METADATA"), 100),
                         "checkpoints/2: is damaged (orbax cannot read it"),
    "gd-config-5": ("gd", lambda ck: open(os.path.join(ck, "2", "meta", "metadata"), "w").write('{"config": 5}'),
                    "checkpoints/2: is damaged (metadata without the run's settings"),
}


@pytest.fixture(scope="module")
def cli_made(tmp_path_factory):
    """imgs/ (3 PNGs) and a finished console-script run of each method on them (gd: one checkpoint, step 2)."""
    root = tmp_path_factory.mktemp("cli")
    imgs = make_folder(str(root / "imgs"), 3)
    for method, args in (("exact", EXACT_TINY), ("gd", TINY)):
        r = _cli(imgs, *args, "--out", str(root / method))
        assert r.returncode == 0, r.stderr[-3000:]
    return root


@pytest.mark.parametrize("case", sorted(CLI_DAMAGE))
def test_cli_damaged_checkpoint_one_line_exit_2(cli_made, tmp_path, case):
    method, damage, needle = CLI_DAMAGE[case]
    out = shutil.copytree(cli_made / method, tmp_path / method)
    damage(os.path.join(out, "checkpoints"))
    before = _tree(str(out))
    r = _cli(str(cli_made / "imgs"), *(EXACT_TINY if method == "exact" else TINY), "--out", str(out), "--resume")
    _one_line_exit_2(r, needle, "run again without --resume into a fresh --out")
    assert _tree(str(out)) == before


SLOW_CLEANUP = """
import asyncio, sys
from orbax.checkpoint._src.path import async_path
is_link = async_path.is_link
async def slow_is_link(p):          # orbax's clean-up of unfinished saves, on its own thread, made slow
    await asyncio.sleep(3)
    return await is_link(p)
async_path.is_link = slow_is_link
from spectral_jax.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_cli_damaged_checkpoint_waits_for_orbax_cleanup(cli_made, tmp_path):
    """A resume refused at once (state/ deleted) while orbax still removes an unfinished save's temporary folder
    in the background: the run waits for it, so no thread's traceback follows the one line."""
    out = shutil.copytree(cli_made / "gd", tmp_path / "gd")
    shutil.rmtree(out / "checkpoints" / "2" / "state")
    os.makedirs(out / "checkpoints" / "4.orbax-checkpoint-tmp-1")            # a save killed before its commit
    r = subprocess.run([sys.executable, "-c", SLOW_CLEANUP, "dataset", str(cli_made / "imgs"), *TINY, "--out",
                        str(out), "--resume"], env=_env(), capture_output=True, text=True, timeout=300)
    _one_line_exit_2(r, "checkpoints/2: is damaged", "KeyError")
    assert sorted(os.listdir(out / "checkpoints")) == ["2"]


def test_checkpoint_meta_is_the_history_at_its_step(tmp_path, monkeypatch):
    """orbax writes the meta on a thread of its own, later: the history saved must be the one at the save, not the
    list the run keeps appending to (a resume read 3 rows at step 2 and was refused as damaged)."""
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    given, json_save = [], ocp.args.JsonSave
    monkeypatch.setattr(ocp.args, "JsonSave", lambda meta: given.append(meta) or json_save(meta))
    ck = dataset.checkpoint.Checkpoints(str(tmp_path / "ck"))
    history = [[1.0, 0.5, 0.1, 4], [0.9, 0.4, 0.2, 4]]
    ck.save(2, {"x": jnp.arange(3.0)}, {"model": "m"}, history, 1.5)
    history.append([0.8, 0.3, 0.3, 2])                  # the next step's row, while the save may be in flight
    assert given[0]["history"] == history[:2]           # what orbax writes, whenever it does
    ck.wait()
    ck.close()
    meta = dataset.checkpoint.read_meta(str(tmp_path / "ck"), 2)
    assert meta["history"] == history[:2] and meta["step"] == 2
