"""`mswift-eval --qa` on rows with images, against HF's own generate called directly with the processor.

The rows are the vision training tests' (tests/vlm_data.py: images of four sizes, a row with two images, two
text-only rows), in the `messages` form and the `question` form. The reference renders each row alone with the
processor's chat template (content parts written out here), encodes it with the processor, and calls
`Qwen2_5_VLForConditionalGeneration.generate` greedily; the CLI's batched, left-padded predictions must be the
same texts, and its accuracy the count of rows whose answer was set to the reference's prediction. Bad input (a
text model given image rows, a missing or corrupt image, a tag without an image) is one file:line error before
any model work.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import megatron_swift._optional as optional
from megatron_swift.eval.__main__ import main as eval_main
from tests.vlm_data import hf_predictions

MAX_NEW_TOKENS = 6


@pytest.fixture(scope="module")
def reference(tiny_models, vlm_sft_data) -> tuple[Path, list[dict], list[str]]:
    rows = [json.loads(line) for line in vlm_sft_data.read_text().splitlines()]
    return (
        tiny_models["qwen2_5_vl"],
        rows,
        hf_predictions(tiny_models["qwen2_5_vl"], rows, vlm_sft_data.parent, MAX_NEW_TOKENS),
    )


def test_image_rows_are_generated_as_hf_generate_and_scored(reference, vlm_sft_data, tmp_path):
    model_dir, rows, expected = reference
    assert any(len(row.get("images", [])) == 2 for row in rows) and any("images" not in row for row in rows)
    assert len(set(expected)) > 1  # the random model says different things for different images
    # Rows 0, 2, 3 and 6 get the reference's prediction as their answer, the others a wrong one; the first two
    # rows in the `question` form.
    right = {0, 2, 3, 6}
    lines = []
    for i, (row, prediction) in enumerate(zip(rows, expected, strict=True)):
        answer = prediction if i in right else prediction + " not"
        qa = {"messages": [*row["messages"][:-1], {"role": "assistant", "content": answer}]}
        if i < 2:
            qa = {"question": row["messages"][0]["content"], "answer": answer}
        lines.append(json.dumps(qa | ({"images": row["images"]} if "images" in row else {})))
    qa_file = vlm_sft_data.parent / "qa_images.jsonl"  # beside the images: paths resolve against the file
    qa_file.write_text("\n".join(lines) + "\n")
    out = tmp_path / "report"
    argv = ["--model", f"vlm={model_dir}", "--qa", str(qa_file), "--max-new-tokens", str(MAX_NEW_TOKENS)]
    assert eval_main([*argv, "--batch-size", "3", "--out", str(out)]) == 0
    saved = (out / "predictions-vlm-qa.jsonl").read_text().splitlines()
    predictions = [json.loads(line)["prediction"] for line in saved]
    assert predictions == expected
    qa = json.loads((out / "report.json").read_text())["results"]["vlm"]["qa"]
    assert qa == {"rows": 8, "exact_match": len(right) / 8, "normalized_match": len(right) / 8}


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _row(images: list[str], content: str = "<image>What colour is the shape?") -> dict:
    return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "red"}],
            "images": images}  # fmt: skip


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("text_model", r"qa\.jsonl:2: the row has images but .*llama has no image processor"),
        ("missing", r"qa\.jsonl:2: images\[0\]: no such file gone\.png"),
        ("corrupt", r"qa\.jsonl:2: images\[0\] \(.*broken\.png\) is not a readable image"),
        ("tags", r"qa\.jsonl:2: 2 <image> tag\(s\) in the messages but 1 images"),
        ("vllm", r"qa\.jsonl:2: rows with images are generated with --backend hf only"),
    ],
)
def test_bad_image_rows_are_one_file_line_error(tiny_models, vlm_sft_data, tmp_path, capsys, monkeypatch,
                                                case, message):  # fmt: skip
    import megatron_swift.eval.suite as suite

    def no_model_work(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(suite, "load_model", no_model_work)
    monkeypatch.setattr(optional, "vllm_unavailable_reason", lambda: None)  # as on a GPU machine with vLLM
    image = str(vlm_sft_data.parent / "image0_0.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    second = {"text_model": _row([image]), "vllm": _row([image]), "missing": _row(["gone.png"]),
              "corrupt": _row(["broken.png"]), "tags": _row([image], "<image><image>What colour?")}[case]  # fmt: skip
    qa = _write(tmp_path / "qa.jsonl", [{"question": "Say hi.", "answer": "hi"}, second])
    model = tiny_models["llama" if case == "text_model" else "qwen2_5_vl"]
    backend = ["--backend", "vllm"] if case == "vllm" else []
    assert eval_main(["--model", str(model), "--qa", str(qa), *backend, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
