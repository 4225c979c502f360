"""Red-team regressions (round 22, solver and graph options at their extremes), single-image side: a kNN graph
whose only kept edges are tokens' edges to themselves (knn-vv at k_intra 1 — a token's nearest neighbour is
itself, cosine 1 — or a min_cos above every other cosine) was solved as the identity: every eigenvalue 1,
"converged", arbitrary maps. It is now one `InputError` naming the options, before the solve. (gd's divergence,
saturation and collapse: tests/test_gd_convergence.py; the dataset's: tests/test_dataset_gd_guard.py.)
"""

from __future__ import annotations

import numpy as np
import pytest

import spectral_jax as sj
from spectral_jax.errors import InputError
from spectral_jax.taps import LayerTap, Taps


def _taps(rng, batch=1, grid=(4, 4), dim=8):
    n = grid[0] * grid[1]
    q, k, v = (rng.normal(size=(batch, 2, n, dim)).astype(np.float32) for _ in range(3))
    return Taps({i: LayerTap(q, k, v, grid) for i in (0, 1)})


@pytest.mark.parametrize("kw,named", [({"k_intra": 1}, "k_intra 1, min_cos 0.1"),
                                      ({"min_cos": 0.9999}, "k_intra 50, min_cos 0.9999")])
def test_a_knn_graph_of_self_edges_only_is_refused(rng, kw, named):
    taps = _taps(rng)
    with pytest.raises(InputError, match=rf"^{named}: leave no edge between two tokens in any knn-vv graph .* — "
                                         r"raise k_intra \(--k-intra\) to 2 or more, or lower min_cos$"):
        sj.solve(taps, "knn-vv", 3, **kw)
    res = sj.solve(taps, "knn-vv", 3, k_intra=2)                       # one more neighbour: a real graph
    assert res.convergence.converged and not np.allclose(res.eigvals, 1.0)


def test_the_joint_knn_graph_of_several_images_names_k_inter_and_counts_edges_between_them(rng):
    taps = _taps(rng, batch=2)
    with pytest.raises(InputError, match=r"^k_intra 1, k_inter 0, min_cos 0.1: leave no edge"):
        sj.solve(taps, "knn-vv", 3, k_intra=1, k_inter=0)
    res = sj.solve(taps, "knn-vv", 3, k_intra=1, k_inter=2)   # edges to the other image only
    assert res.num_images == 2 and not np.allclose(res.eigvals, 1.0)
