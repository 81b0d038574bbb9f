"""A qkv decoder run as an lm-evaluation-harness model (``lm_eval`` name ``qkv``; docs/evaluation.md).

Log-likelihoods come from the decoder's own compiled prefill (``decode.prefill`` with a ``Sampler`` asking
for ``prompt_logprobs``): each scored sequence, context + continuation, is left-padded into one batch row and
its last token is fed as padding (segment 0), so no token past the context is ever read as input, the
positions stay inside the model's context and ``log p(token | everything before)`` of every token, the last
included, comes out of one call. ``is_greedy`` is whether each continuation token is the likeliest id there.
Generation is ``decode.Decoder``'s KV-cached stream, stopped per row at an EOS id or a stop string.

Tokenization follows lm-eval's own Hugging Face backend (``lm_eval.models.huggingface.HFLM``) on the run's
export, token for token: contexts and continuations are encoded whole and split (``TemplateLM._encode_pair``),
an empty context is ``prefix_token_id`` (the tokenizer's bos, which is eos where it has none), and a text gets
the special tokens its tokenizer.json's post-processor adds (Llama 3's ``<|begin_of_text|>``; none for
GPT-2), or bos alone with ``add_bos_token=True``, nothing with ``False``. A SentencePiece run gets bos, as it
was trained. Requests are sorted longest first and batched (``lm_eval.models.utils.Collator``).
"""
from __future__ import annotations

from typing import Any, Sequence

import lm_eval.models  # noqa: F401  (lm-eval's own names first: an empty registry is filled only on first use)
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from qkv.data.chat_template import stop_ids, template_for
from qkv.errors import UserError
from qkv.model.transformer import init_cache

from .decode import MAX_INT, Decoder, Sampler, SamplingConfig, bucket, left_pad, prefill
from .run import Run, load_run

GEN_KEYS = {"do_sample", "temperature", "top_k", "top_p", "seed"}  # what generate_until reads from gen_kwargs


def check_decoder(kind: str, where: str) -> None:
    if kind != "decoder":
        raise UserError(f"{where} holds a model.kind={kind} checkpoint: lm-eval scores and generates text with "
                        "a decoder (model.kind=decoder); evaluate it with qkv evaluate without --tasks")


def _positive(name: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or str(number) != str(value).strip():
        raise UserError(f"{name}={value!r} must be a whole number >= 1: pass {name}=8 (qkv has no 'auto')")
    return number


def _flag(name: str, value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "false"):
        return text == "true"
    raise UserError(f"{name}={value!r} must be True or False")


@register_model("qkv")
class QkvLM(TemplateLM):
    """``lm_eval.simple_evaluate(model="qkv", model_args={"checkpoint": RUN})`` after importing this module."""

    def __init__(self, checkpoint: str | None = None, step: int | str | None = None, batch_size: int | str = 8,
                 max_length: int | str | None = None, max_gen_toks: int | str = 256,
                 add_bos_token: bool | str | None = None, prefix_token_id: int | str | None = None,
                 seed: int | str = 0, device: str | None = None, max_batch_size: Any = None, run: Run | None = None):
        super().__init__()
        if run is None:
            if not checkpoint:
                raise UserError("the qkv lm-eval model needs a run directory: --model_args checkpoint=RUN_DIR")
            run = load_run(checkpoint, None if step is None else int(step))
        cfg = run.config.model
        check_decoder(cfg.kind, str(checkpoint or "the run"))
        if run.tokenizer is None:
            raise UserError(f"{checkpoint} has no tokenizer: lm-eval reads text; convert it again with --tokenizer")
        self.run, self.cfg, self.tok = run, cfg, run.tokenizer
        self._batch_size = _positive("batch_size", batch_size)
        self._max_length = cfg.max_seq_len if max_length is None else _positive("max_length", max_length)
        if self._max_length > cfg.max_seq_len:
            raise UserError(f"max_length={self._max_length} exceeds the model's context of {cfg.max_seq_len}: "
                            f"pass at most {cfg.max_seq_len}")
        self._max_gen_toks = _positive("max_gen_toks", max_gen_toks)
        self.add_bos_token = _flag("add_bos_token", add_bos_token)
        self.seed = int(seed)
        self._prefix = self.tok.bos_id if prefix_token_id is None else int(prefix_token_id)
        self.stops = stop_ids(template_for(run.meta, self.tok), self.tok, run.meta.get("eos_ids", ()))
        if self.tok.backend == "hf":
            self.affixes = self.tok.special_affixes()
            self.skip = self.tok.added_special_ids()
        else:
            self.affixes, self.skip = ([self.tok.bos_id], []), set()
        self.skip = set(self.skip) | {self.tok.pad_id, self.tok.bos_id, self.tok.eos_id}

    # -- what lm-eval asks of a model -------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return f"qkv-{self.tok.backend}-{self.tok.vocab_size}"

    def _encode_text(self, text: str) -> list[int]:
        """Ids of ``text`` alone, special-token spellings read as those tokens (transformers' encode with
        add_special_tokens=False)."""
        if self.tok.backend == "hf":
            return self.tok.encode_with_offsets(text)[0]
        return self.tok.encode(text)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        """HFLM.tok_encode on the exported tokenizer: its post-processor's special tokens (or bos alone with
        add_bos_token=True), none when asked not to or when the text already starts with the prefix token."""
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token is not False
            if string.startswith(self.tok.id_to_piece(self.prefix_token_id)):
                add_special_tokens = False
        ids = self._encode_text(string)
        if add_special_tokens:
            head, tail = ([self.tok.bos_id], []) if self.add_bos_token else self.affixes
            ids = list(head) + ids + list(tail)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids without special tokens (transformers' decode with skip_special_tokens=True)."""
        return self.tok.decode([int(i) for i in ids if int(i) not in self.skip])

    # -- log-likelihoods ------------------------------------------------------------------------------

    def _score(self, rows: Sequence[Sequence[int]], scored: Sequence[int]) -> list[tuple[float, bool]]:
        """(sum of log p, every token the likeliest) of the last ``scored[i]`` tokens of each row, in one
        compiled prefill: rows left-padded to a shape bucket, their last token fed as padding (segment 0)."""
        n = len(rows)
        width = bucket(max(len(r) for r in rows))
        tokens, segments = left_pad(rows, self.tok.pad_id, width, rows=self._batch_size)
        segments[:n, -1] = 0  # the last token is only a target: never read, so positions end inside the context
        how = Sampler(temperature=0.0, top_n=1, prompt_logprobs=True)
        cache = init_cache(self.cfg, tokens.shape[0], width, per_row=True)
        out, _ = prefill(self.run.graphdef, how, self.run.params, tokens, segments, cache)
        logp, top_ids, _ = (np.asarray(a) for a in out["prompt"])
        results = []
        for i, (row, k) in enumerate(zip(rows, scored)):
            cols = slice(width - 1 - k, width - 1)  # entry j scores the token in column j + 1
            results.append((float(logp[i, cols].astype(np.float64).sum()),
                            bool((top_ids[i, cols, 0] == np.asarray(row[-k:])).all())))
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """((context, continuation), context ids, continuation ids) -> (log p(continuation), greedy), with
        HFLM's left truncation to max_length + 1 tokens (the continuation whole)."""
        def sort_key(req):
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        order = Collator(requests, sort_fn=sort_key)
        results = []
        for chunk in order.get_batched(n=self._batch_size):
            rows, scored = [], []
            for _, context, continuation in chunk:
                if not context or not continuation or len(continuation) > self._max_length:
                    raise UserError(f"a request of {len(context)} context and {len(continuation)} continuation "
                                    f"tokens cannot be scored in a context of {self._max_length}")
                rows.append((list(context) + list(continuation))[-(self._max_length + 1):])
                scored.append(len(continuation))
            answers = self._score(rows, scored)
            for (key, _, _), answer in zip(chunk, answers):
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
            results.extend(answers)
        return order.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(text) in HFLM's disjoint rolling windows of max_length tokens, the first after prefix_token_id."""
        windows, owners = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(text)
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self._max_length,
                    context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logp, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation -----------------------------------------------------------------------------------

    def _sampling(self, kwargs: dict[str, Any], max_gen_toks: int, chunk_index: int) -> SamplingConfig:
        unknown = sorted(set(kwargs) - GEN_KEYS)
        if unknown:
            raise UserError(f"generation setting {unknown[0]!r} is not supported by the qkv lm-eval model: use "
                            f"until, max_gen_toks, {', '.join(sorted(GEN_KEYS))}")
        sample = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature", 1.0)) > 0
        seed = (int(kwargs.get("seed", self.seed)) + chunk_index) % 2**32
        return SamplingConfig(temperature=float(kwargs.get("temperature", 1.0)) if sample else 0.0,
                              top_k=int(kwargs.get("top_k") or 0) if sample else 0,
                              top_p=float(kwargs.get("top_p") or 1.0) if sample else 1.0,
                              max_new_tokens=min(max_gen_toks, MAX_INT), seed=seed)

    def _generate(self, decoder: Decoder, prompts: list[list[int]], until: list[str]) -> list[str]:
        """Each prompt's continuation up to its first EOS id or stop string (cut off), or max_gen_toks."""
        n = len(prompts)
        rows = prompts + [prompts[0]] * (self._batch_size - n)  # a full batch: one compiled shape per bucket
        ids: list[list[int]] = [[] for _ in range(n)]
        done = [False] * n
        stops = set(self.stops)
        for tokens in decoder.stream(self.run.params, rows, self.tok.pad_id, self.stops):
            for i, token in enumerate(tokens[:n].tolist()):
                if done[i]:
                    continue
                if token in stops:
                    done[i] = True
                    continue
                ids[i].append(token)
                done[i] = any(s and s in self.tok_decode(ids[i]) for s in until)
            if all(done):
                break
        return [postprocess_generated_text(self.tok_decode(row), until, None) for row in ids]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations of (context, gen_kwargs) requests: greedy unless do_sample (temperature, top_k, top_p,
        seed), cut at the first stop string of ``until`` (and eos), at most max_gen_toks tokens."""
        def sort_key(req):
            return -len(self.tok_encode(req[0])), req[0]

        order = Collator([req.args for req in requests], sort_fn=sort_key, group_by="gen_kwargs",
                         group_fn=lambda req: req[1])
        results = []
        eos_text = self.tok.id_to_piece(self.eot_token_id)
        for index, chunk in enumerate(order.get_batched(n=self._batch_size)):
            contexts, settings = zip(*chunk)
            kwargs = normalize_gen_kwargs(settings[0], self._max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen_toks = kwargs.pop("max_gen_toks")
            room = self._max_length - max_gen_toks
            if room < 1:
                raise UserError(f"max_gen_toks={max_gen_toks} leaves no room for a prompt in max_length="
                                f"{self._max_length}: ask for fewer tokens")
            decoder = Decoder(self.cfg, self.run.graphdef, self._sampling(kwargs, max_gen_toks, index))
            prompts = [self.tok_encode(c, left_truncate_len=room) or [self.prefix_token_id] for c in contexts]
            for context, gen_kwargs, text in zip(contexts, settings, self._generate(decoder, prompts, until)):
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                results.append(text)
        return order.get_original(results)
