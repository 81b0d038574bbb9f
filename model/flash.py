"""Flash-attention kernels for training-time self-attention: O(T) memory, the same mask rule.

The kernels read the mask's parts (causal or not, query/key segment ids) instead of a dense
``[b, t, s]`` boolean, and never materialise the ``[T, T]`` scores:

- ``splash``: the Pallas TPU splash-attention kernel (``jax.experimental.pallas.ops.tpu``), a
  causal or full mask per head and ``SegmentIds`` for packed documents and padding; grouped-query
  heads are read in place (query head i uses kv head i // g), not repeated.
- ``gpu``: on GPUs, cuDNN's fused attention (``jax.nn.dot_product_attention(implementation="cudnn")``,
  causal with per-row lengths) when every row holds one document followed by padding, decided at
  run time per batch; otherwise the Pallas GPU (Triton) flash kernel with segment ids, which keeps
  packed documents apart exactly. The Triton kernel has no grouped-query support: kv heads are
  repeated for it (O(T) memory). Padding queries' outputs differ from the reference on the cuDNN
  branch (zeros instead of padding attending padding); the loss masks them and no real token reads them.

Off their platform the Pallas kernels run in interpret mode (slow; what the CPU tests use). Under an
activation layout (``constrain.layout_sharding``: the train step's mesh and rules) the kernel runs
per shard inside ``jax.shard_map``, batch split as the layout says and heads over their mesh axis,
because XLA cannot partition a custom kernel itself. Without a layout it runs on the whole arrays.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from .constrain import layout_sharding

Q_AXES, KV_AXES, SEG_AXES = ("batch", "length", "heads", "head_dim"), ("batch", "length", "kv_heads", "head_dim"), \
    ("batch", "length")


def target_platform() -> str:
    """The platform the step is compiled for: the layout mesh's devices (a TPU topology compiled on a CPU
    machine counts as TPU), else the default backend."""
    sharding = layout_sharding(SEG_AXES, (0, 0))
    if sharding is not None:
        return sharding.mesh.devices.flat[0].platform
    return jax.default_backend()


def splash_supported(t: int, s: int, e: int) -> bool:
    """Shapes the TPU kernel tiles: lengths in multiples of 128 (its lane width), head size >= 64."""
    return t == s and t % 128 == 0 and e % 64 == 0


def _sharded(kernel, q_bthe, k_bske, v_bske, q_seg_bt, k_seg_bs):
    """Run ``kernel`` per shard under the active layout (or whole, with none)."""
    b, t, h, e = q_bthe.shape
    q_sh, kv_sh = layout_sharding(Q_AXES, q_bthe.shape), layout_sharding(KV_AXES, k_bske.shape)
    if q_sh is None:
        return kernel(q_bthe, k_bske, v_bske, q_seg_bt, k_seg_bs)
    if q_sh.spec[2] != kv_sh.spec[2]:  # kv heads do not split like query heads: give every query head its own
        k_bske, v_bske = (jnp.repeat(a, h // a.shape[2], axis=2) for a in (k_bske, v_bske))
        kv_sh = q_sh
    seg_spec = layout_sharding(SEG_AXES, q_seg_bt.shape).spec
    return jax.shard_map(kernel, mesh=q_sh.mesh, in_specs=(q_sh.spec, kv_sh.spec, kv_sh.spec, seg_spec, seg_spec),
                         out_specs=q_sh.spec, check_vma=False)(q_bthe, k_bske, v_bske, q_seg_bt, k_seg_bs)


def _splash_local(q_bthe, k_bske, v_bske, q_seg_bt, k_seg_bs, causal: bool, interpret: bool, scale: float | None):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, t, h, e = q_bthe.shape
    s = k_bske.shape[1]
    head_mask = sm.CausalMask((t, s)) if causal else sm.FullMask((t, s))
    bq, bk = min(512, t), min(512, s)
    sizes = sk.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                          block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
    kernel = sk.make_splash_mha(sm.MultiHeadMask([head_mask] * h), block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                interpret=interpret)
    scale = jnp.asarray(1 / math.sqrt(e) if scale is None else scale, q_bthe.dtype)  # splash does not scale itself

    def one_row(q_hte, k_kse, v_kse, q_seg_t, k_seg_s):
        return kernel(q_hte * scale, k_kse, v_kse, segment_ids=sk.SegmentIds(q_seg_t, k_seg_s))

    out_bhte = jax.vmap(one_row)(q_bthe.swapaxes(1, 2), k_bske.swapaxes(1, 2), v_bske.swapaxes(1, 2), q_seg_bt,
                                 k_seg_bs)
    return out_bhte.swapaxes(1, 2)


def splash_attention(q_bthe, k_bske, v_bske, q_seg_bt, k_seg_bs, causal: bool, scale: float | None = None) -> jax.Array:
    """Self-attention through the TPU splash kernel (interpret mode off TPU)."""
    kernel = functools.partial(_splash_local, causal=causal, interpret=target_platform() != "tpu", scale=scale)
    return _sharded(kernel, q_bthe, k_bske, v_bske, q_seg_bt, k_seg_bs)


def _triton_local(q_bthe, k_bske, v_bske, q_seg_bt, k_seg_bs, causal: bool, interpret: bool, scale: float | None):
    from jax.experimental.pallas.ops.gpu import attention as ga

    h, t = q_bthe.shape[2], q_bthe.shape[1]
    k_bske, v_bske = (jnp.repeat(a, h // a.shape[2], axis=2) for a in (k_bske, v_bske))
    block = min(128, t)
    back = min(32, t)
    sizes = ga.BlockSizes(block_q=block, block_k=block, block_q_dkv=back, block_kv_dkv=back, block_q_dq=back,
                          block_kv_dq=back)
    return ga.mha(q_bthe, k_bske, v_bske, q_seg_bt, sm_scale=1 / math.sqrt(q_bthe.shape[-1]) if scale is None else scale,
                  causal=causal,
                  block_sizes=sizes, interpret=interpret)


def single_document_rows(seg_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(whether every row is one document then padding, each row's length): when cuDNN's lengths are exact."""
    lengths_b = jnp.sum(seg_bt > 0, axis=1).astype(jnp.int32)
    first_b1 = seg_bt[:, :1]
    expected_bt = jnp.where(jnp.arange(seg_bt.shape[1])[None] < lengths_b[:, None], first_b1, 0)
    return jnp.all(seg_bt == expected_bt) & jnp.all(first_b1 > 0), lengths_b


def cudnn_takes(dtype: jnp.dtype) -> bool:
    """cuDNN's flash attention takes fp16/bf16 (and fp8) only; float32 runs the Pallas GPU kernel (found by
    compiling the float32 `tiny` step for h100:8 without a GPU, tools/topology_plan.py)."""
    return jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)


def _gpu_local(q_bthe, k_bske, v_bske, q_seg_bt, k_seg_bs, causal: bool, interpret: bool, scale: float | None):
    triton = functools.partial(_triton_local, causal=causal, interpret=interpret, scale=scale)
    if interpret or not cudnn_takes(q_bthe.dtype):  # no cuDNN off a GPU: the CPU tests check the Triton kernel
        return triton(q_bthe, k_bske, v_bske, q_seg_bt, k_seg_bs)
    single, lengths_b = single_document_rows(q_seg_bt)

    def cudnn(q, k, v, q_seg, k_seg):
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, scale=scale, query_seq_lengths=lengths_b,
                                            key_value_seq_lengths=lengths_b, implementation="cudnn")

    return jax.lax.cond(single, cudnn, triton, q_bthe, k_bske, v_bske, q_seg_bt, k_seg_bs)


def gpu_attention(q_bthe, k_bske, v_bske, q_seg_bt, k_seg_bs, causal: bool, scale: float | None = None) -> jax.Array:
    """Self-attention through cuDNN (one document per row) or the Pallas GPU flash kernel (packed rows)."""
    kernel = functools.partial(_gpu_local, causal=causal, interpret=target_platform() != "gpu", scale=scale)
    return _sharded(kernel, q_bthe, k_bske, v_bske, q_seg_bt, k_seg_bs)


KERNELS = {"splash": splash_attention, "cudnn": gpu_attention}
