"""Post-training checks to run when a GPU machine is lent (never collected by the CPU suite; not yet run).

    python tests/gpu/post_training_gpu.py [--out DIR]
    python tests/gpu/post_training_gpu.py --smoke      # CPU, the transformers parts: checks the script

On a tiny Qwen2 and an HF-side fine-tune of it: perplexity and generation on the GPU with
transformers; when vLLM is installed, the same greedy generations through `--backend vllm`
(agreement with transformers reported) and a real `vllm serve` started from our command line,
asked once on /v1/chat/completions; when llm-compressor is installed, an fp8 quantization loaded
back with its perplexity. Prints one JSON object and writes it to --out.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for tests.tiny_tuning and tests.gpu

from megatron_swift._optional import vllm_unavailable_reason
from megatron_swift.eval.suite import EvalConfig, evaluate
from megatron_swift.models.tiny import make_tiny_model
from megatron_swift.quantize.methods import unavailable_reason
from megatron_swift.quantize.run import quantize_model
from megatron_swift.serve.command import ServeConfig, build_vllm_command
from tests.gpu.common import device_for, environment, parser, write_result
from tests.tiny_tuning import SFT_DATA, fine_tune

DATA = SFT_DATA.parent


def _eval(tuned: Path, backend: str, out: Path, device: str) -> tuple[dict, list[str]]:
    """The report's results and the agent predictions of one backend."""
    config = EvalConfig(
        models={"tuned": str(tuned)}, qa_data=str(DATA / "qa_sample.jsonl"),
        agent_data=str(DATA / "agent_sample.jsonl"), perplexity_data=str(SFT_DATA), seq_length=64,
        max_new_tokens=16, backend=backend, device=device, out=str(out),
    )  # fmt: skip
    results = evaluate(config)["results"]["tuned"]
    lines = (out / "predictions-tuned-agent.jsonl").read_text().splitlines()
    return results, [json.loads(line)["prediction"] for line in lines]


def _serve_once(tuned: Path, port: int = 8765) -> str:
    command = build_vllm_command(ServeConfig(str(tuned), port=port, max_model_len=256, served_model_name="tuned"))
    server = subprocess.Popen(command, start_new_session=True)
    try:
        for _ in range(180):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
                break
            except OSError:
                time.sleep(1)
        body = {"model": "tuned", "messages": [{"role": "user", "content": "What is the capital of France?"}]}
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps({**body, "max_tokens": 8}).encode(),
            {"Content-Type": "application/json"},
        )  # fmt: skip
        return json.loads(urllib.request.urlopen(request, timeout=60).read())["choices"][0]["message"]["content"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def main() -> None:
    args = parser(__doc__).parse_args()
    result = environment(device_for("tests/gpu/post_training_gpu.py", args.smoke))
    device = "cpu" if args.smoke else "cuda"
    work = Path(tempfile.mkdtemp())
    tuned = fine_tune(make_tiny_model("qwen2", work / "base"), work / "tuned")
    result["hf"], hf_predictions = _eval(tuned, "hf", work / "eval-hf", device)
    reason = vllm_unavailable_reason()
    if reason:
        result["vllm_backend"] = f"skipped: {reason}"
    else:
        result["vllm_backend"], vllm_predictions = _eval(tuned, "vllm", work / "eval-vllm", device)
        same = sum(a == b for a, b in zip(hf_predictions, vllm_predictions, strict=True))
        result["vllm_greedy_agreement_with_hf"] = same / len(hf_predictions)
        result["vllm_serve_answer"] = _serve_once(tuned)
    result["int8"] = quantize_model(tuned, work / "int8", "int8", SFT_DATA, seq_length=64, device=device)
    fp8_reason = unavailable_reason("fp8")
    result["fp8"] = (
        f"skipped: {fp8_reason}"
        if fp8_reason
        else quantize_model(tuned, work / "fp8", "fp8", SFT_DATA, seq_length=64, device=device)
    )
    print(json.dumps(result, indent=2))
    write_result(args.out, "post_training_gpu.json", result)


if __name__ == "__main__":
    main()
