"""megatron-swift: a Megatron-Core engine for training and fine-tuning HF models."""

from setuptools import find_packages, setup

setup(
    name="megatron-swift",
    version="0.1.0",
    description="HF <-> Megatron-Core conversion, training and fine-tuning on megatron-core",
    python_requires=">=3.10",
    # kernels/ holds the import package megatron_swift_kernels: a top-level package named `kernels` would shadow
    # Hugging Face's `kernels`, which transformers (>= 5.25) imports (tests/test_layering.py checks this).
    packages=find_packages(include=["megatron_swift", "megatron_swift.*", "converters", "converters.*"])
    + find_packages("kernels", include=["megatron_swift_kernels", "megatron_swift_kernels.*"]),
    package_dir={"megatron_swift_kernels": "kernels/megatron_swift_kernels"},
    install_requires=[
        "megatron-core>=0.16,<0.20",
        "torch>=2.6",
        "transformers>=4.51",
        "safetensors>=0.4",
        "peft>=0.15",
        "datasets>=3.0",
        "sentencepiece>=0.2",
        "tokenizers>=0.21",
        "nvidia-ml-py>=12.0",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "tensorboard>=2.14",
        "numpy",
        "packaging",
    ],
    extras_require={
        # GPU clusters only: never install these on a CPU machine (a half-built TE breaks megatron-core imports).
        # triton: compiles kernels/ for model.kernels=triton|auto (CUDA torch wheels usually bring a matching one).
        "gpu": ["transformer-engine[pytorch]>=2.0", "triton>=3.2"],
        "serve": ["vllm>=0.8"],
        # Weight-only int8 quantization that runs on CPU (mswift-quantize --method int8); transformers
        # saves and loads it through TorchAoConfig.
        "quant": ["torchao>=0.14"],
        # The techniques comparison's plots (python -m megatron_swift.bench techniques).
        "plot": ["matplotlib>=3.8"],
        # GPU quantization paths (mswift-quantize --method gptq/awq/fp8); need CUDA.
        "quant-gpu": ["optimum>=1.20", "gptqmodel>=2.0", "llmcompressor>=0.6"],
        # triton: the kernel tests run the Triton kernels on CPU through its interpreter (TRITON_INTERPRET=1);
        # tested with 3.9 (the interpreter's bf16 handling differs between versions, see tests/kernel_ops).
        # gguf: tests/references.py reads llama.cpp's GGUF vocabularies (converted once by transformers).
        # psutil: the preemption tests signal the processes of a running job (tests/test_slurm.py).
        # rouge-score, jieba, rouge-chinese: imported by the EvalScope ToolBench scorer files that
        # tests/evalscope_reference.py loads from the pinned evalscope wheel (evalscope itself is not installed).
        # trl: the preference-training oracle (tests/test_preference_oracle.py runs TRL's DPOTrainer on the same pairs).
        "dev": [
            "pytest>=8",
            "ruff>=0.6",
            "accelerate>=1.0",
            "torchao>=0.14",
            "triton>=3.9",
            "gguf>=0.17",
            "psutil>=5.9",
            "rouge-score>=0.1.2",
            "jieba>=0.42",
            "rouge-chinese>=1.0",
            "trl>=1.16",
            "matplotlib>=3.8",
        ],
    },
    entry_points={
        "console_scripts": [
            "mswift-convert=converters.__main__:main",
            "mswift-eval=megatron_swift.eval.__main__:main",
            "mswift-plan=megatron_swift.plan.cli:main",
            "mswift-quantize=megatron_swift.quantize.__main__:main",
            "mswift-serve=megatron_swift.serve.__main__:main",
        ]
    },
)
