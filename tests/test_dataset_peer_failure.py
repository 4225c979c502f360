"""A step that each process of a several-process `spectral-jax dataset` run does on its own — the gathered path's
approximate search, graph j on process j mod P (`whole._owned_searches`) — failing on one process only: that
process says why (its own error) and every other one stops at once with one line naming it
(`layout.fail_together`, `layout.PeerFailed`), instead of waiting at the broadcast of a graph that will never come
(before: both processes hung until killed, then aborted with pages of JAX logs). No result is written.

Two processes of the console script (--coordinator, --num-processes, --process-id), `whole._search_graph` replaced
in process 1 by one that raises.
"""

from __future__ import annotations

import os
import subprocess
import sys

from test_dataset import _env, _free_port, make_folder

WRAPPED = """import os, sys
from spectral_jax.dataset import whole
search = whole._search_graph
def failing(*a, **k):
    if os.environ.get("SPECTRAL_JAX_TEST_FAIL") == "1":
        raise RuntimeError("injected: this process's own kNN search failed")
    return search(*a, **k)
whole._search_graph = failing
from spectral_jax.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_search_that_fails_on_one_process_stops_every_process_with_one_line(tmp_path):
    imgs = make_folder(str(tmp_path / "imgs"), 12)
    out, port = str(tmp_path / "out"), _free_port()
    cli = ["dataset", imgs, "--model", "dinov2_vits14", "--weights", "random", "--size", "56", "--method", "exact",
           "--layers", "10,11", "--num-eigs", "4", "--k-intra", "3", "--k-inter", "6", "--search", "ivf", "--out",
           out, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
    procs = [subprocess.Popen([sys.executable, "-c", WRAPPED, *cli, "--process-id", str(i)],
                              env=_env(TQDM_DISABLE="1", SPECTRAL_JAX_TEST_FAIL=str(i)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        errs = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [1, 1], errs
    said = [line for line in errs[0].splitlines() if line.strip()]
    assert said[-1] == ("spectral-jax dataset: error: process 0 of 2: process 1's share of the kNN search failed "
                        "(it said why on its stderr); no result was written"), errs[0][-2000:]
    assert "injected: this process's own kNN search failed" in errs[1], errs[1][-2000:]
    assert not os.path.exists(os.path.join(out, "summary.json")) and not os.path.exists(os.path.join(out,
                                                                                                 "eigvecs.npz"))
