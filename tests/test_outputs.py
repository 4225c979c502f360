"""Nothing lost, nothing wrong: outputs reserved before the work, atomic, umask permissions, never over an input,
never empty, no collisions; bad sizes and K refused before any model work. CLI cases run the real console script,
as a user runs it."""

import json
import os
import stat
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

import spectral_jax as sj
from spectral_jax import files
from spectral_jax.io import SAMPLE
from spectral_jax.errors import InputError
from spectral_jax.report import unique_stems

EXE = os.path.join(os.path.dirname(sys.executable), "spectral-jax")
TINY = ["--model", "dinov2_vits14", "--weights", "random"]


def cli(*argv, umask=None, cwd=None, timeout=600):
    """Run the installed console script; returns CompletedProcess (text)."""
    exe = [EXE] if os.path.exists(EXE) else [sys.executable, "-m", "spectral_jax"]
    return subprocess.run([*exe, *map(str, argv)], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          umask=-1 if umask is None else umask)


def cli_all(*calls, umasks=None):
    """Independent runs at once: each call (an argv tuple) runs as its own console-script process (with its umask
    from `umasks`, if given), concurrently — most of a refusal's cost is the interpreter's start and imports, and a
    2-core box runs two at a time; results in order."""
    from concurrent.futures import ThreadPoolExecutor

    umasks = umasks or [None] * len(calls)
    with ThreadPoolExecutor(3) as pool:
        return list(pool.map(lambda c: cli(*c[0], umask=c[1]), zip(calls, umasks)))


def one_line_exit2(r, needle):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert needle in lines[0], lines[0]
    return lines[0]


def no_tmp(folder):
    left = [f for _, ds, fs in os.walk(folder) for f in ds + fs if f.startswith(".tmp-")]
    assert not left, left


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    p = tmp_path_factory.mktemp("img") / "cat.jpg"
    Image.open(SAMPLE).convert("RGB").resize((84, 56)).save(p)
    return p


@pytest.fixture(scope="module")
def acts(image, tmp_path_factory):
    out = tmp_path_factory.mktemp("acts") / "a.npz"
    r = cli("extract", image, *TINY, "--size", "28", "--layers", "0,1", "--out", out)
    assert r.returncode == 0, r.stderr
    return out


# --------------------------------------------------------------------------------------------------------------
# extract / solve: one output file


def test_extract_never_destroys_its_input_and_appends_npz(image, tmp_path):
    src = tmp_path / "same.jpg"
    src.write_bytes(image.read_bytes())
    before = src.read_bytes()
    r = cli("extract", src, *TINY, "--size", "28", "--layers", "0", "--out", src)
    assert r.returncode == 0, r.stderr
    assert src.read_bytes() == before                              # the input is untouched
    written = json.loads(r.stdout)["out"]
    assert written == str(src) + ".npz" and os.path.getsize(written) > 0
    for name, expect in (("acts", "acts.npz"), ("ACTS.NPZ", "ACTS.NPZ")):
        r = cli("extract", image, *TINY, "--size", "28", "--layers", "0", "--out", tmp_path / name)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["out"] == str(tmp_path / expect)
        with np.load(tmp_path / expect) as f:
            assert f["layer0/q"].shape[2] == 6
    no_tmp(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["ACTS.NPZ", "acts.npz", "same.jpg", "same.jpg.npz"]


def test_extract_out_folder_or_under_a_file_refused_before_work(image, tmp_path):
    (tmp_path / "existing").mkdir()
    (tmp_path / "file.txt").write_text("x")
    cases = [(str(tmp_path / "existing") + os.sep, "is a folder"), (tmp_path / "existing", "is a folder"),
             (tmp_path / "file.txt" / "sub" / "a.npz", "is a file")]
    for r, (_, needle) in zip(cli_all(*(("extract", image, *TINY, "--out", o) for o, _ in cases)), cases):
        one_line_exit2(r, needle)
    assert sorted(os.listdir(tmp_path)) == ["existing", "file.txt"]
    assert os.listdir(tmp_path / "existing") == []


def test_solve_refuses_out_equal_to_input_and_bad_options(acts, tmp_path):
    before = acts.read_bytes()
    one_line_exit2(cli("solve", acts, "--graph", "qk", "--num-eigs", "2", "--out", acts), "input")
    assert acts.read_bytes() == before
    out = tmp_path / "r.npz"
    cases = [(["--graph", "qk", "--method", "gd", "--lr", "-1"], "--lr"),
             (["--graph", "qk", "--method", "gd", "--lr", "nan"], "--lr"),
             (["--graph", "knn-qk", "--k-intra", "0"], "--k-intra"),
             (["--graph", "knn-qk", "--k-intra", "-3"], "--k-intra"),
             (["--graph", "qk", "--lr", "0.1"], "--method gd")]
    runs = cli_all(*(("solve", acts, "--num-eigs", "2", *argv, "--out", out) for argv, _ in cases))
    for r, (_, needle) in zip(runs, cases):
        one_line_exit2(r, needle)
    assert os.listdir(tmp_path) == []


def test_outputs_follow_the_umask(acts, image, tmp_path):
    out = tmp_path / "an"
    runs = cli_all(("solve", acts, "--graph", "qk", "--num-eigs", "2", "--out", tmp_path / "r022.npz"),
                   ("solve", acts, "--graph", "qk", "--num-eigs", "2", "--out", tmp_path / "sub" / "r002.npz"),
                   ("analyze", image, *TINY, "--size", "28", "--num-eigs", "3", "--layers", "0", "--out", out),
                   umasks=[0o022, 0o002, 0o022])
    for r in runs:
        assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(os.stat(tmp_path / "r022.npz").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "sub" / "r002.npz").st_mode) == 0o664
    assert stat.S_IMODE(os.stat(tmp_path / "sub").st_mode) == 0o775
    modes = {os.path.relpath(os.path.join(d, n), out): stat.S_IMODE(os.stat(os.path.join(d, n)).st_mode)
             for d, ds, fs in os.walk(out) for n in ds + fs}
    modes["."] = stat.S_IMODE(os.stat(out).st_mode)
    assert {"cat/pca.png", "cat/result.npz", "cat/summary.json", "summary.json"} <= set(modes)
    for name, mode in modes.items():
        assert mode == (0o755 if os.path.isdir(os.path.join(out, name)) else 0o644), (name, oct(mode))


# --------------------------------------------------------------------------------------------------------------
# analyze: sizes, K, output location, names


def test_huge_resize_and_k_refused_in_one_line_before_work(tmp_path, image):
    strip = tmp_path / "strip.png"
    Image.new("RGB", (4000, 20), (10, 200, 30)).save(strip)          # 224 shorter side → 224×44800
    out = tmp_path / "o"
    cases = [(("analyze", strip, *TINY, "--size", "224", "--out", out), "tokens"),
             (("analyze", image, *TINY, "--size", "100000", "--out", out), "tokens"),
             (("extract", image, *TINY, "--size", "100000", "--out", tmp_path / "a.npz"), "tokens"),
             (("analyze", image, *TINY, "--num-eigs", "10000", "--out", out), "--num-eigs"),
             (("analyze", image, *TINY, "--size", "14", "--out", out), "--num-eigs"),
             (("analyze", image, *TINY, "--size", "abc", "--out", out), "--size"),
             (("analyze", tmp_path, *TINY, "--out", out), "is a folder")]
    lines = [one_line_exit2(r, needle) for r, (_, needle) in zip(cli_all(*(c for c, _ in cases)), cases)]
    assert "SPECTRAL_JAX_MAX_TOKENS" in lines[0]
    assert sorted(os.listdir(tmp_path)) == ["strip.png"]


def test_token_cap_is_overridable(tmp_path, image, monkeypatch):
    monkeypatch.setenv("SPECTRAL_JAX_MAX_TOKENS", "3")
    with pytest.raises(InputError, match="over the cap of 3"):
        sj.io.target_size((56, 84), 28, 14)                           # 2×3 = 6 tokens
    monkeypatch.setenv("SPECTRAL_JAX_MAX_TOKENS", "6")
    assert sj.io.target_size((56, 84), 28, 14) == (28, 42)
    monkeypatch.setenv("SPECTRAL_JAX_MAX_TOKENS", "lots")
    with pytest.raises(InputError, match="SPECTRAL_JAX_MAX_TOKENS"):
        sj.io.target_size((56, 84), 28, 14)


def test_out_under_a_file_refused_before_the_model_runs(tmp_path, image):
    (tmp_path / "file").write_text("x")
    under, onto = cli_all(("analyze", image, *TINY, "--out", tmp_path / "file" / "out"),
                          ("analyze", image, *TINY, "--out", tmp_path / "file"))
    one_line_exit2(under, "is a file")
    one_line_exit2(onto, "not a folder")
    assert os.listdir(tmp_path) == ["file"]


def test_unwritable_out_refused_before_the_model_runs(tmp_path, image, monkeypatch, capsys):
    """A folder the user cannot write (simulated: tests run as root, who can write anywhere) fails in one line
    before the model loads, leaving nothing behind."""
    from spectral_jax.cli import main

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(files.tempfile, "mkstemp", denied)
    monkeypatch.setattr(files.tempfile, "mkdtemp", denied)
    loads = []
    monkeypatch.setattr(sj.models, "load_backbone", lambda *a, **k: loads.append(a))
    for argv in (["analyze", str(image), *TINY, "--out", str(tmp_path / "new" / "out")],
                 ["extract", str(image), *TINY, "--out", str(tmp_path / "new" / "a.npz")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "cannot write" in err[0] and "Permission denied" in err[0], err
    assert loads == [] and os.listdir(tmp_path) == []


def test_name_collisions_keep_every_result(tmp_path):
    names = ["x.jpg", "x-1.jpg", "x.png", "summary.json.jpg"]
    colours = [(250, 0, 0), (0, 250, 0), (0, 0, 250), (250, 250, 0)]
    paths = []
    for n, c in zip(names, colours):
        p = tmp_path / n
        Image.new("RGB", (28, 28), c).save(p)
        paths.append(p)
    assert unique_stems(paths) == ["x", "x-1", "x-2", "summary.json-1"]
    out = tmp_path / "o"
    r = cli("analyze", *paths, *TINY, "--size", "28", "--num-eigs", "2", "--layers", "0", "--graph", "vv",
            "--out", out)
    assert r.returncode == 0, r.stderr
    top = json.load(open(out / "summary.json"))
    assert [(i["name"], os.path.basename(i["image"])) for i in top["images"]] == list(
        zip(["x", "x-1", "x-2", "summary.json-1"], names))
    for stem, c in zip(["x", "x-1", "x-2", "summary.json-1"], colours):
        shown = np.asarray(Image.open(out / stem / "input.png"))
        assert np.abs(shown.reshape(-1, 3).mean(0) - c).max() < 3, stem


def test_out_holding_an_input_is_refused(tmp_path, image):
    out = tmp_path / "o"
    (out / "cat").mkdir(parents=True)
    inside = out / "cat" / "cat.jpg"
    inside.write_bytes(image.read_bytes())
    # writing out/cat/ would replace the folder that holds the input
    one_line_exit2(cli("analyze", inside, *TINY, "--out", out), "would replace the input")
    assert inside.exists()


# --------------------------------------------------------------------------------------------------------------
# folders: atomic, concurrent


def _write_run(out, tag, errors):
    try:
        with files.staged_dir(out, names=["a", "summary.json"]) as tmp:
            os.makedirs(os.path.join(tmp, "a"))
            for i in range(20):
                with open(os.path.join(tmp, "a", f"{i}.txt"), "w") as f:
                    f.write(tag)
            files.write_json(os.path.join(tmp, "summary.json"), {"tag": tag})
    except BaseException as e:  # noqa: BLE001 — collected for the assertion
        errors.append(e)


def test_concurrent_writers_into_one_folder(tmp_path):
    out = str(tmp_path / "o")
    for _ in range(3):
        errors: list = []
        threads = [threading.Thread(target=_write_run, args=(out, f"t{i}", errors)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        tags = {open(os.path.join(out, "a", f"{i}.txt")).read() for i in range(20)}
        assert len(tags) == 1                         # one writer's folder, whole
        assert json.load(open(os.path.join(out, "summary.json")))["tag"] in {f"t{i}" for i in range(8)}
        assert sorted(os.listdir(out)) == ["a", "summary.json"]
        no_tmp(tmp_path)


def test_failed_or_empty_writes_leave_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="produced no data"):
        files.write_atomic(str(tmp_path / "d" / "x.npz"), lambda tmp: None)
    with pytest.raises(KeyError):
        with files.staged_dir(str(tmp_path / "run")) as tmp:
            open(os.path.join(tmp, "f"), "w").close()
            raise KeyError("boom")
    assert os.listdir(tmp_path) == []
    with pytest.raises(RuntimeError, match="wrote nothing"):
        with files.staged_dir(str(tmp_path / "run")):
            pass
    assert os.listdir(tmp_path) == []


def _old_run(out):
    os.makedirs(os.path.join(out, "a"))
    for name, text in (("a/0.txt", "old"), ("b.txt", "old b"), ("keep.txt", "not ours")):
        with open(os.path.join(out, name), "w") as f:
            f.write(text)


def _tree(folder):
    return {os.path.relpath(os.path.join(d, n), folder): open(os.path.join(d, n)).read()
            for d, _, fs in os.walk(folder) for n in fs}


@pytest.mark.parametrize("fail_at", [1, 2, 3])
def test_merge_into_an_existing_folder_is_all_or_nothing(tmp_path, monkeypatch, fail_at):
    """A merge whose n-th rename into `out` fails puts every moved entry back: `out` is as before, nothing is left
    beside it; should undoing fail too, the replaced entries are kept (in the temporary folder, named) — never
    deleted."""
    out = str(tmp_path / "run")
    _old_run(out)
    before = _tree(out)
    rename, calls = os.rename, {"n": 0, "fail": fail_at}

    def flaky(src, dst):
        if os.path.dirname(os.path.abspath(dst)) == out and ".tmp-" in src:   # a new entry moving into out
            calls["n"] += 1
            if calls["n"] == calls["fail"]:
                raise OSError(28, "No space left on device")
        return rename(src, dst)

    monkeypatch.setattr(files.os, "rename", flaky)
    with pytest.raises(OSError, match="No space left"):
        with files.staged_dir(out, names=["a", "b.txt", "c.txt"]) as tmp:
            os.makedirs(os.path.join(tmp, "a"))
            for name in ("a/0.txt", "b.txt", "c.txt"):
                with open(os.path.join(tmp, name), "w") as f:
                    f.write("new")
    assert _tree(out) == before
    assert sorted(os.listdir(tmp_path)) == ["run"]

    def stuck(src, dst):                     # the last entry's move fails, and every move back too
        if (".tmp-" in dst and ".old-" not in dst) or ".old-" in src:
            raise OSError(5, "Input/output error")
        return flaky(src, dst)

    calls.update(n=0, fail=3)
    monkeypatch.setattr(files.os, "rename", stuck)
    with pytest.raises(OSError, match="kept in"):
        with files.staged_dir(out, names=["a", "b.txt", "c.txt"]) as tmp:
            for name in ("a", "b.txt", "c.txt"):
                with open(os.path.join(tmp, name), "w") as f:
                    f.write("new")
    kept = {k.split(".old-", 1)[1].split(os.sep, 1)[1]: v for k, v in _tree(str(tmp_path)).items() if ".old-" in k}
    assert {k: before[k] for k in kept} == kept and kept          # what was replaced is still on disk


def test_an_existing_out_is_staged_inside_it_and_names_too_long_are_refused_before_work(tmp_path):
    """An existing `out` may be its own filesystem (a mount point: a rename from its parent crossed devices, EXDEV
    after the work) or read-only (it passed the parent's check, and failed after the work): the run is staged
    inside it, which also checks it can be written. A name longer than the filesystem takes was ENAMETOOLONG after
    the work (OutputFile) or refused for a legal 250-byte folder (the staging name's prefix)."""
    out = str(tmp_path / "run")
    _old_run(out)
    with files.OutputDir(out, names=["b.txt"]) as od:
        assert os.path.dirname(od.tmp) == out
        with open(os.path.join(od.tmp, "b.txt"), "w") as f:
            f.write("new")
        od.commit()
    assert _tree(out) == {"a/0.txt": "old", "b.txt": "new", "keep.txt": "not ours"}
    no_tmp(tmp_path)
    with files.OutputDir(str(tmp_path / "fresh")) as od:                # no out yet: staged beside it
        assert os.path.dirname(od.tmp) == str(tmp_path)
    long = str(tmp_path / ("y" * 250))                                 # a legal name: accepted
    with files.staged_dir(long) as tmp:
        open(os.path.join(tmp, "f"), "w").write("x")
    assert os.listdir(long) == ["f"]
    for make in (lambda p: files.OutputDir(p), lambda p: files.OutputFile(p + ".npz")):
        with pytest.raises(InputError, match=r"names a file or folder of 30\d bytes, more than the 255 .* shorter"):
            make(str(tmp_path / ("x" * 300)))
    assert sorted(os.listdir(tmp_path)) == sorted(["run", "y" * 250])


def test_a_full_disk_is_one_line_not_a_traceback(tmp_path, image, monkeypatch, capsys):
    """ENOSPC (and numpy's short write, which carries no errno) while the result is written: one line naming
    --out, exit 1, nothing left."""
    from spectral_jax.cli import main

    for err in (OSError(28, "No space left on device"), OSError("1179648 requested and 16352 written")):
        def full(self, err=err):
            raise err

        monkeypatch.setattr(files.OutputFile, "commit", full)
        out = tmp_path / "a.npz"
        assert main(["extract", str(image), *TINY, "--size", "28", "--layers", "0", "--out", str(out)]) == 1
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"spectral-jax extract: error: --out {out}: "), lines
        assert lines[0].endswith("free space there, or write elsewhere (--out)"), lines
        assert os.listdir(tmp_path) == []


def test_npz_rule(tmp_path):
    assert files.npz_path("a") == "a.npz" and files.npz_path("a.NPZ") == "a.NPZ"
    assert files.npz_path("x.jpg") == "x.jpg.npz"
    assert files.npz_path(str(tmp_path)) == str(tmp_path)         # a folder: left for OutputFile to refuse
    with pytest.raises(InputError, match="is a folder"):
        files.OutputFile(files.npz_path(str(tmp_path)))


# --------------------------------------------------------------------------------------------------------------
# the API's inputs


@pytest.mark.parametrize("images, size, needle", [
    ([], 28, "is empty"),
    (SAMPLE, (112,), "is not S or HxW"),
    (SAMPLE, "abc", "is not S or HxW"),
    (SAMPLE, 0, "must be positive"),
    (42, 28, "is not an image"),
    (os.path.dirname(SAMPLE), 28, "is a folder"),
    (np.zeros((5, 5), np.float32), 28, "uint8"),
])
def test_api_bad_inputs_name_the_problem(images, size, needle):
    with pytest.raises(InputError, match=needle):
        sj.analyze(images, weights="random", size=size, num_eigs=3)


def test_api_takes_path_objects_and_pil_images():
    import pathlib

    res_path = sj.analyze(pathlib.Path(SAMPLE), weights="random", size=28, num_eigs=3, layers=[0])
    with Image.open(SAMPLE) as im:
        res_pil = sj.analyze(im.copy(), weights="random", size=28, num_eigs=3, layers=[0])
    assert res_path.eigvecs.shape == res_pil.eigvecs.shape == (1, 3, 2, 3)
    np.testing.assert_allclose(res_path.eigvecs, res_pil.eigvecs, atol=1e-5)
    with pytest.raises(InputError, match="num_eigs"):
        sj.analyze(SAMPLE, weights="random", size=28, num_eigs=6)
