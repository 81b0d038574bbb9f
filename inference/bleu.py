"""Corpus BLEU (Papineni et al. 2002) matching sacreBLEU's default ``BLEU()``, in pure Python.

Defaults reproduced: the ``13a`` tokenizer (the mteval-v13a.pl rules used by WMT), case-sensitive,
n-grams up to 4, one reference per hypothesis and the ``exp`` smoothing (Chen & Cherry 2014,
method 3, the NIST one): the k-th n-gram order with no match gets precision 1 / (2^k · total).

    BLEU = BP · exp(¼ Σₙ log pₙ),   BP = 1 if c ≥ r else exp(1 − r / c)

with pₙ the clipped n-gram precision summed over the whole corpus, c the hypothesis and r the
reference token counts. Scores and precisions are percentages (0–100), as in sacreBLEU.
"""
from __future__ import annotations

import math
import re
from collections import Counter

MAX_ORDER = 4

# mteval-v13a language-dependent rules, applied in order (same regexes as sacrebleu's TokenizerRegexp).
_13A_RULES = [
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # most punctuation and symbols
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period and comma unless preceded by a digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # period and comma unless followed by a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # dash when preceded by a digit
]


def tokenize_13a(line: str) -> str:
    """mteval-v13a tokenization (sacreBLEU's ``13a``), returning space-joined tokens."""
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} "
    for pattern, repl in _13A_RULES:
        line = pattern.sub(repl, line)
    return " ".join(line.split())


def _ngram_counts(tokens: list[str]) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for n in range(1, MAX_ORDER + 1) for i in range(len(tokens) - n + 1))


def _segment_stats(hypothesis: str, reference: str) -> tuple[int, int, list[int], list[int]]:
    """(hyp_len, ref_len, matches per order, hypothesis n-grams per order) for one sentence pair."""
    hyp_tokens = tokenize_13a(hypothesis.rstrip()).split()
    ref_tokens = tokenize_13a(reference.rstrip()).split()
    ref_ngrams = _ngram_counts(ref_tokens)
    correct, total = [0] * MAX_ORDER, [0] * MAX_ORDER
    for ngram, count in _ngram_counts(hyp_tokens).items():
        total[len(ngram) - 1] += count
        correct[len(ngram) - 1] += min(count, ref_ngrams.get(ngram, 0))
    return len(hyp_tokens), len(ref_tokens), correct, total


def _bleu_from_stats(sys_len: int, ref_len: int, correct: list[int], total: list[int]) -> dict:
    bp = 1.0
    if sys_len < ref_len:
        bp = math.exp(1 - ref_len / sys_len) if sys_len > 0 else 0.0
    precisions = [0.0] * MAX_ORDER
    result = {"score": 0.0, "precisions": precisions, "bp": bp, "sys_len": sys_len, "ref_len": ref_len}
    if not any(correct):  # no match at any order: BLEU 0 (sacreBLEU returns early here too)
        return result
    smooth = 1.0
    for n in range(MAX_ORDER):
        if total[n] == 0:  # hypotheses too short for this order: precision stays 0, so BLEU is 0
            break
        if correct[n] == 0:
            smooth *= 2
            precisions[n] = 100.0 / (smooth * total[n])
        else:
            precisions[n] = 100.0 * correct[n] / total[n]
    if all(p > 0 for p in precisions):
        result["score"] = bp * math.exp(sum(math.log(p) for p in precisions) / MAX_ORDER)
    return result


def corpus_bleu(hypotheses: list[str], references: list[str]) -> dict:
    """Corpus BLEU of ``hypotheses`` against one reference each, equal to sacreBLEU's ``BLEU()``.

    Returns {"score": 0–100, "precisions": [p1..p4] in percent, "bp", "sys_len", "ref_len"}.
    """
    if len(hypotheses) != len(references):  # a caller's bug: one hypothesis is made per reference
        raise ValueError(
            f"corpus_bleu needs one reference per hypothesis: got {len(hypotheses)} hypotheses "
            f"and {len(references)} references"
        )
    sys_len = ref_len = 0
    correct, total = [0] * MAX_ORDER, [0] * MAX_ORDER
    for hyp, ref in zip(hypotheses, references):
        h_len, r_len, seg_correct, seg_total = _segment_stats(hyp, ref)
        sys_len, ref_len = sys_len + h_len, ref_len + r_len
        correct = [a + b for a, b in zip(correct, seg_correct)]
        total = [a + b for a, b in zip(total, seg_total)]
    return _bleu_from_stats(sys_len, ref_len, correct, total)
