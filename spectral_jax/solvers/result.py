"""`Result`: what every solver returns, and the RESULT.npz file of DESIGN.md.

Shape legend
    B  images    K  eigenvectors    (H0, W0)  base grid    G  graphs (all groups, flattened, in order)
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spectral_jax.acts import write_atomic
from spectral_jax.graphs import Graph
from spectral_jax.objective import from_nodes, rayleigh, to_nodes


@dataclasses.dataclass
class Result:
    """Pseudo-eigenvectors and their diagnostics, sorted by eigenvalue, largest first.

    eigvecs `[B, K, H0, W0]` float32 (orthonormal over the B·H0·W0 base nodes for a single grid; B-orthonormal
    for the multi-grid exact solve); eigvals `[K]` (exact eigenvalues, or Ritz values for `gd`); rq `[G, K]`
    per-graph Rayleigh quotients; objective = Σ_k Σ_l w_l R_{l,k}; orth_error = max |XᵀX − I|.
    """

    eigvecs: np.ndarray
    eigvals: np.ndarray
    rq: np.ndarray
    objective: float
    orth_error: float
    steps: int
    seconds: float
    method: str
    history: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0,), np.float32))
    info: dict = dataclasses.field(default_factory=dict)

    @property
    def num_eigs(self) -> int:
        return int(self.eigvecs.shape[1])

    def summary(self) -> dict[str, Any]:
        """The JSON summary: objective, seconds, method, num_eigs, steps, and more."""
        return {"objective": float(self.objective), "seconds": round(float(self.seconds), 4), "method": self.method,
                "num_eigs": self.num_eigs, "steps": int(self.steps), "orth_error": float(self.orth_error),
                "eigvals": [round(float(v), 6) for v in np.asarray(self.eigvals).reshape(-1)[: self.num_eigs]],
                "grid": list(self.eigvecs.shape[-2:]), "num_images": int(self.eigvecs.shape[0]), **self.info}

    def save(self, path: str) -> None:
        """Write RESULT.npz (eigvecs, eigvals, rq, history and the summary as JSON), atomically."""
        arrays = dict(eigvecs=np.asarray(self.eigvecs, np.float32), eigvals=np.asarray(self.eigvals, np.float32),
                      rq=np.asarray(self.rq, np.float32), history=np.asarray(self.history, np.float32),
                      summary=np.array(json.dumps(self.summary())))
        write_atomic(path, lambda tmp: np.savez(tmp, **arrays))


_rayleigh = jax.jit(rayleigh)   # one compiled pass over every graph, not op-by-op dispatch of the blocked kernels


def fix_signs(v: np.ndarray) -> np.ndarray:
    """Deterministic sign per column of `v` `[M, K]`: the sum is positive, or if ~0 the largest entry is."""
    s = v.sum(axis=0)
    big = v[np.abs(v).argmax(axis=0), np.arange(v.shape[1])]
    sign = np.where(np.abs(s) > 1e-6 * np.sqrt(v.shape[0]), np.sign(s), np.sign(big))
    return v * np.where(sign == 0, 1.0, sign)


def finish(graphs: Sequence[Graph], weights, vecs: np.ndarray, eigvals: np.ndarray, num_images: int,
           base: tuple[int, int], *, steps: int, seconds: float, method: str, history=None, info=None,
           metric=None) -> Result:
    """Build a `Result` from base-grid node vectors `[M0, K]` sorted largest first: signs, rq, objective.

    `metric`: the operator B in which the vectors are orthonormal (None: the identity); orth_error = max|XᵀBX − I|.
    """
    vecs = fix_signs(np.asarray(vecs, np.float64)).astype(np.float32)
    x = from_nodes(jnp.asarray(vecs), num_images, base)
    rqs, obj = _rayleigh(list(graphs), x, weights)
    rq = np.concatenate([np.asarray(r).reshape(-1, vecs.shape[1]) for r in rqs], axis=0)
    bv = vecs if metric is None else np.asarray(metric(jnp.asarray(vecs)))
    gram = vecs.T.astype(np.float64) @ bv
    orth = float(np.abs(gram - np.eye(vecs.shape[1])).max())
    return Result(np.asarray(x), np.asarray(eigvals, np.float32), rq, float(obj), orth, int(steps), float(seconds),
                  method, np.asarray(history if history is not None else [], np.float32), dict(info or {}))


__all__ = ["Result", "finish", "fix_signs", "to_nodes"]
