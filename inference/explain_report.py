"""Draw an :class:`~qkv.inference.explain.Explanation` as a self-contained report: ``DIR/index.html`` with
PNG pictures (matplotlib, Agg) and the numbers as ``explanation.json``, readable offline; plus the
training curves of a run's metrics.jsonl and a short terminal summary.

The report is written to a temporary folder beside ``DIR`` and renamed into place at the end, so a
failure leaves no half-written report behind.
"""
from __future__ import annotations

import html
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .explain import Explanation
from qkv.errors import UserError

TITLES = {"self": "self-attention", "encoder": "encoder self-attention", "cross": "cross-attention (target × source)"}
REPORT_MARK = "explanation.json"  # a folder holding this is a report that may be replaced


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def label(row: dict[str, Any]) -> str:
    """How a piece is printed: SentencePiece's ▁ (a space) kept visible, byte pieces as <0x..>, and a
    newline or tab piece as \\n or \\t."""
    return row["piece"].replace("\n", "\\n").replace("\t", "\\t")


def _ticks(ax, labels_x: list[str], labels_y: list[str], size: float) -> None:
    step = max(1, math.ceil(max(len(labels_x), len(labels_y)) / 40))  # at most ~40 labels per axis
    ax.set_xticks(range(0, len(labels_x), step), labels_x[::step], rotation=90, fontsize=size)
    ax.set_yticks(range(0, len(labels_y), step), labels_y[::step], fontsize=size)


def _heatmap(ax, w_ts: np.ndarray, causal: bool, plt, annotate: bool = False):
    shown = np.ma.masked_where(np.triu(np.ones_like(w_ts, bool), 1), w_ts) if causal else w_ts
    cmap = plt.get_cmap("Blues").with_extremes(bad="white")
    image = ax.imshow(shown, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    if annotate:
        for (i, j), v in np.ndenumerate(w_ts):
            if not (causal and j > i):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if v > 0.5 else "black")
    return image


def draw_attention(weights_lhts: np.ndarray, query: list[str], keys: list[str], causal: bool, title: str,
                   path: Path, layers: list[int], heads: list[int]) -> None:
    """One row of per-head heat-maps per layer (queries down, keys across)."""
    plt = _plt()
    size = min(2.2 + 0.09 * len(keys), 6.0)
    fig, axes = plt.subplots(len(layers), len(heads), figsize=(size * len(heads), size * len(layers) + 0.6),
                             squeeze=False, constrained_layout=True)
    font = 7 if max(len(keys), len(query)) <= 24 else 5
    for r, layer in enumerate(layers):
        for c, head in enumerate(heads):
            ax = axes[r][c]
            _heatmap(ax, weights_lhts[layer, head], causal, plt)
            _ticks(ax, keys, query, font)
            ax.set_title(f"layer {layer} head {head}", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_detail(w_ts: np.ndarray, query: list[str], keys: list[str], causal: bool, title: str, path: Path) -> None:
    """One head large, every weight printed when the text is short."""
    plt = _plt()
    side = min(3 + 0.32 * len(keys), 11)
    fig, ax = plt.subplots(figsize=(side + 1, min(3 + 0.32 * len(query), 11)), constrained_layout=True)
    image = _heatmap(ax, w_ts, causal, plt, annotate=len(keys) <= 20 and len(query) <= 20)
    _ticks(ax, keys, query, 8)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query (attending)")
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set_title(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_head_shares(summary: list[list[dict[str, Any]]], title: str, path: Path) -> None:
    """Stacked bars: where each head's attention goes (first, same, previous, far back, ...)."""
    plt = _plt()
    names = list(summary[0][0]["shares"])
    bars = [(f"L{layer}H{h['head']}", h["shares"]) for layer, heads in enumerate(summary) for h in heads]
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * len(bars) + 2), 3.6), constrained_layout=True)
    bottom = np.zeros(len(bars))
    for name, color in zip(names, plt.get_cmap("tab10").colors):
        values = np.array([shares[name] for _, shares in bars])
        ax.bar(range(len(bars)), values, bottom=bottom, label=name, color=color)
        bottom += values
    ax.set_xticks(range(len(bars)), [b for b, _ in bars], rotation=90, fontsize=7)
    ax.set_ylabel("share of attention")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncols=3, loc="upper center", bbox_to_anchor=(0.5, -0.28))
    ax.set_title(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_next_token(table: dict[str, Any], path: Path) -> None:
    plt = _plt()
    rows = table["rows"]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.4), constrained_layout=True)
    y = np.arange(len(rows))
    ax.barh(y - 0.2, [r["p_t1"] for r in rows], height=0.4, label="T = 1", color="#9ecae1")
    ax.barh(y + 0.2, [r["p_sampled"] for r in rows], height=0.4, color="#08519c",
            label=f"sampled from (T = {table['temperature']:g}, top-k {table['top_k']}, top-p {table['top_p']:g})")
    ax.set_yticks(y, [f"{label(r)}  ({r['id']})" + ("" if r["kept"] else "  ✗") for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("probability (✗: dropped by top-k/top-p)")
    ax.legend(fontsize=7, loc="lower right")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_embedding_map(emb: dict[str, Any], highlight: set[int], path: Path) -> None:
    plt = _plt()
    xy = np.asarray(emb["map"]["xy"])
    fig, ax = plt.subplots(figsize=(9, 7), constrained_layout=True)
    ax.scatter(xy[:, 0], xy[:, 1], s=6, color="#9ecae1")
    for (x, y), i, piece in zip(xy, emb["map"]["ids"], emb["map"]["pieces"]):
        ax.annotate(label({"piece": piece}), (x, y), fontsize=6, color="#b30000" if i in highlight else "#333333")
    var = emb["map"]["variance"]
    ax.set_xlabel(f"PC 1 ({100 * var[0]:.1f} % of variance)")
    ax.set_ylabel(f"PC 2 ({100 * var[1]:.1f} % of variance)")
    ax.set_title(f"input embeddings of {len(xy)} frequent pieces, 2-D PCA (red: in the text)", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass the train.run_dir of a run that has logged steps")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a crash mid-write
            continue
    return records


def draw_training(run_dir: str | Path, path: Path) -> dict[str, Any]:
    """Loss, validation loss and learning rate against step, from the run's metrics.jsonl."""
    records = read_metrics(run_dir)
    train = [r for r in records if r.get("split") == "train" and "loss" in r]
    evals = [r for r in records if r.get("split") == "eval" and "loss" in r]
    if not train:
        raise UserError(f"{Path(run_dir) / 'metrics.jsonl'} holds no training steps yet: train for longer")
    plt = _plt()
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(7, 5), sharex=True, height_ratios=[3, 1], constrained_layout=True)
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="validation loss")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax_lr.plot([r["step"] for r in train], [r.get("lr", np.nan) for r in train], color="gray")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"steps": train[-1]["step"], "last_loss": train[-1]["loss"],
            "last_val_loss": evals[-1]["loss"] if evals else None}


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
       "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}"
       "img{max-width:100%;border:1px solid #eee;margin:.4em 0}.tok{display:inline-block;border:1px solid #9ecae1;"
       "margin:2px;padding:1px 4px;font-family:monospace;background:#f0f7fc}.byte{background:#fde0c5}"
       ".tok small{color:#777}")


def _token_spans(rows: list[dict[str, Any]]) -> str:
    return "".join(f'<span class="tok{" byte" if r["byte"] else ""}">{_esc(label(r))} <small>{r["id"]}</small>'
                   "</span>" for r in rows)


def write_report(exp: Explanation, out_dir: str | Path, layer: int | None = None, head: int | None = None,
                 run_dir: str | Path | None = None, title: str = "") -> Path:
    """Write the report into ``out_dir`` (replacing an earlier report there) and return index.html's path."""
    return _replace_dir(out_dir, lambda tmp: _write_into(exp, tmp, layer, head, run_dir, title))


def _replace_dir(out_dir: str | Path, fill) -> Path:
    """Run ``fill(tmp)`` on a fresh folder beside ``out_dir``, then move it to ``out_dir`` (replacing an earlier
    report, never other files): nothing is left behind if ``fill`` fails."""
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / REPORT_MARK).exists())):
        raise UserError(f"--out {out} exists and is not an earlier qkv explain report: choose a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        fill(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out / "index.html"


def _write_into(exp: Explanation, out: Path, layer: int | None, head: int | None, run_dir, title: str) -> None:
    n = exp.numbers
    tokens = [label(r) for r in n["tokens"]]
    source = [label(r) for r in n["source_tokens"]] if n["source_tokens"] else None
    parts = [f"<h1>qkv explain{(': ' + _esc(title)) if title else ''}</h1>",
             f"<p>model kind <b>{_esc(n['kind'])}</b>; prompt <code>{_esc(n['prompt'])}</code>"
             + (f"; source <code>{_esc(n['source'])}</code>" if n["source"] else "")
             + (f"; its greedy translation <code>{_esc(n['target_text'])}</code>" if n.get("target_text") is not None
                else "") + "</p>", "<h2>Tokens</h2>"]
    if source:
        parts.append(f"<p>source: {_token_spans(n['source_tokens'])}</p><p>target: {_token_spans(n['tokens'])}</p>")
    else:
        parts.append(f"<p>{_token_spans(n['tokens'])}</p>")
    parts.append("<p>Each box is one SentencePiece piece and its id (▁ is a space; orange: byte-fallback "
                 "pieces, one UTF-8 byte each).</p><h2>Attention</h2>")
    for stack, w in exp.weights.items():
        causal = stack == "self" and n["kind"] != "encoder"
        queries = tokens if stack != "encoder" else source
        keys = source if stack in ("cross", "encoder") else tokens
        n_layers, n_heads = w.shape[:2]
        layers = [layer] if layer is not None else list(range(n_layers))
        heads = [head] if head is not None else list(range(n_heads))
        draw_attention(w, queries, keys, causal, TITLES[stack], out / f"attention_{stack}.png", layers, heads)
        l0, h0 = layers[0], heads[0]
        draw_detail(w[l0, h0], queries, keys, causal, f"{TITLES[stack]}, layer {l0} head {h0}",
                    out / f"attention_{stack}_detail.png")
        parts.append(f"<h3>{_esc(TITLES[stack])}</h3><p>Rows are queries, columns the keys they attend to; each "
                     "row sums to 1" + ("; the empty upper triangle is the causal mask." if causal else ".") + "</p>"
                     f'<img src="attention_{stack}.png" alt="{stack} attention"><img src="attention_{stack}_detail.png"'
                     f' alt="{stack} attention, one head">')
        summary = n["heads"][stack]
        if stack == "cross":
            rows = [[f"{li}", h["head"], f"{h['entropy_bits']:.2f}", f"{h['peak_weight']:.2f}"]
                    for li, hs in enumerate(summary) for h in hs]
            parts.append(_table(["layer", "head", "entropy (bits)", "mean strongest weight"], rows))
        else:
            draw_head_shares(summary, f"where each head looks ({TITLES[stack]})", out / f"heads_{stack}.png")
            names = list(summary[0][0]["shares"])
            rows = [[li, h["head"], f"{h['entropy_bits']:.2f}", h["mostly"], *[f"{h['shares'][k]:.2f}" for k in names]]
                    for li, hs in enumerate(summary) for h in hs]
            parts.append(_table(["layer", "head", "entropy (bits)", "mostly", *names], rows)
                         + f'<img src="heads_{stack}.png" alt="head shares">')
    table = n["next_token"]
    draw_next_token(table, out / "next_token.png")
    where = (f"masked position {n['position']} (hidden piece: {table['masked']['piece']})" if "masked" in table
             else f"after position {n['position']} ({tokens[n['position']]})")
    parts.append(f"<h2>Next token</h2><p>The model's guess {_esc(where)}: logits, softmax at T = 1 and at "
                 f"T = {table['temperature']:g}, and whether the sampler's top-k = {table['top_k']} / top-p = "
                 f"{table['top_p']:g} filter keeps the token ({table['kept']} tokens kept in all; entropy at T = 1: "
                 f"{table['entropy_bits_t1']:.2f} bits).</p>")
    parts.append(_table(["rank", "piece", "id", "logit", "p (T=1)", f"p (T={table['temperature']:g})", "kept",
                         "p sampled"], [[r["rank"], label(r), r["id"], f"{r['logit']:.3f}", f"{r['p_t1']:.4f}",
                                         f"{r['p_temperature']:.4f}", "yes" if r["kept"] else "no",
                                         f"{r['p_sampled']:.4f}"] for r in table["rows"]]))
    parts.append('<img src="next_token.png" alt="next-token probabilities">')
    emb = n["embeddings"]
    highlight = {r["id"] for r in n["tokens"] + (n["source_tokens"] or [])}
    draw_embedding_map(emb, highlight, out / "embeddings.png")
    parts.append("<h2>Embeddings</h2><p>Nearest vocabulary pieces by cosine similarity of input embeddings:</p>")
    parts.append(_table(["piece", "nearest pieces (cosine)"],
                        [[label(e), ", ".join(f"{label(x)} ({x['cosine']:.2f})" for x in e["neighbours"])]
                         for e in emb["neighbours"]]))
    parts.append('<img src="embeddings.png" alt="embedding map">')
    if "kv_cache" in n:
        kv = n["kv_cache"]
        parts.append("<h2>The KV cache</h2><p>Forward FLOPs for one new token at each length: with the cache only "
                     "the new token's work; without it, the whole sequence again (from the model's training FLOP "
                     "count, train/metrics.py). Keys and values cost "
                     f"{kv['cache_bytes_per_token']:,} bytes per token ({kv['dtype']}), "
                     f"{kv['cache_bytes_total']:,} bytes for {kv['tokens']} tokens"
                     + (f", plus {kv['cross_memory_bytes']:,} bytes of cross-attention keys/values of the source"
                        if "cross_memory_bytes" in kv else "") + ".</p>")
        parts.append(_table(["length", "FLOPs with cache", "FLOPs without", "ratio"],
                            [[r["length"], f"{r['flops_with_cache']:.3g}", f"{r['flops_without_cache']:.3g}",
                              f"{r['flops_without_cache'] / r['flops_with_cache']:.1f}×"] for r in kv["rows"]]))
        check = n.get("greedy_check")
        if check:
            parts.append(f"<p>Greedy decoding of {check['new_tokens']} tokens with the cache and without it: "
                         f"<b>{'the same tokens' if check['same'] else 'DIFFERENT tokens'}</b> "
                         f"(<code>{_esc(check['text'])}</code>).</p>")
    if run_dir is not None and (Path(run_dir) / "metrics.jsonl").is_file():
        curves = draw_training(run_dir, out / "training.png")
        n = {**n, "training": curves}
        parts.append('<h2>Training</h2><img src="training.png" alt="training curves">')
    (out / REPORT_MARK).write_text(json.dumps(n, indent=1))
    parts.append(f'<p>All numbers: <a href="{REPORT_MARK}">{REPORT_MARK}</a>.</p>')
    (out / "index.html").write_text("<!doctype html><html><head><meta charset='utf-8'><title>qkv explain</title>"
                                    f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>",
                                    encoding="utf-8")


def write_training_report(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Only the training curves of a run (``qkv explain --run RUN``)."""
    read_metrics(run_dir)  # refuse before making anything

    def fill(tmp: Path) -> None:
        curves = draw_training(run_dir, tmp / "training.png")
        (tmp / REPORT_MARK).write_text(json.dumps({"run": str(run_dir), "training": curves}, indent=1))
        (tmp / "index.html").write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>qkv explain</title>"
                                        f"<style>{CSS}</style></head><body><h1>Training of {_esc(run_dir)}</h1>"
                                        '<img src="training.png" alt="training curves"></body></html>',
                                        encoding="utf-8")

    return _replace_dir(out_dir, fill)


def terminal_summary(exp: Explanation, index: Path | None = None) -> str:
    n = exp.numbers
    lines = ["tokens: " + " ".join(f"{label(r)}[{r['id']}]" for r in n["tokens"])]
    if n["source_tokens"]:
        lines.insert(0, "source: " + " ".join(f"{label(r)}[{r['id']}]" for r in n["source_tokens"]))
    for stack, layers in n["heads"].items():
        for li, heads in enumerate(layers):
            cells = [f"h{h['head']} {h.get('mostly', 'peak %.2f' % h.get('peak_weight', 0))} {h['entropy_bits']:.1f}b"
                     for h in heads]
            lines.append(f"{stack} layer {li}: " + ", ".join(cells))
    t = n["next_token"]
    best = ", ".join(f"{label(r)!r} {r['p_t1']:.3f}{'' if r['kept'] else ' (dropped)'}" for r in t["rows"][:5])
    lines.append(f"next token at position {n['position']}: {best}")
    check = n.get("greedy_check")
    if check:
        lines.append(f"greedy with/without KV cache: {'same' if check['same'] else 'DIFFERENT'} tokens "
                     f"({check['new_tokens']} new)")
    if index is not None:
        lines.append(f"report: {index}")
    return "\n".join(lines)
