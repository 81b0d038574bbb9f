"""Eager PyTorch vs `qkv benchmark train` for the GPT-2-style character model at three sizes, in one run.

    JAX_PLATFORMS=cpu python docs/benchmarks/vs_torch.py [--rounds 10] [--sizes S,M,L] [--json FILE]

Every implementation is built and warmed up first; then the rounds alternate, ``--block`` steps back to back
per turn for each (size, implementation) — PyTorch eager steps, then qkv's compiled train steps each followed
by the matmul probe of `qkv benchmark` — so a change in machine load hits all of them alike. Both train on one fixed random
batch (data loading excluded on both sides). Reported per size: median step wall time and tokens/s, the
ratio qkv/PyTorch, each one's model FLOP rate as a fraction of the same run's float32 matmul probe, and the
same ratios per CPU-second of this process (which a shared machine distorts less than wall time).
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
    "S": (65, 128, 4, 4, 64, 12),   # nanoGPT's documented CPU run of shakespeare_char (the shape)
    "M": (65, 256, 4, 4, 128, 16),
    "L": (65, 384, 6, 6, 256, 16),  # nanoGPT's shakespeare_char GPU shape, at batch 16
}


def qkv_overrides(vocab, d, layers, heads, block, batch) -> list[str]:
    return [f"model.vocab_size={vocab}", f"model.d_model={d}", f"model.n_layers={layers}", f"model.n_heads={heads}",
            f"model.d_ff={4 * d}", f"model.max_seq_len={block}", "model.positions=learned", "model.norm=layernorm",
            "model.use_bias=true", "model.activation=gelu", "model.tie_embeddings=true", f"data.seq_len={block}",
            f"train.batch_size={batch}", "optim.name=adamw", "optim.b2=0.99", "optim.learning_rate=1e-3",
            "optim.grad_clip=1.0"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--sizes", default="S,M,L")
    p.add_argument("--json", default=None)
    p.add_argument("--torch-threads", type=int, default=0,
                   help="PyTorch intra-op threads (0: its default, one per core); on an oversubscribed machine "
                        "OpenMP's spinning barriers make 2 threads far slower than 1")
    p.add_argument("--pause", type=float, default=0.05, help="seconds between turns (idle worker threads settle)")
    p.add_argument("--block", type=int, default=1,
                   help="steps per turn, back to back (a training loop's rhythm; after a pause, a step of either "
                        "side runs slower: measured 50.0 vs 44.5 ms for qkv's S step)")
    args = p.parse_args()

    import torch
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
        probe = point.probe
        ref = TorchTrainer(vocab, d, layers, heads, block, batch)
        for _ in range(args.warmup):
            ref.step()
        built.append((name, cfg, point, ref, {"wall": [], "cpu": []}))
    print(f"timing {args.rounds} rounds ...", file=sys.stderr, flush=True)
    for _ in range(args.rounds):
        for name, cfg, point, ref, torch_times in built:
            for _ in range(args.block):
                start, cpu = time.perf_counter(), time.process_time()
                ref.step()
                torch_times["wall"].append(time.perf_counter() - start)
                torch_times["cpu"].append(time.process_time() - cpu)
            time.sleep(args.pause)
            for _ in range(args.block):
                point.step()  # qkv step, then one probe matmul
            time.sleep(args.pause)

    probe_rate = probe.flops / float(np.median([t for _, _, pt, _, _ in built for t in pt.probe_times]))
    probe_cpu_rate = probe.flops / float(np.median([t for _, _, pt, _, _ in built for t in pt.probe_cpu]))
    records = []
    for name, cfg, point, ref, tt in built:
        tokens = cfg.train.batch_size * cfg.data.seq_len
        flops = flops_per_token(cfg.model, cfg.data.seq_len) * tokens
        q_wall, q_cpu = float(np.median(point.times)), float(np.median(point.cpu_times))
        t_wall, t_cpu = float(np.median(tt["wall"])), float(np.median(tt["cpu"]))
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
            "torch_step_all_s": tt["wall"], "qkv_step_all_s": point.times,
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
    print(f"probe {records[0]['probe_gflops']:.0f} GFLOP/s wall, {records[0]['probe_cpu_gflops']:.0f} per CPU-s; "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads); {env['date']}; load {env['machine']['load_average_1m']}")
    if args.json:
        Path(args.json).write_text(json.dumps({**env, "records": records}, indent=1) + "\n")


if __name__ == "__main__":
    main()
