"""Shared by the serving tests: a tiny instruct checkpoint (a random Llama with a real byte-level BPE tokenizer and
Qwen 2.5's ChatML template, imported from a Hugging Face directory) and a real ``qkv serve`` process on loopback
that stops itself: SIGTERM at the end of the test module, and ``timeout`` kills it if the tests never get there."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"
WORDS = "the cat sat on a mat while dogs ran in the park and birds sang over old trees".split()


def instruct_run(root: Path) -> Path:
    """``root/hf`` (transformers' files) imported as the qkv run ``root/run``."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from qkv.cli import main as cli_main

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 5 + ["system user assistant"] * 5
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                                  eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf_tok.chat_template = (FIXTURES / "qwen2.5-instruct.jinja").read_text()
    eot, im_end = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(hf_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=eot, eos_token_id=im_end,
        pad_token_id=eot)).eval()
    model.save_pretrained(root / "hf")
    hf_tok.save_pretrained(root / "hf")
    assert cli_main(["convert", "import", str(root / "hf"), str(root / "run")]) == 0
    return root / "run"


class ServeProcess:
    """``qkv serve --checkpoint RUN --port 0 ...`` as a child process; ``url`` once it listens."""

    def __init__(self, run: Path, *args: str, env: dict[str, str] | None = None, limit_s: int = 900):
        command = ["timeout", "-s", "KILL", str(limit_s), sys.executable, "-m", "qkv.cli", "serve",
                   "--checkpoint", str(run), "--port", "0", *args]
        self.proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        while True:  # the first line says where it listens (after the model loaded and compiled)
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError("qkv serve ended before listening:\n" + "".join(self.lines))
            self.lines.append(line)
            if line.startswith("qkv: serving "):
                self.url = line.split(" on ", 1)[1].split()[0]
                break
        self.base = self.url.removesuffix("/v1")

    def stop(self) -> tuple[int, str]:
        """SIGTERM (the child of ``timeout``, which passes it on), then everything it wrote to stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        rest = self.proc.stderr.read()
        code = self.proc.wait(timeout=120)
        return code, "".join(self.lines) + rest


def stats(base: str, headers: dict[str, str] | None = None) -> dict:
    import httpx

    return httpx.get(f"{base}/health", headers=headers or {}, timeout=30).json()


def first_line_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[0])
