"""The history of an interactive chat kept within the model's context: the oldest turns dropped first."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def fit_history(turns: Sequence[dict[str, Any]], length: Callable[[list[dict[str, Any]]], int],
                limit: int) -> tuple[list[dict[str, Any]], int]:
    """(the newest turns whose rendered prompt, ``length(turns)`` tokens, is at most ``limit``, how many
    were dropped). Turns go from the front, a user turn together with the replies after it, so the kept
    history still starts with a user turn; the newest user turn is always kept."""
    kept = list(turns)
    dropped = 0
    while len(kept) > 1 and length(kept) > limit:
        cut = 1
        while cut < len(kept) - 1 and kept[cut]["role"] != "user":
            cut += 1
        kept, dropped = kept[cut:], dropped + cut
    return kept, dropped
