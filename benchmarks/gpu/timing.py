"""What every section of the GPU suite shares: its time budget, its rows (one JSON line each, written as they are
measured so a section killed at its deadline keeps what it finished), device sync, matched precision, medians.

A row is a flat dict: `section`, `row` (its label), `status` ("ok" | "skipped" | "failed"), `reason` (for the
other two), and the section's own numeric fields (seconds are `*_s`, milliseconds `*_ms`).

Shape legend: none (no arrays here).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _common  # noqa: E402  (benchmarks/_common.py: interleaved medians, Markdown tables)


class Section:
    """One section's run: a soft budget (a row is not started once it is spent) and the rows file.

    name: the section; budget_s: seconds for all its rows; rows_path: where rows are appended as JSON lines;
    tiny: the CPU toy-size mode (same code paths, seconds in all).
    """

    def __init__(self, name: str, budget_s: float, rows_path: str, tiny: bool):
        self.name, self.budget_s, self.rows_path, self.tiny = name, float(budget_s), rows_path, bool(tiny)
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def spent(self) -> bool:
        """Whether the budget is used up (the next row is then reported as skipped)."""
        return self.elapsed() >= self.budget_s

    def row(self, label: str, status: str = "ok", reason: str = "", **fields: Any) -> dict:
        """Append one row (non-finite floats become null) and echo it on stdout."""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in fields.items()}
        rec = {"section": self.name, "row": label, "status": status, "reason": reason, **clean}
        with open(self.rows_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"[{self.name} {self.elapsed():6.1f} s] {label}: {status} {reason} "
              + " ".join(f"{k}={_short(v)}" for k, v in clean.items()), flush=True)
        return rec

    def attempt(self, label: str, measure: Callable[[], dict], **fields: Any) -> dict | None:
        """Run `measure()` (→ the row's fields) unless the budget is spent; a failure becomes a "failed" row with
        the exception's last line (out of memory, an unsupported implementation, ...), and the suite goes on."""
        if self.spent():
            self.row(label, "skipped", f"section budget of {self.budget_s:.0f} s spent", **fields)
            return None
        try:
            out = measure()
        except Exception as e:  # noqa: BLE001 - every failure is a reported row, never the end of the suite
            self.row(label, "failed", error_line(e), **fields)
            free_torch_memory()
            return None
        return self.row(label, **fields, **out)


def error_line(e: BaseException) -> str:
    """`Type: first line of the message` (JAX appends a traceback-filtering note after the message)."""
    lines = [l.strip() for l in str(e).splitlines() if l.strip() and not l.startswith("For simplicity, JAX")]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def medians(fns: dict[str, Callable[[], Any]], runs: int, warmup: int) -> dict[str, float]:
    """Median seconds of each callable (each must block until its result is ready), calls interleaved."""
    return _common.median_seconds(fns, runs, warmup)


def jax_blocking(fn: Callable[..., Any], *args) -> Callable[[], None]:
    """A callable that runs `fn(*args)` and waits for every output array."""
    import jax

    return lambda: jax.block_until_ready(fn(*args))


def torch_blocking(fn: Callable[[], Any]) -> Callable[[], None]:
    """A callable that runs `fn()` and waits for the device (CUDA synchronise; nothing to wait for on CPU)."""
    import torch

    def run():
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    return run


def torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def free_torch_memory() -> None:
    """Hand PyTorch's cached device blocks back (JAX and PyTorch share the GPU)."""
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@contextlib.contextmanager
def matched_precision(dtype_name: str):
    """The same matmul precision on both sides: "float32" rows run true float32 products in JAX
    (`jax_default_matmul_precision`) and in PyTorch (TF32 off); "bfloat16" rows use each library's default for
    bfloat16 operands (float32 accumulation in both)."""
    import jax
    import torch

    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        if dtype_name == "float32":
            with jax.default_matmul_precision("float32"):
                yield
        else:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def device_memory_bytes() -> int:
    """Memory of JAX's first device (the GPU's limit; on CPU the machine's RAM)."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def rel_err(x, ref) -> float:
    """max |x − ref| / max |ref| in float64 (numpy inputs)."""
    import numpy as np

    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(x - ref).max() / max(np.abs(ref).max(), 1e-30))
