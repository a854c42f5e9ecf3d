"""Imported last by run_workers' fork server (its preload list): freezes the heap the server imported.

Ranks fork from the server with torch, transformers and megatron-core already imported (~500k objects). Each
run's destroy_distributed runs the cyclic collector to free its process groups, and a collection over that heap
took ~1.6 s per rank. `gc.freeze` moves the imported objects out of the collector's reach (Python's documented
use for forking servers, which also keeps the collector from touching, and so copying, the parent's pages).
"""

import gc

gc.collect()
gc.freeze()
