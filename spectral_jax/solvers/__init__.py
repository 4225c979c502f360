"""Eigen-solvers for the layer-distributed objective, one module per solver:

    exact   `exact.exact(graphs, K)`: top-K of the linearised objective — dense (LAPACK's subset driver / `eigh`)
            when it fits, else ARPACK on the sparse kNN operator or matrix-free LOBPCG — with its convergence report
    gd      `gd.gd(graphs, K, preset=...)`: an optax loop, whole loop jitted (presets `eigen` and `paper`)
    sparse  many kNN graphs coalesced into one sparse operator (the exact solver's large-graph path)
    result  `Result`, what every solver returns, and its `Convergence` record (also here: `solvers.Result`,
            `solvers.Convergence`)

`spectral_jax.solve(taps, method="exact" | "gd")` builds the graphs and calls these; call them directly for graphs of
your own (`spectral_jax.graphs`). The modules keep their names here (`solvers.exact.DENSE_MAX`): no function shadows
its module.
"""

from spectral_jax.solvers import exact, gd, sparse
from spectral_jax.solvers.result import Convergence, Result

__all__ = ["Convergence", "Result", "exact", "gd", "sparse"]
