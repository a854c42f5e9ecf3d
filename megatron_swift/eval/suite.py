"""One evaluation run: every requested dataset on every model, validated up front, as report results
(`data`: what each dataset left out, see datasets.py; `results`: the figures per model)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from megatron_swift.data.errors import BadRows
from megatron_swift.eval.agent_metrics import score_agent
from megatron_swift.eval.datasets import data_entry, read_agent, read_qa
from megatron_swift.eval.generation import (
    PromptRow,
    generate_hf,
    generate_hf_media,
    generate_vllm,
    qa_accuracy,
    render_prompt,
    vllm_engine,
)
from megatron_swift.eval.loading import EvalInputError, load_image_processor, load_model, load_tokenizer
from megatron_swift.eval.perplexity import encode_rows, masked_loss
from megatron_swift.fs import atomic_write_text

PREDICTIONS_ONLY = "predictions"  # the model name used when rows carry their own predictions


@dataclass
class EvalConfig:
    models: dict[str, str] = field(default_factory=dict)  # name -> HF directory; empty: score row predictions
    perplexity_data: str | None = None
    task: str = "sft"  # sft: assistant-only loss; pretrain: every token
    seq_length: int = 2048
    qa_data: str | None = None
    agent_data: str | None = None
    max_new_tokens: int = 256
    batch_size: int = 8
    backend: str = "hf"  # hf (transformers) or vllm
    tensor_parallel_size: int = 1  # vllm backend only
    dtype: str = "auto"
    device: str = "cpu"
    skip_bad_rows: bool = False  # skip and count malformed rows instead of stopping at the first
    out: str | None = None  # where predictions-MODEL-{qa,agent}.jsonl go (next to the report)

    def problems(self) -> list[str]:
        found = []
        if not (self.perplexity_data or self.qa_data or self.agent_data):
            found.append("nothing to evaluate: give --perplexity, --qa and/or --agent data")
        if self.task not in ("sft", "pretrain"):
            found.append(f"--task {self.task!r}: expected sft or pretrain")
        if self.backend not in ("hf", "vllm"):
            found.append(f"--backend {self.backend!r}: expected hf or vllm")
        if min(self.seq_length, self.batch_size, self.max_new_tokens, self.tensor_parallel_size) < 1:
            found.append("--seq-length, --batch-size, --max-new-tokens and --tensor-parallel-size must be positive")
        if not self.models and self.perplexity_data:
            found.append("--perplexity needs a --model")
        if self.backend == "vllm" and self.models and (self.qa_data or self.agent_data):
            from megatron_swift._optional import vllm_unavailable_reason

            reason = vllm_unavailable_reason()
            if reason:
                found.append(f"--backend vllm: {reason}; use --backend hf")
        for name, path in self.models.items():
            if not (Path(path) / "config.json").is_file():
                found.append(f"--model {name}={path}: not an HF model directory (no config.json)")
        return found


def _predictions(generate, rows: list[PromptRow]) -> list[str]:
    if generate is None:
        missing = [row.where for row in rows if row.prediction is None]
        if missing:
            raise EvalInputError(f"{missing[0]}: no 'prediction' in the row and no --model to generate one")
        return [row.prediction for row in rows]
    return generate(rows)


def _generator(config: EvalConfig, model_dir: str, model, tokenizer, processor=None):
    """rows -> greedy predictions, prompts rendered with the model's chat template, on the configured backend; with
    a processor (datasets with images), every row through the processor (generate_hf_media)."""
    if processor is not None:
        return lambda rows: generate_hf_media(model, processor, rows, config.max_new_tokens, config.batch_size)
    if config.backend == "vllm":
        engine = vllm_engine(model_dir, config.tensor_parallel_size)

        def generate(prompts):
            return generate_vllm(engine, prompts, config.max_new_tokens)
    else:

        def generate(prompts):
            return generate_hf(model, tokenizer, prompts, config.max_new_tokens, config.batch_size)

    return lambda rows: generate([render_prompt(tokenizer, row) for row in rows])


def _save_predictions(config: EvalConfig, name: str, kind: str, rows: list[PromptRow], predictions: list[str]):
    if config.out:
        lines = [
            json.dumps({"where": row.where, "prediction": prediction, "reference": row.reference})
            for row, prediction in zip(rows, predictions, strict=True)
        ]
        atomic_write_text(Path(config.out) / f"predictions-{name}-{kind}.jsonl", "\n".join(lines) + "\n")


def evaluate(config: EvalConfig) -> dict:
    """Validate everything, then evaluate each model; returns the report (settings + results)."""
    problems = config.problems()
    if problems:
        raise EvalInputError("; ".join(problems))
    qa = read_qa(config.qa_data, config.skip_bad_rows) if config.qa_data else None
    agent = read_agent(config.agent_data, config.skip_bad_rows) if config.agent_data else None

    data = {kind: dataset.report() for kind, dataset in (("qa", qa), ("agent", agent)) if dataset}
    image_row = next((row.where for dataset in (qa, agent) if dataset for row in dataset.rows if row.images), None)
    if image_row and config.backend == "vllm" and config.models:
        raise EvalInputError(f"{image_row}: rows with images are generated with --backend hf only")
    # Every model's processor before any model work: a text-only model given image rows stops the run here.
    processors = {name: load_image_processor(path, image_row) if image_row else None
                  for name, path in config.models.items()}  # fmt: skip
    results = {}
    for name, model_dir in config.models.items() or [(PREDICTIONS_ONLY, None)]:
        result, generate = {}, None
        if model_dir is not None:
            tokenizer = load_tokenizer(model_dir)
            samples = None
            if config.perplexity_data:  # encoded (and so validated) before the model is loaded
                bad = BadRows(skip=config.skip_bad_rows, option="--skip-bad-rows")
                samples = encode_rows(config.perplexity_data, tokenizer, config.seq_length, config.task, bad)
                data[f"perplexity:{name}"] = data_entry(config.perplexity_data, len(samples), bad)
            model = load_model(model_dir, config.dtype, config.device) if samples or config.backend == "hf" else None
            if samples:
                result["perplexity"] = masked_loss(model, samples, config.batch_size)
            if qa or agent:
                if config.backend == "vllm":
                    model = None  # free the transformers copy before vLLM takes the GPU memory
                generate = _generator(config, model_dir, model, tokenizer, processors[name])
        if qa:
            predictions = _predictions(generate, qa.rows)
            _save_predictions(config, name, "qa", qa.rows, predictions)
            result["qa"] = qa_accuracy(predictions, [row.reference for row in qa.rows])
        if agent:
            predictions = _predictions(generate, agent.rows)
            _save_predictions(config, name, "agent", agent.rows, predictions)
            result["agent"] = score_agent(predictions, agent.references, agent.tools).summary()
        results[name] = result
    settings = {k: v for k, v in vars(config).items() if k != "out"}
    return {"settings": settings, "data": data, "results": results}
