"""Every config field checked at load by range and meaning (train/validate.py), YAML files read strictly,
sampling flags checked before the slow part. Each case: exit 2, one `qkv: error:` line naming the key."""
from __future__ import annotations

from pathlib import Path

import pytest

from qkv.cli import main
from qkv.train.config import load_config
from qkv.train.validate import RULES


def _file(tmp: Path, name: str, content: str | bytes) -> str:
    path = tmp / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


# (case id, argv after `qkv config` (tmp -> list), words the one line must contain)
CONFIG_CASES = [
    ("lr-negative", lambda t: ["optim.learning_rate=-1"], "optim.learning_rate=-1.0 must be a finite number > 0"),
    ("lr-nan", lambda t: ["optim.learning_rate=nan"], "optim.learning_rate=nan"),
    ("lr-inf", lambda t: ["optim.learning_rate=.inf"], "optim.learning_rate=inf"),
    ("lr-zero", lambda t: ["optim.learning_rate=0"], "optim.learning_rate=0"),
    ("warmup-negative", lambda t: ["optim.warmup_steps=-10"], "optim.warmup_steps=-10 must be an integer >= 0"),
    ("seq-len-1", lambda t: ["data.seq_len=1"], "data.seq_len=1 must be an integer in [2"),
    ("steps-huge", lambda t: ["train.steps=100000000000000000000"], "train.steps=100000000000000000000"),
    ("steps-float-text", lambda t: ["train.steps=1e20"], "train.steps='1e20' must be an int: write whole digits"),
    ("eval-batches-negative", lambda t: ["data.eval_batches=-1"], "data.eval_batches=-1"),
    ("grad-clip-negative", lambda t: ["optim.grad_clip=-1"], "optim.grad_clip=-1.0"),
    ("b2-above-one", lambda t: ["optim.b2=2.0"], "optim.b2=2.0 must be in [0, 1)"),
    ("b1-one", lambda t: ["optim.b1=1"], "optim.b1=1.0 must be in [0, 1)"),
    ("batch-huge", lambda t: ["train.batch_size=1000000000000"], "train.batch_size=1000000000000"),
    ("seed-2-pow-70", lambda t: [f"train.seed={2**70}"], f"train.seed={2**70} must be an integer in [0, 4294967295]"),
    ("seed-negative", lambda t: ["train.seed=-1"], "train.seed=-1"),
    ("run-dir-empty", lambda t: ["train.run_dir="], "train.run_dir='' must be a non-empty path"),
    ("eps-zero", lambda t: ["optim.eps=0"], "optim.eps=0"),
    ("min-lr-ratio", lambda t: ["optim.min_lr_ratio=1.5"], "optim.min_lr_ratio=1.5 must be in [0, 1]"),
    ("weight-decay-nan", lambda t: ["optim.weight_decay=.nan"], "optim.weight_decay=nan"),
    ("validation-fraction", lambda t: ["data.validation_fraction=1"], "data.validation_fraction=1.0 must be in (0, 1)"),
    ("rope-theta-zero", lambda t: ["model.rope_theta=0"], "model.rope_theta=0.0"),
    ("norm-eps-inf", lambda t: ["model.norm_eps=.inf"], "model.norm_eps=inf"),
    ("mesh-axis-zero", lambda t: ["mesh.tensor=0"], "mesh.tensor=0 must be -1 or a positive integer"),
    ("mesh-rules-number", lambda t: ["mesh.rules={batch: 3}"], "mesh.rules="),
    ("sample-tokens-negative", lambda t: ["train.sample_tokens=-1"], "train.sample_tokens=-1"),
    ("labels-not-list", lambda t: ["finetune.labels=3"], "finetune.labels=3"),
    ("lora-targets-empty", lambda t: ["finetune.lora.targets=[]"], "finetune.lora.targets=[]"),
    ("dpo-beta-nan", lambda t: ["finetune.dpo_beta=nan"], "finetune.dpo_beta=nan"),
    ("duplicate-yaml-key", lambda t: [_file(t, "dup.yaml", "train:\n  steps: 3\n  steps: 4\n")],
     "duplicate key 'steps' (first on line 2, again on line 3)"),
    ("duplicate-yaml-section", lambda t: [_file(t, "dups.yaml", "train: {steps: 3}\noptim: {}\ntrain: {seed: 1}\n")],
     "duplicate key 'train'"),
    ("yaml-bare-string", lambda t: [_file(t, "str.yaml", "hello\n")], "str.yaml' holds a str, not a mapping"),
    ("yaml-list", lambda t: [_file(t, "list.yaml", "- a\n- b\n")], "list.yaml' holds a list, not a mapping"),
    ("yaml-binary", lambda t: [_file(t, "bin.yaml", b"\x89PNG\r\n\x1a\n\x00\xff\xfe")],
     "bin.yaml' is not a text file (byte 0 is not UTF-8)"),
]


@pytest.mark.parametrize("case", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_value_refused_with_one_line(case, tmp_path, capsys):
    _, argv, expected = case
    code = main(["config", *argv(tmp_path)])
    out = capsys.readouterr()
    err = out.err.strip().splitlines()
    assert code == 2 and out.out == ""
    assert len(err) == 1 and err[0].startswith("qkv: error: "), err
    assert expected in err[0], err[0]
    assert ": use " in err[0] or ": write " in err[0] or ": keep " in err[0] or ": give " in err[0], err[0]


def test_every_preset_passes_its_own_checks():
    from qkv.train.config import preset_names
    for name in preset_names():
        load_config(name)


def test_rules_name_real_fields():
    """The table names only fields that exist (a renamed field cannot silently drop its check)."""
    import dataclasses

    from qkv.train.config import Config, FinetuneConfig
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    for section, rules in RULES.items():
        cls = (FinetuneConfig.__dataclass_fields__["lora"].default_factory().__class__ if section == "finetune.lora"
               else getattr(Config(), section).__class__)
        names = {f.name for f in dataclasses.fields(cls)}
        assert {r[0] for r in rules} <= names, (section, {r[0] for r in rules} - names)
    assert set(sections) <= set(RULES)


def test_boundary_values_accepted():
    cfg = load_config("tiny", ["optim.warmup_steps=0", "optim.grad_clip=0", "optim.b1=0", "data.seq_len=2",
                               f"train.seed={2**32 - 1}", "data.eval_batches=0", "optim.min_lr_ratio=1",
                               "mesh.rules={batch: [data, fsdp], embed: null}"])
    assert cfg.train.seed == 2**32 - 1 and cfg.data.seq_len == 2
