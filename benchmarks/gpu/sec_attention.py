"""Section `attention`: the matrix-free attention product P·Z and its gradient (Pᵀ·G) at N = 16k, 65k, 262k tokens
(one head, D = 64, K = 20 vectors, seeded random q/k/Z), P = softmax(q kᵀ/√D).

Variants, each its own row (ms per call, error vs the float32 reference, XLA's scratch memory plan):
    blockwise f32      `graphs.attention(q, k, grid).matvec` — our blocked online-softmax kernel (`spectral_jax.kernels`)
    blockwise bf16 qk  the same with q, k in bfloat16 and Z float32 (so the kernel's accumulators stay float32)
    dense f32          softmax(q kᵀ/√D) materialised, then @ Z — only where 3·N²·4 bytes fit in half the device
    dpa xla f32        candidate: `jax.nn.dot_product_attention(q, k, Z)` (Z as the values), implementation "xla"
                       (materialises the logits: same fit rule as dense)
    dpa cudnn bf16     candidate: the same with implementation "cudnn" (flash attention; bfloat16 in, float32
                       accumulation inside; Z's K columns zero-padded to D, as cuDNN wants equal head dims)
The reference is the dense float32 product where it fits, else the blockwise float32 kernel. The gradient row is
∂/∂Z of ⟨G, P·Z⟩ for a random G (= Pᵀ G). The candidate stays here until these rows decide whether it is promoted
into `spectral_jax.kernels`.

Shape legend
    N  tokens   D  head dim   K  vectors   q, k `[N, D]`   Z, G `[N, K]`
"""

from __future__ import annotations

import math

import numpy as np

from timing import Section, _common, device_memory_bytes, jax_blocking, medians, rel_err

FULL = dict(sizes=(16384, 65536, 262144), dim=64, k=20, runs=5, warmup=1)
TINY = dict(sizes=(1024,), dim=16, k=4, runs=2, warmup=1)         # N = 32²: several of the kernel's blocks

COLUMNS = [("n", "N"), ("variant", "variant"), ("matvec_ms", "P·Z (ms)"), ("grad_ms", "Pᵀ·G via grad (ms)"),
           ("matvec_err", "P·Z rel err"), ("grad_err", "grad rel err"), ("xla_temp_mib", "XLA temp (MiB)"),
           ("vs_blockwise", "P·Z speed-up vs blockwise f32")]


def _variants(dim: int, k: int):
    """name → (matvec(q, k, z), dtype of q/k/z, needs the N×N logits)."""
    import jax
    import jax.numpy as jnp

    from spectral_jax import graphs as G

    scale = 1.0 / math.sqrt(dim)

    def blockwise(q, kk, z):
        n = q.shape[0]
        side = math.isqrt(n)
        return G.attention(q, kk, (side, n // side)).matvec(z)

    def dense(q, kk, z):
        return jax.nn.softmax(scale * (q @ kk.T), axis=-1) @ z

    def dpa(impl):
        def f(q, kk, z):
            zp = jnp.pad(z, ((0, 0), (0, max(dim - z.shape[1], 0))))          # cuDNN: v's head dim = q's
            out = jax.nn.dot_product_attention(q[None, :, None], kk[None, :, None], zp[None, :, None],
                                               implementation=impl)
            return out[0, :, 0, :z.shape[1]].astype(z.dtype)
        return f

    f32, bf16 = jnp.float32, jnp.bfloat16
    return {"dense f32": (dense, (f32, f32, f32), True),
            "blockwise f32": (blockwise, (f32, f32, f32), False),
            "blockwise bf16 qk": (blockwise, (bf16, bf16, f32), False),
            "dpa xla f32": (dpa("xla"), (f32, f32, f32), True),
            "dpa cudnn bf16": (dpa("cudnn"), (bf16, bf16, bf16), False)}


def run(st: Section) -> None:
    import jax
    import jax.numpy as jnp

    plan = TINY if st.tiny else FULL
    dim, k = plan["dim"], plan["k"]
    room = device_memory_bytes() / 2
    for n in plan["sizes"]:
        rng = np.random.default_rng(n)
        q, kk = (rng.standard_normal((n, dim)).astype(np.float32) for _ in range(2))
        z, g = (rng.standard_normal((n, k)).astype(np.float32) for _ in range(2))
        ref: dict[str, np.ndarray] = {}
        done: dict[str, float] = {}
        for name, (fn, dts, square) in _variants(dim, k).items():
            fields = dict(n=n, variant=name, target=not st.tiny and n == max(plan["sizes"]) and name == "blockwise f32")
            if square and 3.0 * n * n * 4 > room:
                st.row(f"N={n} {name}", "skipped", f"the N×N logits ({4 * n * n / 2 ** 30:.0f} GiB) do not fit "
                                                   f"in half the device memory", **fields)
                continue

            def measure(fn=fn, dts=dts, square=square, name=name):
                args = [jnp.asarray(a, d) for a, d in zip((q, kk, z), dts)]
                gj = jnp.asarray(g, dts[2])
                grad = jax.jit(jax.grad(lambda z_, q_, k_: jnp.sum(gj * fn(q_, k_, z_)).astype(jnp.float32)))
                with jax.default_matmul_precision("float32"):
                    mv = jax.jit(fn).lower(*args).compile()        # compiled once: its memory plan, then timed
                    mem = _common.xla_memory(mv)["xla_temp_mib"]
                    y, dz = np.asarray(mv(*args), np.float32), np.asarray(grad(args[2], *args[:2]), np.float32)
                    t = medians({"mv": jax_blocking(mv, *args), "grad": jax_blocking(grad, args[2], *args[:2])},
                                plan["runs"], plan["warmup"])
                if name in ("dense f32", "blockwise f32") and not ref:     # dense where it fits, else blockwise
                    ref.update(y=y, dz=dz, name=name)
                done[name] = t["mv"]
                base = done.get("blockwise f32")
                return {"matvec_ms": 1e3 * t["mv"], "grad_ms": 1e3 * t["grad"], "xla_temp_mib": mem,
                        "matvec_err": rel_err(y, ref["y"]) if ref else None,
                        "grad_err": rel_err(dz, ref["dz"]) if ref else None,
                        "reference": ref.get("name"), "vs_blockwise": base / t["mv"] if base else None}

            st.attempt(f"N={n} {name}", measure, **fields)
