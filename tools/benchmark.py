"""``qkv benchmark train|decode``: throughput of the real compiled steps on synthetic tokens.

Train: builds the run's ``Trainer`` (the jitted, sharded, donating train step ``pretrain`` uses) on one
random token batch of the config's shape, compiles it (timed), warms up, then times each step with
``block_until_ready``. FLOPs come from the analytic ``flops_per_token`` (train/metrics.py); MFU divides
by the device's peak (tools/roofline.py). A sweep builds and compiles a grid of overrides in one process,
then times the points round-robin, one step each per round, so load changes hit all points alike.

Decode: the real ``Decoder`` (jitted prefill and donated-cache decode step), greedy, per batch size:
prefill tokens/s, per-token latency, decode tokens/s, and the fraction of the memory-bandwidth roofline.

Every record is self-contained: command, machine, versions and date travel with the numbers.
"""
from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import os
import platform
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from qkv.model import ModelConfig, count_params, create_model, inactive_params, split_params

from . import roofline
from qkv.train.config import Config, load_config, parse_override, split_config_args
from qkv.train.metrics import flops_per_token
from qkv.train.tasks import task_for
from .profile_summary import summarize_trace
from qkv.train.sharding import check_batch, make_mesh, resolve_rules
from qkv.train.step import Trainer
from qkv.errors import UserError

# Short names accepted by --sweep; any section.key works too. mesh=DxFxT and devices=N are special.
SWEEP_ALIASES = {"batch_size": "train.batch_size", "batch": "train.batch_size", "remat": "model.remat",
                 "scan_layers": "model.scan_layers", "scan": "model.scan_layers", "dtype": "model.dtype",
                 "attention_impl": "model.attention_impl", "seq_len": "data.seq_len", "grad_accum": "optim.grad_accum"}


def environment() -> dict[str, Any]:
    """Command, machine, versions and UTC date: what makes a number reproducible."""
    import flax
    import jaxlib
    import optax

    device = jax.devices()[0]
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "command": " ".join(["qkv" if Path(sys.argv[0]).name == "qkv" else sys.argv[0], *sys.argv[1:]]),
        "machine": {"platform": device.platform, "device_kind": device.device_kind,
                    "device_count": jax.device_count(), "process_count": jax.process_count(),
                    "cpu_count": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                    "load_average_1m": round(load[0], 2) if load else None,
                    # qkv's command sets glibc.malloc.hugetlb=1 (qkv/host.py): steps run faster with it
                    "glibc_tunables": os.environ.get("GLIBC_TUNABLES")},
        "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
                     "optax": optax.__version__, "python": platform.python_version()},
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def synthetic_batch(batch: int, seq_len: int, vocab: int, seed: int = 0,
                    source_len: int = 0) -> dict[str, np.ndarray]:
    """Random tokens shaped like a packed training batch: one document per row, every target counted;
    with ``source_len``, also an encoder-decoder's source side of that length."""
    toks = np.random.default_rng(seed).integers(0, vocab, (batch, seq_len + 1)).astype(np.int32)
    ones = np.ones((batch, seq_len), np.int32)
    out = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": ones,
           "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy(),
           "loss_mask": ones}
    if source_len:
        src = np.random.default_rng(seed + 1).integers(0, vocab, (batch, source_len)).astype(np.int32)
        out.update(src_inputs=src, src_segment_ids=np.ones_like(src),
                   src_positions=np.broadcast_to(np.arange(source_len, dtype=np.int32), src.shape).copy())
    return out


def synthetic_batch_for(cfg: Config, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``synthetic_batch`` shaped for ``cfg``: its target length, and a source side for encoder-decoders."""
    source_len = cfg.data.source_len if cfg.model.kind == "encoder_decoder" else 0
    return synthetic_batch(rows, cfg.data.seq_len, cfg.model.vocab_size, seed, source_len=source_len)


def _stats(times: Sequence[float]) -> dict[str, float]:
    return {"median": float(np.median(times)), "min": float(np.min(times)), "max": float(np.max(times))}


def peak_memory_bytes(devices: Sequence[Any]) -> int | None:
    """Largest ``peak_bytes_in_use`` over the devices, where the backend reports it (not on CPU)."""
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices]
    peaks = [p for p in peaks if p is not None]
    return max(peaks) if peaks else None


def _memory_analysis(compiled) -> dict[str, int] | None:
    m = compiled.memory_analysis()
    if m is None:
        return None
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes")
    return {k.replace("_size_in", ""): int(getattr(m, k)) for k in keys if hasattr(m, k)}


class TrainPoint:
    """One configuration built, compiled (timed) and warmed up; ``step()`` times one more real step and,
    on CPU, one matmul of the probe right after it, so both see the same load."""

    def __init__(self, cfg: Config, warmup: int, total_steps: int, devices: Sequence[Any] | None = None,
                 probe: roofline.MatmulProbe | None = None):
        self.cfg, self.warmup = cfg, warmup
        self.devices = list(devices or jax.devices())
        self.mesh = make_mesh(cfg.mesh, self.devices)
        rules = resolve_rules(cfg.mesh.rules)
        check_batch(cfg.train.batch_size, self.mesh, rules)
        self.trainer = Trainer(cfg.model, cfg.optim, self.mesh, rules, max(cfg.train.steps, total_steps),
                               cfg.train.seed, task_for(cfg).objective())  # the pretraining step (MLM masking too)
        self.state = self.trainer.init_state()
        self.n_params = count_params(self.state["params"])
        self.batch = self.trainer.put_batch(synthetic_batch_for(cfg, cfg.train.batch_size))
        start = time.perf_counter()
        self.compiled = self.trainer.train_step.lower(self.state, self.batch).compile()
        self.compile_s = time.perf_counter() - start
        for _ in range(warmup):
            self.state, self.metrics = self.compiled(self.state, self.batch)
        jax.block_until_ready(self.state)
        # On CPU the "peak" is a matmul timed between the steps, under the same (shared) load.
        self.probe = probe or (roofline.MatmulProbe(self.devices[0]) if self.devices[0].platform == "cpu" else None)
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.probe_times: list[float] = []
        self.probe_cpu: list[float] = []

    def step(self) -> None:
        start, cpu = time.perf_counter(), time.process_time()
        self.state, self.metrics = self.compiled(self.state, self.batch)
        jax.block_until_ready((self.state, self.metrics))
        self.times.append(time.perf_counter() - start)
        self.cpu_times.append(time.process_time() - cpu)
        if self.probe is not None:
            wall, cpu = self.probe.timed()
            self.probe_times.append(wall)
            self.probe_cpu.append(cpu)

    def record(self, breakdown: bool = False) -> dict[str, Any]:
        cfg, m, probe = self.cfg, self.cfg.model, self.probe
        host_tflops = probe.tflops(self.probe_times) if probe is not None else None
        n_dev, seq = len(self.devices), cfg.data.seq_len
        tokens = cfg.train.batch_size * seq
        flops_tok = flops_per_token(m, seq, cfg.data.source_len)
        step_s = _stats(self.times)
        tflops_dev = flops_tok * tokens / step_s["median"] / n_dev / 1e12
        peak, peak_source = roofline.peak_tflops_per_device(self.devices[0], n_dev, host_tflops)
        cpu_s = float(np.median(self.cpu_times))
        record = {
            "benchmark": "train",
            "config": {"model": dataclasses.asdict(m), "batch_size": cfg.train.batch_size, "seq_len": seq,
                       "grad_accum": cfg.optim.grad_accum, "rules": cfg.mesh.rules,
                       "mesh": {k: v for k, v in self.mesh.shape.items() if k != "expert" or v > 1}},
            "params": self.n_params, "active_params": self.n_params - inactive_params(m), "devices": n_dev, "steps": len(self.times), "warmup": self.warmup,
            "compile_s": self.compile_s, "step_s": step_s,
            "tokens_per_step": tokens,
            "tokens_per_s": tokens / step_s["median"], "tokens_per_s_per_device": tokens / step_s["median"] / n_dev,
            "flops_per_token": flops_tok,
            # XLA also multiplies the masked upper triangle of each attention matrix: hardware, not model, FLOPs.
            "masked_attention_flops_per_token": 0.0 if m.kind == "encoder" else 6.0 * m.n_layers * m.n_heads * m.head_size * seq,
            "tflops_per_device": tflops_dev, "peak_tflops_per_device": peak, "peak_source": peak_source,
            "mfu": tflops_dev / peak if peak else None,
            "measured_matmul_tflops": host_tflops,
            # CPU only: the same ratio per CPU-second of this process (step vs matmul), which a shared,
            # oversubscribed machine distorts far less than wall time (a waiting thread burns no CPU time)
            "step_cpu_s": cpu_s,
            "mfu_cpu_time": (flops_tok * tokens / cpu_s) / (probe.flops / float(np.median(self.probe_cpu)))
            if probe is not None and cpu_s > 0 and min(self.probe_cpu) > 0 else None,
            "peak_memory_bytes": peak_memory_bytes(self.devices),
            "compiled_memory_bytes": _memory_analysis(self.compiled),
            "final_loss": float(self.metrics["loss"]),
        }
        if breakdown:
            record["breakdown_s"] = _breakdown(self, len(self.times))
        return record


def _breakdown(point: "TrainPoint", repeats: int) -> dict[str, float]:
    """Median seconds, timed round-robin, of the forward pass alone (the real eval step), of forward +
    backward without the optimizer (the train step's loss and gradient, jitted on their own) and of the
    full step; the optimizer update and the rest is the full step minus forward + backward."""
    from qkv.train.objectives import forward_loss_sum

    trainer = point.trainer

    def grads(params, b):
        return jax.value_and_grad(lambda p: forward_loss_sum(trainer.graphdef, p, b, None)[0])(params)

    def full_step():
        point.state, point.metrics = point.compiled(point.state, point.batch)
        return point.state

    fwd_bwd = jax.jit(grads, in_shardings=(trainer.param_shardings, trainer.batch_sharding))
    fns = {"forward": lambda: trainer.eval_step(point.state["params"], point.batch),
           "forward_backward": lambda: fwd_bwd(point.state["params"], point.batch), "full_step": full_step}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(repeats + 1):  # round 0 compiles
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            if round_:
                times[name].append(time.perf_counter() - start)
    out = {name: float(np.median(t)) for name, t in times.items()}
    out["optimizer_and_rest"] = out["full_step"] - out["forward_backward"]
    return out


def benchmark_train(cfg: Config, steps: int = 10, warmup: int = 2, devices: Sequence[Any] | None = None,
                    profile_dir: str | None = None, breakdown: bool = False) -> dict[str, Any]:
    """Time ``steps`` real train steps of ``cfg`` on ``devices`` (default all) after ``warmup``."""
    return _time_points([TrainPoint(cfg, warmup, warmup + steps, devices)], steps, profile_dir, breakdown)[0]


def _time_points(points: Sequence[TrainPoint], steps: int, profile_dir: str | None,
                 breakdown: bool) -> list[dict[str, Any]]:
    """Round-robin over the points, one step each per round, so load changes hit every point alike."""
    if steps < 1:
        raise UserError(f"--steps={steps} must be >= 1")
    with jax.profiler.trace(profile_dir, create_perfetto_trace=True) if profile_dir else nullcontext():
        for _ in range(steps):
            for point in points:
                point.step()
    records = [point.record(breakdown) for point in points]
    if profile_dir:
        summary = summarize_trace(profile_dir, "train_step", steps) if len(points) == 1 else None
        for r in records:
            r.update(profile_dir=profile_dir, profile_summary=summary)
    return records


def sweep_points(specs: Sequence[str]) -> list[list[tuple[str, Any]]]:
    """``["remat=none,full", "batch=8,16"]`` → every combination as (key, value) lists."""
    axes = []
    for spec in specs:
        if "=" not in spec:
            raise UserError(f"--sweep {spec!r} must look like key=v1,v2 (e.g. remat=none,full)")
        key, raw = spec.split("=", 1)
        key = key.strip()
        values = [parse_override(f"{key}={v}")[1] for v in raw.split(",") if v != ""]
        if not values:
            raise UserError(f"--sweep {spec!r} lists no values")
        axes.append([(key, v) for v in values])
    return [list(p) for p in itertools.product(*axes)] if axes else [[]]


def point_overrides(point: Sequence[tuple[str, Any]]) -> tuple[list[str], int | None]:
    """Config overrides for one sweep point, and the device count it asks for (None: all)."""
    overrides, n_devices = [], None
    for key, value in point:
        if key == "devices":
            n_devices = int(value)
        elif key == "mesh":
            parts = str(value).lower().split("x")
            if len(parts) != 3:
                raise UserError(f"--sweep mesh={value!r} must be DATAxFSDPxTENSOR, e.g. 2x2x1")
            overrides += [f"mesh.{axis}={p}" for axis, p in zip(("data", "fsdp", "tensor"), parts)]
        else:
            overrides.append(f"{SWEEP_ALIASES.get(key, key)}={json.dumps(value) if isinstance(value, bool) else value}")
    return overrides, n_devices


def run_train_sweep(source: str | None, overrides: Sequence[str], sweep: Sequence[str], steps: int, warmup: int,
                    profile_dir: str | None = None, breakdown: bool = False) -> list[dict[str, Any]]:
    """Build and compile every point of the grid, then time them round-robin (one step each per round)."""
    if steps < 1 or warmup < 0:
        raise UserError(f"--steps={steps} must be >= 1 and --warmup={warmup} >= 0")
    env, built, labels = environment(), [], []
    points = sweep_points(sweep)
    probe = None
    for i, point in enumerate(points):
        extra, n_devices = point_overrides(point)
        label = " ".join(f"{k}={v}" for k, v in point) or "base"
        cfg = load_config(source, [*overrides, *extra])
        if n_devices and n_devices > jax.device_count():
            raise UserError(f"devices={n_devices} but only {jax.device_count()} are available")
        print(f"[{i + 1}/{len(points)}] compiling {label} ...", file=sys.stderr, flush=True)
        built.append(TrainPoint(cfg, warmup, warmup + steps, jax.devices()[:n_devices] if n_devices else None, probe))
        probe = built[-1].probe
        labels.append((dict(point), label))
    print(f"timing {steps} rounds of {len(built)} point(s) ...", file=sys.stderr, flush=True)
    records = _time_points(built, steps, profile_dir, breakdown)
    return [{**env, "point": point, "label": label, **r} for (point, label), r in zip(labels, records)]


def train_table(records: Sequence[dict[str, Any]]) -> str:
    base = records[0]["tokens_per_s"]
    rows = [("point", "step ms (med/min/max)", "tokens/s", "tok/s/dev", "TFLOP/s/dev", "MFU", "MFU cpu-s", "vs first",
             "compile s", "peak mem")]
    for r in records:
        s = r["step_s"]
        mem = r["peak_memory_bytes"]
        rows.append((r["label"], f"{s['median'] * 1e3:.1f}/{s['min'] * 1e3:.1f}/{s['max'] * 1e3:.1f}",
                     f"{r['tokens_per_s']:.0f}", f"{r['tokens_per_s_per_device']:.0f}", f"{r['tflops_per_device']:.4f}",
                     "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}",
                     "n/a" if r["mfu_cpu_time"] is None else f"{r['mfu_cpu_time']:.1%}", f"{r['tokens_per_s'] / base:.2f}x",
                     f"{r['compile_s']:.1f}", "n/a" if mem is None else f"{mem / 2**30:.2f} GiB"))
    return _format(rows)


def _format(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(row[c])) for row in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


# ---------------------------------------------------------------------------------------------
# Decode


def benchmark_decode(model_cfg: ModelConfig, graphdef: Any, params: Any, batch_sizes: Sequence[int],
                     prompt_len: int, new_tokens: int, repeats: int = 3, device: Any = None) -> list[dict[str, Any]]:
    """Prefill and per-token decode timings of the real ``Decoder`` (greedy) for each batch size."""
    from qkv.model import init_cache
    from qkv.inference import decode

    if prompt_len < 1 or new_tokens < 2:
        raise UserError(f"--prompt-len={prompt_len} must be >= 1 and --new-tokens={new_tokens} >= 2")
    if prompt_len + new_tokens > model_cfg.max_seq_len:
        raise UserError(f"--prompt-len {prompt_len} + --new-tokens {new_tokens} exceed model.max_seq_len="
                        f"{model_cfg.max_seq_len}: shorten them")
    device = device or jax.devices()[0]
    params = jax.device_put(params, device)
    host_tbps = roofline.measure_copy_tbps(device) if device.platform == "cpu" else None
    bandwidth, bw_source = roofline.bandwidth_tbps(device, host_tbps)
    greedy = decode.Sampler()
    records = []
    for b in batch_sizes:
        tokens = jax.device_put(np.random.default_rng(b).integers(0, model_cfg.vocab_size, (b, prompt_len))
                                .astype(np.int32), device)
        segments = jax.device_put(np.ones((b, prompt_len), np.int32), device)
        key = jax.random.key(0)

        def run() -> tuple[float, list[float]]:
            cache = jax.device_put(init_cache(model_cfg, b, prompt_len + new_tokens, per_row=True), device)
            jax.block_until_ready(cache)
            start = time.perf_counter()
            out, cache = decode.prefill(graphdef, greedy, params, tokens, segments, cache, key)
            jax.block_until_ready(out)
            prefill = time.perf_counter() - start
            steps = []
            for _ in range(new_tokens - 1):
                start = time.perf_counter()
                out, cache = decode.step(graphdef, greedy, params, out["token"], out["position"], cache, key)
                jax.block_until_ready(out)
                steps.append(time.perf_counter() - start)
            return prefill, steps

        start = time.perf_counter()
        run()  # compiles prefill and step
        compile_s = time.perf_counter() - start
        prefills, steps = [], []
        for _ in range(repeats):
            p, s = run()
            prefills.append(p)
            steps += s
        step_med, prefill_med = float(np.median(steps)), float(np.median(prefills))
        need = roofline.decode_bytes_per_step(model_cfg, params, b, prompt_len, new_tokens - 1)
        floor_s = need / (bandwidth * 1e12) if bandwidth else None
        records.append({
            "benchmark": "decode", "batch_size": b, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "repeats": repeats, "params": count_params(params), "first_call_s": compile_s,
            "prefill_s": prefill_med, "prefill_tokens_per_s": b * prompt_len / prefill_med,
            "token_latency_s": _stats(steps), "decode_tokens_per_s": b / step_med,
            "weight_bytes_per_step": roofline.weight_bytes_read(model_cfg, params, b),
            "roofline_bytes_per_step": need,
            # what this implementation touches: attention runs over the whole preallocated cache buffer
            "buffer_bytes_per_step": roofline.weight_bytes_read(model_cfg, params, b)
            + roofline.kv_bytes_read(model_cfg, b, prompt_len + new_tokens),
            "bandwidth_tbps": bandwidth, "bandwidth_source": bw_source, "measured_copy_tbps": host_tbps,
            "roofline_step_s": floor_s, "roofline_fraction": floor_s / step_med if floor_s else None,
            "achieved_tbps": need / step_med / 1e12,
        })
    return records


def decode_table(records: Sequence[dict[str, Any]]) -> str:
    rows = [("batch", "prefill tok/s", "latency ms (med/min/max)", "decode tok/s", "bytes/step", "roofline ms",
             "of roofline")]
    for r in records:
        lat = r["token_latency_s"]
        rows.append((str(r["batch_size"]), f"{r['prefill_tokens_per_s']:.0f}",
                     f"{lat['median'] * 1e3:.2f}/{lat['min'] * 1e3:.2f}/{lat['max'] * 1e3:.2f}",
                     f"{r['decode_tokens_per_s']:.1f}", f"{r['roofline_bytes_per_step'] / 2**20:.1f} MiB",
                     "n/a" if r["roofline_step_s"] is None else f"{r['roofline_step_s'] * 1e3:.3f}",
                     "n/a" if r["roofline_fraction"] is None else f"{r['roofline_fraction']:.1%}"))
    return _format(rows)


def run_decode(source: str | None, overrides: Sequence[str], checkpoint_dir: str | None, batch_sizes: Sequence[int],
               prompt_len: int, new_tokens: int, repeats: int = 3) -> list[dict[str, Any]]:
    """Decode records for a checkpoint's parameters, or for random parameters of a config."""
    if checkpoint_dir:
        from qkv.inference.run import load_run

        run = load_run(checkpoint_dir)
        model_cfg, graphdef, params, origin = run.config.model, run.graphdef, run.params, f"checkpoint {checkpoint_dir}"
    else:
        cfg = load_config(source, overrides)
        model_cfg = cfg.model
        graphdef, params = split_params(create_model(model_cfg, cfg.train.seed))
        origin = "random parameters"
    env = environment()
    return [{**env, "origin": origin, "model": dataclasses.asdict(model_cfg), **r}
            for r in benchmark_decode(model_cfg, graphdef, params, batch_sizes, prompt_len, new_tokens, repeats)]


def write_json(path: str, records: Sequence[dict[str, Any]]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"records": list(records)}, indent=1, default=str) + "\n")


def parse_int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{what}={text!r} must be comma-separated integers, e.g. 1,2,4") from None
    if not values or any(v < 1 for v in values):
        raise UserError(f"{what}={text!r} must list positive integers, e.g. 1,2,4")
    return values


def main(ns: Any) -> int:
    """The CLI entry (``qkv benchmark``); ``ns`` comes from the parser in qkv/cli.py."""
    if ns.cpu_devices:
        jax.config.update("jax_num_cpu_devices", ns.cpu_devices)
    source, overrides = split_config_args(ns.args)
    if ns.bench == "train":
        records = run_train_sweep(source, overrides, ns.sweep or [], ns.steps, ns.warmup, ns.profile, ns.breakdown)
        print(train_table(records))
        for r in records:
            if "breakdown_s" in r:
                print(f"{r['label']}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in r["breakdown_s"].items()))
            if r.get("profile_summary"):
                prof = r["profile_summary"]
                print(f"{r['label']}: XLA op time per step {prof['op_seconds_per_step'] * 1e3:.0f} ms: " + ", ".join(
                    f"{k} {v['share']:.0%}" for k, v in prof["by_kind"].items()))
                print("  top ops: " + ", ".join(f"{o['op']} {o['s'] * 1e3:.0f} ms" for o in prof["top_ops"]))
    else:
        if ns.checkpoint and (source or overrides):
            raise UserError("give either CONFIG [key=value ...] or --checkpoint RUN_DIR, not both")
        if ns.checkpoint and not Path(ns.checkpoint).expanduser().is_dir():
            raise FileNotFoundError(f"checkpoint directory {ns.checkpoint!r} does not exist: pass the train.run_dir of a run")
        records = run_decode(source, overrides, ns.checkpoint, parse_int_list(ns.batch_sizes, "--batch-sizes"),
                             ns.prompt_len, ns.new_tokens, ns.repeats)
        print(decode_table(records))
    r0 = records[0]
    print(f"{r0['machine']['device_count']}x {r0['machine']['device_kind']} ({r0['machine']['platform']}), "
          f"jax {r0['versions']['jax']}, {r0['date']}, load {r0['machine']['load_average_1m']}")
    if ns.json:
        write_json(ns.json, records)
        print(f"wrote {ns.json}")
    return 0
