"""Draw tokens/s and MFU across a `qkv benchmark train --sweep ... --json FILE` run (needs matplotlib).

    python docs/benchmarks/plot_sweep.py docs/benchmarks/cpu-train-7m-sweep.json docs/benchmarks/cpu-train-7m-sweep.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

records = json.load(open(sys.argv[1]))["records"]
labels = [r["label"].replace("scan_layers=", "scan=").replace(" ", "\n") for r in records]
x = range(len(records))
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
ax1.bar(x, [r["tokens_per_s"] for r in records], color="tab:blue")
ax1.set_ylabel("tokens/s (median step)")
mfu = [100 * (r["mfu"] or 0) for r in records]
mfu_cpu = [100 * (r.get("mfu_cpu_time") or 0) for r in records]
ax2.bar([i - 0.2 for i in x], mfu, 0.4, label="wall time")
ax2.bar([i + 0.2 for i in x], mfu_cpu, 0.4, label="CPU time")
ax2.axhline(60, color="gray", linestyle="--", linewidth=1, label="60 % target")
ax2.set_ylabel("% of the same run's matmul rate")
ax2.legend(fontsize=8)
for ax in (ax1, ax2):
    ax.set_xticks(list(x), labels, fontsize=7)
m = records[0]["machine"]
fig.suptitle(f"{records[0]['params'] / 1e6:.1f}M-parameter model, {m['device_count']}x {m['device_kind']} "
             f"({m['cpu_count']} cores, load {m['load_average_1m']}), jax {records[0]['versions']['jax']}, "
             f"{records[0]['date']}", fontsize=9)
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=90)
print(f"wrote {sys.argv[2]}")
