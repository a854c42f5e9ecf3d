"""Training data: sources and formats, chat templates and loss masks, packing, streaming, indexed data.

The training side uses `build_train_data` (pipeline.py) and the `Batches` protocol (batches.py).
"""

from megatron_swift.data.batches import Batches, GlobalBatches
from megatron_swift.data.errors import DataError
from megatron_swift.data.pipeline import TrainData, build_train_data
from megatron_swift.data.sources import read_jsonl
from megatron_swift.data.templates import render_tool_call

__all__ = ["Batches", "DataError", "GlobalBatches", "TrainData", "build_train_data", "read_jsonl", "render_tool_call"]
