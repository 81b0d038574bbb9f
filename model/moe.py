"""Mixture-of-experts feed-forward layer: a router picks k of E experts per token (docs/moe.md).

    logits_ne = x_nd @ router_de                          (float32)
    weights_nk, experts_nk = top-k of the router scores   (model.router)
    y_nd = sum_k weights_nk * expert[experts_nk](x_nd)    (+ shared experts: one dense MLP every token uses)

Each expert is the block's MLP kind (ReLU / GELU / SwiGLU / GeGLU) of width ``moe_d_ff``; the experts' weights are
stacked on a leading ``expert`` logical axis (``[E, d, f]``), which the rules table maps to the ``expert``
mesh axis. Dispatch is a grouped matmul, never a dense all-experts einsum: the N·k (token, expert)
assignments are sorted by expert, ``jax.lax.ragged_dot`` multiplies each contiguous group by its expert's
weights, and the outputs are put back in token order and weighed.

Dropless by default: every assignment is computed. With ``expert_capacity_factor`` c > 0 an expert takes at
most ceil(c · N · k / E) assignments of a batch (in token order); the rest get weight 0 and are counted.

Auxiliary outputs (per layer, kept as ``nnx.Intermediate`` and collected by ``moe_stats`` after the forward
pass, stacked over layers like the parameters): the load-balancing loss E · sum_e f_e · P_e (f_e: the share
of assignments routed to e, summed over the k choices as in Hugging Face's ``load_balancing_loss_func``;
P_e: the mean router probability of e; it is k for a uniform router), the router z-loss
mean(logsumexp(logits)²), each expert's share of the assignments and the share dropped by capacity.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from qkv.errors import UserError

from .config import ModelConfig
from .constrain import layout_sharding
from .layers import Mlp, param


def route(logits_ne: jax.Array, k: int, kind: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(weights [N, k], expert ids [N, k], per-token probabilities over all experts [N, E]) from float32 logits."""
    if kind == "sigmoid_normalized":
        scores_ne = jax.nn.sigmoid(logits_ne)
        probs_ne = scores_ne / jnp.sum(scores_ne, axis=-1, keepdims=True)
    else:
        scores_ne = probs_ne = jax.nn.softmax(logits_ne, axis=-1)
    weights_nk, experts_nk = jax.lax.top_k(scores_ne, k)
    if kind != "softmax":
        weights_nk = weights_nk / jnp.sum(weights_nk, axis=-1, keepdims=True)
    return weights_nk, experts_nk, probs_ne


def dispatch_order(experts_nk: jax.Array, n_experts: int, capacity: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(order [N·k]: assignment indices sorted by expert, stable; group sizes [E]; kept [N·k] in assignment order).

    ``capacity`` > 0 keeps the first ``capacity`` assignments of each expert (token order); 0 keeps all."""
    flat = experts_nk.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sizes_e = jnp.bincount(flat, length=n_experts).astype(jnp.int32)
    if capacity <= 0:
        return order, sizes_e, jnp.ones(flat.shape, bool)
    starts_e = jnp.cumsum(sizes_e) - sizes_e
    rank_sorted = jnp.arange(flat.shape[0]) - starts_e[flat[order]]
    kept = jnp.zeros(flat.shape, bool).at[order].set(rank_sorted < capacity)
    return order, sizes_e, kept


class MoeMlp(nnx.Module):
    """Routed experts (+ optional shared experts) in place of the block's MLP."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f, e, std, wd = cfg.d_model, cfg.expert_d_ff, cfg.n_experts, cfg.init_std, cfg.weight_dtype
        self.k, self.n_experts, self.kind = cfg.n_experts_per_token, e, cfg.router
        self.activation, self.dtype, self.capacity_factor = cfg.activation, cfg.compute_dtype, cfg.expert_capacity_factor
        self.router = param(rngs, (d, e), ("embed", None), std, wd)
        self.wi = param(rngs, (e, d, f), ("expert", "embed", "mlp"), std, wd)
        if cfg.activation in ("swiglu", "geglu"):
            self.wg = param(rngs, (e, d, f), ("expert", "embed", "mlp"), std, wd)
        self.wo = param(rngs, (e, f, d), ("expert", "mlp", "embed"), std / math.sqrt(2 * cfg.n_layers), wd)
        self.bi = param(rngs, (e, f), ("expert", "mlp"), None, wd) if cfg.use_bias else None
        self.bo = param(rngs, (e, d), ("expert", "embed"), None, wd) if cfg.use_bias else None
        self.shared = (Mlp(cfg.replace(d_ff=cfg.n_shared_experts * f, n_experts=0, n_shared_experts=0), rngs)
                       if cfg.n_shared_experts else None)

    def capacity(self, n_tokens: int) -> int:
        """Assignments one expert takes from a group of ``n_tokens`` tokens (0: no limit)."""
        if not self.capacity_factor:
            return 0
        return max(1, math.ceil(self.capacity_factor * n_tokens * self.k / self.n_experts))

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        dt = self.dtype
        weights = {"router": self.router[...].astype(jnp.float32),
                   **{name: getattr(self, name)[...].astype(dt) for name in ("wi", "wg", "wo", "bi", "bo")
                      if getattr(self, name, None) is not None}}
        tokens = layout_sharding(("batch", None, None), x_btd.shape)
        if tokens is None:  # no mesh (decoding, plain calls): one group of all tokens
            y_btd, stats = self.dispatch(x_btd, weights, (), None)
        else:  # on the train step's mesh: per batch shard, experts split over their mesh axis (docs/moe.md)
            y_btd, stats = self.sharded_dispatch(x_btd, weights, tokens)
        if self.shared is not None:
            y_btd = y_btd + self.shared(x_btd)
        for name, value in stats.items():
            setattr(self, name, nnx.Intermediate(value))
        return y_btd

    def sharded_dispatch(self, x_btd, weights, tokens):
        """``dispatch`` inside ``shard_map``: each device routes its batch shard; with the experts split over a
        mesh axis (expert parallelism) the token shards along that axis are all-gathered, each device runs its
        own experts' assignments, and the partial outputs are reduce-scattered back (exact and dropless)."""
        mesh = tokens.mesh
        tok_axes = _names(tokens.spec[0])
        ep = _names(layout_sharding(("expert", None, None), weights["wi"].shape).spec[0])
        if len(ep) > 1:
            raise UserError(f"mesh.rules.expert={list(ep)}: experts split over one mesh axis only (e.g. expert)")
        ep_axis = ep[0] if ep else None
        spec = {name: P(ep_axis) if name != "router" else P() for name in weights}
        body = lambda x, w: self.dispatch(x, w, tok_axes, ep_axis)  # noqa: E731
        return jax.shard_map(body, mesh=mesh, in_specs=(P(tok_axes or None), spec),
                             out_specs=(P(tok_axes or None), P()))(x_btd, weights)

    def dispatch(self, x_btd, w, tok_axes: tuple[str, ...], ep_axis: str | None):
        """(outputs [b, t, d], statistics over the whole batch) for this device's tokens and experts."""
        b, t, d = x_btd.shape
        k, n_experts = self.k, self.n_experts
        x_nd = x_btd.reshape(b * t, d)
        logits_ne = jnp.dot(x_nd.astype(jnp.float32), w["router"])
        weights_nk, experts_nk, probs_ne = route(logits_ne, k, self.kind)
        totals = {"counts_e": jnp.bincount(experts_nk.reshape(-1), length=n_experts).astype(jnp.float32),
                  "probs_e": jnp.sum(probs_ne, axis=0), "lse2": jnp.sum(jnp.square(jax.nn.logsumexp(logits_ne, -1))),
                  "tokens": jnp.float32(b * t)}
        if tok_axes:
            totals = jax.lax.psum(totals, tok_axes)
        gather = ep_axis is not None and ep_axis in tok_axes
        if gather:  # the assignments of every token shard along the expert axis
            x_nd, weights_nk, experts_nk = (jax.lax.all_gather(a, ep_axis, tiled=True)
                                            for a in (x_nd, weights_nk, experts_nk))
        e_local = w["wi"].shape[0]
        first = jax.lax.axis_index(ep_axis) * e_local if ep_axis else 0
        local_nk = experts_nk - first
        mine_nk = (local_nk >= 0) & (local_nk < e_local)  # assignments to this device's experts
        order, sizes, kept = dispatch_order(jnp.where(mine_nk, local_nk, e_local), e_local + 1,
                                            self.capacity(x_nd.shape[0]))
        kept_nk = kept.reshape(mine_nk.shape) & mine_nk
        dropped = jnp.sum((mine_nk & ~kept_nk).astype(jnp.float32))
        dropped_axes = tuple(dict.fromkeys(tok_axes + ((ep_axis,) if ep_axis else ())))
        if dropped_axes:
            dropped = jax.lax.psum(dropped, dropped_axes)
        y_nd = self.experts(x_nd, w, order, sizes[:e_local], jnp.where(mine_nk, local_nk, 0),
                            jnp.where(kept_nk, weights_nk, 0.0))
        if gather:
            y_nd = jax.lax.psum_scatter(y_nd, ep_axis, scatter_dimension=0, tiled=True)
        elif ep_axis is not None:
            y_nd = jax.lax.psum(y_nd, ep_axis)
        n_assign = totals["tokens"] * k
        share_e = totals["counts_e"] / n_assign
        stats = {"aux_loss": n_experts * k * jnp.sum(share_e * totals["probs_e"] / totals["tokens"]),
                 "z_loss": totals["lse2"] / totals["tokens"], "expert_share": share_e, "dropped": dropped / n_assign}
        return y_nd.reshape(b, t, d), stats

    def experts(self, x_nd, w, order, sizes_e, experts_nk, weights_nk) -> jax.Array:
        """The grouped matmuls: sorted assignments through their experts, back to token order, weighed.
        Rows past the groups (assignments of other devices' experts) come out zero and carry weight 0."""
        n, k = experts_nk.shape
        sorted_experts = experts_nk.reshape(-1)[order]
        x_md = x_nd[order // k]  # m = n·k assignments, grouped by expert
        h_mf = jax.lax.ragged_dot(x_md, w["wi"], sizes_e)
        if "bi" in w:
            h_mf = h_mf + w["bi"][sorted_experts]
        if self.activation in ("swiglu", "geglu"):
            gate_mf = jax.lax.ragged_dot(x_md, w["wg"], sizes_e)
            gate_mf = jax.nn.silu(gate_mf) if self.activation == "swiglu" else jax.nn.gelu(gate_mf, approximate=True)
            h_mf = gate_mf * h_mf
        elif self.activation == "gelu":
            h_mf = jax.nn.gelu(h_mf, approximate=True)
        else:
            h_mf = jax.nn.relu(h_mf)
        y_md = jax.lax.ragged_dot(h_mf, w["wo"], sizes_e)
        if "bo" in w:
            y_md = y_md + w["bo"][sorted_experts]
        inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
        y_nkd = y_md[inverse].reshape(n, k, -1)
        return jnp.einsum("nk,nkd->nd", weights_nk.astype(y_nkd.dtype), y_nkd)


def _names(entry) -> tuple[str, ...]:
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


STATS = ("aux_loss", "z_loss", "expert_share", "dropped")


def moe_stats(model: nnx.Module) -> dict[str, jax.Array] | None:
    """The MoE layers' auxiliary outputs of the last forward pass, averaged over layers (and over stacks:
    an encoder-decoder's two), removed from the model; None for a model without experts.

    Returns ``aux_loss``, ``z_loss`` (unweighted scalars), ``expert_share`` [E] (share of assignments per
    expert, 1/E when balanced) and ``dropped`` (share of assignments dropped by capacity)."""
    found: list[dict[str, Any]] = []
    for _, node in nnx.iter_graph(model):
        if isinstance(node, MoeMlp) and hasattr(node, "aux_loss"):
            found.append({name: getattr(node, name)[...] for name in STATS})
            for name in STATS:
                delattr(node, name)
    if not found:
        return None
    # stacked [layers, ...] by run_blocks (or unstacked for a single call): average the leading layer axis away
    mean = lambda a, nd: a.reshape(-1, *a.shape[a.ndim - nd:]).mean(0)  # noqa: E731
    return {name: jnp.mean(jnp.stack([mean(s[name], 1 if name == "expert_share" else 0) for s in found]), 0)
            for name in STATS}


def expert_params_per_layer(cfg: ModelConfig) -> int:
    """Weights of one routed expert (its matmuls; biases left out)."""
    return cfg.d_model * cfg.expert_d_ff * (3 if cfg.activation in ("swiglu", "geglu") else 2)


def inactive_params(cfg: ModelConfig) -> int:
    """Parameters a token does not use: the experts it is not routed to, over all MoE layers."""
    if not cfg.n_experts:
        return 0
    layers = cfg.n_layers + (cfg.encoder_layers if cfg.kind == "encoder_decoder" else 0)
    return layers * (cfg.n_experts - cfg.n_experts_per_token) * expert_params_per_layer(cfg)


__all__ = ["MoeMlp", "dispatch_order", "expert_params_per_layer", "inactive_params", "moe_stats", "route"]
