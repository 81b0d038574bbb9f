"""Range and meaning checks of every config field, one table per config section.

The types are checked while parsing (train/config.py); here each value is checked against what it
means: sizes are positive and below a sane bound, probabilities lie in their interval, floats are
finite, a learning rate is positive. One row per field:

    (field, test, what it must be, the fix)

and one message shape for all of them, naming the key and a fix on one line::

    optim.b2=2.0 must be in [0, 1): use e.g. 0.95

Checks that tie several fields together (data.seq_len <= model.max_seq_len, ...) stay in the
dataclasses' ``__post_init__``.
"""
from __future__ import annotations

import math
from typing import Any, Callable
from qkv.errors import UserError

# Sane upper bounds: far above any real run, low enough to catch a typo (1e20 steps, a batch of 1e12).
MAX_STEPS = 10**9
MAX_BATCH = 2**24  # rows per step, across all devices
MAX_SIZE = 2**20  # widths, vocabularies and other counts of the model
MAX_SEQ = 2**22  # tokens in one row
MAX_SEED = 2**32 - 1  # numpy and jax.random take any seed in [0, 2**32)


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def finite(x: Any) -> bool:
    return _number(x) and math.isfinite(x)


def int_in(lo: int, hi: int) -> Callable[[Any], bool]:
    return lambda x: isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi


def positive(hi: int) -> Callable[[Any], bool]:
    return int_in(1, hi)


def count(hi: int) -> Callable[[Any], bool]:  # zero allowed
    return int_in(0, hi)


def optional(test: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda x: x is None or test(x)


def gt0(x: Any) -> bool:
    return finite(x) and x > 0


def ge0(x: Any) -> bool:
    return finite(x) and x >= 0


def unit_closed(x: Any) -> bool:  # [0, 1]
    return finite(x) and 0.0 <= x <= 1.0


def unit_right_open(x: Any) -> bool:  # [0, 1)
    return finite(x) and 0.0 <= x < 1.0


def unit_open(x: Any) -> bool:  # (0, 1)
    return finite(x) and 0.0 < x < 1.0


def nonempty_text(x: Any) -> bool:
    return isinstance(x, str) and x.strip() != "" and "\x00" not in x


def mesh_axis(x: Any) -> bool:
    return x == -1 or positive(MAX_SIZE)(x)


def name_list(x: Any) -> bool:
    return isinstance(x, list) and len(x) > 0 and all(isinstance(t, str) and t for t in x)


def rule_map(x: Any) -> bool:  # logical axis name -> a mesh axis, a list of them, or null
    def target(t: Any) -> bool:
        return t is None or isinstance(t, str) or (isinstance(t, list) and all(isinstance(a, str) for a in t))
    return isinstance(x, dict) and all(isinstance(k, str) and target(v) for k, v in x.items())


def label_list(x: Any) -> bool:
    return x is None or (isinstance(x, list) and len(x) >= 2 and all(isinstance(t, (str, int)) and not isinstance(t, bool)
                                                                     for t in x) and len(set(map(str, x))) == len(x))


Rule = tuple[str, Callable[[Any], bool], str, str]

RULES: dict[str, list[Rule]] = {
    "model": [
        ("vocab_size", positive(MAX_SIZE), f"an integer in [1, {MAX_SIZE}]", "use the tokenizer's size, e.g. 8192"),
        ("d_model", positive(MAX_SIZE), f"an integer in [1, {MAX_SIZE}]", "use e.g. 256"),
        ("n_layers", positive(4096), "an integer in [1, 4096]", "use e.g. 4"),
        ("n_heads", positive(MAX_SIZE), f"an integer in [1, {MAX_SIZE}]", "use e.g. 4"),
        ("n_kv_heads", optional(positive(MAX_SIZE)), "a positive integer or null", "use null (= n_heads) or a divisor of n_heads"),
        ("head_dim", optional(positive(MAX_SIZE)), "a positive integer or null", "use null (= d_model / n_heads)"),
        ("d_ff", positive(MAX_SIZE), f"an integer in [1, {MAX_SIZE}]", "use e.g. 4 * d_model"),
        ("max_seq_len", positive(MAX_SEQ), f"an integer in [1, {MAX_SEQ}]", "use e.g. 256"),
        ("rope_theta", gt0, "a finite number > 0", "use e.g. 10000"),
        ("norm_eps", gt0, "a finite number > 0", "use e.g. 1e-5"),
        ("dropout", unit_right_open, "in [0, 1)", "use e.g. 0.0 or 0.1"),
        ("init_std", gt0, "a finite number > 0", "use e.g. 0.02"),
        ("n_encoder_layers", optional(positive(4096)), "a positive integer or null", "use null (= n_layers)"),
        ("n_classes", count(MAX_SIZE), "an integer >= 0", "use 0 (no head) or the number of classes"),
    ],
    "data": [
        ("validation_fraction", unit_open, "in (0, 1)", "use e.g. 0.01"),
        ("seq_len", int_in(2, MAX_SEQ), f"an integer in [2, {MAX_SEQ}] (a row needs an input and a target)",
         "use e.g. 256"),
        ("source_seq_len", count(MAX_SEQ), f"an integer in [0, {MAX_SEQ}]", "use 0 (= data.seq_len) or a length"),
        ("toy_limit", int_in(20, 10**9), "an integer in [20, 1e9]", "use e.g. 10000"),
        ("eval_batches", count(10**7), "an integer >= 0", "use 0 (the whole split) or a count, e.g. 8"),
        ("shuffle_rows", count(10**7), "an integer >= 0", "use e.g. 1024 (rows per shuffle window), or 0 for none"),
        ("data_dir", nonempty_text, "a non-empty path", "use e.g. ~/.cache/qkv/tfds"),
        ("text_field", nonempty_text, "a non-empty field name", "use e.g. text"),
    ],
    "tokenizer": [
        ("train_documents", positive(10**8), "an integer in [1, 1e8]", "use e.g. 400"),
    ],
    "optim": [
        ("learning_rate", gt0, "a finite number > 0", "use e.g. 3e-4"),
        ("muon_learning_rate", gt0, "a finite number > 0", "use e.g. 0.02"),
        ("warmup_steps", count(MAX_STEPS), "an integer >= 0", "use e.g. 50 (0: no warmup)"),
        ("min_lr_ratio", unit_closed, "in [0, 1]", "use e.g. 0.1"),
        ("weight_decay", ge0, "a finite number >= 0", "use e.g. 0.1 (0: none)"),
        ("b1", unit_right_open, "in [0, 1)", "use e.g. 0.9"),
        ("b2", unit_right_open, "in [0, 1)", "use e.g. 0.95"),
        ("eps", gt0, "a finite number > 0", "use e.g. 1e-8"),
        ("grad_clip", ge0, "a finite number >= 0", "use e.g. 1.0 (0: no clipping)"),
        ("grad_accum", positive(MAX_BATCH), "a positive integer", "use e.g. 1"),
        ("z_loss", ge0, "a finite number >= 0", "use e.g. 1e-4 (0: off)"),
        ("label_smoothing", unit_right_open, "in [0, 1)", "use e.g. 0.1 (0: off)"),
    ],
    "mesh": [
        ("data", mesh_axis, "-1 or a positive integer", "use -1 (all devices left) or a device count"),
        ("fsdp", mesh_axis, "-1 or a positive integer", "use 1 or a device count"),
        ("tensor", mesh_axis, "-1 or a positive integer", "use 1 or a device count"),
        ("expert", mesh_axis, "-1 or a positive integer", "use 1 or a divisor of model.n_experts"),
        ("dcn_data", positive(10**4), "a positive integer", "use 1 (one slice) or the number of slices"),
        ("dcn_fsdp", positive(10**4), "a positive integer", "use 1 (parameters split inside each slice)"),
        ("rules", rule_map, "a mapping of logical axis names to a mesh axis, a list of them, or null",
         "use e.g. {batch: [data, fsdp]}"),
    ],
    "train": [
        ("run_dir", nonempty_text, "a non-empty path", "use e.g. runs/tiny"),
        ("steps", positive(MAX_STEPS), f"a positive integer (at most {MAX_STEPS:.0e})", "use e.g. 300"),
        ("stop_at_step", count(MAX_STEPS), "an integer >= 0", "use 0 (run to train.steps) or a step"),
        ("batch_size", positive(MAX_BATCH), f"a positive integer (at most {MAX_BATCH})", "use e.g. 16"),
        ("seed", count(MAX_SEED), f"an integer in [0, {MAX_SEED}]", "use e.g. 0"),
        ("log_every", positive(MAX_STEPS), "a positive integer", "use e.g. 10"),
        ("eval_every", positive(MAX_STEPS), "a positive integer", "use e.g. 100"),
        ("checkpoint_every", positive(MAX_STEPS), "a positive integer", "use e.g. 100"),
        ("keep_checkpoints", positive(10**6), "a positive integer", "use e.g. 3"),
        ("sample_tokens", count(MAX_SEQ), "an integer >= 0", "use e.g. 64 (0: no sample)"),
        ("spike_window", int_in(20, 10**6), "an integer in [20, 1e6]", "use e.g. 100"),
        ("spike_k", gt0, "a finite number > 0", "use e.g. 6"),
        ("spike_grad_factor", lambda x: finite(x) and x > 1, "a finite number > 1", "use e.g. 10"),
        ("spike_max_rewinds", positive(10**6), "a positive integer", "use e.g. 3"),
    ],
    "finetune": [
        ("init_step", optional(count(MAX_STEPS)), "an integer >= 0 or null", "use null (the newest step)"),
        ("dpo_beta", gt0, "a finite number > 0", "use e.g. 0.1"),
        ("eval_fraction", unit_right_open, "in [0, 1)", "use e.g. 0.05 (0: evaluate on the training examples)"),
        ("labels", label_list, "null or a list of at least 2 distinct names", "use e.g. [neg, pos]"),
        ("label_field", nonempty_text, "a non-empty field name", "use e.g. label"),
    ],
    "finetune.lora": [
        ("rank", count(MAX_SIZE), "an integer >= 0", "use 0 (full fine-tuning) or e.g. 8"),
        ("alpha", gt0, "a finite number > 0", "use e.g. 16"),
        ("targets", name_list, "a non-empty list of names", "use e.g. [wq, wv]"),
    ],
}


def show(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_section(section: str, obj: Any) -> None:
    """Raise ValueError naming the first field of ``obj`` (config section ``section``) out of range."""
    for key, test, need, fix in RULES[section]:
        value = getattr(obj, key)
        if not test(value):
            raise UserError(f"{section}.{key}={show(value)} must be {need}: {fix}")


def check_run_dir(run_dir: "Path") -> None:
    """``train.run_dir`` must be a directory, or a path where one can be made: not a file, not under a file,
    not under a folder this process cannot write to. Checked before anything is created."""
    import os
    from pathlib import Path

    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"train.run_dir={str(run_dir)!r} is a file, not a directory: choose another train.run_dir")
    ancestor = run_dir
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"train.run_dir={str(run_dir)!r} lies under the file {str(ancestor)!r}: choose another "
                        "train.run_dir")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"train.run_dir={str(run_dir)!r}: {str(ancestor)!r} is not writable by this user: choose "
                        "another train.run_dir")


MIXTURE_KEYS = ("kind", "path", "weight", "text_field", "token_field", "eval_path", "name")


def check_mixture(data: Any) -> None:
    """``data.mixture``: a list of mappings with a streamed kind, a path and a weight > 0 (docs/data.md)."""
    mixture = data.mixture
    if mixture is None:
        return
    if isinstance(mixture, list) and not mixture:
        raise UserError("data.mixture is empty: list at least one source, e.g. "
                        "[{kind: jsonl, path: 'docs.jsonl.zst', weight: 1}], or leave data.mixture unset")
    if not isinstance(mixture, list):
        raise UserError(f"data.mixture={show(mixture)} must be a list of sources: write e.g. "
                        "[{kind: parquet, path: 'web/*.parquet', weight: 0.7}, {kind: jsonl, path: 'code.jsonl.zst', weight: 0.3}]")
    names = []
    for i, entry in enumerate(mixture):
        where = f"data.mixture[{i}]"
        if not isinstance(entry, dict):
            raise UserError(f"{where}={show(entry)} must be a mapping: write {{kind: KIND, path: PATH, weight: W}}")
        unknown = sorted(set(entry) - set(MIXTURE_KEYS))
        if unknown:
            raise UserError(f"{where} has unknown key(s) {unknown}: use {', '.join(MIXTURE_KEYS)}")
        if entry.get("kind") not in ("jsonl", "parquet", "hf", "prepared"):
            raise UserError(f"{where}.kind={show(entry.get('kind'))} is not allowed: choose 'jsonl', 'parquet', 'hf' "
                            "or 'prepared'")
        if not isinstance(entry.get("path"), str) or not entry["path"]:
            raise UserError(f"{where}.path={show(entry.get('path'))} must be a non-empty path, glob or URL")
        w = entry.get("weight", 1.0)
        if not finite(w) or w <= 0:
            raise UserError(f"{where}.weight={show(w)} must be a number > 0: use e.g. 0.5 (drop the source to leave it out)")
        names.append(str(entry.get("name") or f"{entry['kind']}{i}"))
    if len(set(names)) != len(names):
        raise UserError(f"data.mixture names {names} repeat: give each source its own name")


def local_run_dir(text: str) -> "Path":
    """``train.run_dir`` as a local path: a plain path or a ``file://`` URL. Other URLs are refused: metrics,
    the tokenizer and the rewind plan are written with local file operations (Orbax alone could write gs://)."""
    from pathlib import Path

    if "://" not in text:
        return Path(text).expanduser().resolve()
    scheme, rest = text.split("://", 1)
    if scheme == "file":
        return Path(rest).expanduser().resolve()
    raise UserError(f"train.run_dir={text!r}: a run directory on {scheme}:// is not supported (checkpoints, metrics "
                    "and the tokenizer are written locally): use a local path or file://, or mount the bucket "
                    "(e.g. gcsfuse) and give its path; data paths may be URLs")
