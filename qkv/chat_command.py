"""``qkv chat`` (an interactive multi-turn chat in the terminal) and ``qkv generate --messages`` (docs/chat.md),
kept beside the CLI so that qkv/cli.py stays one screen per job."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qkv.errors import UserError


def require_dir(path: str) -> None:
    if not Path(path).expanduser().is_dir():
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist: pass the train.run_dir of a run")


def add_template_kwargs_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--template-kwargs", metavar="JSON", default=None,
                   help='chat template keyword arguments, e.g. \'{"enable_thinking": false}\' (over the ones the run '
                        "was fine-tuned with, tokenizer.chat_template_kwargs)")


def template_kwargs(ns: argparse.Namespace, lm) -> dict:
    """``--template-kwargs JSON``, checked against the checkpoint's template (every key a variable it reads)."""
    import json

    from qkv.data.chat_template import check_template_kwargs

    text = getattr(ns, "template_kwargs", None)
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as err:
        raise UserError(f"--template-kwargs {text!r} is not JSON ({str(err).splitlines()[0]}): pass an object, "
                        'e.g. \'{"enable_thinking": false}\'') from None
    kwargs = check_template_kwargs(value, "--template-kwargs")
    lm.chat_template.with_kwargs(kwargs, "--template-kwargs")  # refused here when the template does not read one
    return kwargs


def generate_messages(ns: argparse.Namespace) -> int:
    """``qkv generate --messages FILE.jsonl``: one ``{"reply": ...}`` JSON line per conversation, in order."""
    import json

    from qkv.data.chat_template import TemplateError
    from qkv.data.examples import DataError, read_jsonl
    from qkv.data.sft import check_messages

    if ns.prompt or ns.prompt_file or ns.prompt_ids:
        raise UserError("give either --messages or --prompt/--prompt-file/--prompt-ids, not both")
    records = []
    for where, record in read_jsonl(ns.messages, "pass --messages a .jsonl file of {\"messages\": [...]} lines"):
        if "messages" not in record:
            raise DataError(f"{where}: missing field 'messages'")
        records.append((where, check_messages(record["messages"], where)))
    require_dir(ns.checkpoint)
    from qkv.api import load

    lm = load(ns.checkpoint, ns.step)
    kwargs = template_kwargs(ns, lm)
    for where, messages in records:  # every conversation renders before anything is printed
        try:
            lm.chat_prompt_ids(messages, **kwargs)
        except TemplateError as err:
            raise DataError(f"{where}: {err}") from None
    replies = lm.chat([m for _, m in records], max_new_tokens=ns.max_new_tokens, temperature=ns.temperature,
                      top_k=ns.top_k, top_p=ns.top_p, seed=ns.seed, **kwargs)
    for reply in replies:
        print(json.dumps({"reply": reply}, ensure_ascii=False))
    return 0


def cmd_chat(ns: argparse.Namespace) -> int:
    """An interactive chat in the terminal (see add_chat_parser's help)."""
    require_dir(ns.checkpoint)
    from qkv.api import load

    lm = load(ns.checkpoint, ns.step)
    kwargs = template_kwargs(ns, lm)  # a checkpoint that cannot chat is refused before the prompt appears
    lm.chat_template
    context = lm.config.model.max_seq_len
    print(f"qkv chat: {ns.checkpoint} (context {context} tokens). /system TEXT, /reset; Ctrl-C stops a reply, "
          "Ctrl-D leaves.", flush=True)
    system: str | None = None
    history: list[dict[str, str]] = []
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            continue
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            history = []
            print("(conversation cleared)", flush=True)
            continue
        if text == "/system" or text.startswith("/system "):
            system = text[len("/system"):].strip() or None
            print(f"(system message {'set' if system else 'cleared'})", flush=True)
            continue
        if text.startswith("/"):
            print("(commands: /system TEXT, /reset; Ctrl-D leaves)", flush=True)
            continue
        head = [{"role": "system", "content": system}] if system else []
        try:  # Ctrl-C anywhere in a turn ends that turn (a reply cut short stays in the history)
            history = _turn(lm, ns, head, history, line, kwargs)
        except KeyboardInterrupt:
            print(" [stopped]", flush=True)


def _turn(lm, ns: argparse.Namespace, head: list[dict], history: list[dict], line: str, kwargs: dict) -> list[dict]:
    """One user message and the streamed reply; the history after it."""
    from qkv.inference.chat import fit_history

    context = lm.config.model.max_seq_len
    reserve = min(ns.max_new_tokens, context // 2)
    try:
        turns, dropped = fit_history(history + [{"role": "user", "content": line}],
                                     lambda t: len(lm.chat_prompt_ids(head + t, check=False, **kwargs)),
                                     context - reserve)
    except UserError as err:
        print(f"qkv: error: {str(err).splitlines()[0]}", flush=True)
        return history
    if dropped:
        print(f"(the {dropped} oldest messages no longer fit in the model's context of {context} tokens: "
              "dropped)", flush=True)
    reply, stopped = "", False
    try:
        for piece in lm.chat_stream(head + turns, max_new_tokens=reserve, temperature=ns.temperature,
                                    top_k=ns.top_k, top_p=ns.top_p, seed=ns.seed, **kwargs):
            reply += piece
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        stopped = True
    except UserError as err:  # the newest message alone does not fit: say so, keep the history as it was
        print(f"qkv: error: {str(err).splitlines()[0]}", flush=True)
        return history
    history = turns + [{"role": "assistant", "content": reply}]
    print(" [stopped]" if stopped else "", flush=True)
    return history


def add_chat_parser(sub) -> None:
    p = sub.add_parser("chat", help="chat with a checkpoint in the terminal, in the model's own chat template")
    p.add_argument("--checkpoint", required=True, help="run directory (qkv finetune, qkv convert import, ...)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest reply, in tokens")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    add_template_kwargs_argument(p)
    p.set_defaults(func=cmd_chat)
