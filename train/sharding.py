"""Device meshes and the one table that maps logical axis names to mesh axes.

The model names each parameter dimension (``embed``, ``heads``, ``mlp``...); ``LOGICAL_RULES`` says
which mesh axis shards it. Batches shard over ``data`` and ``fsdp``; under ``fsdp`` parameters and
optimizer state are split too (ZeRO-3 style), and ``tensor`` splits heads and the MLP width.

The mesh uses ``AxisType.Auto`` on purpose: jit gets explicit in/out shardings and XLA's
partitioner propagates the rest, so model code needs no sharding annotations to be correct. The
model does name a few activations' axes (``qkv.model.constrain``: the residual stream between
blocks, the logits); ``activation_layout`` turns those names into sharding constraints while the
train step is traced, so XLA keeps batch-sharded activations where it could otherwise wander.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from .config import MeshConfig
from qkv.errors import UserError

MESH_AXES = ("data", "fsdp", "expert", "tensor")

LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp", "expert"),  # expert parallelism splits the batch too (model/moe.py, docs/moe.md)
    "length": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "layers": None,
    "expert": "expert",  # a mixture of experts' stacked experts: each device holds E / expert of them
    "position": None,
    "classes": None,  # an encoder's classification head: small, replicated
    # the residual stream's model dimension (not "embed": that one shards weights). Split over tensor like
    # MaxText's rules: the per-layer inputs kept for the backward pass are 1/tensor the size (llama-70b,
    # tensor=8 on v5e-256: 12.6 -> 6.0 GiB of temporaries per chip, docs/scaling.md); the blocks' all-reduces
    # over tensor become a reduce-scatter and an all-gather (Megatron's sequence-parallel trade)
    "activation_embed": "tensor",
}


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, ...]:
    """The mesh axes' sizes in ``MESH_AXES`` order: -1 ("the rest") resolved, the product checked against the
    device count."""
    sizes = {name: getattr(cfg, name) for name in MESH_AXES}
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise UserError(f"only one mesh axis may be -1, got {', '.join('mesh.' + k for k in free)}")
    for key, value in sizes.items():
        if value == 0 or value < -1:
            raise UserError(f"mesh.{key}={value} must be a positive integer or -1 (the rest)")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if n_devices % fixed:
            raise UserError(f"mesh axes {sizes} cannot fill {n_devices} devices: {n_devices} is not divisible by {fixed}")
        sizes[free[0]] = n_devices // fixed
    if math.prod(sizes.values()) != n_devices:
        raise UserError(
            f"mesh {' x '.join(f'{k}={v}' for k, v in sizes.items())} = "
            f"{math.prod(sizes.values())} devices, but {n_devices} are available: set one axis to -1"
        )
    return tuple(sizes[name] for name in MESH_AXES)


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    """A (data, fsdp, expert, tensor) mesh over all devices (topology-aware order) or the given ones.

    Several slices (``mesh.dcn_data`` x ``mesh.dcn_fsdp`` > 1): a hybrid mesh in which the data (fsdp) axis is
    ``dcn_data`` (``dcn_fsdp``) slices joined over the data-center network times ``mesh.data`` (``mesh.fsdp``)
    chips inside each slice; the other axes stay inside a slice (their collectives never cross the DCN)."""
    auto = (AxisType.Auto,) * len(MESH_AXES)
    dcn = (cfg.dcn_data, cfg.dcn_fsdp, 1, 1)
    slices = math.prod(dcn)
    if devices is None and slices == 1:
        return jax.make_mesh(mesh_shape(cfg, jax.device_count()), MESH_AXES, axis_types=auto)
    devices = jax.devices() if devices is None else list(devices)
    if slices > 1:
        found = len({getattr(d, "slice_index", 0) for d in devices})
        if found != slices or len(devices) % slices:
            raise UserError(f"mesh.dcn_data={cfg.dcn_data} x mesh.dcn_fsdp={cfg.dcn_fsdp} = {slices} slices, but the "
                            f"{len(devices)} devices come from {found}: set them to multiply to the slice count")
        from jax.experimental import mesh_utils
        per_slice = mesh_shape(cfg, len(devices) // slices)
        array = mesh_utils.create_hybrid_device_mesh(per_slice, dcn, devices, allow_split_physical_axes=True)
        return Mesh(array, MESH_AXES, axis_types=auto)
    return Mesh(np.array(devices).reshape(mesh_shape(cfg, len(devices))), MESH_AXES, axis_types=auto)


def resolve_rules(overrides: Mapping[str, Any]) -> dict[str, Any]:
    rules = dict(LOGICAL_RULES)
    for name, target in overrides.items():
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        bad = [t for t in targets if t not in MESH_AXES]
        if bad:
            raise UserError(f"mesh.rules.{name}={target!r}: {bad[0]!r} is not a mesh axis ({', '.join(MESH_AXES)})")
        rules[name] = targets or None
    return rules


def logical_to_spec(axes: tuple[str | None, ...], rules: Mapping[str, Any], mesh: Mesh | None = None) -> PartitionSpec:
    """PartitionSpec for one array; a mesh axis is used at most once per array. With ``mesh``, its axes of
    size 1 are left out (they split nothing), so a run's layouts read the same whichever axes it leaves at 1."""
    used: set[str] = set()
    spec = []
    for name in axes:
        target = rules.get(name) if name else None
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        targets = tuple(t for t in targets if t not in used and (mesh is None or mesh.shape[t] > 1))
        used.update(targets)
        spec.append(targets[0] if len(targets) == 1 else (targets or None))
    return PartitionSpec(*spec)


def _check_divisible(path: str, shape: tuple[int, ...], spec: PartitionSpec, mesh: Mesh,
                     logical: tuple[str | None, ...] = ()) -> None:
    for dim, (size, entry) in enumerate(zip(shape, spec)):
        names = (entry,) if isinstance(entry, str) else tuple(entry or ())
        ways = math.prod(mesh.shape[n] for n in names)
        if size % ways:
            axes = "x".join(f"{n}={mesh.shape[n]}" for n in names)
            what = f" ({logical[dim]})" if dim < len(logical) and logical[dim] else ""
            raise UserError(
                f"{path} dimension {dim}{what} of size {size} cannot be split over mesh axes {axes} ({ways} ways): "
                "choose mesh sizes that divide it, or change mesh.rules"
            )


def tree_shardings(axes_tree: Any, shapes_tree: Any, mesh: Mesh, rules: Mapping[str, Any]) -> Any:
    """NamedShardings for a tree of arrays given a matching tree of logical axis tuples."""
    flat_axes = jax.tree_util.tree_flatten_with_path(axes_tree, is_leaf=lambda x: isinstance(x, tuple))[0]
    flat_shapes, treedef = jax.tree.flatten(shapes_tree)
    out = []
    for (path, axes), shaped in zip(flat_axes, flat_shapes, strict=True):
        spec = logical_to_spec(axes, rules, mesh)
        _check_divisible(jax.tree_util.keystr(path), tuple(shaped.shape), spec, mesh, axes)
        out.append(NamedSharding(mesh, spec))
    return jax.tree.unflatten(treedef, out)


def batch_sharding(mesh: Mesh, rules: Mapping[str, Any]) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(("batch", "length"), rules, mesh))


def check_batch(batch_size: int, mesh: Mesh, rules: Mapping[str, Any], what: str = "train.batch_size") -> None:
    spec = logical_to_spec(("batch",), rules, mesh)[0]
    names = (spec,) if isinstance(spec, str) else tuple(spec or ())
    ways = math.prod(mesh.shape[n] for n in names)
    if batch_size % ways:
        raise UserError(f"{what}={batch_size} cannot be split over {ways} batch shards ({'x'.join(names)}): "
                        f"use a multiple of {ways}")


def activation_layout(mesh: Mesh, rules: Mapping[str, Any]):
    """The context in which the model's ``constrain`` hints become sharding constraints on ``mesh``."""
    from qkv.model.constrain import activation_layout as layout

    def to_sharding(axes: tuple[str | None, ...], shape: tuple[int, ...]) -> NamedSharding:
        # A hint, not a requirement: a dimension the mesh cannot divide (a small micro-batch) stays unsplit.
        spec = [e if size % math.prod(mesh.shape[n] for n in ((e,) if isinstance(e, str) else e or ())) == 0
                else None for size, e in zip(shape, logical_to_spec(axes, rules, mesh))]
        return NamedSharding(mesh, PartitionSpec(*spec))

    return layout(to_sharding)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
