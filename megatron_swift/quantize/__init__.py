"""Post-training quantization of HF directories (torchao int8 on CPU; GPTQ / AWQ / FP8 on GPU).

CLI: `python -m megatron_swift.quantize` (`mswift-quantize`); modules: methods (the libraries), run.
"""
