"""Serving HF directories with vLLM: the `vllm serve` command and a static check of exports and adapters.

CLI: `python -m megatron_swift.serve` (`mswift-serve`); modules: command, export_check.
"""
