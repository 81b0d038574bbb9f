"""Validation bits/byte against minutes since the first record, for one or more runs' metrics.jsonl.

    python docs/benchmarks/plot_bpb.py OUT.png LABEL=RUN/metrics.jsonl [LABEL=...]   (the last "=" splits)
"""
import json
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(figsize=(6, 4))
for spec in sys.argv[2:]:
    label, path = spec.rsplit("=", 1)
    records = [json.loads(line) for line in open(path)]
    t0 = records[0]["time"]
    evals = [r for r in records if r["split"] == "eval" and "bits_per_byte" in r]
    ax.plot([(r["time"] - t0) / 60 for r in evals], [r["bits_per_byte"] for r in evals], "o-", label=label)
ax.axhline(2.02, ls="--", c="gray", label="xz -9, file by file")
ax.axhline(2.0, ls=":", c="k", label="target 2.0")
ax.set_xlabel("minutes since step 10 (wall, loaded machine)")
ax.set_ylabel("validation bits per byte")
ax.legend()
fig.tight_layout()
fig.savefig(sys.argv[1], dpi=100)
