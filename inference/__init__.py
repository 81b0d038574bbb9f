"""Inference: loading a run once, decoding (sampling, greedy, beam search), translation, BLEU, evaluation."""
