"""The ``qkv`` command: one entry point, a subcommand per job.

    qkv pretrain [CONFIG] [key=value ...]        train (or resume) a model; default: the tiny preset
    qkv evaluate --checkpoint RUN_DIR            validation loss, perplexity, bits/byte of a checkpoint
    qkv generate --checkpoint RUN_DIR --prompt TEXT     continue text, or translate (encoder-decoder)
    qkv embed --checkpoint RUN_DIR --text A --text B   sentence embeddings and cosine neighbours (encoder)
    qkv embed --checkpoint RUN_DIR --word def          nearest vocabulary pieces by input embedding
    qkv explain --checkpoint RUN_DIR --prompt TEXT [--out DIR]   tokens, attention, next-token odds: an HTML report
    qkv tokenizer train|encode|decode ...
    qkv config [CONFIG] [key=value ...]           print the resolved configuration
    qkv finetune [CONFIG] finetune.init_from=RUN finetune.train_path=F.jsonl [key=value ...]   SFT/DPO, LoRA
    qkv convert import HF_DIR RUN_DIR | export RUN_DIR OUT_DIR --arch FAMILY
    qkv benchmark train|decode [CONFIG] [key=value ...]   throughput, MFU and roofline on synthetic tokens
    qkv launch local --processes N -- SUBCOMMAND  run a subcommand as N local JAX processes
    qkv plan CONFIG --mesh data=1,fsdp=8 --device h100   per-device memory of a model on a mesh
    qkv chat --checkpoint RUN_DIR                 an interactive chat in the model's own chat template
    qkv serve --checkpoint RUN_DIR                an OpenAI-compatible HTTP server (continuous batching)
    qkv data inspect|prepare CONFIG               look at a config's sources / tokenize them once

Bad input ends with one line, ``qkv: error: ...``, naming the problem and the fix, and exit code 2. Anything
else is a bug in qkv: one ``qkv: internal error`` line naming the exception and the file that holds the
traceback (in the run directory, or a temporary file), exit code 1. Set QKV_DEBUG=1 for the traceback itself.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path
from qkv.errors import UserError

from qkv.chat_command import add_chat_parser, add_template_kwargs_argument, generate_messages, require_dir
from qkv.evaluate_command import add_evaluate_parser
from qkv.generate_benchmark import add_generate_benchmark_parser
from qkv.serve_bench import add_serve_benchmark
from qkv.serve_command import add_serve_parser

EXIT_USAGE = 2  # the user's input or environment: one `qkv: error:` line
EXIT_BUG = 1  # a bug in qkv: one line, the traceback in a file


def cmd_pretrain(ns: argparse.Namespace) -> int:
    from qkv.inference.report import pretrain_report
    from qkv.train.config import load_config, split_config_args
    from qkv.train.loop import pretrain

    source, overrides = split_config_args(ns.args)
    cfg = load_config(source, overrides)
    ns.error_dir = cfg.train.run_dir  # where a bug's traceback goes, once the run directory exists
    return _report_run(pretrain(cfg, report=pretrain_report(cfg)))


def cmd_finetune(ns: argparse.Namespace) -> int:
    from qkv.inference.report import finetune_report
    from qkv.train.config import split_config_args
    from qkv.train.finetune import finetune, load_finetune_config

    source, overrides = split_config_args(ns.args)
    cfg = load_finetune_config(source, overrides)
    ns.error_dir = cfg.train.run_dir
    return _report_run(finetune(cfg, report=finetune_report(cfg)))


def _report_run(summary: dict) -> int:
    """Print a training run's summary as one JSON line (once per job, not per host); exit 75 if it was
    stopped by a signal with a complete checkpoint."""
    import jax

    from qkv.train.loop import EXIT_PREEMPTED

    if jax.process_index() == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "sample"}, default=str))
    if summary.get("preempted"):
        print(f"qkv: stopped by {summary['preempted']} after step {summary['step']} with a complete checkpoint: "
              "run the same command again to resume", file=sys.stderr)
        return EXIT_PREEMPTED
    return 0


def cmd_config(ns: argparse.Namespace) -> int:
    import yaml

    from qkv.train.config import load_config, split_config_args

    source, overrides = split_config_args(ns.args)
    print(yaml.safe_dump(load_config(source, overrides).to_dict(), sort_keys=False), end="")
    return 0


def _nonblank_lines(path_text: str, what: str) -> list[str]:
    path = Path(path_text)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path_text!r} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{what} file {path_text!r} is not UTF-8 text (byte {err.start}): save it as UTF-8") from None
    return [line for line in text.splitlines() if line.strip()]


def _read_prompts(ns: argparse.Namespace) -> list[str]:
    prompts = list(ns.prompt or [])
    if ns.prompt_file:
        prompts += _nonblank_lines(ns.prompt_file, "prompt")
    if not prompts:
        raise UserError("no prompt given: pass --prompt TEXT (repeatable) or --prompt-file FILE")
    return prompts


def _read_prompt_ids(ns: argparse.Namespace) -> list[list[int]]:
    try:
        return [[int(t) for t in text.split(",")] for text in ns.prompt_ids]
    except ValueError:
        raise UserError("--prompt-ids takes comma-separated integer token ids, e.g. --prompt-ids 1,2,3") from None


def cmd_generate(ns: argparse.Namespace) -> int:
    from qkv.inference.decode import SamplingConfig, check_beam

    if ns.messages:  # conversations in, the assistant's replies out (docs/chat.md)
        return generate_messages(ns)
    if ns.prompt_ids and (ns.prompt or ns.prompt_file):
        raise UserError("give either --prompt-ids or --prompt/--prompt-file, not both")
    prompts = _read_prompt_ids(ns) if ns.prompt_ids else _read_prompts(ns)
    settings = dict(max_new_tokens=ns.max_new_tokens, temperature=ns.temperature, top_k=ns.top_k,
                    top_p=ns.top_p, seed=ns.seed)
    SamplingConfig(**settings)  # validate before the slow part
    check_beam(ns.beam_size, ns.length_penalty)
    require_dir(ns.checkpoint)
    from qkv.api import load

    lm = load(ns.checkpoint, ns.step)
    if ns.prompt_ids:  # token ids in, token ids out: one comma-separated line per prompt
        for row in lm.generate_ids(prompts, beam_size=ns.beam_size, length_penalty=ns.length_penalty, **settings):
            print(",".join(map(str, row)))
        return 0
    lm.prompt_ids(prompts)  # refuse bad prompts before printing anything
    if lm.kind == "encoder":
        raise UserError(f"{ns.checkpoint} holds an encoder-only model: it reads text but does not generate it "
                        "(use qkv embed, or qkv evaluate)")
    settings["max_new_tokens"], notice = lm.fit_new_tokens(prompts, ns.max_new_tokens)
    if notice:  # more than the context holds: generate what fits, and say so (docs/errors.md)
        print(f"qkv: note: --{notice.replace('_', '-', 2)}", file=sys.stderr)
    translating = lm.kind == "encoder_decoder"
    if not translating and len(prompts) == 1 and not ns.no_stream and ns.beam_size == 1:  # beam search ends whole
        sys.stdout.write(prompts[0])
        for piece in lm.stream(prompts[0], **settings):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    for prompt, output in zip(prompts, lm.generate(prompts, beam_size=ns.beam_size, length_penalty=ns.length_penalty,
                                                   **settings)):
        print(f"{prompt}\t{output}" if translating else f"{prompt}{output}\n{'-' * 40}")
    return 0


def cmd_embed(ns: argparse.Namespace) -> int:
    if ns.word:
        require_dir(ns.checkpoint)
        from qkv.api import load

        lm = load(ns.checkpoint, ns.step)
        for word, near in zip(ns.word, lm.word_neighbours(ns.word, ns.neighbours)):
            print(json.dumps({"word": word, "neighbours": [{"piece": t, "cosine": round(c, 4)} for t, c in near]}))
        return 0
    texts = list(ns.text or [])
    if ns.text_file:
        texts += _nonblank_lines(ns.text_file, "text")
    if len(texts) < 2:
        raise UserError("give at least two texts (--text, repeatable, or --text-file): neighbours need others")
    require_dir(ns.checkpoint)
    from qkv.api import load

    lm = load(ns.checkpoint, ns.step)
    for text, near in zip(texts, lm.neighbours(texts, ns.neighbours)):
        print(json.dumps({"text": text, "neighbours": [{"text": t, "cosine": round(c, 4)} for t, c in near]}))
    return 0


def cmd_explain(ns: argparse.Namespace) -> int:
    from qkv.inference.decode import SamplingConfig

    if ns.checkpoint is None:
        if ns.run is None:
            raise UserError("no checkpoint given: pass --checkpoint RUN_DIR (or --run RUN_DIR for training curves)")
        require_dir(ns.run)
        from qkv.inference.explain_report import write_training_report
        print(f"report: {write_training_report(ns.run, ns.out)}")
        return 0
    if not ns.prompt:
        raise UserError("empty prompt: give the text to explain with --prompt TEXT")
    SamplingConfig(temperature=ns.temperature, top_k=ns.top_k, top_p=ns.top_p)  # validate before the slow part
    for flag, value in (("--layer", ns.layer), ("--head", ns.head), ("--new-tokens", ns.new_tokens)):
        if value is not None and value < 0:
            raise UserError(f"{flag} {value} must be >= 0")
    require_dir(ns.checkpoint)
    from qkv.api import load
    from qkv.inference.explain_report import terminal_summary, write_report

    lm = load(ns.checkpoint, ns.step)
    cfg = lm.config.model
    depth = min(cfg.n_layers, cfg.encoder_layers) if cfg.kind == "encoder_decoder" else cfg.n_layers
    if ns.layer is not None and ns.layer >= depth:
        raise UserError(f"--layer {ns.layer} is out of range: this model has layers 0..{depth - 1}")
    if ns.head is not None and ns.head >= cfg.n_heads:
        raise UserError(f"--head {ns.head} is out of range: this model has heads 0..{cfg.n_heads - 1}")
    exp = lm.explain(ns.prompt, source=ns.source, position=ns.position, k=ns.k, temperature=ns.temperature,
                     top_k=ns.top_k, top_p=ns.top_p, new_tokens=ns.new_tokens)
    index = write_report(exp, ns.out, ns.layer, ns.head, run_dir=ns.checkpoint, title=f"{ns.checkpoint}, step {lm.step}")
    print(terminal_summary(exp, index))
    return 0


def cmd_tokenizer(ns: argparse.Namespace) -> int:
    from qkv.data import Tokenizer, open_text_source, train_tokenizer

    if ns.tok_command == "train":
        kind = "stdlib" if ns.input is None else ("jsonl" if ns.input.endswith(".jsonl") else "files")
        source = open_text_source(kind, ns.input, "train", Path(ns.data_dir).expanduser())
        n = min(ns.documents, len(source))
        texts = source.__getitems__(list(range(n)))
        path = train_tokenizer(texts, ns.output, vocab_size=ns.vocab_size, model_type=ns.model_type,
                               with_mask=ns.with_mask)
        print(f"wrote {path} ({Tokenizer.load(path).vocab_size} pieces, trained on {n} documents)")
        return 0
    if not Path(ns.model).is_file():
        raise FileNotFoundError(f"tokenizer model {ns.model!r} does not exist: train one with qkv tokenizer train")
    tok = Tokenizer.load(ns.model)
    if ns.tok_command == "encode":
        text = sys.stdin.read() if ns.text == "-" else ns.text
        print(" ".join(str(i) for i in tok.encode(text)))
    else:
        try:
            ids = [int(x) for x in " ".join(ns.ids).replace(",", " ").split()]
        except ValueError:
            raise UserError("decode takes integer token ids, e.g. qkv tokenizer decode --model M 12 7 99") from None
        bad = [i for i in ids if not 0 <= i < tok.vocab_size]
        if bad:
            raise UserError(f"token id {bad[0]} is outside the vocabulary [0, {tok.vocab_size})")
        sys.stdout.write(tok.decode(ids))
        sys.stdout.write("\n")
    return 0


def cmd_launch(ns: argparse.Namespace) -> int:
    from qkv.launch.local import launch_local

    return launch_local(ns.command, ns.processes, ns.devices_per_process, timeout_s=ns.timeout,
                        all_output=ns.all_output)


def cmd_plan(ns: argparse.Namespace) -> int:
    from qkv.tools.plan import main as plan_main

    return plan_main(ns)


def cmd_benchmark(ns: argparse.Namespace) -> int:
    from qkv.tools.benchmark import main as benchmark_main

    return benchmark_main(ns)


def cmd_convert(ns: argparse.Namespace) -> int:
    from qkv.tools.convert import export_hf, import_hf

    if ns.direction == "import":
        print(json.dumps(import_hf(ns.hf_dir, ns.run_dir, ns.tokenizer)))
    elif ns.direction == "merge-lora":
        from qkv.tools.convert import merge_lora_run
        require_dir(ns.run_dir)
        print(json.dumps(merge_lora_run(ns.run_dir, ns.out_dir, ns.step)))
    else:
        require_dir(ns.run_dir)
        print(json.dumps(export_hf(ns.run_dir, ns.out_dir, ns.arch, ns.step)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qkv", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="train (or resume) a language model")
    p.add_argument("args", nargs="*", help="[CONFIG: preset name or YAML path] [section.key=value ...]")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("finetune", help="SFT or DPO (full or LoRA) from a checkpoint; see docs/finetuning.md")
    p.add_argument("args", nargs="*", help="[CONFIG: sft-tiny, dpo-tiny or a YAML path] [section.key=value ...]")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("config", help="print the resolved configuration")
    p.add_argument("args", nargs="*", help="[CONFIG] [section.key=value ...]")
    p.set_defaults(func=cmd_config)

    add_evaluate_parser(sub)

    p = sub.add_parser("generate", help="sample text from a checkpoint")
    p.add_argument("--checkpoint", required=True, help="run directory written by qkv pretrain")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    p.add_argument("--prompt", action="append", help="prompt text; repeat for a batch")
    p.add_argument("--prompt-file", help="one prompt per line")
    p.add_argument("--prompt-ids", action="append", help="prompt as token ids, e.g. 1,2,3 (no bos added); "
                   "prints the new ids; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-stream", action="store_true", help="print only when done")
    p.add_argument("--beam-size", type=int, default=1, help="beam search width (1: greedy/sampling)")
    p.add_argument("--length-penalty", type=float, default=0.6, help="beam search: GNMT length penalty alpha")
    p.add_argument("--messages", help='JSONL of {"messages": [...]}: print each conversation\'s next assistant '
                   "reply (the model's chat template; one JSON line each)")
    add_template_kwargs_argument(p)
    p.set_defaults(func=cmd_generate)
    add_chat_parser(sub)
    add_serve_parser(sub)

    p = sub.add_parser("embed", help="sentence embeddings and cosine neighbours from an encoder checkpoint")
    p.add_argument("--checkpoint", required=True, help="run directory of an encoder (or encoder-decoder)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    p.add_argument("--text", action="append", help="a text; repeat for more")
    p.add_argument("--text-file", help="one text per line")
    p.add_argument("--word", action="append", help="a word: its nearest vocabulary pieces by input embedding")
    p.add_argument("--neighbours", type=int, default=3, help="how many nearest texts (or pieces) to list for each")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("explain", help="look inside a checkpoint: tokens, attention, next-token odds, KV cache")
    p.add_argument("--checkpoint", help="run directory written by qkv pretrain")
    p.add_argument("--run", help="without --checkpoint: only draw this run's loss and learning-rate curves")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    p.add_argument("--prompt", help="the text (encoder-decoder: the target, or the source when --source is absent)")
    p.add_argument("--source", help="encoder-decoder: the source text (default: translate --prompt)")
    p.add_argument("--out", default="qkv-explain", help="report folder (index.html, PNGs, explanation.json)")
    p.add_argument("--layer", type=int, default=None, help="draw only this layer (default: all)")
    p.add_argument("--head", type=int, default=None, help="draw only this head (default: all)")
    p.add_argument("--position", type=int, default=None,
                   help="token index of the next-token table (default: last; encoder: the position to mask)")
    p.add_argument("--k", type=int, default=10, help="rows of the next-token table")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--new-tokens", type=int, default=16, help="continuation length for the KV-cache check")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("tokenizer", help="train a SentencePiece tokenizer, encode, decode")
    tsub = p.add_subparsers(dest="tok_command", required=True)
    t = tsub.add_parser("train")
    t.add_argument("--output", required=True, help="model prefix: writes PREFIX.model")
    t.add_argument("--input", help="directory, glob or .jsonl (default: this Python's standard library)")
    t.add_argument("--vocab-size", type=int, default=8192)
    t.add_argument("--model-type", choices=["bpe", "unigram", "char"], default="bpe")
    t.add_argument("--documents", type=int, default=2000, help="documents to train on")
    t.add_argument("--data-dir", default="~/.cache/qkv/tfds")
    t.add_argument("--with-mask", action="store_true", help="reserve <mask> (id 4) for encoders' MLM")
    t = tsub.add_parser("encode")
    t.add_argument("--model", required=True)
    t.add_argument("text", help="text to encode, or - for standard input")
    t = tsub.add_parser("decode")
    t.add_argument("--model", required=True)
    t.add_argument("ids", nargs="+")
    p.set_defaults(func=cmd_tokenizer)

    p = sub.add_parser("benchmark", help="time the real train or decode step: tokens/s, MFU, roofline")
    bsub = p.add_subparsers(dest="bench", required=True)
    for name in ("train", "decode"):
        t = bsub.add_parser(name)
        t.add_argument("args", nargs="*", help="[CONFIG] [section.key=value ...]")
        t.add_argument("--json", help="write one record per run to this JSON file")
        t.add_argument("--cpu-devices", type=int, default=0, help="virtual CPU devices (default: the backend's)")
        if name == "train":
            t.add_argument("--steps", type=int, default=10, help="timed steps")
            t.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
            t.add_argument("--sweep", action="append", help="key=v1,v2 (repeatable; a grid): batch_size, remat, "
                           "scan_layers, attention_impl, dtype, mesh=DxFxT, devices=N or section.key")
            t.add_argument("--profile", help="write a jax.profiler trace of the timed steps here")
            t.add_argument("--breakdown", action="store_true", help="also time forward and forward+backward alone")
        else:
            t.add_argument("--checkpoint", help="a run directory (default: random parameters of CONFIG)")
            t.add_argument("--batch-sizes", default="1,2,4")
            t.add_argument("--prompt-len", type=int, default=64)
            t.add_argument("--new-tokens", type=int, default=32)
            t.add_argument("--repeats", type=int, default=3, help="timed generations per batch size")
    p.set_defaults(func=cmd_benchmark)
    bsub_for_data = bsub
    add_serve_benchmark(bsub)

    p = sub.add_parser("convert", help="Hugging Face safetensors <-> qkv checkpoints (Llama, GPT-2)")
    csub = p.add_subparsers(dest="direction", required=True)
    t = csub.add_parser("import", help="HF model directory -> new qkv run directory")
    t.add_argument("hf_dir")
    t.add_argument("run_dir")
    t.add_argument("--tokenizer", help="SentencePiece .model (default: HF_DIR/tokenizer.model if present)")
    t = csub.add_parser("export", help="qkv run directory -> HF model directory (config.json + safetensors)")
    t.add_argument("run_dir")
    t.add_argument("out_dir")
    t.add_argument("--arch", required=True, help="the HF family: a short name (llama, gpt2, qwen2, qwen3, mistral, "
                   "gemma2, gemma3, olmo2) or its transformers class (e.g. Qwen3ForCausalLM)")
    t.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    t = csub.add_parser("merge-lora", help="LoRA fine-tuning run -> plain checkpoint (base + adapters merged)")
    t.add_argument("run_dir")
    t.add_argument("out_dir")
    t.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("launch", help="run a qkv subcommand as several cooperating JAX processes")
    lsub = p.add_subparsers(dest="launcher", required=True)
    t = lsub.add_parser("local", help="N processes on this machine (CPU devices), for multi-host code paths")
    t.add_argument("--processes", type=int, required=True)
    t.add_argument("--devices-per-process", type=int, default=1, help="virtual CPU devices in each process")
    t.add_argument("--timeout", type=float, default=None, help="seconds before every process is stopped")
    t.add_argument("--all-output", action="store_true", help="stream every process's output, prefixed [N]")
    t.add_argument("command", nargs=argparse.REMAINDER, help="-- SUBCOMMAND [ARGS]: e.g. -- pretrain tiny")
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("plan", help="per-device memory of a model on a mesh, from an ahead-of-time compile")
    p.add_argument("args", nargs="*", help="[CONFIG] [section.key=value ...]")
    p.add_argument("--mesh", default=None, help="axis sizes, e.g. data=1,fsdp=8,tensor=1 (default: the config's)")
    p.add_argument("--device", default=None, help="check the fit on this device, e.g. h100, tpu-v5e (default: all)")
    p.add_argument("--analytic", action="store_true", help="skip the compile: analytic estimate only")
    p.add_argument("--topology", default=None, help="compile for a TPU slice (e.g. v5p:4x4x8) or NVIDIA GPUs (e.g. h100:8) "
                   "without one: needs the tpu-compile or cuda extra")
    p.add_argument("--slices", type=int, default=1, help="with --topology (TPU): this many such slices joined over the "
                   "data-center network (default mesh.dcn_data = the slice count); reports the cross-slice traffic")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)
    _add_data_parser(sub, bsub_for_data)
    add_generate_benchmark_parser(bsub_for_data)
    return parser


def _add_data_parser(sub, bench_sub) -> None:
    """`qkv data inspect CONFIG` and `qkv benchmark data CONFIG` (streamed sources, docs/data.md)."""
    p = sub.add_parser("data", help="look at a config's streamed data sources before training")
    dsub = p.add_subparsers(dest="data_command", required=True)
    t = dsub.add_parser("inspect", help="per source: shards, documents, tokens/document, a sample; the mixture")
    t.add_argument("args", nargs="*", help="[CONFIG] [section.key=value ...]")
    t.add_argument("--count-shards", type=int, default=4, help="shards whose rows are counted (the rest estimated)")
    t.add_argument("--sample", type=int, default=200, help="documents sampled for tokens/document")
    t.add_argument("--json", action="store_true", help="print the report as JSON")
    t = dsub.add_parser("prepare", help="tokenize every source once into array_record (read back as kind prepared)")
    t.add_argument("args", nargs="*", help="[CONFIG] [section.key=value ...]")
    t.add_argument("--out", required=True, help="a directory: one subdirectory per source")
    p.set_defaults(func=cmd_data)
    t = bench_sub.add_parser("data", help="tokens/s of the input path (read, tokenize, pack, batch) on this host")
    t.add_argument("args", nargs="*", help="[CONFIG] [section.key=value ...]")
    t.add_argument("--workers", type=int, default=1, help="processes, each reading its own shards")
    t.add_argument("--batches", type=int, default=20, help="timed batches per worker")
    t.add_argument("--json", action="store_true", help="print the result as JSON")
    t.set_defaults(func=cmd_data)


def cmd_data(ns: argparse.Namespace) -> int:
    from qkv.tools.data_tools import main as data_main

    return data_main(ns)


class UsageError(UserError):
    """A command line argparse refuses (unknown flag, a value of the wrong type)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one `qkv: error:` line like every other refusal, not usage + message
        raise UsageError(f"{message}: see {self.prog} --help")


def _stdout_closed() -> int:
    """The reader of our standard output went away (``qkv generate ... | head``): stop quietly, exit 0, and
    point stdout at /dev/null so the interpreter's final flush cannot complain either."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, AttributeError, ValueError):  # a stdout without a file descriptor (e.g. captured)
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the command line itself (not a test or script calling main): huge pages first (qkv/host.py)
        from qkv.host import reexec_with_huge_pages
        reexec_with_huge_pages()
    ns = None
    try:
        ns = build_parser().parse_args(argv)
        code = ns.func(ns)
        sys.stdout.flush()
        return code
    except BrokenPipeError:  # before ConnectionError, its base class
        return _stdout_closed()
    except KeyboardInterrupt:
        print("qkv: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if os.environ.get("QKV_DEBUG"):
            raise
        if is_user_error(err):
            print(f"qkv: error: {_first_line(err)}", file=sys.stderr)
            return EXIT_USAGE
        if isinstance(getattr(err, "exit_code", None), int):  # errors that carry their own code (a diverged run: 3)
            print(f"qkv: error: {_first_line(err)}", file=sys.stderr)
            return err.exit_code
        return _internal_error(err, _run_dir_of(ns))


# OS errors that are about the user's files or environment, not about qkv: a path that is missing, not a
# directory, not writable (or any OSError naming a file); a full disk; a server (the user's) that cannot be reached.
USER_OS_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError,
                  ConnectionError)
USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENAMETOOLONG}


def is_user_error(err: BaseException) -> bool:
    """A user's mistake (exit 2, one line) rather than a bug in qkv (exit 1, the traceback in a file)."""
    if isinstance(err, (UserError, *USER_OS_ERRORS)):
        return True
    return isinstance(err, OSError) and (err.errno in USER_ERRNOS or err.filename is not None)


def _run_dir_of(ns: argparse.Namespace | None) -> str | None:
    """The run directory a command works on (train.run_dir, --checkpoint, --run, RUN_DIR), if it has one."""
    for name in ("error_dir", "checkpoint", "run", "run_dir"):
        if getattr(ns, name, None):
            return str(getattr(ns, name))
    return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else err.__class__.__name__


def _internal_error(err: BaseException, run_dir: str | Path | None) -> int:
    """A bug in qkv: one line naming the exception and the file holding the whole traceback; exit 1."""
    import tempfile
    import time
    import traceback

    text = "".join(traceback.format_exception(err))
    name = f"qkv-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    path = None
    for folder in ([Path(run_dir)] if run_dir and Path(run_dir).is_dir() else []) + [Path(tempfile.gettempdir())]:
        try:
            (folder / name).write_text(f"qkv {' '.join(sys.argv[1:])}\n\n{text}")
            path = folder / name
            break
        except OSError:
            continue
    where = f"the traceback is in {path}" if path else "the traceback could not be written to a file"
    print(f"qkv: internal error (a bug in qkv, please report it): {err.__class__.__name__}: {_first_line(err)}; "
          f"{where}; run again with QKV_DEBUG=1 to show it here", file=sys.stderr)
    return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
