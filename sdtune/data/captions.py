"""Caption augmentation: tag shuffling (kohya's keep_tokens) and caption dropout."""

from __future__ import annotations

import random


def augment_caption(
    caption: str, rng: random.Random, *, shuffle: bool = False, keep_tokens: int = 0, dropout_rate: float = 0.0
) -> str:
    """Return the caption to train on this time.

    Args:
        caption: Comma-separated tags or a sentence.
        rng: Source of randomness (seeded per sample and epoch, so resumed runs see the same captions).
        shuffle: Shuffle the comma-separated tags.
        keep_tokens: Leading tags that stay in place when shuffling (e.g. the trigger word).
        dropout_rate: Probability of returning the empty caption (trains the unconditional branch of CFG).
    """
    if dropout_rate and rng.random() < dropout_rate:
        return ""
    if not shuffle:
        return caption
    tags = [t.strip() for t in caption.split(",")]
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(rest)
    return ", ".join(t for t in kept + rest if t)
