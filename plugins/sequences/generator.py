"""The majority-token task, drawn from a seed with numpy (no download, no file).

A sample is ``length`` token ids drawn uniformly from ``1 .. vocab-1`` (0 is padding and never
drawn). Tokens ``1 .. classes`` are the *class tokens*; the label is the class token that occurs
most often in the sequence (samples where the largest count is tied are redrawn). A fraction
``noise`` of the labels is then replaced by a different class, drawn uniformly: the best
achievable accuracy is therefore ``1 - noise`` in expectation, which keeps trained models below
100% and leaves room to tell compression methods apart.

Solving it needs attention over the whole sequence (counting several token types), which a
2-layer transformer learns in a few epochs; a bag of embeddings without attention cannot pool
across positions in these models' heads.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

GENERATOR_VERSION = 1
"""Bump when the same parameters would draw other samples."""


@dataclass(frozen=True)
class MajorityTask:
    """Parameters of the majority-token task; with ``seed`` they fix every sample."""

    length: int = 24
    vocab: int = 16
    classes: int = 4
    noise: float = 0.1
    seed: int = 0

    def check(self) -> list[str]:
        """Problems with the parameters, one line each (empty if they are valid)."""
        problems = []
        if not 2 <= self.classes <= 64:
            problems.append(f"classes must be between 2 and 64, got {self.classes}")
        if not self.classes < self.vocab <= 65_536:
            problems.append(
                f"vocab must be larger than classes ({self.classes}) and at most 65536 (token 0 "
                f"is padding), got {self.vocab}"
            )
        if not 2 <= self.length <= 4096:
            problems.append(f"length must be between 2 and 4096 tokens, got {self.length}")
        if not 0 <= self.noise < 1 - 1 / max(self.classes, 2):
            problems.append(
                f"noise must be in [0, {1 - 1 / max(self.classes, 2):.3g}) (beyond that labels "
                f"carry no signal), got {self.noise}"
            )
        return problems

    def to_json(self) -> dict[str, object]:
        """The parameters, with the generator version (what determines the samples)."""
        return {**asdict(self), "v": GENERATOR_VERSION}


def draw(task: MajorityTask, count: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` samples of ``task`` from an independent random stream ``stream`` (one per
    split): token ids ``(count, length)`` int64 and labels ``(count,)`` int64."""
    rng = np.random.default_rng([task.seed, stream, GENERATOR_VERSION])
    tokens: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    have = 0
    while have < count:
        batch = rng.integers(1, task.vocab, size=(max(2 * (count - have), 64), task.length))
        counts = np.stack([(batch == c + 1).sum(1) for c in range(task.classes)], axis=1)
        top = counts.max(1)
        unique = (counts == top[:, None]).sum(1) == 1
        tokens.append(batch[unique])
        labels.append(counts[unique].argmax(1))
        have += int(unique.sum())
    x = np.concatenate(tokens)[:count].astype(np.int64)
    y = np.concatenate(labels)[:count].astype(np.int64)
    flip = rng.random(count) < task.noise
    # A flipped label is a uniformly drawn *other* class.
    shift = rng.integers(1, task.classes, size=count)
    y = np.where(flip, (y + shift) % task.classes, y)
    return x, y
