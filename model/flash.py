"""Flash-attention kernels for training-time self-attention: O(T) memory, the same mask rule.

The kernels read the mask's parts (causal or not, query/key segment ids, a static sliding window)
instead of a dense ``[b, t, s]`` boolean, and never materialise the ``[T, T]`` scores:

- ``splash``: the Pallas TPU splash-attention kernel (``jax.experimental.pallas.ops.tpu``), a
  causal, full or local (sliding-window) mask per head, ``SegmentIds`` for packed documents and
  padding, and its own logit soft-cap; grouped-query heads are read in place (query head i uses kv
  head i // g), not repeated. Blocks: the largest multiple of 128 up to 512 dividing T.
- ``gpu``: on GPUs, cuDNN's fused attention (``jax.nn.dot_product_attention(implementation="cudnn")``,
  causal with per-row lengths and a left window) when every row holds one document followed by
  padding, decided at run time per batch; otherwise the Pallas GPU (Triton) flash kernel with segment
  ids, which keeps packed documents apart exactly but takes no window, no soft-cap and only lengths in
  multiples of 128 (where it cannot, those rows run on jax's XLA attention). The Triton kernel has no
  grouped-query support: kv heads are repeated for it (O(T) memory). Padding queries' outputs differ
  from the reference on the cuDNN branch (zeros instead of padding attending padding); the loss masks
  them and no real token reads them. ``gpu_plan`` says which runs; a soft-cap runs on XLA.

Off their platform the Pallas kernels run in interpret mode (slow; what the CPU tests use). Under an
activation layout (``constrain.layout_sharding``: the train step's mesh and rules) the kernel runs
per shard inside ``jax.shard_map``, batch split as the layout says and heads over their mesh axis,
because XLA cannot partition a custom kernel itself; a layout that splits ``length`` or ``head_dim``
would give each shard part of the attention (``sharded_dims``; model/attention.py refuses or falls
back). Without a layout it runs on the whole arrays.
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


def sharded_dims(t: int, e: int) -> list[str]:
    """The query dimensions among ``length`` and ``head_dim`` that the active layout splits over mesh axes
    of more than one device: a kernel run per shard would attend within a chunk of the sequence, or add
    up partial dot products, so no kernel here takes them."""
    sharding = layout_sharding(Q_AXES, (0, t, 0, e))
    if sharding is None:
        return []
    sizes = dict(sharding.mesh.shape)
    split = []
    for name, entry in zip(("length", "head_dim"), (sharding.spec[1], sharding.spec[3])):
        axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
        if math.prod(sizes[a] for a in axes) > 1:
            split.append(name)
    return split


def splash_block(n: int) -> int:
    """The splash block along a length n (a multiple of 128): the largest multiple of 128 <= 512 dividing n."""
    return max(b for b in (512, 384, 256, 128) if n % b == 0)


def splash_unsupported(t: int, s: int, e: int) -> str:
    """Why the TPU kernel cannot tile these shapes ('' when it can): self-attention over one length in
    multiples of 128 (its lane width), head size a multiple of 64."""
    if t != s:
        return f"query length {t} differs from key length {s}"
    if t % 128:
        return f"length {t} is not a multiple of 128"
    if e % 64:
        return f"head size {e} is not a multiple of 64"
    return ""


def pallas_gpu_unsupported(t: int, s: int, window: int, softcap: float) -> str:
    """Why the Pallas GPU (Triton) kernel cannot run ('' when it can): it takes no sliding window and no
    soft-cap, and its blocks (128 forward, 32 backward) must divide the length."""
    if softcap:
        return "the Pallas GPU kernel has no soft-cap"
    if window:
        return "the Pallas GPU kernel has no sliding window"
    if t % 128:
        return f"the Pallas GPU kernel tiles lengths in multiples of 128, not {t}"
    return ""


def cudnn_unsupported(dtype: jnp.dtype, e: int, causal: bool, window: int, softcap: float) -> str:
    """Why cuDNN's fused attention cannot run ('' when it can): fp16/bf16 only (float32 does not compile,
    found by compiling the float32 `tiny` step for h100:8 without a GPU, tools/topology_plan.py), head
    size a multiple of 8 up to 256 (above 128 Hopper or later), a window only when causal, no soft-cap."""
    if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return f"cuDNN takes bfloat16/float16, not {jnp.dtype(dtype).name}"
    if e % 8 or e > 256:
        return f"cuDNN takes head sizes in multiples of 8 up to 256, not {e}"
    if softcap:
        return "cuDNN (through jax) has no soft-cap"
    if window and not causal:
        return "cuDNN takes a sliding window only with a causal mask"
    return ""


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


def _splash_local(q_bthe, k_bske, v_bske, q_seg_bt, k_seg_bs, causal: bool, interpret: bool, scale: float | None,
                  window: int, softcap: float):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, t, h, e = q_bthe.shape
    s = k_bske.shape[1]
    if window:  # query i sees keys i - (W - 1) .. i (causal), or .. i + (W - 1) (bidirectional)
        head_mask = sm.LocalMask((t, s), (window - 1, 0 if causal else window - 1), offset=0)
    else:
        head_mask = sm.CausalMask((t, s)) if causal else sm.FullMask((t, s))
    bq, bk = splash_block(t), splash_block(s)
    sizes = sk.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                          block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
    kernel = sk.make_splash_mha(sm.MultiHeadMask([head_mask] * h), block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                attn_logits_soft_cap=softcap or None, interpret=interpret)
    scale = jnp.asarray(1 / math.sqrt(e) if scale is None else scale, q_bthe.dtype)  # splash does not scale itself

    def one_row(q_hte, k_kse, v_kse, q_seg_t, k_seg_s):
        return kernel(q_hte * scale, k_kse, v_kse, segment_ids=sk.SegmentIds(q_seg_t, k_seg_s))

    out_bhte = jax.vmap(one_row)(q_bthe.swapaxes(1, 2), k_bske.swapaxes(1, 2), v_bske.swapaxes(1, 2), q_seg_bt,
                                 k_seg_bs)
    return out_bhte.swapaxes(1, 2)


def splash_attention(q_bthe, k_bske, v_bske, q_seg_bt, k_seg_bs, causal: bool, scale: float | None = None,
                     window: int = 0, softcap: float = 0.0) -> jax.Array:
    """Self-attention through the TPU splash kernel (interpret mode off TPU)."""
    kernel = functools.partial(_splash_local, causal=causal, interpret=target_platform() != "tpu", scale=scale,
                               window=window, softcap=softcap)
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


def _xla_local(q_bthe, k_bske, v_bske, q_seg_bt, k_seg_bs, causal: bool, scale: float | None, window: int):
    """jax's XLA attention with the mask built from its parts (packed rows where no GPU kernel can run)."""
    same_segment = (q_seg_bt[:, :, None] == k_seg_bs[:, None, :])[:, None]
    local = (window - 1, 0 if causal else window - 1) if window else None
    return jax.nn.dot_product_attention(q_bthe, k_bske, v_bske, mask=same_segment, is_causal=causal, scale=scale,
                                        local_window_size=local, implementation="xla")


def _gpu_local(q_bthe, k_bske, v_bske, q_seg_bt, k_seg_bs, causal: bool, interpret: bool, scale: float | None,
               window: int, use_cudnn: bool, packed: str):
    if packed == "pallas-gpu":
        packed_rows = functools.partial(_triton_local, causal=causal, interpret=interpret, scale=scale)
    else:
        packed_rows = functools.partial(_xla_local, causal=causal, scale=scale, window=window)
    if interpret or not use_cudnn:  # no cuDNN off a GPU: the CPU tests check the packed-rows path
        return packed_rows(q_bthe, k_bske, v_bske, q_seg_bt, k_seg_bs)
    single, lengths_b = single_document_rows(q_seg_bt)

    def cudnn(q, k, v, q_seg, k_seg):
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, scale=scale, query_seq_lengths=lengths_b,
                                            key_value_seq_lengths=lengths_b, implementation="cudnn",
                                            local_window_size=(window - 1, 0) if window else None)

    return jax.lax.cond(single, cudnn, packed_rows, q_bthe, k_bske, v_bske, q_seg_bt, k_seg_bs)


def gpu_plan(t: int, s: int, e: int, dtype: jnp.dtype, causal: bool, window: int, softcap: float) -> tuple[str, str]:
    """What the GPU path runs, as (kernels, reason): ``cudnn+pallas-gpu`` (cuDNN for rows of one document,
    the Pallas GPU kernel for packed rows, chosen per batch at run time), ``cudnn+xla`` (packed rows on
    jax's XLA attention), ``pallas-gpu`` (every row), or ``xla`` (no kernel can; the reason says why)."""
    if t != s:  # both kernels read one row's lengths / segment ids for queries and keys alike
        return "xla", f"query length {t} differs from key length {s}"
    no_cudnn = cudnn_unsupported(dtype, e, causal, window, softcap)
    no_pallas = pallas_gpu_unsupported(t, s, window, softcap)
    if no_cudnn and no_pallas:
        return "xla", f"{no_cudnn}; {no_pallas}"
    if no_cudnn:
        return "pallas-gpu", no_cudnn
    return ("cudnn+pallas-gpu", "") if not no_pallas else ("cudnn+xla", f"packed rows on xla: {no_pallas}")


def gpu_attention(q_bthe, k_bske, v_bske, q_seg_bt, k_seg_bs, causal: bool, scale: float | None = None,
                  window: int = 0, softcap: float = 0.0) -> jax.Array:
    """Self-attention through cuDNN (one document per row) or the Pallas GPU flash kernel (packed rows),
    as ``gpu_plan`` says; ``softcap`` must be 0 (``select_impl`` sends a soft-cap to XLA)."""
    kernels, reason = gpu_plan(q_bthe.shape[1], k_bske.shape[1], q_bthe.shape[3], q_bthe.dtype, causal, window,
                               softcap)
    if kernels == "xla":
        raise ValueError(f"no GPU kernel runs this attention: {reason}")  # select_impl avoids it
    kernel = functools.partial(_gpu_local, causal=causal, interpret=target_platform() != "gpu", scale=scale,
                               window=window, use_cudnn=kernels.startswith("cudnn"), packed=kernels.split("+")[-1])
    return _sharded(kernel, q_bthe, k_bske, v_bske, q_seg_bt, k_seg_bs)


KERNELS = {"splash": splash_attention, "cudnn": gpu_attention}
