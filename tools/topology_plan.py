"""``qkv plan CONFIG --topology v5p:4x4x8`` (or ``h100:8``): the accelerator compiler's answer, on any machine.

With ``jax[tpu]`` (libtpu) installed, ``jax.experimental.topologies.get_topology_desc`` describes a TPU
slice without any TPU; the run's real train step (same ``Trainer``, rules table and shardings) is
lowered over the slice's devices and compiled by the TPU compiler on this CPU. From the compiled
program:

- **HBM per chip** from ``compiled.memory_analysis()``: exact for this program (arguments = train
  state + batch shards, temporaries = activations, gradients, logits, workspace), against the chip's
  capacity. A program that does not fit fails to compile ("Ran out of memory in memory space hbm");
  the compiler's own figures are reported then.
- **Collectives** in the compiled HLO (all-gather, reduce-scatter, all-reduce, all-to-all,
  collective-permute): count and bytes per step, loop bodies counted once per trip.
- **The compiler's estimate** ``cost_analysis()["optimal_seconds"]``: turned into a step time and
  MFU (model FLOPs 6·N·tokens + attention, over the chips' bf16 peak). An estimate of the TPU cost
  model, never a measurement.

NVIDIA targets the same way (``h100:8``, ``h200:2x8``: GPUs per node, or nodes x GPUs): with the CUDA
plugin installed (the ``cuda`` extra; no GPU needed), ``get_topology_desc(platform="cuda", topology=...,
target_config=...)`` describes the GPUs from a ``GpuTargetConfigProto`` (``GPU_SPECS`` below) and XLA's GPU
compiler (with ptxas from the CUDA wheels) compiles the step for them: exact memory and collectives as
for TPU; the GPU compiler gives no cost analysis without a GPU, so there is no step-time estimate.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
import time
from dataclasses import replace
from typing import Any

import jax
import numpy as np

from qkv.train.config import Config
from qkv.errors import UserError

GIB = 1024 ** 3

# device_kind -> (name, HBM GiB per chip, dense bf16 peak TFLOP/s per chip), from Cloud TPU's tables.
CHIPS: dict[str, tuple[str, float, float]] = {
    "TPU v4": ("TPU v4", 32, 275),
    "TPU v5 lite": ("TPU v5e", 16, 197),
    "TPU v5": ("TPU v5p", 95, 459),
    "TPU v6 lite": ("TPU v6e", 32, 918),
}
# NVIDIA GPUs for deviceless compiles: (device name, memory bytes as nvidia-smi reports it, dense bf16 TFLOP/s,
# HBM bytes/s). Architecture limits (Hopper, compute capability 9.0) from NVIDIA's CUDA programming guide.
GPU_SPECS: dict[str, tuple[str, int, float, float]] = {
    "h100": ("NVIDIA H100 80GB HBM3", 81559 * 2 ** 20, 989, 3.35e12),
    "h200": ("NVIDIA H200", 143771 * 2 ** 20, 989, 4.8e12),
}
_HOPPER = """gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 shared_memory_per_block_optin: 232448 threads_per_core_limit: 2048
  core_count: 132 fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: {bandwidth:.0f} l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: {memory} cuda_compute_capability {{ major: 9 minor: 0 }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
device_description_str: "{name}"
"""
# JAX on a GPU preallocates this share of its memory (XLA_PYTHON_CLIENT_MEM_FRACTION, default 0.75): a step
# must fit in it
GPU_MEM_FRACTION_DEFAULT = 0.75
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1}


@contextlib.contextmanager
def quiet_native_stderr():
    """Hold back what libtpu prints to the C-level stderr while it describes a topology without a TPU
    (host-bound and worker-hostname warnings); shown again if the block fails."""
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            os.write(2, sink.read())
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def gpu_memory_fraction() -> float:
    try:
        return float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_MEM_FRACTION_DEFAULT))
    except ValueError:
        return GPU_MEM_FRACTION_DEFAULT


def _gpu_devices(name: str) -> list:
    gpu, shape = name.split(":")
    hosts, per_host = shape.split("x") if "x" in shape else ("1", shape)
    label, memory, _, bandwidth = GPU_SPECS[gpu]
    from qkv.platforms import cuda_plugin_installed
    if not cuda_plugin_installed():
        raise UserError(f"--topology {name!r} needs the CUDA plugin (no GPU needed): install it with "
                        'pip install -e ".[cuda]"')
    from jax.experimental import topologies
    target = _HOPPER.format(bandwidth=bandwidth, memory=memory, name=label)
    try:
        with quiet_native_stderr():  # the plugin logs its failed cuInit on a machine without a GPU
            return list(topologies.get_topology_desc(topology_name=gpu, platform="cuda",
                                                     topology=f"1x{int(hosts)}x{int(per_host)}",
                                                     target_config=target).devices)
    except Exception as err:  # noqa: BLE001
        raise UserError(f"--topology {name!r}: the CUDA plugin cannot describe it ({str(err).splitlines()[0][:160]})"
                        ) from None


def topology_devices(name: str, slices: int = 1) -> list:
    """The devices of a TPU slice such as ``v5p:4x4x8`` (TPU generation: topology) or of NVIDIA GPUs such as
    ``h100:8`` / ``h100:2x8`` (GPUs per node, or nodes x GPUs per node), compile-only."""
    if slices < 1:
        raise UserError(f"--slices {slices}: use a positive slice count")
    if re.fullmatch(rf"({'|'.join(GPU_SPECS)}):[0-9]+(x[0-9]+)?", name):
        if slices != 1:
            raise UserError(f"--slices {slices} is for TPU slices: describe GPUs as NODESxGPUS, e.g. h100:2x8")
        return _gpu_devices(name)
    if not re.fullmatch(r"v[0-9][a-z]*:[0-9]+(x[0-9]+)*", name):
        raise UserError(f"--topology {name!r}: use GENERATION:SHAPE, e.g. v5p:2x2x1, v5e:16x16, v6e:8x8, v4:4x4x4, "
                        "or GPU:COUNT, e.g. h100:8, h200:2x8")
    from qkv.platforms import restrict_platforms
    restrict_platforms()  # without a TPU: allow several compile-only libtpu loads (if libtpu is not loaded yet)
    try:
        from jax.experimental import topologies
        with quiet_native_stderr():
            extra = {"num_slices": slices} if slices > 1 else {}  # devices carry their slice_index
            return list(topologies.get_topology_desc(topology_name=name, platform="tpu", **extra).devices)
    except Exception as err:  # noqa: BLE001 (no libtpu, or a shape it does not know)
        raise UserError(f"--topology {name!r}: the TPU compiler cannot describe it ({str(err).splitlines()[0][:160]}); "
                        'install it with pip install -e ".[tpu-compile]"') from None


def _shape_bytes(text: str) -> int:
    return sum(_DTYPE_BYTES.get(dt, 4) * math.prod(int(d) for d in dims.split(",") if d)
               for dt, dims in re.findall(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]", text))


def collective_stats(hlo: str) -> dict[str, dict[str, int]]:
    """{collective: {"count", "bytes"}} per step from compiled HLO text: each op's output bytes,
    computations reached through a while loop counted once per trip (the loop's known trip count, or
    the loop condition's bound).

    A multi-slice TPU program is compiled per slice (``num_partitions`` = chips per slice): the ICI
    collectives stay ops of the module, and what crosses the data-center network becomes ``send`` /
    ``recv`` pairs to the Megascale runtime, tagged ``_xla_megascale_transfer_type`` (ALL_REDUCE,
    ALL_GATHER...). Those sends are counted as ``dcn all-reduce`` etc. with the bytes each chip sends."""
    comps: dict[str, list[str]] = {}
    name = None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if head and not line.startswith(" "):
            name = "ENTRY" if line.startswith("ENTRY") else head.group(1)
            comps[name] = []
        elif name is not None and line.startswith("  "):
            comps[name].append(line)

    def trips(condition: str) -> int:
        consts = [int(c) for ln in comps.get(condition, []) for c in re.findall(r"s32\[\]\S* constant\((\d+)\)", ln)]
        return max(consts) if len(consts) == 1 else 1

    totals = {c: {"count": 0, "bytes": 0} for c in COLLECTIVES}

    def visit(comp: str, times: int, depth: int = 0) -> None:
        if depth > 20:
            return
        for ln in comps.get(comp, []):
            op = re.search(r"\)?\s([a-z\-]+)\(", ln.split(" = ", 1)[-1]) if " = " in ln else None
            opname = op.group(1) if op else ""
            base = opname.removesuffix("-start")
            if base in totals and not opname.endswith("-done"):
                out_type = ln.split(" = ", 1)[1].split(f" {opname}(", 1)[0]
                size = _shape_bytes(out_type)
                if opname.endswith("-start") and base != "all-reduce":
                    size = max(_shape_bytes(s) for s in re.findall(r"\w+\[[0-9,]*\]", out_type))
                elif opname.endswith("-start"):
                    size //= 2
                totals[base]["count"] += times
                totals[base]["bytes"] += times * size
            dcn = re.search(r'_xla_megascale_transfer_type="(\w+)"', ln) if opname == "send" else None
            if dcn:  # a transfer over the data-center network: its payload is the send's first operand
                key = "dcn " + dcn.group(1).lower().replace("_", "-")
                payload = ln.split(" = ", 1)[1].split(" send(", 1)[0]
                entry = totals.setdefault(key, {"count": 0, "bytes": 0})
                entry["count"] += times
                entry["bytes"] += times * _shape_bytes(payload.split(", u32[]", 1)[0])
            body = re.search(r"condition=%?([\w.\-]+), body=%?([\w.\-]+)", ln)
            if body:  # the GPU compiler states the trip count (its loop condition compares inside a fusion)
                known = re.search(r'known_trip_count":\{"n":"(\d+)"', ln)
                visit(body.group(2), times * (int(known.group(1)) if known else trips(body.group(1))), depth + 1)
            for callee in re.findall(r"(?:calls|true_computation|false_computation)=%?([\w.\-]+)", ln):
                visit(callee, times, depth + 1)
            for group in re.findall(r"branch_computations=\{([^}]*)\}", ln):
                for callee in re.findall(r"%?([\w.\-]+)", group):
                    visit(callee, times, depth + 1)

    visit("ENTRY", 1)
    return totals


def model_flops_per_step(cfg: Config, n_params: int) -> float:
    """Training FLOPs of one step: 6 · (active matmul parameters) · tokens + 12 · layers · heads · head · T · tokens.
    The embedding lookup is no matmul: an untied input table is left out."""
    m = cfg.model
    tokens = cfg.train.batch_size * cfg.data.seq_len
    from qkv.model import inactive_params
    # active parameters: a mixture of experts' routed experts count only k of E per token (model/moe.py)
    matmul_params = n_params - (0 if m.tie_embeddings else m.vocab_size * m.d_model) - inactive_params(m)
    attention = 12 * m.n_layers * m.n_heads * m.head_size * cfg.data.seq_len * tokens
    return 6.0 * matmul_params * tokens + attention


def _oom_figures(message: str) -> dict[str, Any]:
    """The TPU compiler's own numbers from its out-of-memory error, where it gives them."""
    out: dict[str, Any] = {"compiler_message": " ".join(message.split())[:600]}
    used = re.search(r"Used ([0-9.]+)([KMGT]) of ([0-9.]+)([KMGT]) hbm", message)
    if used:
        scale = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
        out["peak"] = int(float(used.group(1)) * scale[used.group(2)])
        out["compiler_capacity"] = int(float(used.group(3)) * scale[used.group(4)])
    return out


def advice(plan: dict[str, Any]) -> str:
    """Which term dominates and what to change, for a plan that does not fit."""
    c = plan.get("compiled", {})
    args, temps = c.get("arguments", 0), c.get("temporaries", 0)
    if args and args >= temps:
        return ("the train state (arguments) dominates: split it over more chips (a larger mesh fsdp), a bigger slice, "
                "or keep parameters in bfloat16 (model.param_dtype=bfloat16)")
    fixes = ["model.remat=full" if plan["remat"] != "full" else None,
             "model.attention_impl=splash" if plan["attention"] == "xla" else None,
             "model.loss_chunk=-1 (chunked loss)" if not plan["loss_chunk"] else None,
             "fewer rows per chip (train.batch_size, or optim.grad_accum)", "more tensor parallelism (mesh tensor=N)"]
    return "activations (temporaries) dominate: try " + ", ".join(f for f in fixes if f)


def _optimal_seconds(cfg: Config, mesh, rules, n_layers: int) -> tuple[float, float]:
    """(optimal_seconds, flops) of the cost model for the step with ``n_layers`` unrolled layers and the
    full loss: no loops, which the cost model counts once whatever their trip count."""
    from qkv.train.step import Trainer

    from .benchmark import synthetic_batch_for

    model = replace(cfg.model, n_layers=n_layers, scan_layers=False, loss_chunk=0,
                    layer_types=cfg.model.layer_types[:n_layers])  # per-layer local / global: the first layers'
    optim = replace(cfg.optim, grad_accum=1)
    rows = cfg.train.batch_size // cfg.optim.grad_accum
    trainer = Trainer(model, optim, mesh, rules, cfg.train.steps, cfg.train.seed)
    example = synthetic_batch_for(cfg, 1)
    batch = {k: jax.ShapeDtypeStruct((rows, *v.shape[1:]), np.int32, sharding=trainer.batch_sharding)
             for k, v in example.items()}
    cost = trainer.train_step.lower(trainer.abstract_state, batch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["optimal_seconds"]), float(cost["flops"])


def estimate(cfg: Config, mesh, rules, n_params: int, attention: str, peak_tflops: float) -> dict[str, Any]:
    """The compiler's step-time estimate, extrapolated over layers, and the MFU it implies.

    XLA's cost analysis counts a loop body once (the scan over layers, the loss chunks, the micro-batch
    loop), so the step is compiled twice more with 1 and 2 *unrolled* layers and the full loss:
    step = grad_accum x (t1 + (layers - 1) x (t2 - t1)). The splash kernel carries no cost estimate, so
    its FLOPs are invisible to the cost model; they are added at the chip's peak rate (optimistic).
    """
    try:
        t1, f1 = _optimal_seconds(cfg, mesh, rules, 1)
        t2, f2 = _optimal_seconds(cfg, mesh, rules, 2)
    except Exception as err:  # noqa: BLE001 (e.g. the full logits of the small variants do not fit)
        return {"unavailable": str(err).splitlines()[0][:200]}
    m, chips = cfg.model, math.prod(mesh.shape.values())
    if t1 <= 0 or t2 <= t1:  # seen for llama-8b on v6e:8x8: the cost model priced 2 layers below 1, so no extrapolation holds
        return {"unavailable": f"the cost model gave {t2:.3g} s for 2 layers and {t1:.3g} s for 1: no per-layer "
                               "cost to extrapolate"}
    step = cfg.optim.grad_accum * (t1 + (m.n_layers - 1) * (t2 - t1))
    tokens = cfg.train.batch_size * cfg.data.seq_len
    kernel_flops = 12 * m.n_layers * m.n_heads * m.head_size * cfg.data.seq_len * tokens / 2 / chips  # causal
    kernel_seconds = kernel_flops / (peak_tflops * 1e12) if attention == "splash" else 0.0
    step += kernel_seconds
    flops = model_flops_per_step(cfg, n_params)
    return {"step_seconds": step, "splash_seconds_at_peak": kernel_seconds,
            "compiler_flops_per_chip": cfg.optim.grad_accum * (f1 + (m.n_layers - 1) * (f2 - f1)),
            "model_flops_per_step": flops, "tokens_per_second": tokens / step,
            "mfu": flops / chips / (step * peak_tflops * 1e12)}


def attention_choice(model, seq_len: int, platform: str | None = None) -> tuple[str, str]:
    """(what runs, why) for the training-time self-attention of ``model`` at ``seq_len``, per layer kind
    where full and sliding-window layers differ ("full: splash; sliding: xla"), under the active layout."""
    from qkv.model.attention import choose_impl

    window = getattr(model, "sliding_window", 0)  # the model's window / soft-cap options (0: none)
    softcap = getattr(model, "attn_softcap", 0.0)
    kinds = sorted(set(getattr(model, "layer_types", ()) or ()) or {"sliding" if window else "full"})
    choices = {kind: choose_impl(model.attention_impl, seq_len, seq_len, model.head_size,
                                 causal=model.kind != "encoder", window=window if kind == "sliding" else 0,
                                 softcap=softcap, dtype=model.compute_dtype, platform=platform)
               for kind in kinds}
    if len({c.kernels for c in choices.values()}) == 1:
        kernels = next(iter(choices.values())).kernels
    else:
        kernels = "; ".join(f"{kind}: {c.kernels}" for kind, c in choices.items())
    reasons = dict.fromkeys(c.reason for c in choices.values() if c.reason)
    return kernels, "; ".join(reasons)


def topology_plan(cfg: Config, topology: str, mesh: dict[str, int] | None, with_estimate: bool = True,
                  slices: int = 1) -> dict[str, Any]:
    """Compile ``cfg``'s train step for ``topology`` with the TPU compiler; the plan as a dict
    (``with_estimate``: also the step-time estimate, two more small compiles)."""
    from qkv.model.loss import chunk_length
    from qkv.train.sharding import MESH_AXES, activation_layout, check_batch, make_mesh, mesh_shape, resolve_rules
    from qkv.train.step import Trainer

    from .benchmark import synthetic_batch_for

    devices = topology_devices(topology, slices)
    if slices > 1 and cfg.mesh.dcn_data * cfg.mesh.dcn_fsdp == 1:  # data parallelism across the slices by default
        cfg = replace(cfg, mesh=replace(cfg.mesh, dcn_data=slices))
    kind = devices[0].device_kind
    gpu = devices[0].platform == "gpu"
    if gpu:
        label, memory, peak_tflops, _ = GPU_SPECS[topology.split(":")[0]]
        chip, hbm_gib = label, memory * gpu_memory_fraction() / GIB  # what JAX's preallocated pool holds
    else:
        chip, hbm_gib, peak_tflops = CHIPS.get(kind, (kind, float("nan"), float("nan")))
    mesh_cfg = replace(cfg.mesh, **mesh) if mesh else cfg.mesh
    n = len(devices)
    dcn = mesh_cfg.dcn_data * mesh_cfg.dcn_fsdp
    shape = mesh_shape(mesh_cfg, n // dcn)  # per slice
    cfg = replace(cfg, mesh=replace(mesh_cfg, **dict(zip(MESH_AXES, shape))))
    jmesh = make_mesh(cfg.mesh, devices)
    rules = resolve_rules(cfg.mesh.rules)
    check_batch(cfg.train.batch_size, jmesh, rules)
    trainer = Trainer(cfg.model, cfg.optim, jmesh, rules, cfg.train.steps, cfg.train.seed)
    state = trainer.abstract_state
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(state["params"]))
    example = synthetic_batch_for(cfg, 1)
    batch = {k: jax.ShapeDtypeStruct((cfg.train.batch_size, *v.shape[1:]), np.int32, sharding=trainer.batch_sharding)
             for k, v in example.items()}
    with activation_layout(jmesh, rules):  # what the model's attention selects when compiled for these devices
        attention, attention_reason = attention_choice(cfg.model, cfg.data.seq_len)
    plan: dict[str, Any] = {
        "topology": topology, "chip": chip, "chips": n, "hbm_per_chip": int(hbm_gib * GIB) if hbm_gib == hbm_gib else None,
        "peak_tflops_per_chip": peak_tflops, "mesh": {k: v for k, v in zip(MESH_AXES, shape) if k != "expert" or v > 1},
        "slices": slices, "dcn": {"data": cfg.mesh.dcn_data, "fsdp": cfg.mesh.dcn_fsdp},
        "model_parameters": n_params, "seq_len": cfg.data.seq_len, "batch_size": cfg.train.batch_size,
        "rows_per_chip": cfg.train.batch_size / (shape[0] * shape[1] * shape[2] * dcn), "remat": cfg.model.remat,
        "attention": attention, "attention_reason": attention_reason,
        "loss_chunk": chunk_length(cfg.model.loss_chunk, cfg.data.seq_len, cfg.model.vocab_size),
        "compiler": "XLA GPU (deviceless)" if gpu else "TPU",
    }
    if gpu:
        plan["memory_fraction"] = gpu_memory_fraction()
    start = time.perf_counter()
    try:
        with quiet_native_stderr() if gpu else contextlib.nullcontext():
            compiled = trainer.train_step.lower(state, batch).compile()
    except Exception as err:  # noqa: BLE001
        if "Ran out of memory" not in str(err) and "RESOURCE_EXHAUSTED" not in str(err):
            raise
        plan["compile_seconds"] = time.perf_counter() - start
        plan["compiled"] = _oom_figures(str(err))
        plan["fits"] = False
        plan["advice"] = advice(plan)
        return plan
    plan["compile_seconds"] = time.perf_counter() - start
    stats = compiled.memory_analysis()
    args, out, alias, temp = (stats.argument_size_in_bytes, stats.output_size_in_bytes, stats.alias_size_in_bytes,
                              stats.temp_size_in_bytes)
    plan["compiled"] = {"arguments": args, "outputs": out, "aliased": alias, "temporaries": temp,
                        "peak": args + out - alias + temp}
    plan["fits"] = plan["hbm_per_chip"] is None or plan["compiled"]["peak"] <= plan["hbm_per_chip"]
    if not plan["fits"]:
        plan["advice"] = advice(plan)
    plan["collectives"] = collective_stats(compiled.as_text())
    if with_estimate and gpu:
        plan["estimate"] = {"unavailable": "XLA's GPU compiler gives no cost analysis without a GPU"}
    elif with_estimate:
        plan["estimate"] = estimate(cfg, jmesh, rules, n_params, attention, peak_tflops)
    return plan


def _gib(b: float) -> str:
    return f"{b / GIB:.2f} GiB" if abs(b) >= GIB / 10 else f"{b / 2 ** 20:.2f} MiB"


def format_topology_plan(plan: dict[str, Any]) -> str:
    m, c = plan["mesh"], plan["compiled"]
    n = plan["model_parameters"]
    lines = [f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"]
    where = plan["topology"] if plan.get("slices", 1) == 1 else f"{plan['slices']} slices of {plan['topology']}"
    lines = [f"{lines[0]} parameters on {where}: {plan['chips']} x {plan['chip']} "
             f"({_gib(plan['hbm_per_chip'] or 0)} HBM, {plan['peak_tflops_per_chip']:g} TFLOP/s bf16 each), "
             f"compiled by the {plan['compiler']} compiler on this machine"
             + (f"; HBM counted as JAX's preallocated {plan['memory_fraction']:.0%} (XLA_PYTHON_CLIENT_MEM_FRACTION)"
                if "memory_fraction" in plan else ""),
             f"mesh {' '.join(f'{k}={v}' for k, v in m.items() if k != 'expert' or v > 1)}"
             + ("".join(f", x {v} slices over DCN on {k}" for k, v in plan.get("dcn", {}).items() if v > 1))
             + f"; {plan['rows_per_chip']:g} rows x "
             f"{plan['seq_len']} tokens per chip; attention {plan['attention']}"
             + (f" ({plan['attention_reason']})" if plan.get("attention_reason") else "") + f", remat {plan['remat']}, loss "
             + (f"in chunks of {plan['loss_chunk']} positions" if plan["loss_chunk"] else "over full logits"),
             f"compile time {plan['compile_seconds']:.0f} s", "", "HBM per chip (compiled memory analysis):"]
    if "arguments" in c:
        lines += [f"  arguments           {_gib(c['arguments']):>12}  (train state + batch shards)",
                  f"  temporaries         {_gib(c['temporaries']):>12}  (activations, gradients, logits, workspace)",
                  f"  outputs not aliased {_gib(c['outputs'] - c['aliased']):>12}"]
    peak, cap = c.get("peak"), plan["hbm_per_chip"]
    if peak is not None and cap:
        verdict = f"fits, {_gib(cap - peak)} spare" if plan["fits"] else f"does NOT fit: short by {_gib(peak - cap)}"
        lines.append(f"  peak                {_gib(peak):>12}  of {_gib(cap)}: {verdict}")
    elif not plan["fits"]:
        lines.append("  does NOT fit: the compiler ran out of HBM")
    if "compiler_message" in c:
        lines.append(f"  compiler: {c['compiler_message'][:300]}")
    if "advice" in plan:
        lines.append(f"  what to change: {plan['advice']}")
    if "collectives" in plan:
        lines += ["", "collectives per step (compiled HLO, loop bodies x trips):"]
        lines += [f"  {name:18s} {v['count']:6d}  {_gib(v['bytes']):>12}" for name, v in plan["collectives"].items()
                  if v["count"]]
        if plan.get("slices", 1) > 1:
            lines.append("  (dcn ...: sent over the data-center network between slices, per chip; the rest stays "
                         "inside a slice)")
    e = plan.get("estimate", {})
    if "unavailable" in e:
        lines += ["", f"no step-time estimate: {e['unavailable']}"]
    elif e:
        lines += ["", "the TPU compiler's estimate (its cost model's optimal_seconds, 1- and 2-layer compiles "
                  "extrapolated; not a measurement):",
                  f"  step {e['step_seconds'] * 1e3:.4g} ms, {e['tokens_per_second'] / 1e6:.3g}M tokens/s, "
                  f"MFU {e['mfu']:.1%} (model FLOPs {e['model_flops_per_step']:.3g} per step"
                  + (f"; splash kernels counted at peak: {e['splash_seconds_at_peak'] * 1e3:.3g} ms" if
                     e["splash_seconds_at_peak"] else "") + ")"]
    return "\n".join(lines)
