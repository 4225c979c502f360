"""What a user feels before any work starts: `--help` and argument errors without importing JAX, the public names
loaded on first use, the persistent compilation cache for command-line runs (and its off switch), Ctrl-C as one
line with exit code 130, and a closed output pipe as a quiet exit."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from sjtest import planted_qk

import spectral_jax as sj
from spectral_jax.acts import save_acts
from spectral_jax.cli import EPILOG, compile_cache, main
from spectral_jax.taps import LayerTap, Taps

HEAVY = ("jax", "jaxlib", "flax", "optax", "torch")


def _env(tmp_path, **extra):
    """The test's environment for a child: CPU, and a compile cache only under tmp_path (never the user's)."""
    env = {k: v for k, v in os.environ.items()
           if k not in (compile_cache.ENV, "JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES")}
    env.update({"JAX_PLATFORMS": "cpu", "XDG_CACHE_HOME": str(tmp_path / "xdg"), **extra})
    return env


def _console_script():
    exe = shutil.which("spectral-jax", path=os.path.dirname(sys.executable)) or shutil.which("spectral-jax")
    assert exe, "the spectral-jax console script is not installed: pip install -e ."
    return exe


def _imported(stderr: str) -> set[str]:
    """Module names from `python -X importtime` output."""
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


def _acts(path, rng):
    q, k, _ = planted_qk(rng, (6, 6), groups=3, layers=2, heads=2, dim=8)
    taps = Taps({i: LayerTap(q[i][None], k[i][None], (q[i] + k[i])[None], (6, 6), 0) for i in range(2)})
    save_acts(str(path), taps, "test", (84, 84))
    return path


@pytest.mark.parametrize("argv, code", [(["--help"], 0), (["solve", "--help"], 0), (["analyze", "--help"], 0),
                                        (["solve", "--bogus"], 2), (["nosuchcommand"], 2)])
def test_help_and_argument_errors_import_no_jax(tmp_path, argv, code):
    r = subprocess.run([sys.executable, "-X", "importtime", _console_script(), *argv], env=_env(tmp_path),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == code, r.stderr[-2000:]
    imported = _imported(r.stderr)
    assert "spectral_jax.cli" in imported  # the real console script ran
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))
    assert not (tmp_path / "xdg").exists()  # no cache folder for a command that never ran
    if code == 2:
        errors = [line for line in r.stderr.splitlines() if not line.startswith("import time:")]
        assert len(errors) == 1 and errors[0].startswith("spectral-jax") and "--help" in errors[0], errors


def test_package_and_cli_import_lazily_then_resolve(tmp_path):
    child = textwrap.dedent(f"""
        import sys
        import spectral_jax as sj, spectral_jax.cli, spectral_jax.errors
        from spectral_jax.cli import build_parser
        build_parser()
        heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)
        assert not heavy, heavy
        assert {{"analyze", "Result", "models", "dataset"}} <= set(dir(sj))
        assert callable(sj.analyze) and callable(sj.models.load_backbone) and sj.Result.__name__ == "Result"
        assert "jax" in sys.modules  # loaded on first use
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", child], env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


@pytest.mark.parametrize("environ, expected", [
    ({"HOME": "/h"}, "/h/.cache/spectral-jax/jax"),
    ({"HOME": "/h", "XDG_CACHE_HOME": "/x"}, "/x/spectral-jax/jax"),
    ({"HOME": "/h", "XDG_CACHE_HOME": "relative"}, "/h/.cache/spectral-jax/jax"),  # XDG: relative paths ignored
    ({"HOME": "/h", compile_cache.ENV: "1"}, "/h/.cache/spectral-jax/jax"),
    ({"HOME": "/h", compile_cache.ENV: "/elsewhere"}, "/elsewhere"),
    ({"HOME": "/h", compile_cache.ENV: "0"}, None),
    ({"HOME": "/h", compile_cache.ENV: "off"}, None),
])
def test_cache_dir_from_environment(environ, expected):
    got = compile_cache.cache_dir(environ)
    assert (None if got is None else str(got)) == expected


def test_cache_off_switch_documented():
    assert compile_cache.ENV in EPILOG and "=0" in EPILOG
    assert compile_cache.ENV in sys.modules["spectral_jax.cli"].__doc__


def test_enable_before_jax_import_configures_jax(tmp_path):
    child = textwrap.dedent("""
        import os, sys
        from spectral_jax.cli import compile_cache
        path = compile_cache.enable()
        assert "jax" not in sys.modules
        import jax
        assert jax.config.jax_compilation_cache_dir == str(path), (jax.config.jax_compilation_cache_dir, path)
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
        assert jax.config.jax_persistent_cache_min_entry_size_bytes == -1
        print(path)
    """)
    relocated = tmp_path / "elsewhere"
    r = subprocess.run([sys.executable, "-c", child], env=_env(tmp_path, **{compile_cache.ENV: str(relocated)}),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == str(relocated) and relocated.is_dir()


@pytest.fixture
def no_jax_cache():
    """This process's JAX without a compilation cache folder while the test runs (the suite's own cache, set by
    conftest, would read as one the user configured, which `enable` leaves alone)."""
    suite = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    try:
        yield
    finally:
        jax.config.update("jax_compilation_cache_dir", suite)


def test_unusable_cache_folder_never_stops_a_command(tmp_path, capsys, no_jax_cache):
    blocker = tmp_path / "file"
    blocker.write_text("a regular file, not a folder")
    before = jax.config.jax_compilation_cache_dir
    # the default location unusable: silently without a cache
    assert compile_cache.enable({"HOME": str(tmp_path), "XDG_CACHE_HOME": str(blocker)}) is None
    assert capsys.readouterr().err == ""
    # a folder the user named: one warning line
    assert compile_cache.enable({"HOME": str(tmp_path), compile_cache.ENV: str(blocker / "jax")}) is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("spectral-jax: warning: compile cache") and compile_cache.ENV in err
    # off: nothing made
    assert compile_cache.enable({"HOME": str(tmp_path), compile_cache.ENV: "0"}) is None
    assert not (tmp_path / ".cache").exists()
    assert jax.config.jax_compilation_cache_dir == before


def test_cli_run_fills_the_cache_and_the_switch_turns_it_off(tmp_path, rng):
    acts = _acts(tmp_path / "a.npz", rng)
    argv = [_console_script(), "solve", str(acts), "--graph", "qk", "--num-eigs", "3"]
    on = subprocess.run(argv + ["--out", str(tmp_path / "on.npz")], env=_env(tmp_path), capture_output=True,
                        text=True, timeout=300)
    assert on.returncode == 0, on.stderr[-3000:]
    cache = tmp_path / "xdg" / "spectral-jax" / "jax"
    assert cache.is_dir() and any(cache.iterdir())
    off = subprocess.run(argv + ["--out", str(tmp_path / "off.npz")], capture_output=True, text=True, timeout=300,
                         env=_env(tmp_path, XDG_CACHE_HOME=str(tmp_path / "xdg2"), **{compile_cache.ENV: "0"}))
    assert off.returncode == 0, off.stderr[-3000:]
    assert not (tmp_path / "xdg2").exists()
    assert json.loads(on.stdout)["eigvals"] == json.loads(off.stdout)["eigvals"]
    with np.load(tmp_path / "on.npz") as a, np.load(tmp_path / "off.npz") as b:
        np.testing.assert_array_equal(a["eigvecs"], b["eigvecs"])


def test_main_called_from_python_leaves_jax_config_alone(tmp_path, rng, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    before = jax.config.jax_compilation_cache_dir
    acts = _acts(tmp_path / "a.npz", rng)
    assert main(["solve", str(acts), "--graph", "qk", "--num-eigs", "3", "--out", str(tmp_path / "r.npz")]) == 0
    assert jax.config.jax_compilation_cache_dir == before
    assert not (tmp_path / "xdg").exists()


# A command that stands in for a long run (patched in before the parser is built, so `register` picks it up).
_PATCHED = """
import signal, sys, time
import spectral_jax.cli.solve as solve
{prelude}

def stand_in(args):
    {body}

solve.run = stand_in
sys.argv = ["spectral-jax", "solve", "a.npz", "--graph", "qk", "--out", "r.npz"]
from spectral_jax.cli import main
sys.exit(main())
"""


def _sigint_default():
    """Child processes start with Ctrl-C's default action, as from a terminal: a test run started in the background
    of a non-interactive shell (`cmd &`) ignores SIGINT, which every child would inherit, and Python then installs
    no KeyboardInterrupt handler at all."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _patched(tmp_path, body, prelude="", sigint=_sigint_default):
    code = _PATCHED.format(body=body, prelude=prelude)
    return subprocess.Popen([sys.executable, "-c", code], env=_env(tmp_path, **{compile_cache.ENV: "0"}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint)


def test_ctrl_c_is_one_line_and_exit_130(tmp_path):
    proc = _patched(tmp_path, 'print("started", flush=True); time.sleep(120)')
    try:
        assert proc.stdout.readline().strip() == "started"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert err == "spectral-jax solve: interrupted\n"


def test_sigterm_is_the_same_clean_stop_one_line_and_exit_143(tmp_path):
    """`kill PID` (a scheduler's stop): the command stops as for Ctrl-C (its cleanup runs), one line, exit 143."""
    proc = _patched(tmp_path, 'try:\n        print("started", flush=True)\n        time.sleep(120)\n    finally:\n'
                              '        print("cleanup ran", flush=True)')
    try:
        assert proc.stdout.readline().strip() == "started"
        proc.send_signal(signal.SIGTERM)
        cleanup = proc.stdout.readline()
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert (proc.returncode, cleanup, out, err) == (143, "cleanup ran\n", "", "spectral-jax solve: terminated\n")


def test_sigterm_lost_in_a_del_is_sent_again_where_sigint_is_ignored(tmp_path):
    """A job started with `&` from a script (or under nohup) ignores SIGINT. A SIGTERM that lands in a `__del__`
    (JAX's garbage-collector callback, say) becomes an "Exception ignored" there: it was sent again only where the
    SIGINT handler was ours, so the run went on to the end, wrote its outputs and exited 0."""
    body = ('class Slow:\n        def __del__(self):\n            print("in del", flush=True); time.sleep(30)\n'
            '    s = Slow(); del s\n    time.sleep(5); print("ran on", flush=True); return 0')
    proc = _patched(tmp_path, body, sigint=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        assert proc.stdout.readline().strip() == "in del"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert (proc.returncode, out) == (143, ""), (proc.returncode, out, err)
    assert err.endswith("spectral-jax solve: terminated\n"), err


def test_the_package_s_warnings_are_one_line_others_python_s(tmp_path):
    body = """import warnings, spectral_jax
    warnings.warn_explicit("not converged; raise --maxiter", RuntimeWarning, spectral_jax.__file__, 1)
    warnings.warn("a library's own", UserWarning)"""
    proc = _patched(tmp_path, body)
    out, err = proc.communicate(timeout=120)
    lines = err.splitlines()
    assert proc.returncode == 0 and lines[0] == "spectral-jax solve: warning: not converged; raise --maxiter"
    assert "UserWarning: a library's own" in lines[1] and len(lines) == 2 + ("warnings.warn" in err)


def test_ctrl_c_inside_a_gc_callback_still_stops_the_command(tmp_path):
    # Python prints and drops an exception raised in a gc callback (JAX registers one; a Ctrl-C during its import
    # often lands there): the command must still stop, with the same one line.
    body = """import gc
    def interrupted_here(phase, info):
        gc.callbacks.remove(interrupted_here)
        raise KeyboardInterrupt
    gc.callbacks.append(interrupted_here)
    gc.collect()
    time.sleep(60)
    print("ran on to the end")"""
    proc = _patched(tmp_path, body)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert (proc.returncode, out, err) == (130, "", "spectral-jax solve: interrupted\n")


def test_ctrl_c_during_an_extension_init_waits_for_it(tmp_path):
    # A KeyboardInterrupt raised inside a C extension's initialisation can kill the process (jaxlib's calls
    # std::terminate): it is held until the initialisation returns. Stand-in: a loader method with that name.
    prelude = textwrap.dedent("""
        class ExtensionFileLoader:
            def create_module(self):
                signal.raise_signal(signal.SIGINT)
                time.sleep(0.3)
                print("init done", flush=True)
    """)
    body = 'ExtensionFileLoader().create_module(); time.sleep(60); print("ran on to the end")'
    proc = _patched(tmp_path, body, prelude)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert (proc.returncode, out, err) == (130, "init done\n", "spectral-jax solve: interrupted\n")


def test_ctrl_c_early_in_a_real_run(tmp_path, rng):
    # A Ctrl-C while a real `solve` is still importing numpy / JAX: the most common moment for one. Sent once the
    # command line is in charge, seen from outside without a sleep: the CLI makes the compile-cache folder
    # (`compile_cache.enable`) inside its Ctrl-C handling (`_CtrlC`), after parsing the arguments and before the
    # command imports anything heavy. (Before that, Python is still starting — `site`, the console script's own
    # imports — and a Ctrl-C there is Python's, not ours: a traceback and exit 1.)
    acts = _acts(tmp_path / "a.npz", rng)
    ready = tmp_path / "cache"
    proc = subprocess.Popen([_console_script(), "solve", str(acts), "--graph", "qk", "--num-eigs", "3", "--out",
                             str(tmp_path / "r.npz")], env=_env(tmp_path, **{compile_cache.ENV: str(ready)}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_sigint_default)
    try:
        deadline = time.monotonic() + 120
        while not ready.is_dir() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert ready.is_dir() and proc.poll() is None, "the run never made its compile-cache folder"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert (proc.returncode, out) == (130, ""), err
    assert err in ("spectral-jax solve: interrupted\n", "spectral-jax: interrupted\n"), err
    assert not (tmp_path / "r.npz").exists()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_closed_output_pipe_is_quiet(tmp_path):
    proc = _patched(tmp_path, 'print("started", flush=True)\n    for _ in range(10**6): print("x" * 100)')
    try:
        assert proc.stdout.readline().strip() == "started"
        proc.stdout.close()  # the reader goes away, as `| head` does
        err = proc.stderr.read()
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 141
    assert err == ""
