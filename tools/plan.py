"""``qkv plan``: will this model train on this mesh, and how much memory does each device need?

    qkv plan llama-8b --mesh data=1,fsdp=8,tensor=1 --device h100

Two answers side by side, per device:

- **Exact state bytes** from the real sharding: the train state is built abstractly (no memory) with
  the same ``Trainer`` and rules table the run uses, and every array's shard shape is summed:
  parameters, AdamW's two moments (same dtype as the parameters, float32 by default) and a
  gradient tree of the same shape.
- **Compiled** (default): the train step is compiled ahead of time (``jax.jit(...).lower(abstract
  state, abstract batch).compile()``) for a mesh of that many *virtual CPU devices*, and XLA's
  memory analysis gives argument, output and temporary bytes per device. Temporaries are XLA:CPU's
  schedule (no fused attention kernels, its own fusion decisions), so read them as an estimate of
  the activations on an accelerator, not a measurement of one.
- **Analytic activations**: saved residuals per layer by remat policy, plus one layer's working set
  and the logits; a cross-check for the compiled temporaries and the answer with ``--analytic``.

The virtual devices exist only in a child process (``JAX_NUM_CPU_DEVICES``), so planning never
touches the accelerators of the machine it runs on.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from typing import Any

import jax
import numpy as np

from qkv.train.config import Config, load_config, split_config_args
from qkv.errors import UserError

GIB = 1024 ** 3

# Memory per device as the vendor lists it, in GiB (usable memory is a little less).
DEVICES: dict[str, tuple[str, float]] = {
    "h100": ("NVIDIA H100 80GB", 80),
    "h200": ("NVIDIA H200 141GB", 141),
    "a100-40": ("NVIDIA A100 40GB", 40),
    "a100-80": ("NVIDIA A100 80GB", 80),
    "tpu-v4": ("TPU v4 (per chip)", 32),
    "tpu-v5e": ("TPU v5e (per chip)", 16),
    "tpu-v5p": ("TPU v5p (per chip)", 95),
    "tpu-v6e": ("TPU v6e (per chip)", 32),
}
USABLE = 0.9  # allow ~10% for the runtime, fragmentation and buffers XLA does not report


def parse_mesh(text: str) -> dict[str, int]:
    """``data=1,fsdp=8,tensor=1`` (missing axes are 1) -> {"data": 1, "fsdp": 8, "tensor": 1} (``expert=N``
    too, for a mixture of experts; it is left out when 1)."""
    sizes = {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        if key not in sizes or not value.isdigit() or int(value) < 1:
            raise UserError(f"--mesh {text!r}: use positive sizes for data, fsdp, tensor (expert), e.g. "
                            "data=1,fsdp=8,tensor=1")
        sizes[key] = int(value)
    if sizes["expert"] == 1:
        del sizes["expert"]
    return sizes


def _shard_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs carrying NamedShardings."""
    return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
               for leaf in jax.tree.leaves(tree))


def analytic_activation_bytes(cfg: Config, mesh: dict[str, int]) -> dict[str, int]:
    """Per-device activation memory of one training step, estimated from the shapes.

    Rows per device: the (micro-)batch split over data x fsdp. Saved per layer for the backward pass:
    remat=full keeps the block input; dots keeps also the matmul outputs (q, k, v, attention
    projection, MLP); none keeps everything including the [T, T] attention probabilities. While one
    layer is recomputed/differentiated its full working set is live once more. Heads, the MLP width and
    the saved block inputs (the residual stream, ``activation_embed``) divide over ``tensor``.
    """
    m, t = cfg.model, mesh["tensor"]
    rows = max(cfg.train.batch_size // cfg.optim.grad_accum // (mesh["data"] * mesh["fsdp"] * mesh.get("expert", 1)), 1)
    bt, a = rows * cfg.data.seq_len, np.dtype(m.dtype).itemsize
    heads, kv, hd, ff = m.n_heads / t, m.num_kv_heads / t, m.head_size, m.d_ff / t
    n_ff = 2 if m.activation in ("swiglu", "geglu") else 1
    dots = bt * a * ((heads + 2 * kv) * hd + m.d_model + (n_ff + 1) * ff + m.d_model)
    working = dots + bt * a * (2 * m.d_model + heads * hd + ff) + rows * heads * cfg.data.seq_len ** 2 * 4 * 2
    block_input = bt * a * m.d_model / t
    saved_per_layer = {"full": block_input, "dots": block_input + dots, "none": working}[m.remat]
    layers = int(m.n_layers * saved_per_layer + (working if m.remat != "none" else 0))
    logits = int(bt * m.vocab_size / t * 4 * 3)  # float32 logits, softmax and their gradient
    return {"activations": layers + logits, "activations_layers": layers, "activations_logits": logits}


def build_plan(cfg: Config, mesh: dict[str, int], compile: bool = True) -> dict[str, Any]:
    """The memory plan for ``cfg`` on ``mesh``; needs data*fsdp*tensor JAX (CPU) devices in this process."""
    from qkv.train.sharding import activation_layout, check_batch, make_mesh, resolve_rules
    from qkv.train.step import Trainer

    n = math.prod(mesh.values())
    devices = jax.devices()
    if len(devices) < n:
        raise UserError(f"planning a {n}-device mesh needs {n} devices, this process has {len(devices)}")
    cfg = replace(cfg, mesh=replace(cfg.mesh, **mesh))
    jmesh = make_mesh(cfg.mesh, devices[:n])
    rules = resolve_rules(cfg.mesh.rules)
    check_batch(cfg.train.batch_size, jmesh, rules)
    trainer = Trainer(cfg.model, cfg.optim, jmesh, rules, cfg.train.steps, cfg.train.seed)  # refuses bad meshes
    state = trainer.abstract_state
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(state["params"]))
    params = _shard_bytes(state["params"])
    plan: dict[str, Any] = {
        "model_parameters": n_params, "mesh": mesh, "devices": n,
        "batch_per_device": cfg.train.batch_size // (mesh["data"] * mesh["fsdp"] * mesh.get("expert", 1)), "seq_len": cfg.data.seq_len,
        "param_dtype": cfg.model.param_dtype, "compute_dtype": cfg.model.dtype, "remat": cfg.model.remat,
        "params": params, "optimizer": _shard_bytes(state["opt_state"]), "gradients": params,
        **analytic_activation_bytes(cfg, mesh),
    }
    from .topology_plan import attention_choice
    with activation_layout(jmesh, rules):  # what the model's attention selects when compiled for these devices
        plan["attention"], plan["attention_reason"] = attention_choice(cfg.model, cfg.data.seq_len)
    plan["analytic_total"] = plan["params"] + plan["optimizer"] + plan["gradients"] + plan["activations"]
    if compile:
        from .benchmark import synthetic_batch_for
        example = synthetic_batch_for(cfg, 1)  # the keys and row shapes
        batch = {k: jax.ShapeDtypeStruct((cfg.train.batch_size, *v.shape[1:]), np.int32,
                                         sharding=trainer.batch_sharding) for k, v in example.items()}
        compiled = trainer.train_step.lower(state, batch).compile()
        stats = compiled.memory_analysis()
        if stats is not None:
            args, out = stats.argument_size_in_bytes, stats.output_size_in_bytes
            alias, temp = stats.alias_size_in_bytes, stats.temp_size_in_bytes
            plan["compiled"] = {"arguments": args, "outputs": out, "aliased": alias, "temporaries": temp,
                                "peak": args + out - alias + temp, "backend": jax.devices()[0].platform}
    plan["total"] = plan["compiled"]["peak"] if "compiled" in plan else plan["analytic_total"]
    plan["fits"] = {name: {"capacity_gib": gib, "fits": plan["total"] <= USABLE * gib * GIB,
                           "used": plan["total"] / (gib * GIB)} for name, (_, gib) in DEVICES.items()}
    return plan


def plan_in_subprocess(source: str | None, overrides: list[str], mesh: dict[str, int], compile: bool) -> dict[str, Any]:
    """``build_plan`` in a child process that has exactly data*fsdp*tensor virtual CPU devices."""
    n = math.prod(mesh.values())
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(n), "QKV_PLAN_CHILD": "1"}
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    mesh_arg = ",".join(f"{k}={v}" for k, v in mesh.items())
    cmd = [sys.executable, "-m", "qkv.cli", "plan", *([source] if source else []), *overrides, "--mesh", mesh_arg,
           "--json", *([] if compile else ["--analytic"])]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
        message = lines[-1] if lines else f"exit code {out.returncode}"
        if out.returncode == 2:  # the child refused the input: the same one line
            raise UserError(message.removeprefix("qkv: error: "))
        raise RuntimeError(f"the planning process ended with exit code {out.returncode}: {message}")
    return json.loads(out.stdout)


def _gib(n: float) -> str:
    return f"{n / GIB:8.2f} GiB"


def format_plan(plan: dict[str, Any], device: str | None = None) -> str:
    m = plan["mesh"]
    expert = f" expert={m['expert']}" if m.get("expert", 1) > 1 else ""
    lines = [f"model {plan['model_parameters'] / 1e9:.2f}B parameters ({plan['param_dtype']} storage, "
             f"{plan['compute_dtype']} compute, remat={plan['remat']}) on mesh data={m['data']} fsdp={m['fsdp']} "
             f"tensor={m['tensor']}{expert} ({plan['devices']} devices); {plan['batch_per_device']} rows x "
             f"{plan['seq_len']} tokens per device; attention {plan['attention']}"
             + (f" ({plan['attention_reason']})" if plan["attention_reason"] else ""), "", "per device:",
             f"  parameters        {_gib(plan['params'])}   (exact: shard shapes from the rules table)",
             f"  optimizer (AdamW) {_gib(plan['optimizer'])}   (exact: two moments + step counters)",
             f"  gradients         {_gib(plan['gradients'])}   (exact: one tree like the parameters)",
             f"  activations       {_gib(plan['activations'])}   (analytic estimate: layers "
             f"{plan['activations_layers'] / GIB:.2f} + logits {plan['activations_logits'] / GIB:.2f} GiB)",
             f"  analytic total    {_gib(plan['analytic_total'])}"]
    if "compiled" in plan:
        c = plan["compiled"]
        lines += [f"  compiled ({c['backend']}): arguments {c['arguments'] / GIB:.2f} + temporaries "
                  f"{c['temporaries'] / GIB:.2f} + outputs not aliased {(c['outputs'] - c['aliased']) / GIB:.2f}"
                  f" = peak {_gib(c['peak'])}"]
    lines += ["", f"fits (total {plan['total'] / GIB:.2f} GiB against {USABLE:.0%} of each device's memory):"]
    for name, fit in plan["fits"].items():
        if device in (None, name):
            lines.append(f"  {name:9s} {DEVICES[name][0]:20s} {fit['used']:6.0%} of {fit['capacity_gib']:g} GiB"
                         f"  {'fits' if fit['fits'] else 'does NOT fit'}")
    return "\n".join(lines)


def main(ns) -> int:
    """The ``qkv plan`` command (argparse namespace from qkv/cli.py)."""
    if getattr(ns, "slices", 1) != 1 and not getattr(ns, "topology", None):
        raise UserError(f"--slices {ns.slices} needs --topology (the slice type), e.g. --topology v5p:4x4x4 --slices 2")
    if getattr(ns, "topology", None):  # the TPU compiler's answer (tools/topology_plan.py), in this process
        from .topology_plan import format_topology_plan, topology_plan
        source, overrides = split_config_args(ns.args)
        plan = topology_plan(load_config(source, overrides), ns.topology, parse_mesh(ns.mesh) if ns.mesh else None,
                             slices=ns.slices)
        print(json.dumps(plan) if ns.json else format_topology_plan(plan))
        return 0 if plan["fits"] else 1
    if ns.device is not None and ns.device not in DEVICES:
        raise UserError(f"--device {ns.device!r} is unknown: choose one of {', '.join(DEVICES)}")
    source, overrides = split_config_args(ns.args)
    cfg = load_config(source, overrides)
    mesh = parse_mesh(ns.mesh) if ns.mesh else {"data": max(cfg.mesh.data, 1), "fsdp": max(cfg.mesh.fsdp, 1),
                                                "tensor": max(cfg.mesh.tensor, 1),
                                                **({"expert": cfg.mesh.expert} if cfg.mesh.expert > 1 else {})}
    if os.environ.get("QKV_PLAN_CHILD"):
        plan = build_plan(cfg, mesh, compile=not ns.analytic)
    else:
        plan = plan_in_subprocess(source, overrides, mesh, compile=not ns.analytic)
    if ns.json:
        print(json.dumps(plan))
    else:
        print(format_plan(plan, ns.device))
    fit = plan["fits"].get(ns.device) if ns.device else None
    return 0 if fit is None or fit["fits"] else 1
