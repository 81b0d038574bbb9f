"""Shared by the serving tests: a tiny instruct checkpoint (a random Llama with a real byte-level BPE tokenizer and
Qwen 2.5's ChatML template, imported from a Hugging Face directory) and a real ``qkv serve`` process on loopback
that stops itself: SIGTERM at the end of the test module, and ``timeout`` kills it if the tests never get there."""
from __future__ import annotations

import json
from pathlib import Path

from qkv.serve_bench import ServeProcess  # noqa: F401  (the tests' server process)

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


def stats(base: str, headers: dict[str, str] | None = None) -> dict:
    import httpx

    return httpx.get(f"{base}/health", headers=headers or {}, timeout=30).json()


def first_line_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[0])
