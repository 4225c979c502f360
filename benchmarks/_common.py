"""Shared helpers for the benchmark scripts: machine description, timing, peak memory, Markdown tables.

Peak memory is measured in two independent ways (they answer different questions, so both are reported):

- **RSS high-water mark** (`peak_rss_delta`): in a *fresh* process, after inputs exist and the function has been
  compiled and run once, the kernel's peak-RSS counter is reset (`/proc/self/clear_refs` ← 5, Linux ≥ 4.0), the
  function is run again, and the growth of `VmHWM` over the RSS just before the run is reported. glibc's dynamic
  mmap threshold is pinned (`MALLOC_MMAP_THRESHOLD_`) so that large buffers are returned to the OS when freed and
  cannot hide inside already-resident heap. Falls back to `ru_maxrss` growth where clear_refs is unavailable.
- **XLA's compiled memory analysis** (`xla_memory`): `jit(f).lower(...).compile().memory_analysis()` —
  `temp_size_in_bytes` (scratch the program allocates) and `output_size_in_bytes`; no measurement noise, but it is
  the compiler's plan, not what the process actually touched.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

MIB = 1024.0 ** 2

# Pin glibc's mmap threshold (128 KiB) so freed large buffers leave RSS; set before a child process starts.
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def cpu_and_load() -> tuple[str, str]:
    """(CPU model name, "1 / 5 / 15"-minute load averages) for one-line machine descriptions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return cpu, " / ".join(f"{x:.1f}" for x in os.getloadavg())



def torch_machine_line(*libs) -> str:
    """One-line machine description for a JAX-vs-PyTorch benchmark; `libs`: extra modules whose versions to name."""
    import jax
    import torch

    cpu, load = cpu_and_load()
    return (f"{cpu}; {os.cpu_count()} logical CPUs visible (torch threads {torch.get_num_threads()}), load average "
            f"{load} (1/5/15 min) at the end; {platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}; jax {jax.__version__} ({jax.default_backend()}); "
            f"torch {torch.__version__}" + "".join(f"; {m.__name__} {m.__version__}" for m in libs))


def median_seconds(fns: dict, runs: int, warmup: int) -> dict[str, float]:
    """Median wall time of each callable; calls are interleaved so that all see the same (shared, noisy) load."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def machine() -> dict[str, Any]:
    """A description of this machine and software, for the results files."""
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        with open("/proc/cpuinfo") as f:
            names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
        info["cpu"] = f"{names[0]} × {len(names)} logical" if names else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    info["cores_visible"] = os.cpu_count()
    try:
        info["cores_usable"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        with open("/proc/meminfo") as f:
            kb = int(next(l for l in f if l.startswith("MemTotal")).split()[1])
        info["memory_gib"] = round(kb / 1024 ** 2, 1)
    except (OSError, StopIteration):
        pass
    try:
        info["load_avg_1_5_15"] = tuple(round(x, 2) for x in os.getloadavg())
    except OSError:
        pass
    info["git"] = git_state()
    for mod in ("jax", "jaxlib", "flax", "optax", "numpy", "torch"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional
            pass
    try:
        import jax

        info["jax_backend"] = jax.default_backend()
        info["jax_devices"] = str(jax.devices())
    except Exception:  # noqa: BLE001
        pass
    return info


def git_state() -> str:
    """HEAD of the repository and which tracked files of the code differ from it (the library, the models and the
    benchmarks' scripts; not the results they write) — the code is edited while we measure."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "log", "-1", "--format=%h %s"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--name-only", "HEAD", "--", "spectral_jax", "models",
                               "benchmarks", ":!benchmarks/results"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"HEAD {head[:90]}" + (f"; modified in the working tree: {', '.join(dirty)}" if dirty else "; clean")


def machine_md(info: dict[str, Any], extra_note: str = "") -> str:
    lines = [f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}"]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    if extra_note:
        lines.append(f"- note: {extra_note}")
    return "\n".join(lines)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table."""
    def cell(x):
        if x is None:
            return "—"
        if isinstance(x, float):
            return f"{x:.4g}"
        return str(x)

    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(out)


def time_fn(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> dict[str, float]:
    """Median / min wall seconds of `fn()` (which must block until its result is ready) after `warmup` calls."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "repeats": repeats}


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False where not supported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_delta(run: Callable[[], Any]) -> dict[str, float]:
    """Growth of the resident set while `run()` executes, in MiB (see the module docstring)."""
    import gc

    gc.collect()
    if reset_peak_rss() and _status_kib("VmHWM") is not None:
        before = _status_kib("VmRSS")
        run()
        return {"rss_peak_delta_mib": (_status_kib("VmHWM") - before) / 1024.0, "rss_method": "VmHWM-reset"}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"rss_peak_delta_mib": (after - before) / 1024.0, "rss_method": "ru_maxrss"}


def xla_memory(compiled) -> dict[str, float | None]:
    """XLA's memory plan of a compiled function, in MiB (None where the backend does not report it)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        m = None
    if m is None:
        return {"xla_temp_mib": None, "xla_out_mib": None, "xla_arg_mib": None}
    return {"xla_temp_mib": m.temp_size_in_bytes / MIB, "xla_out_mib": m.output_size_in_bytes / MIB,
            "xla_arg_mib": m.argument_size_in_bytes / MIB}


def run_child(script: str, args: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    """Run `python SCRIPT --child JSON` in a fresh process; it prints one JSON line last.

    A child killed for memory or time, or failing, gives `{"error": ...}` instead of raising."""
    env = dict(os.environ, **CHILD_ENV)
    cmd = [sys.executable, os.path.abspath(script), "--child", json.dumps(args)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or [f"exit code {p.returncode}"])[-1][:300]
        return {"error": f"exit {p.returncode}: {tail}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def parse_processes(ap, argv, child, procs: int = 2):
    """Parse argv with `run_processes`' arguments added to the argparse parser (--procs shown; the children's --port,
    --pid, --rows hidden). In a child (--pid given) run child(args) and return None; else return the args."""
    import argparse

    ap.add_argument("--procs", type=int, default=procs, help="local processes (one CPU device each)")
    for name, kind in (("--port", int), ("--pid", int), ("--rows", str)):
        ap.add_argument(name, type=kind, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.pid is None:
        return args
    child(args)
    return None


def run_processes(script: str, argv: list[str], procs: int, env: dict | None = None) -> tuple[list[dict], float]:
    """Run `python SCRIPT ARGV --procs P --port PORT --pid i --rows FILE` as P local processes of one jax.distributed
    job (JAX_PLATFORMS=cpu, and env's variables; a free port on 127.0.0.1 for the coordinator); each writes its JSON
    rows to FILE. Returns (every process's rows in process order, the 1-minute load at the start); exits when one
    fails (its stderr is shown)."""
    import socket
    import tempfile

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, JAX_PLATFORMS="cpu", **(env or {}))
        ps = [subprocess.Popen([sys.executable, os.path.abspath(script), *argv, "--procs", str(procs), "--port",
                                str(port), "--pid", str(i), "--rows", os.path.join(tmp, f"{i}.json")], env=env)
              for i in range(procs)]
        load0 = os.getloadavg()[0]
        if any(p.wait() for p in ps):
            sys.exit("a process failed (its stderr is above)")
        return [json.load(open(os.path.join(tmp, f"{i}.json"))) for i in range(procs)], load0


def save_npy(path: str, x) -> None:
    """`np.save` of x to path atomically (a temporary file beside it, then renamed): a run killed midway leaves no
    partial .npy that a later run would take for its cache."""
    import numpy as np

    tmp = path + ".part"
    try:
        with open(tmp, "wb") as f:
            np.save(f, x)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def report_paths(out: str) -> set[str]:
    """The real paths a report at `out` writes: `out` and its .json beside it (`write`'s two calls)."""
    return {os.path.realpath(out), os.path.realpath(os.path.splitext(out)[0] + ".json")}


def write(path: str, text: str, announce: bool = False) -> None:
    """Write a results file atomically (creating its folder); if `announce`, say so on stdout."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    if announce:
        print(f"wrote {path}")


def position_share(eigvecs) -> list[float]:
    """Per eigenvector k of `[n, K, h, w]`: the share of its (per-image centred) variance that is the same map in
    every image — ‖mean_i v_ik‖² / mean_i ‖v_ik‖², v_ik image i's map minus its mean. 1: a pure position code shared
    by all images; ≈ 1/n: maps unrelated across images (content, not layout). (Was bench_dataset's; eval_joint and
    eval_dataset read it.)"""
    import numpy as np

    e = np.asarray(eigvecs, np.float64)
    e = e - e.mean(axis=(2, 3), keepdims=True)
    return [float((e[:, k].mean(0) ** 2).sum() / max((e[:, k] ** 2).sum(axis=(1, 2)).mean(), 1e-30))
            for k in range(e.shape[1])]
