"""Known third-party notices, silenced by our command-line entry points (`MSWIFT_VERBOSE=1` shows them all).

Each one is a fallback the README documents (megatron-core without Apex / Transformer Engine, which is every CPU
run), a library announcing binaries for hardware this machine lacks (torchao's CUDA kernels), megatron-core
remarking on our own layer spec, or a deprecation inside a dependency that no user setting changes. They are
dozens of lines per process; nothing else is filtered: our warnings, and every other third-party warning, show.
Standard library only: entry points call this before megatron-core, torch or torchao are imported (the
warnings are raised at import time).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

VERBOSE_ENV = "MSWIFT_VERBOSE"

# (message regex, category) for warnings.warn calls.
KNOWN_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    (r"(Transformer Engine and )?Apex (is|are) not installed", UserWarning),
    (r"full scope is deprecated", UserWarning),  # megatron-core's own default cuda_graph_scope
    (r"Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning),
    (r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated", FutureWarning),
    (r"`load_state_dict` is deprecated and will be removed", FutureWarning),  # torch DCP, called by megatron
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning),  # transformers, called by peft
)
# (logger name, message regex) for logging records.
KNOWN_LOG_RECORDS: tuple[tuple[str, str], ...] = (
    ("torchao", r"Failed to load .*\.so"),
    ("torch.utils._pytree", r"is an Enum subclass and is now natively supported"),
    ("megatron.core.transformer.transformer_layer", r"Unknown MLP type"),
)
SUMMARY = (
    "mswift: silenced known third-party notices (megatron-core's Apex/TE fallbacks, torchao's CUDA libraries, "
    "deprecations inside dependencies); MSWIFT_VERBOSE=1 shows them"
)


class _DropMatching(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


_installed = False


def silence_known_noise(announce: bool = True) -> bool:
    """Install the filters unless MSWIFT_VERBOSE=1 (once per process); prints SUMMARY then (stderr, global rank 0)
    when `announce`. Returns whether known notices are silenced."""
    global _installed
    if os.environ.get(VERBOSE_ENV) == "1":
        return False
    if _installed:
        return True
    _installed = True
    for pattern, category in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    for name, pattern in KNOWN_LOG_RECORDS:
        logging.getLogger(name).addFilter(_DropMatching(pattern))
    if announce and os.environ.get("RANK", "0") == "0":
        print(SUMMARY, file=sys.stderr)
    return True
