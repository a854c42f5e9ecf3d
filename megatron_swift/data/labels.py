"""Which tokens are trained and how much: loss policies, per-role loss scales, truncation of long samples.

A sample's weights are per token: weight[i] scales the loss of predicting token i from the tokens
before it (so weight[0] is never used). Policies (ms-swift's `loss_scale` names):
- default:    every assistant turn;
- last_round: the assistant turns after the last user turn;
- all:        every token, template markup included.
Then per-role scales multiply (`role=scale`, e.g. `tool=0`: tool observations are never trained).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from megatron_swift.data.errors import DataError
from megatron_swift.data.segments import Segment

LOSS_SCALES = ("default", "last_round", "all")
TRUNCATION = ("delete", "left", "right")


def parse_role_scales(entries: list[str]) -> dict[str, float]:
    """["tool=0", "system=0.5"] -> {"tool": 0.0, "system": 0.5}."""
    scales = {}
    for entry in entries:
        role, sep, value = entry.partition("=")
        try:
            scales[role.strip()] = float(value)
        except ValueError:
            raise DataError(f"data.role_loss_scale: {entry!r} is not role=number (e.g. tool=0)") from None
        if not sep or scales[role.strip()] < 0:
            raise DataError(f"data.role_loss_scale: {entry!r} is not role=number with number >= 0")
    return scales


@dataclass(frozen=True)
class LossPolicy:
    scope: str = "default"
    role_scales: dict[str, float] = field(default_factory=lambda: {"tool": 0.0})

    def segment_weights(self, segments: list[Segment]) -> list[float]:
        if self.scope == "all":
            base = [1.0] * len(segments)
        else:
            last_user = max((s.turn for s in segments if s.role == "user"), default=-1)
            first_turn = last_user if self.scope == "last_round" else -1
            base = [float(s.role == "assistant" and s.turn > first_turn) for s in segments]
        return [weight * self.role_scales.get(s.role, 1.0) for weight, s in zip(base, segments, strict=True)]


@dataclass
class TruncationCounts:
    truncated: int = 0  # cut to max_length
    deleted: int = 0  # longer than max_length with truncation_strategy=delete
    no_target: int = 0  # nothing left to train on after truncation


def truncate(ids: np.ndarray, weights: np.ndarray, max_length: int, strategy: str, counts: TruncationCounts):
    """(ids, weights) fitting `max_length`, or None when deleted; counts what was cut and what lost every target."""
    if len(ids) > max_length:
        if strategy == "delete":
            counts.deleted += 1
            return None
        counts.truncated += 1
        keep = slice(len(ids) - max_length, None) if strategy == "left" else slice(0, max_length)
        ids, weights = ids[keep], weights[keep]
        counts.no_target += int(not weights[1:].any())
    return ids, weights
