"""How much of a run's sampled text is Python: the fraction of sampled lines that `ast.parse` accepts.

    JAX_PLATFORMS=cpu python docs/benchmarks/sample_python.py RUN_DIR [--samples 16] [--tokens 120] [--json F]

Each of `--samples` continuations of `--prompt` (temperature 0.7, top-k 40, as `qkv pretrain`'s sample;
seeds 0..N-1) is cut into lines; the last line is dropped when the sample ends mid-line. A line counts
as Python when it parses on its own after dedenting (a bare `def f(x):` or `if x:` is completed with
`pass`, a lone `else:`/`elif`/`except`/`finally` header with a leading `if 1: pass`/`try: pass`); a
"block" counts when its consecutive non-empty lines of one indentation group parse together. Blank
lines and comment-only lines (which parse trivially) are not counted as lines; their number is reported.
"""
from __future__ import annotations

import argparse
import ast
import json
import textwrap

HEADS = {"else": "if 1:\n    pass\n", "elif": "if 1:\n    pass\n", "except": "try:\n    pass\n",
         "finally": "try:\n    pass\n"}


def parses(code: str) -> bool:
    try:
        ast.parse(code)
        return True
    except (SyntaxError, ValueError):
        return False


def line_is_python(line: str) -> bool:
    code = line.strip()
    if not code:
        return False
    first = code.split()[0].rstrip(":")
    prefix = HEADS.get(first, "")
    body = "\n    pass" if code.endswith(":") else ""
    return parses(prefix + code + body)


def blocks(lines: list[str]) -> list[str]:
    """Consecutive non-blank lines, split where the indentation returns to the first line's level."""
    out, cur = [], []
    for line in lines:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if cur and indent <= len(cur[0]) - len(cur[0].lstrip()) and not line.lstrip().startswith(("else", "elif", "except", "finally")):
            out.append("\n".join(cur))
            cur = []
        cur.append(line)
    if cur:
        out.append("\n".join(cur))
    return out


def block_is_python(block: str) -> bool:
    code = textwrap.dedent(block)
    return parses(code) or parses(code + "\n" + " " * 4 + "pass")


def score(samples: list[str]) -> dict:
    lines, blks = [], []
    for s in samples:
        ls = s.split("\n")
        if not s.endswith("\n"):
            ls = ls[:-1]  # cut mid-line by the token budget
        lines += [line for line in ls if line.strip()]
        blks += blocks(ls)
    comments = sum(line.strip().startswith("#") for line in lines)
    lines = [line for line in lines if not line.strip().startswith("#")]
    ok_lines = sum(map(line_is_python, lines))
    ok_blocks = sum(map(block_is_python, blks))
    return {"comment_lines": comments, "lines": len(lines), "lines_parsing": ok_lines, "line_fraction": ok_lines / max(1, len(lines)),
            "blocks": len(blks), "blocks_parsing": ok_blocks, "block_fraction": ok_blocks / max(1, len(blks))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--tokens", type=int, default=120)
    p.add_argument("--prompt", default="def ")
    p.add_argument("--json")
    args = p.parse_args()
    import qkv

    lm = qkv.load(args.run_dir)
    samples = [args.prompt + lm.generate(args.prompt, max_new_tokens=args.tokens, temperature=0.7, top_k=40, seed=s)[0]
               for s in range(args.samples)]
    result = {"run_dir": args.run_dir, "samples": args.samples, "tokens": args.tokens, **score(samples)}
    print(json.dumps(result, indent=1))
    print("\n--- sample 0 ---\n" + samples[0])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**result, "texts": samples}, f, indent=1)


if __name__ == "__main__":
    main()
