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


def agent_row(reference: str, prediction: str, tools: list | None = None) -> str:
    """One agent JSONL line in ToolBench's ReAct format, with the prediction to score."""
    messages = [{"role": "user", "content": "Find x."}, {"role": "assistant", "content": reference}]
    tools = [{"name": "search"}] if tools is None else tools
    return json.dumps({"tools": tools, "messages": messages, "prediction": prediction})


def test_cli_counts_and_reports_agent_rows_it_leaves_out(tmp_path, capsys):
    call = 'Action: search\nAction Input: {"query": "x"}'
    give_up = 'Action: Finish\nAction Input: {"return_type": "give_up_and_restart"}'  # ToolBench's give-up
    data = tmp_path / "agent.jsonl"
    lines = [
        agent_row(call, call),  # 1 scored
        '{"tools": [',  # 2 bad row: not JSON
        agent_row(call, call, tools=[]),  # 3 bad row: no tools
        agent_row(give_up, give_up),  # 4 scored
        agent_row('Action: Finish\nAction Input: {"return_type": "restart"}', give_up),  # 5 unreadable reference
        agent_row("Action: search\nAction Input: query=x", call),  # 6 scored, but out of argument F1
    ]
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "r"
    assert eval_main(["--agent", str(data), "--out", str(out)]) == 2  # a bad row stops the run, naming the flag
    err = capsys.readouterr().err
    assert f"error: {data}:2: invalid JSON" in err and "(or skip and count such rows with --skip-bad-rows)" in err
    assert not out.exists()

    assert eval_main(["--agent", str(data), "--skip-bad-rows", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    entry = report["data"]["agent"]
    assert (entry["rows"], entry["scored_rows"], entry["bad_rows"], entry["unreadable_references"]) == (6, 3, 2, 1)
    assert entry["unreadable_reference_arguments"] == 1
    for count, lines_named in [("bad_rows", [2, 3]), ("unreadable_references", [5]),
                               ("unreadable_reference_arguments", [6])]:  # fmt: skip
        assert [e.split(": ")[0] for e in entry[f"{count}_examples"]] == [f"{data}:{n}" for n in lines_named]
    # Rows 1, 4 and 6: every plan and tool name matches; only row 1 has readable reference arguments.
    agent = report["results"]["predictions"]["agent"]
    assert (agent["steps"], agent["call_steps"], agent["f1_steps"]) == (3, 2, 1)
    assert (agent["plan_em"], agent["act_em"], agent["argument_f1"]) == (1.0, 1.0, 1.0)
    printed = capsys.readouterr().out
    assert f"agent data {data}: 3 of 6 rows scored; bad rows skipped (--skip-bad-rows): 2 (first: {data}:2:" in printed
    assert f"rows with an unreadable reference, left out: 1 (first: {data}:5:" in printed

    only_unreadable = tmp_path / "unreadable.jsonl"
    only_unreadable.write_text(lines[4] + "\n")
    assert eval_main(["--agent", str(only_unreadable), "--out", str(tmp_path / "r2")]) == 2
    assert "no row can be scored (0 bad, 1 with an unreadable reference)" in capsys.readouterr().err


def test_cli_skip_bad_rows_in_perplexity_data(models, tmp_path, capsys):
    good = SFT_DATA.read_text().splitlines()[:4]
    clean, with_bad = tmp_path / "clean.jsonl", tmp_path / "bad.jsonl"
    clean.write_text("\n".join(good) + "\n")
    with_bad.write_text("\n".join([*good[:2], '{"messages": [}', *good[2:]]) + "\n")  # line 3 is not JSON
    argv = ["--model", f"base={models['base']}", "--seq-length", "256"]
    assert eval_main([*argv, "--perplexity", str(with_bad), "--out", str(tmp_path / "r0")]) == 2
    err = capsys.readouterr().err
    assert f"error: {with_bad}:3: invalid JSON" in err and "(or skip and count such rows with --skip-bad-rows)" in err

    reports = {}
    for name, path in (("clean", clean), ("bad", with_bad)):
        assert eval_main([*argv, "--perplexity", str(path), "--skip-bad-rows", "--out", str(tmp_path / name)]) == 0
        reports[name] = json.loads((tmp_path / name / "report.json").read_text())
    entry = reports["bad"]["data"]["perplexity:base"]
    assert (entry["rows"], entry["scored_rows"], entry["bad_rows"]) == (5, 4, 1)
    assert [e.split(": ")[0] for e in entry["bad_rows_examples"]] == [f"{with_bad}:3"]
    # Skipping the bad row leaves the loss of the others unchanged.
    assert reports["bad"]["results"]["base"]["perplexity"] == reports["clean"]["results"]["base"]["perplexity"]
    assert f"perplexity:base data {with_bad}: 4 of 5 rows scored" in capsys.readouterr().out


def test_bad_input_is_one_error_line_before_any_model_work(models, tmp_path, capsys):
    bad = tmp_path / "agent.jsonl"
    good = json.loads((DATA / "agent_sample.jsonl").read_text().splitlines()[0])
    bad.write_text(json.dumps(good) + "\n" + json.dumps({**good, "tools": []}) + "\n")
    assert eval_main(["--model", str(models["base"]), "--agent", str(bad), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert f"error: {bad}:2: agent rows need a non-empty 'tools' list (or skip and count such rows with --skip" in err
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
