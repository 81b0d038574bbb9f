"""What the hardware could do: peak tables, the same-run CPU measurements, and decode's byte count.

Accelerators are rated from tables of published numbers (dense bf16 matmul peak, HBM bandwidth),
chosen by ``jax.devices()[0].device_kind``. A CPU has no useful published number, so the benchmark
measures one in the same process: a jitted float32 2048×2048 matmul for the FLOP rate, a large jitted
elementwise copy for the memory bandwidth. Virtual CPU devices share the host's cores, so a CPU
"device" is rated at the host's rate divided by the number of devices the run uses.

Decode roofline: one decode step must read every weight it multiplies by once (the embedding table
only for the rows it gathers, unless it is tied to the output projection) plus the keys and values
of every filled cache position, for all rows of the batch:

    bytes(step) = weight_bytes + 2 · L · B · n_keys · K · E · itemsize(kv)

and cannot take less than ``bytes / bandwidth`` seconds. Compute is negligible at small batch.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qkv.model import ModelConfig

PROBE_N = 2048  # the CPU "peak": a float32 PROBE_N × PROBE_N matmul
COPY_BYTES = 256 << 20  # the CPU bandwidth: an in-place x + 1 over this many bytes (well past the L3 cache)

# Dense (no sparsity) bf16 matmul peak per device, TFLOP/s. Checked in order: first match wins.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("h100 pcie", 756.0), ("h200", 989.0), ("h100", 989.0), ("a100", 312.0),
    ("tpu v6 lite", 918.0), ("tpu v6e", 918.0), ("tpu v5 lite", 197.0), ("tpu v5e", 197.0),
    ("tpu v5p", 459.0), ("tpu v5", 459.0), ("tpu v4", 275.0),
]
# HBM bandwidth per device, TB/s.
HBM_TBPS: list[tuple[str, float]] = [
    ("h100 pcie", 2.0), ("h200", 4.8), ("h100", 3.35), ("a100", 2.0),
    ("tpu v6 lite", 1.64), ("tpu v6e", 1.64), ("tpu v5 lite", 0.82), ("tpu v5e", 0.82),
    ("tpu v5p", 2.76), ("tpu v5", 2.76), ("tpu v4", 1.2),
]


def lookup(table: list[tuple[str, float]], device_kind: str) -> float | None:
    kind = device_kind.lower()
    return next((value for pattern, value in table if pattern in kind), None)


class MatmulProbe:
    """A jitted float32 n×n·n×n matmul on one device (2n³ FLOPs); each ``()`` runs one and returns seconds.

    The train benchmark calls it between timed steps, so the "peak" and the steps see the same load.
    """

    def __init__(self, device: Any = None, n: int | None = None):
        device, n = device or jax.devices()[0], n or PROBE_N
        key_a, key_b = jax.random.split(jax.random.key(0))
        self.a = jax.device_put(jax.random.normal(key_a, (n, n), jnp.float32), device)
        self.b = jax.device_put(jax.random.normal(key_b, (n, n), jnp.float32), device)
        self.flops = 2.0 * n**3
        self.fn = jax.jit(jnp.matmul)
        jax.block_until_ready(self.fn(self.a, self.b))  # compile and warm up

    def __call__(self) -> float:
        return self.timed()[0]

    def timed(self) -> tuple[float, float]:
        """(wall seconds, this process's CPU seconds) of one matmul."""
        start, cpu = time.perf_counter(), time.process_time()
        jax.block_until_ready(self.fn(self.a, self.b))
        return time.perf_counter() - start, time.process_time() - cpu

    def tflops(self, seconds: Sequence[float]) -> float:
        """Rate at the median of the given call times, TFLOP/s."""
        return self.flops / float(np.median(seconds)) / 1e12


def measure_matmul_tflops(device: Any = None, n: int | None = None, repeats: int = 7) -> float:
    """Median float32 rate of a jitted n×n·n×n matmul on ``device``, TFLOP/s."""
    probe = MatmulProbe(device, n)
    return probe.tflops([probe() for _ in range(repeats)])


def measure_copy_tbps(device: Any = None, n_bytes: int | None = None, repeats: int = 7) -> float:
    """Median bandwidth of a jitted in-place ``x + 1`` over a float32 array of ``n_bytes`` (donated, so no
    fresh pages are touched): bytes read + written, TB/s."""
    device, n_bytes = device or jax.devices()[0], n_bytes or COPY_BYTES
    x = jax.device_put(jnp.zeros((n_bytes // 4,), jnp.float32), device)
    add_one = jax.jit(lambda v: v + 1.0, donate_argnums=0)
    x = jax.block_until_ready(add_one(x))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        x = jax.block_until_ready(add_one(x))
        times.append(time.perf_counter() - start)
    return 2.0 * n_bytes / float(np.median(times)) / 1e12


def peak_tflops_per_device(device: Any, n_devices: int, measured_host_tflops: float | None) -> tuple[float | None, str]:
    """(peak TFLOP/s per device, where it comes from) for MFU."""
    if device.platform == "cpu":
        if measured_host_tflops is None:
            return None, "none"
        return measured_host_tflops / n_devices, f"measured float32 {PROBE_N}x{PROBE_N} matmul (host rate / devices)"
    value = lookup(PEAK_BF16_TFLOPS, device.device_kind)
    return value, ("table: dense bf16 peak" if value else f"unknown device kind {device.device_kind!r}")


def bandwidth_tbps(device: Any, measured_tbps: float | None) -> tuple[float | None, str]:
    if device.platform == "cpu":
        return measured_tbps, f"measured jitted in-place float32 x+1 over {COPY_BYTES >> 20} MiB (read + write)"
    value = lookup(HBM_TBPS, device.device_kind)
    return value, ("table: HBM bandwidth" if value else f"unknown device kind {device.device_kind!r}")


def weight_bytes_read(cfg: ModelConfig, params: Any, batch: int) -> int:
    """Bytes of parameters one decode step reads: all of them, except tables it only gathers rows from."""
    total = sum(int(x.size) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))
    gathered = [] if cfg.tie_embeddings else [params["embed"]]  # tied: the output projection reads it all
    if cfg.positions == "learned":
        gathered.append(params["pos_embed"])
    for table in gathered:
        itemsize = np.dtype(table.dtype).itemsize
        total -= int(table.size) * itemsize - batch * table.shape[1] * itemsize
    return total


def kv_bytes_read(cfg: ModelConfig, batch: int, n_keys: int) -> int:
    """Keys and values of ``n_keys`` cache positions, every layer and row, in the compute dtype."""
    return 2 * cfg.n_layers * batch * n_keys * cfg.num_kv_heads * cfg.head_size * cfg.compute_dtype.itemsize


def decode_bytes_per_step(cfg: ModelConfig, params: Any, batch: int, prompt_len: int, n_steps: int) -> float:
    """Mean roofline bytes over decode steps 1..n_steps: step i writes position prompt_len+i-1 and reads
    prompt_len+i keys (the prefill already produced the first new token)."""
    weights = weight_bytes_read(cfg, params, batch)
    keys = [prompt_len + i for i in range(1, n_steps + 1)]
    return weights + float(np.mean([kv_bytes_read(cfg, batch, k) for k in keys]))
