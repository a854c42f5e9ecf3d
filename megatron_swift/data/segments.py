"""What a chat template produces: the conversation's text as segments, each tagged with the role that owns it.

The segments concatenate to the exact text the model sees; labels (labels.py) come from the roles, so the
rendered tokens and the loss mask can never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

GLUE = "template"  # role of the template's own text between turns (trained only with loss_scale=all)


@dataclass(frozen=True)
class Segment:
    text: str
    role: str  # system / user / assistant / tool, or GLUE
    turn: int  # index of the message it belongs to (-1 for GLUE)
