"""Evaluation: perplexity against a direct HF computation, batched generation, the CLI report, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_swift.eval.__main__ import main as eval_main
from megatron_swift.eval.loading import load_model, load_tokenizer
from megatron_swift.eval.perplexity import encode_rows, masked_loss
from megatron_swift.models.tiny import make_tiny_model
from tests.tiny_tuning import SFT_DATA, fine_tune

DATA = SFT_DATA.parent


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    base = make_tiny_model("llama", root / "base", seed=3)
    return {
        "base": base,
        "qwen2": make_tiny_model("qwen2", root / "qwen2", seed=4),
        "tuned": fine_tune(base, root / "tuned"),
    }


def direct_masked_loss(model_dir: Path, path: Path) -> float:
    """The SFT loss computed independently: each conversation unpadded, the assistant's reply with the
    end marker and newline the ChatML template emits after it as targets, HF logits, own shift."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    nll_sum, count = 0.0, 0
    for line in path.read_text().splitlines():
        messages = json.loads(line)["messages"]
        ids, mask = [], []
        for message in messages:
            head = tokenizer(f"<|im_start|>{message['role']}\n", add_special_tokens=False)["input_ids"]
            body = tokenizer(f"{message['content']}<|im_end|>\n", add_special_tokens=False)["input_ids"]
            ids += head + body
            mask += [0] * len(head) + [int(message["role"] == "assistant")] * len(body)
        rendered = tokenizer.apply_chat_template(messages, tokenize=True)
        assert ids == list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
        log_probs = torch.log_softmax(logits[:-1], dim=-1)
        targets = torch.tensor(ids[1:])
        token_nll = -log_probs[torch.arange(len(targets)), targets]
        target_mask = torch.tensor(mask[1:], dtype=torch.float64)
        nll_sum += float((token_nll * target_mask).sum())
        count += int(target_mask.sum())
    return nll_sum / count


@pytest.mark.parametrize("name", ["base", "qwen2", "tuned"])
def test_perplexity_equals_direct_hf_masked_loss(models, name):
    expected = direct_masked_loss(models[name], SFT_DATA)
    model, tokenizer = load_model(models[name]), load_tokenizer(models[name])
    samples = encode_rows(SFT_DATA, tokenizer, seq_length=256, task="sft")
    for batch_size in (1, 8):  # right padding and the column trim must not change anything
        result = masked_loss(model, samples, batch_size=batch_size)
        assert abs(result["loss"] - expected) < 1e-5
        assert result["perplexity"] == pytest.approx(torch.exp(torch.tensor(expected)).item(), rel=1e-5)


def test_batched_greedy_generation_matches_one_at_a_time(models):
    from transformers import AutoModelForCausalLM

    from megatron_swift.eval.generation import generate_hf, read_prompt_rows, render_prompt

    tokenizer = load_tokenizer(models["tuned"])
    rows = read_prompt_rows(DATA / "qa_sample.jsonl")[:4] + read_prompt_rows(DATA / "agent_sample.jsonl")[:2]
    prompts = [render_prompt(tokenizer, row) for row in rows]
    assert len({len(p) for p in prompts}) > 1, "prompts of different lengths exercise the left padding"
    model = load_model(models["tuned"])
    batched = generate_hf(model, tokenizer, prompts, max_new_tokens=6, batch_size=8)
    reference = AutoModelForCausalLM.from_pretrained(models["tuned"]).eval()
    for prompt, text in zip(prompts, batched, strict=True):
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)
        assert text == tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True)


def test_cli_scores_row_predictions_without_a_model(tmp_path):
    rows = [
        {"question": "Capital of France?", "answer": "Paris", "prediction": "paris."},  # normalised match only
        {"question": "2 + 2?", "answer": "4", "prediction": "4"},  # exact
        {"question": "Capital of Spain?", "answer": "Madrid", "prediction": "Rome"},  # miss
    ]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert eval_main(["--qa", str(data), "--out", str(tmp_path / "r")]) == 0
    qa = json.loads((tmp_path / "r" / "report.json").read_text())["results"]["predictions"]["qa"]
    assert qa == {"rows": 3, "exact_match": 1 / 3, "normalized_match": 2 / 3}


def test_bad_input_is_one_error_line_before_any_model_work(models, tmp_path, capsys):
    bad = tmp_path / "agent.jsonl"
    good = json.loads((DATA / "agent_sample.jsonl").read_text().splitlines()[0])
    bad.write_text(json.dumps(good) + "\n" + json.dumps({**good, "tools": []}) + "\n")
    assert eval_main(["--model", str(models["base"]), "--agent", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert f"error: {bad}:2: agent rows need a non-empty 'tools' list" in capsys.readouterr().err
    broken = tmp_path / "qa.jsonl"
    broken.write_text('{"question": "q", "answer": "a"}\n{"question": \n')
    assert eval_main(["--model", str(models["base"]), "--qa", str(broken)]) == 2
    assert f"{broken}:2: invalid JSON" in capsys.readouterr().err
    assert eval_main(["--model", f"x={tmp_path}", "--qa", str(DATA / "qa_sample.jsonl")]) == 2
    assert "not an HF model directory" in capsys.readouterr().err
    assert eval_main(["--model", str(models["base"])]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert eval_main(["--model", f"a={models['base']}", "--model", f"a={models['base']}", "--qa", str(broken)]) == 2
    assert "give NAME=DIR with a unique NAME" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_vllm_backend_without_vllm_says_why(models, monkeypatch, capsys):
    import megatron_swift._optional as optional

    monkeypatch.setattr(optional, "vllm_unavailable_reason", lambda: "vllm is not installed; pip install x")
    argv = ["--model", str(models["base"]), "--qa", str(DATA / "qa_sample.jsonl"), "--backend", "vllm"]
    assert eval_main(argv) == 2
    assert "error: --backend vllm: vllm is not installed; pip install x; use --backend hf" in capsys.readouterr().err
