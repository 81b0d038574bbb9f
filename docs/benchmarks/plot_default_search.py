"""The default-job search of docs/benchmarks.md as a picture: validation bits/byte per training step (left,
load-independent) and per wall-clock minute of the runs made on an idle machine (right).

    python docs/benchmarks/plot_default_search.py [docs/benchmarks/default-search.json] [OUT.png]
"""
import json
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

src = sys.argv[1] if len(sys.argv) > 1 else "docs/benchmarks/default-search.json"
out = sys.argv[2] if len(sys.argv) > 2 else "docs/benchmarks/default-search.png"
data = json.load(open(src))
fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
for run in data["runs"]:
    steps = [e["step"] for e in run["evals"]]
    bpb = [e["bits_per_byte"] for e in run["evals"]]
    if not run["idle_machine"]:
        left.plot(steps, bpb, "o-" if len(steps) > 1 else "s", label=run["label"])
    else:
        right.plot([e["seconds_since_start"] / 60 for e in run["evals"]], bpb, "o-", label=run["label"])
        right.axvline(run["wall_seconds"] / 60, ls=":", c=right.lines[-1].get_color())
for ax in (left, right):
    ax.axhline(1.83, ls="--", c="gray", label="gzip -9, file by file (1.83)")
    ax.axhline(1.78, ls="-.", c="gray", label="xz -9, file by file (1.78)")
    ax.axhline(2.0, ls=":", c="k", label="target: 2.0 in about 3 minutes")
    ax.set_ylabel("validation bits per byte (whole split)")
    ax.set_ylim(1.7, 3.0)
left.set_xlabel("training step (16 x 128 tokens; runs on a shared machine)")
right.set_xlabel("minutes since the command started (idle machine; dotted: the run's end)")
left.legend(fontsize=7)
right.legend(fontsize=7)
fig.suptitle("qkv pretrain tiny on the stdlib, 2-core CPU: what moved bits/byte (" + data["date"] + ")")
fig.tight_layout()
fig.savefig(out, dpi=90)
