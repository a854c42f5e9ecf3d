"""Preference training across layouts, references and resume: DPO full and LoRA at TP2, TP2 + SP, PP2, DP2 against
the single process (3 steps, losses, reward / log-prob metrics, grad norms), packed DPO at TP2 + SP, PP2 and DP2,
SimPO and ORPO at two layouts each, precomputed reference log-probs at one and two processes;
LoRA's adapters-off reference against an explicit frozen copy of the base (`rlhf.ref_model`); a run stopped after
2 steps and resumed equals the straight run; KTO full and LoRA at the same four layouts (its KL term reduced over
the global batch: DP2 equals one process), precomputed at DP2, packed (full and LoRA) at TP2 + SP (packed and
precomputed equals packed and live). Every layout of a world size runs inside one launch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.train_matrix import run_cases

DPO = "examples/data/dpo_sample.jsonl"
# Validation at the last step on 10 pairs: global batches of 4, the last one with 2 fillers.
DATA = {"seq_length": 64, "val_dataset": [f"{DPO}#10"]}
DPO_TRAIN = {"task": "dpo", "lr": 5e-3}
LORA = {"rank": 4, "alpha": 8}
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")
LAYOUTS = {
    "tp2": {"tensor_model_parallel_size": 2},
    "tp2_sp": {"tensor_model_parallel_size": 2, "sequence_parallel": True},
    "pp2": {"pipeline_model_parallel_size": 2},
    "dp2": {},
}


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]


# Packed: whole pairs per row of 256 positions (about 3 pairs a row), global batches of 4 rows.
PACKED = {**DATA, "seq_length": 256, "packing": True}
PRECOMPUTE = {"precompute_ref_logps": True}
KTO = "examples/data/kto_sample.jsonl"
KTO_DATA = {"seq_length": 64, "dataset": [KTO], "val_dataset": [f"{KTO}#10"]}
KTO_PACKED = {**KTO_DATA, "seq_length": 256, "packing": True}  # whole items per row (about 4), validation unpacked
KTO_METRICS = ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


def _kto_case(hf, parallel: dict, lora: dict | None, rlhf: dict | None = None, train: dict | None = None,
              data: dict = KTO_DATA):  # fmt: skip
    return _case(hf, parallel, lora, rlhf={"undesirable_weight": 1.2, **(rlhf or {})},
                 train={"task": "kto", **(train or {})}, data=data)  # fmt: skip


def _assert_same_kto(got: list[dict], expected: list[dict], rel: float, what, steps: int = 3) -> None:
    """KTO's metrics: per-class means are absent when a global batch has no item of the class (as TRL's)."""
    assert len(got) == len(expected) == steps, what
    for step, (a, b) in enumerate(zip(got, expected, strict=True)):
        keys = [key for key in b if key in KTO_METRICS or key.startswith("val_")]
        assert {key for key in a if key in KTO_METRICS or key.startswith("val_")} == set(keys), (what, step)
        assert any(key.startswith("val_") for key in keys) == (step == steps - 1), (what, step)
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=rel, abs=rel), (what, step, key, a[key], b[key])
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (what, step, a["grad_norm"], b["grad_norm"])


def _case(hf, parallel: dict, lora: dict | None, rlhf: dict | None = None, train: dict | None = None,
          checkpoint: dict | None = None, data: dict = DATA):  # fmt: skip
    return (hf, parallel, {**DPO_TRAIN, **(train or {})}, lora, {}, checkpoint, None, data, rlhf)


RM_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def _rm_case(hf, parallel: dict, train: dict | None = None, lora: dict | None = None, checkpoint: dict | None = None,
             data: dict = DATA):  # fmt: skip
    """A reward model (train.task rm) with TRL's reward-centering term. Adam's eps is 1e-4: a reward model's loss
    reads one token per sequence, so many gradients are near zero, and Adam turns their fp32 round-off (which differs
    with TP's summation order) into update differences of lr x round-off / eps. Measured at TP2 against one process:
    step 1 equal within 1e-7 and step 3's rewards 4e-5 apart at eps 1e-8 (8x less at a 10x smaller lr), 2e-6 at
    eps 1e-4. `lora`: LoRA options (the head trains in full next to the adapters)."""
    train = {"task": "rm", "adam_eps": 1e-4, **(train or {})}
    rlhf = {"center_rewards_coefficient": 0.01}
    return _case(hf, parallel, lora, rlhf=rlhf, train=train, checkpoint=checkpoint, data=data)


def _resumed(run_dir: Path) -> dict:
    return {"save": str(run_dir / "ckpt"), "output_dir": str(run_dir)}


def _assert_same(got: list[dict], expected: list[dict], rel: float, what, steps: int = 3,
                 metrics: tuple[str, ...] = METRICS) -> None:  # fmt: skip
    assert len(got) == len(expected) == steps, what
    for step, (a, b) in enumerate(zip(got, expected, strict=True)):
        validation = [key for key in b if key.startswith("val_")]
        assert bool(validation) == (step == steps - 1) and set(validation) <= set(a), (what, step, validation)
        for key in (*metrics, *validation):
            assert a[key] == pytest.approx(b[key], rel=rel, abs=rel), (what, step, key, a[key], b[key])
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (what, step, a["grad_norm"], b["grad_norm"])


@pytest.mark.slow
def test_dpo_layouts_references_and_resume_match_the_single_process(tiny_models, tmp_path):
    llama = tiny_models["llama"]
    single = [
        _case(llama, {}, None),  # 0: full, frozen copy of the initial weights
        _case(llama, {}, LORA),  # 1: LoRA, adapters off
        _case(llama, {}, LORA, rlhf={"ref_model": str(llama)}),  # 2: LoRA, explicit frozen copy of the base
        # 3, 4 (full) and 5, 6 (LoRA): 2 steps saved, then resumed to 3 in the same save directory
        *(
            _case(llama, {}, lora, train=train, checkpoint=_resumed(tmp_path / name))
            for name, lora in (("full", None), ("lora", LORA))
            for train in ({"train_iters": 2}, {})
        ),
    ]
    single.append(_case(llama, {}, None, data=PACKED))  # 7: packed
    single.append(_case(llama, {}, None, rlhf=PRECOMPUTE))  # 8: reference log-probs precomputed
    single += [_kto_case(llama, {}, None), _kto_case(llama, {}, LORA)]  # 9, 10: KTO full, LoRA
    single.append(_kto_case(llama, {}, LORA, rlhf={"ref_model": str(llama)}))  # 11: KTO LoRA, explicit frozen copy
    single.append(_kto_case(llama, {}, None, data=KTO_PACKED))  # 12: KTO packed
    single.append(_kto_case(llama, {}, None, rlhf=PRECOMPUTE, data=KTO_PACKED))  # 13: KTO packed, precomputed
    single.append(_kto_case(llama, {}, LORA, data=KTO_PACKED))  # 14: KTO packed, LoRA
    run_cases(single, DPO, tmp_path / "one", world_size=1)
    one = [_metrics(tmp_path / "one" / f"case{i}") for i in range(3)]
    full, lora = one[0], one[1]
    assert full[-1]["loss"] < full[0]["loss"] and full[-1]["rewards/margins"] > 0  # it learns the preference
    assert lora[-1]["loss"] < lora[0]["loss"]
    # Step 1 of LoRA: lora_B = 0, so the policy is the reference exactly; a tie is not a correct preference (TRL).
    assert lora[0]["rewards/margins"] == 0.0 and lora[0]["rewards/accuracies"] == 0.0
    # LoRA's reference is the base model: adapters off equals a separate frozen copy of the base.
    _assert_same(one[2], lora, 1e-6, "lora: adapters off vs rlhf.ref_model")
    # Resume: the resumed run's step 3 is the straight run's (the reference is re-read, not the trained weights).
    for straight, name in ((full, "full"), (lora, "lora")):
        resumed = _metrics(tmp_path / name)
        assert [r["step"] for r in resumed] == [1, 2, 3], name
        compared = [key for key in straight[-1] if key in METRICS or key.startswith("val_")]
        assert {k: resumed[-1][k] for k in compared} == {k: straight[-1][k] for k in compared}, name

    names = [(train, layout) for train in ("full", "lora") for layout in LAYOUTS]
    cases = [_case(llama, LAYOUTS[layout], LORA if train == "lora" else None) for train, layout in names]
    # SimPO (with its NLL term) and ORPO (NLL over whole sequences): full training at TP2 + SP and PP2 / DP2.
    other = [("simpo", {"cpo_alpha": 0.5}, "tp2_sp"), ("simpo", {"cpo_alpha": 0.5}, "dp2"), ("orpo", {}, "pp2"),
             ("orpo", {}, "dp2")]  # fmt: skip
    cases += [_case(llama, LAYOUTS[layout], None, rlhf=rlhf, train={"task": task}) for task, rlhf, layout in other]
    packed_layouts = ("tp2_sp", "pp2", "dp2")
    cases += [_case(llama, LAYOUTS[layout], None, data=PACKED) for layout in packed_layouts]
    precomputed_layouts = ("pp2", "dp2")
    cases += [_case(llama, LAYOUTS[layout], None, rlhf=PRECOMPUTE) for layout in precomputed_layouts]
    kto_first = len(cases)
    cases += [_kto_case(llama, LAYOUTS[layout], LORA if train == "lora" else None) for train, layout in names]
    cases.append(_kto_case(llama, LAYOUTS["dp2"], None, rlhf=PRECOMPUTE))
    cases += [_kto_case(llama, LAYOUTS["tp2_sp"], lora, data=KTO_PACKED) for lora in (None, LORA)]
    run_cases(cases, DPO, tmp_path / "two", world_size=2)
    for index, (train, layout) in enumerate(names):
        _assert_same(_metrics(tmp_path / "two" / f"case{index}"), full if train == "full" else lora, 1e-5,
                     (train, layout))  # fmt: skip
    singles = {task: _case(llama, {}, None, rlhf=rlhf, train={"task": task}) for task, rlhf, _ in other}
    run_cases(list(singles.values()), DPO, tmp_path / "one_other", world_size=1)
    expected = {task: _metrics(tmp_path / "one_other" / f"case{i}") for i, task in enumerate(singles)}
    for index, (task, _, layout) in enumerate(other, start=len(names)):
        _assert_same(_metrics(tmp_path / "two" / f"case{index}"), expected[task], 1e-5, (task, layout))
    assert expected["orpo"][-1]["loss"] < expected["orpo"][0]["loss"]
    packed = _metrics(tmp_path / "one" / "case7")
    assert packed[-1]["loss"] < packed[0]["loss"]
    for index, layout in enumerate(packed_layouts, start=len(names) + len(other)):
        _assert_same(_metrics(tmp_path / "two" / f"case{index}"), packed, 1e-5, ("packed", layout))
    # Precomputed reference log-probs: the frozen copy's run, at one and two processes.
    precomputed = _metrics(tmp_path / "one" / "case8")
    _assert_same(precomputed, full, 1e-6, "precomputed vs frozen copy")
    for index, layout in enumerate(precomputed_layouts, start=len(names) + len(other) + len(packed_layouts)):
        _assert_same(_metrics(tmp_path / "two" / f"case{index}"), full, 1e-5, ("precomputed", layout))
    # KTO: full and LoRA at every layout, and precomputed at DP2, equal the single process.
    kto = {"full": _metrics(tmp_path / "one" / "case9"), "lora": _metrics(tmp_path / "one" / "case10")}
    assert kto["full"][-1]["loss"] < kto["full"][0]["loss"] and kto["full"][-1]["kl"] > 0
    # KTO's reference (its log-probs and its KL pass) with LoRA: adapters off equals a separate frozen base.
    _assert_same_kto(_metrics(tmp_path / "one" / "case11"), kto["lora"], 1e-6, "kto lora: adapters off vs ref_model")
    for index, (train, layout) in enumerate(names, start=kto_first):
        _assert_same_kto(_metrics(tmp_path / "two" / f"case{index}"), kto[train], 1e-5, ("kto", train, layout))
    _assert_same_kto(_metrics(tmp_path / "two" / f"case{kto_first + len(names)}"), kto["full"], 1e-5, "kto precomputed")
    kto_packed = _metrics(tmp_path / "one" / "case12")
    assert kto_packed[-1]["loss"] < kto_packed[0]["loss"] and max(m["kl"] for m in kto_packed) > 0.1  # KL live
    _assert_same_kto(_metrics(tmp_path / "one" / "case13"), kto_packed, 1e-6, "kto packed: precomputed vs live")
    for offset, (expected, what) in enumerate(((kto_packed, "full"), (_metrics(tmp_path / "one" / "case14"), "lora"))):
        got = _metrics(tmp_path / "two" / f"case{kto_first + len(names) + 1 + offset}")
        _assert_same_kto(got, expected, 1e-5, ("kto packed tp2_sp", what))


def test_dpo_tp2_sp_matches_the_single_process_fast_guard(tiny_models, tmp_path):
    """The default suite's guard: full DPO (frozen-copy reference) at TP2 + SP for 2 steps, one launch per size; the
    same with precomputed reference log-probs in the single process; full KTO at DP2 (its KL term over the global
    batch) for 3 steps (the third's KL term is above the clamp's zero); a reward model at TP2 + SP for 2 steps."""
    llama, two_steps = tiny_models["llama"], {"train_iters": 2}
    single = [_case(llama, {}, None, train=two_steps), _case(llama, {}, None, rlhf=PRECOMPUTE, train=two_steps),
              _kto_case(llama, {}, None), _rm_case(llama, {}, two_steps)]  # fmt: skip
    run_cases(single, DPO, tmp_path / "one", world_size=1)
    _assert_same(_metrics(tmp_path / "one" / "case1"), _metrics(tmp_path / "one" / "case0"), 1e-6, "precomputed", 2)
    two = [
        _case(llama, LAYOUTS["tp2_sp"], None, train=two_steps),
        _kto_case(llama, LAYOUTS["dp2"], None),
        _rm_case(llama, LAYOUTS["tp2_sp"], two_steps),
    ]
    run_cases(two, DPO, tmp_path / "two", world_size=2)
    expected, got = _metrics(tmp_path / "one" / "case0"), _metrics(tmp_path / "two" / "case0")
    assert len(got) == len(expected) == 2 and expected[-1]["rewards/margins"] != 0
    for a, b in zip(got, expected, strict=True):
        assert all(a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-5) for key in METRICS), (a, b)
    kto = _metrics(tmp_path / "one" / "case2")
    assert kto[-1]["kl"] > 0.1 and kto[-1]["val_kl"] > 0.1  # the policy has moved: the KL term is live
    _assert_same_kto(_metrics(tmp_path / "two" / "case1"), kto, 1e-5, "kto dp2")
    # A reward model (its head initialised from train.seed, hidden states gathered over SP) at TP2 + SP.
    rm = _metrics(tmp_path / "one" / "case3")
    assert rm[-1]["rewards/margins"] != rm[0]["rewards/margins"]
    _assert_same(_metrics(tmp_path / "two" / "case2"), rm, 1e-5, "rm tp2_sp", 2, RM_METRICS)
