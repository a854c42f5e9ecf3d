"""Evaluation of HF model directories (our exports or any HF model): perplexity with training's loss
masks, generation accuracy, ToolBench-style agent metrics, and side-by-side reports.

CLI: `python -m megatron_swift.eval` (`mswift-eval`); modules: perplexity, generation,
agent_metrics, datasets (rows read and left out), report, suite (one run), loading.
"""
