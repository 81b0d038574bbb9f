"""Eager PyTorch vs `qkv benchmark train` for the GPT-2-style character model at three sizes, in one run.

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 JAX_PLATFORMS=cpu python docs/benchmarks/vs_torch.py [--sizes S,M,L] [--json FILE]

Every implementation is built and warmed up first; then the rounds alternate, ``--block`` steps back to back
per turn for each (size, implementation) — PyTorch eager steps, then qkv's compiled train steps, then one matmul
of the probe of `qkv benchmark` — so a change in machine load hits all of them alike. (Until 2026-12-06 the probe
ran after every qkv step; its 48 MB of operands evicted the step's working set from the caches, a handicap the
PyTorch steps did not have.) Both train on one fixed random batch (data loading excluded on both sides).
Reported per size: median step wall time and tokens/s, the ratio qkv/PyTorch, each one's model FLOP rate as a
fraction of the same run's float32 matmul probe, and the same ratios per CPU-second of this process (which a
shared machine distorts less than wall time). Each turn also times the step's matmuls alone (step_matmuls.py) in
the same library: the floor under either step.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

SIZES = {  # name: (vocab, d_model, layers, heads, block, batch)
    "S": (65, 128, 4, 4, 64, 12),   # nanoGPT's documented CPU run of shakespeare_char (size S)
    "M": (65, 256, 4, 4, 128, 16),
    "L": (65, 384, 6, 6, 256, 16),  # nanoGPT's shakespeare_char GPU shape, at batch 16
}


def qkv_overrides(vocab, d, layers, heads, block, batch) -> list[str]:
    return [f"model.vocab_size={vocab}", f"model.d_model={d}", f"model.n_layers={layers}", f"model.n_heads={heads}",
            f"model.d_ff={4 * d}", f"model.max_seq_len={block}", "model.positions=learned", "model.norm=layernorm",
            "model.use_bias=true", "model.activation=gelu", "model.tie_embeddings=true", f"data.seq_len={block}",
            f"train.batch_size={batch}", "optim.name=adamw", "optim.b2=0.99", "optim.learning_rate=1e-3",
            "optim.grad_clip=1.0", "model.qk_norm=false"]  # the preset's QK-norm is not in the reference


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--warmup", type=int, default=10, help="steps of each side before timing (with 2, the first two "
                                                        "rounds of both were still 1.5-2x slow)")
    p.add_argument("--sizes", default="S,M,L")
    p.add_argument("--json", default=None)
    p.add_argument("--torch-threads", type=int, default=0,
                   help="PyTorch intra-op threads (0: its default, one per core); on an oversubscribed machine "
                        "OpenMP's spinning barriers make 2 threads far slower than 1")
    p.add_argument("--pause", type=float, default=0.05, help="seconds between turns (idle worker threads settle)")
    p.add_argument("--block", type=int, default=4,
                   help="steps per turn, back to back (a training loop's rhythm; after a pause, a step of either "
                        "side runs slower: measured 50.0 vs 44.5 ms for qkv's S step)")
    args = p.parse_args()

    import torch
    from step_matmuls import MatmulsAlone, step_matmuls
    from torch_reference import TorchTrainer
    from qkv.tools.benchmark import TrainPoint, environment
    from qkv.train.config import load_config
    from qkv.train.metrics import flops_per_token

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    env = environment()
    built, probe = [], None
    for name in args.sizes.split(","):
        vocab, d, layers, heads, block, batch = SIZES[name]
        cfg = load_config("tiny", qkv_overrides(*SIZES[name]))
        print(f"building {name}: d={d} L={layers} H={heads} T={block} B={batch} ...", file=sys.stderr, flush=True)
        point = TrainPoint(cfg, args.warmup, args.warmup + args.rounds * args.block, probe=probe)
        probe, point.probe = point.probe, None  # timed once per turn below, not between the steps of a block
        ref = TorchTrainer(vocab, d, layers, heads, block, batch)
        for _ in range(args.warmup):
            ref.step()
        floor = MatmulsAlone(step_matmuls(*SIZES[name]))
        built.append((name, cfg, point, ref, {"torch_wall": [], "torch_cpu": [], "floor": floor, "mm_torch": [], "mm_jax": []}))
    print(f"timing {args.rounds} rounds ...", file=sys.stderr, flush=True)
    probe_times, probe_cpus = [], []
    for _ in range(args.rounds):
        for name, cfg, point, ref, timings in built:
            for _ in range(args.block):
                start, cpu = time.perf_counter(), time.process_time()
                ref.step()
                timings["torch_wall"].append(time.perf_counter() - start)
                timings["torch_cpu"].append(time.process_time() - cpu)
            for _ in range(args.block):
                timings["mm_torch"].append(timings["floor"].time_torch())
            time.sleep(args.pause)
            for _ in range(args.block):
                point.step()
            for _ in range(args.block):
                timings["mm_jax"].append(timings["floor"].time_jax())
            probe_wall, probe_cpu = probe.timed()  # the probe's 48 MB of operands evict the steps' working set
            probe_times.append(probe_wall)
            probe_cpus.append(probe_cpu)
            time.sleep(args.pause)

    probe_rate = probe.flops / float(np.median(probe_times))
    probe_cpu_rate = probe.flops / float(np.median(probe_cpus))
    records = []
    for name, cfg, point, ref, tt in built:
        tokens = cfg.train.batch_size * cfg.data.seq_len
        flops = flops_per_token(cfg.model, cfg.data.seq_len) * tokens
        q_wall, q_cpu = float(np.median(point.times)), float(np.median(point.cpu_times))
        t_wall, t_cpu = float(np.median(tt["torch_wall"])), float(np.median(tt["torch_cpu"]))
        records.append({
            "size": name, "shape": dict(zip(("vocab", "d_model", "layers", "heads", "block", "batch"), SIZES[name])),
            "params_qkv": point.n_params, "params_torch": ref.n_params, "tokens_per_step": tokens,
            "flops_per_step": flops, "rounds": args.rounds, "block": args.block,
            "torch_step_s": t_wall, "qkv_step_s": q_wall, "torch_cpu_s": t_cpu, "qkv_cpu_s": q_cpu,
            "torch_tokens_per_s": tokens / t_wall, "qkv_tokens_per_s": tokens / q_wall,
            "speedup_wall": t_wall / q_wall, "speedup_cpu": t_cpu / q_cpu,
            "probe_gflops": probe_rate / 1e9, "probe_cpu_gflops": probe_cpu_rate / 1e9,
            "torch_of_probe": flops / t_wall / probe_rate, "qkv_of_probe": flops / q_wall / probe_rate,
            "torch_of_probe_cpu": flops / t_cpu / probe_cpu_rate, "qkv_of_probe_cpu": flops / q_cpu / probe_cpu_rate,
            "torch_step_all_s": tt["torch_wall"], "qkv_step_all_s": point.times,
            # the floor: the step's matmuls alone (step_matmuls.py), and the step time the 1.25x target asks for
            "matmul_flops": tt["floor"].flops, "torch_matmuls_s": float(np.median(tt["mm_torch"])),
            "jax_matmuls_s": float(np.median(tt["mm_jax"])), "target_step_s": t_wall / 1.25,
        })
    head = ("size", "params", "torch tok/s", "qkv tok/s", "qkv/torch wall", "qkv/torch cpu-s",
            "torch % probe", "qkv % probe", "torch % probe cpu-s", "qkv % probe cpu-s")
    print("| " + " | ".join(head) + " |\n|" + " --- |" * len(head))
    for r in records:
        s = r["shape"]
        print(f"| {r['size']} (d={s['d_model']} L={s['layers']} T={s['block']} B={s['batch']}) | "
              f"{r['params_qkv'] / 1e6:.2f}M | {r['torch_tokens_per_s']:.0f} | {r['qkv_tokens_per_s']:.0f} | "
              f"{r['speedup_wall']:.2f}x | {r['speedup_cpu']:.2f}x | {r['torch_of_probe']:.1%} | {r['qkv_of_probe']:.1%} | "
              f"{r['torch_of_probe_cpu']:.1%} | {r['qkv_of_probe_cpu']:.1%} |")
    print("\n| size | PyTorch step ms | qkv step ms | 1.25x target ms | matmuls alone, PyTorch ms | matmuls alone, "
          "JAX ms |\n|" + " --- |" * 6)
    for r in records:
        print(f"| {r['size']} | {1e3 * r['torch_step_s']:.1f} | {1e3 * r['qkv_step_s']:.1f} | {1e3 * r['target_step_s']:.1f} | "
              f"{1e3 * r['torch_matmuls_s']:.1f} | {1e3 * r['jax_matmuls_s']:.1f} |")
    print(f"probe {records[0]['probe_gflops']:.0f} GFLOP/s wall, {records[0]['probe_cpu_gflops']:.0f} per CPU-s; "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads); {env['date']}; load {env['machine']['load_average_1m']}")
    if args.json:
        Path(args.json).write_text(json.dumps({**env, "records": records}, indent=1) + "\n")


if __name__ == "__main__":
    main()
