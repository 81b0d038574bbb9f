"""The matrix multiplications of one training step of the GPT-style model, and nothing else: a floor for the step.

vs_torch.py times this list in JAX (one compiled call) and in eager PyTorch beside the two real steps. A step cannot
run faster than its matmuls alone, so the floor shows how much of each step is matmul and how much is everything
else (norms, softmax, GELU, layout copies, the optimizer, dispatch).

Per layer, with rows N = batch · block, each linear layer y = x·W ([N, i] @ [i, o]) costs three matmuls: the forward,
dx = dy·Wᵀ and dW = xᵀ·dy. q, k and v are one [d, 3d] projection (PyTorch's fused form: one larger matmul is at
least as fast as three). Attention per (sequence, head): S = Q·Kᵀ and O = P·V forward; dV = Pᵀ·dO, dP = dO·Vᵀ,
dQ = dS·K and dK = dSᵀ·Q backward. Then the tied output head [N, d] @ [d, vocab] and its two gradients.
"""
from __future__ import annotations

import time

import numpy as np

# (kind, lhs shape, rhs shape): "nn" a @ b, "nt" a @ bᵀ, "tn" aᵀ @ b (the last two axes; a leading axis is a batch)
Matmul = tuple[str, tuple[int, ...], tuple[int, ...]]


def linear(rows: int, n_in: int, n_out: int) -> list[Matmul]:
    return [("nn", (rows, n_in), (n_in, n_out)),  # y = x W
            ("nt", (rows, n_out), (n_in, n_out)),  # dx = dy Wᵀ
            ("tn", (rows, n_in), (rows, n_out))]  # dW = xᵀ dy


def step_matmuls(vocab: int, d: int, layers: int, heads: int, block: int, batch: int) -> list[Matmul]:
    rows, bh, e, t = batch * block, batch * heads, d // heads, block
    per_layer = linear(rows, d, 3 * d) + linear(rows, d, d) + linear(rows, d, 4 * d) + linear(rows, 4 * d, d) + [
        ("nt", (bh, t, e), (bh, t, e)),  # S = Q Kᵀ
        ("nn", (bh, t, t), (bh, t, e)),  # O = P V
        ("tn", (bh, t, t), (bh, t, e)),  # dV = Pᵀ dO
        ("nt", (bh, t, e), (bh, t, e)),  # dP = dO Vᵀ
        ("nn", (bh, t, t), (bh, t, e)),  # dQ = dS K
        ("tn", (bh, t, t), (bh, t, e)),  # dK = dSᵀ Q
    ]
    return per_layer * layers + linear(rows, d, vocab)


def flops(matmuls: list[Matmul]) -> float:
    total = 0.0
    for kind, a, b in matmuls:
        batch = a[0] if len(a) == 3 else 1
        m, k = (a[-1], a[-2]) if kind == "tn" else (a[-2], a[-1])
        n = b[-2] if kind == "nt" else b[-1]
        total += 2.0 * batch * m * k * n
    return total


class MatmulsAlone:
    """Random float32 operands for every matmul of the list, in JAX and PyTorch; ``time_jax``/``time_torch``
    run all of them once (JAX: one jitted call) and return the wall seconds."""

    def __init__(self, matmuls: list[Matmul], seed: int = 0):
        import jax
        import jax.numpy as jnp
        import torch

        rng = np.random.default_rng(seed)
        operands = [(rng.standard_normal(a, dtype=np.float32), rng.standard_normal(b, dtype=np.float32))
                    for _, a, b in matmuls]
        kinds = [kind for kind, _, _ in matmuls]
        self.flops = flops(matmuls)

        def t(x):
            return jnp.swapaxes(x, -1, -2)

        def all_jax(pairs):
            return [a @ b if k == "nn" else (a @ t(b) if k == "nt" else t(a) @ b) for k, (a, b) in zip(kinds, pairs)]

        self._jax, self._jax_ops = jax.jit(all_jax), jax.device_put(operands)
        self._torch_ops = [(torch.from_numpy(a), torch.from_numpy(b)) for a, b in operands]
        self._kinds, self._block = kinds, jax.block_until_ready
        self.time_jax(), self.time_torch()  # compile, warm up

    def time_jax(self) -> float:
        start = time.perf_counter()
        self._block(self._jax(self._jax_ops))
        return time.perf_counter() - start

    def time_torch(self) -> float:
        start = time.perf_counter()
        for k, (a, b) in zip(self._kinds, self._torch_ops):
            a @ b if k == "nn" else (a @ b.mT if k == "nt" else a.mT @ b)
        return time.perf_counter() - start
