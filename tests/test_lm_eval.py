"""lm-evaluation-harness on a qkv run against lm-eval's own Hugging Face backend on its export.

A tiny decoder is pretrained for a few seconds on counting sentences with a byte-level BPE tokenizer.json, and
exported (`qkv convert export --arch qwen3`). The three local tasks of tests/fixtures/lm_eval (multiple choice,
generation until a stop string, rolling log-likelihood over several context windows) run through
`lm_eval.simple_evaluate` twice: `hf` (transformers, float32, CPU) on the export and `qkv` on the run. Every
request's log-likelihood, is_greedy flag and generation, and every metric, must agree; the rolling
log-likelihood must also equal a float64 NumPy sum over `qkv.load(run).logits` of the same windows. A second
run holds the same weights with a tokenizer whose post-processor adds a bos token (Llama 3's layout), so both
of the exported tokenizer's encodings are checked. Offline throughout (HF_DATASETS_OFFLINE)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

for _name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_name, "1")

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import qkv  # noqa: E402
from qkv.cli import main  # noqa: E402

pytestmark = pytest.mark.slow  # trains a model and runs lm-eval twice: deselect with -m 'not slow'

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "lm_eval"
TASKS = ["qkv_counting_mc", "qkv_counting_gen", "qkv_counting_text"]
WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()
CONTEXT = 64  # model.max_seq_len: the longest fixture text needs three rolling windows


def corpus_lines(rng: np.random.Generator) -> list[str]:
    lines = []
    for _ in range(600):
        start, kind = int(rng.integers(0, 8)), int(rng.integers(0, 3))
        if kind == 0:
            lines.append("count: " + " ".join(WORDS[start:start + 6]) + ".")
        elif kind == 1:
            lines.append(f"Question: what comes after {WORDS[start]}?\nAnswer: {WORDS[start + 1]}")
        else:
            lines.append(f"what comes after {WORDS[start]}? {WORDS[start + 1]}.")
    return lines


def byte_bpe(texts: list[str]) -> tokenizers.Tokenizer:
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|begin_of_text|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def write_tokenizer(tok: tokenizers.Tokenizer, folder: Path, bos: str) -> Path:
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": bos, "eos_token": "<|endoftext|>"}))
    return folder / "tokenizer.json"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """{"plain": run, "plain_hf": its export, "bos": the same weights with a bos-adding tokenizer, "bos_hf"}."""
    from tokenizers import processors

    from qkv.data import Tokenizer
    from qkv.tools.convert import load_params
    from qkv.train import checkpoint

    root = tmp_path_factory.mktemp("lm_eval")
    lines = corpus_lines(np.random.default_rng(0))
    (root / "corpus").mkdir()
    for i in range(40):  # documents of 15 lines
        (root / "corpus" / f"doc{i}.txt").write_text("\n".join(lines[i * 15:(i + 1) * 15]) + "\n")
    tok = byte_bpe(lines)
    plain = write_tokenizer(tok, root / "tok_plain", "<|endoftext|>")
    assert main(["pretrain", "tiny", f"model.vocab_size={tok.get_vocab_size()}", "model.d_model=64",
                 "model.n_layers=2", "model.n_heads=2", "model.d_ff=128", f"model.max_seq_len={CONTEXT}",
                 f"data.seq_len={CONTEXT}", "data.source=files", f"data.path={root / 'corpus'}",
                 f"data.data_dir={root / 'tfds'}", "data.validation_fraction=0.1", "data.eval_batches=1",
                 f"tokenizer.path={plain}", f"train.run_dir={root / 'plain'}", "train.steps=120",
                 "train.batch_size=16", "train.eval_every=120", "train.checkpoint_every=120",
                 "train.sample_tokens=0", "train.progress=false", "optim.warmup_steps=5"]) == 0
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
    with_bos = Tokenizer.load(write_tokenizer(tok, root / "tok_bos", "<|begin_of_text|>"))
    _, params, meta = load_params(root / "plain")
    checkpoint.save_params(root / "bos", params, {**meta, "tokenizer": checkpoint.encode_tokenizer(
        with_bos.to_bytes())}, step=meta["step"])
    out = {}
    for name in ("plain", "bos"):
        assert main(["convert", "export", str(root / name), str(root / f"{name}_hf"), "--arch", "qwen3"]) == 0
        out[name], out[f"{name}_hf"] = root / name, root / f"{name}_hf"
    return out


def evaluate(model: str, model_args: dict, tasks: list[str], **kwargs) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import qkv.inference.lm_eval_model  # noqa: F401  (registers the model name "qkv")

    where = os.getcwd()
    os.chdir(ROOT)  # the tasks' data_files are relative to the working directory
    try:
        return simple_evaluate(model=model, model_args=model_args, tasks=tasks, batch_size=4, log_samples=True,
                               task_manager=TaskManager(include_path=str(FIXTURES), include_defaults=False),
                               bootstrap_iters=0, **kwargs)
    finally:
        os.chdir(where)


@pytest.fixture(scope="module")
def evaluated(runs) -> dict[str, tuple[dict, dict]]:
    """Per tokenizer layout: (lm-eval's results on the export with the hf backend, on the run with qkv)."""
    out = {}
    for name in ("plain", "bos"):
        hf = evaluate("hf", {"pretrained": str(runs[f"{name}_hf"]), "dtype": "float32", "device": "cpu"}, TASKS)
        ours = evaluate("qkv", {"checkpoint": str(runs[name])}, TASKS)
        out[name] = hf, ours
    return out


def responses(results: dict, task: str) -> list:
    return [s["resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


@pytest.mark.parametrize("name", ["plain", "bos"])
def test_every_request_and_metric_matches_lm_evals_hf_backend(evaluated, name):
    hf, ours = evaluated[name]
    deltas, greedy = [], []
    for task in ("qkv_counting_mc", "qkv_counting_text"):
        for theirs, mine in zip(responses(hf, task), responses(ours, task), strict=True):
            for (a,), (b,) in zip(theirs, mine, strict=True):  # one response per choice (rolling: one per text)
                if isinstance(a, (tuple, list)):  # (log-likelihood, is_greedy)
                    assert a[1] == b[1]
                    greedy.append(b[1])
                    a, b = a[0], b[0]
                deltas.append(abs(a - b))
    assert max(deltas) <= 1e-4, max(deltas)
    assert 0 < sum(greedy) < len(greedy)  # the flags are informative: some choices are the model's pick, most not
    generations = [r[0][0] for r in responses(ours, "qkv_counting_gen")]
    assert generations == [r[0][0] for r in responses(hf, "qkv_counting_gen")]
    assert all(len(g.split()) >= 2 and "." not in g for g in generations), generations  # cut at the stop string
    for task in TASKS:
        theirs, mine = hf["results"][task], ours["results"][task]
        assert theirs.keys() == mine.keys()
        for key, value in theirs.items():
            if isinstance(value, float):
                assert mine[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (task, key)
            else:
                assert mine[key] == value, (task, key)


def test_tokenization_is_the_exported_tokenizers(runs):
    import transformers

    from qkv.inference.lm_eval_model import QkvLM

    texts = ["Question: what comes after two?\nAnswer:", " three", "count: zero one", "<|endoftext|> x"]
    for name, starts_with_bos in (("plain", False), ("bos", True)):
        hf_tok = transformers.AutoTokenizer.from_pretrained(runs[f"{name}_hf"])
        lm = QkvLM(checkpoint=str(runs[name]))
        for text in texts:
            assert lm.tok_encode(text) == hf_tok.encode(text), (name, text)
            assert lm.tok_encode(text, add_special_tokens=False) == hf_tok.encode(text, add_special_tokens=False)
        assert (lm.tok_encode("x")[0] == hf_tok.bos_token_id) == starts_with_bos
        assert lm.prefix_token_id == hf_tok.bos_token_id and lm.eot_token_id == hf_tok.eos_token_id
        assert lm.max_length == CONTEXT


def rolling_windows(ids: list[int], prefix: int, length: int):
    """(input ids, how many of its last predictions are scored) covering every token once, each window at most
    ``length`` tokens ending where its predictions end, the first after ``prefix``: written out here."""
    full = [prefix] + ids
    for start in range(0, len(ids), length):
        end = min(start + length, len(ids))
        yield full[max(0, end - length):end], ids[start:end]


def test_rolling_loglikelihood_is_qkvs_own_log_probability(runs, evaluated):
    import transformers

    texts = [json.loads(line)["text"] for line in (FIXTURES / "counting_text.jsonl").read_text().splitlines()]
    for name in ("plain", "bos"):
        hf_tok = transformers.AutoTokenizer.from_pretrained(runs[f"{name}_hf"])
        lm = qkv.load(runs[name])
        got = [r[0][0] for r in responses(evaluated[name][1], "qkv_counting_text")]
        windows = 0
        for text, value in zip(texts, got, strict=True):
            total = 0.0
            for inputs, targets in rolling_windows(hf_tok.encode(text), hf_tok.bos_token_id, CONTEXT):
                logits = lm.logits([inputs])[0].astype(np.float64)[-len(targets):]
                logp = logits - logits.max(-1, keepdims=True)
                logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
                total += float(logp[np.arange(len(targets)), targets].sum())
                windows += 1
            assert value == pytest.approx(total, abs=1e-4), (name, text[:30])
        assert windows >= len(texts) + 2  # the long text spans several windows


def generate(lm, contexts: list[str], **settings) -> list[str]:
    from lm_eval.api.instance import Instance

    settings = {"until": ["."], "max_gen_toks": 10, **settings}
    return lm.generate_until([Instance("generate_until", {}, (c, dict(settings)), i) for i, c in enumerate(contexts)])


def test_sampling_max_gen_toks_and_batch_sizes(runs):
    from qkv.inference.lm_eval_model import QkvLM

    contexts = [json.loads(line)["prompt"] for line in (FIXTURES / "counting_gen.jsonl").read_text().splitlines()]
    lm = QkvLM(checkpoint=str(runs["plain"]), batch_size=4)
    greedy = generate(lm, contexts)
    assert generate(QkvLM(checkpoint=str(runs["plain"]), batch_size=1), contexts) == greedy
    assert generate(lm, contexts, do_sample=False, temperature=2.0) == greedy  # do_sample=False: greedy
    hot = generate(lm, contexts, do_sample=True, temperature=3.0, seed=1)
    assert hot == generate(lm, contexts, do_sample=True, temperature=3.0, seed=1) and hot != greedy
    short = generate(lm, contexts, max_gen_toks=2)
    assert [len(lm.tok_encode(s, add_special_tokens=False)) for s in short] == [2] * len(contexts)
    assert all(g.startswith(s) for g, s in zip(greedy, short))


def run_cli(capsys, *args: str) -> tuple[int, str, list[str]]:
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, [line for line in out.err.splitlines() if line.startswith("qkv:")]


def test_qkv_evaluate_tasks_prints_the_table_and_writes_json_and_metrics(runs, evaluated, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    run = runs["plain"]
    code, out, err = run_cli(capsys, "evaluate", "--checkpoint", str(run), "--tasks",
                             "qkv_counting_mc,qkv_counting_gen", "--include-path", str(FIXTURES), "--batch-size", "4")
    assert code == 0, err
    table = [line for line in out.splitlines() if line.startswith("|qkv_counting_")]
    assert len(table) == 2 and "exact_match" in out and "acc_norm" in out, out
    path = Path(out.strip().splitlines()[-1].removeprefix("results: "))
    assert path.parent == run / "eval" and path.is_file()
    saved = json.loads(path.read_text())
    want = evaluated["plain"][1]["results"]
    assert saved["qkv"]["step"] == qkv.load(run).step
    for task in ("qkv_counting_mc", "qkv_counting_gen"):
        values = {k: v for k, v in want[task].items() if "," in k and "_stderr" not in k}
        assert {k: saved["results"][task][k] for k in values} == pytest.approx(values)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = {r["split"]: r for r in records if r["split"].startswith("lm_eval/")}
    assert logged["lm_eval/qkv_counting_mc"]["acc"] == pytest.approx(want["qkv_counting_mc"]["acc,none"])
    assert logged["lm_eval/qkv_counting_gen"]["exact_match"] == want["qkv_counting_gen"]["exact_match,none"]
    assert logged["lm_eval/qkv_counting_mc"]["step"] == saved["qkv"]["step"]


def test_python_m_qkv_lm_eval_is_lm_evals_cli_with_the_qkv_model(runs, capsys, monkeypatch):
    from qkv.lm_eval import main as lm_eval_main

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["lm-eval", "run", "--model", "qkv", "--model_args", f"checkpoint={runs['plain']}",
                                      "--tasks", "qkv_counting_mc", "--include_path", str(FIXTURES), "--limit", "3"])
    capsys.readouterr()
    assert lm_eval_main() == 0
    assert "|qkv_counting_mc|" in capsys.readouterr().out


def test_refusals_are_one_line(runs, tmp_path, capsys, monkeypatch):
    import jax

    from qkv.model import create_model, split_params
    from qkv.train import checkpoint
    from qkv.train.config import load_config

    monkeypatch.chdir(ROOT)
    base = ["evaluate", "--checkpoint", str(runs["plain"])]
    code, _, err = run_cli(capsys, *base, "--tasks", "qkv_no_such_task", "--include-path", str(FIXTURES))
    assert code == 2 and len(err) == 1 and "unknown lm-eval task 'qkv_no_such_task'" in err[0], err
    for extra, words in ((["--limit", "3"], "--limit applies to lm-eval tasks"),
                         (["--tasks", "qkv_counting_mc", "--baseline"], "apply to qkv evaluate without --tasks"),
                         (["--tasks", " , "], "--tasks is empty"),
                         (["--tasks", "qkv_counting_mc", "--include-path", "no_such_dir"], "is not a directory")):
        code, _, err = run_cli(capsys, *base, *extra)
        assert code == 2 and len(err) == 1 and words in err[0], (extra, err)
    cfg = load_config("bert-tiny", ["model.vocab_size=64", "model.n_layers=1", "model.d_model=32", "model.n_heads=2",
                                    "model.d_ff=64"])
    params = jax.tree.map(np.asarray, split_params(create_model(cfg.model, seed=0))[1])
    checkpoint.save_params(tmp_path / "encoder", params, {"config": cfg.to_dict(), "step": 0}, step=0)
    code, _, err = run_cli(capsys, "evaluate", "--checkpoint", str(tmp_path / "encoder"), "--tasks", "qkv_counting_mc",
                           "--include-path", str(FIXTURES))
    assert code == 2 and len(err) == 1 and "model.kind=encoder" in err[0], err
    assert not (tmp_path / "encoder" / "eval").exists()
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # an environment without lm-eval
    code, _, err = run_cli(capsys, *base, "--tasks", "qkv_counting_mc")
    assert code == 2 and len(err) == 1 and "pip install 'qkv[eval]'" in err[0], err


def test_local_completions_against_qkv_serve_match_the_qkv_model(runs, evaluated):
    """lm-eval's own OpenAI-completions client (`local-completions`) against `qkv serve` on the run: the same
    per-choice log-likelihoods and the same accuracy as `--model qkv` in-process."""
    pytest.importorskip("fastapi")
    from qkv.serve_bench import ServeProcess

    server = ServeProcess(runs["plain"], "--slots", "4")
    try:
        served = evaluate("local-completions", {
            "base_url": f"{server.url}/completions", "model": "plain", "tokenizer_backend": "huggingface",
            "tokenizer": str(runs["plain_hf"]), "num_concurrent": 2, "max_retries": 1}, ["qkv_counting_mc"])
    finally:
        code, err = server.stop()
    assert code == 0 and "Traceback" not in err, err
    ours = evaluated["plain"][1]
    for theirs, mine in zip(responses(served, "qkv_counting_mc"), responses(ours, "qkv_counting_mc"), strict=True):
        for (a,), (b,) in zip(theirs, mine, strict=True):
            assert a[0] == pytest.approx(b[0], abs=1e-4) and a[1] == b[1]
    assert served["results"]["qkv_counting_mc"]["acc,none"] == ours["results"]["qkv_counting_mc"]["acc,none"]
