"""The device bundle (tests/gpu/bundle.sh) and the budgeted runner (tests/gpu/run_all.sh).

Default suite: the bundle covers every requirement the GPU image lacks, and run_all.sh's summary keeps
every check, in priority order, with every figure. `pytest -m slow` (needs PyPI; caches venvs and
wheels in ~/.cache/megatron-swift-test-refs/gpu-bundle): the bundle is under 64 MiB with the repo,
installs with no network into a Python 3.12 venv, and the printed command runs every GPU script's
--smoke mode, offline, in a stand-in for the image. The stand-in cannot be the image's Python 3.12 +
torch 2.11: no CPU build of torch for Python 3.12 can be had here (PyPI's x86-64 torch wheels are CUDA
builds; the PyTorch CPU index is not reachable), so it is this suite's Python with the image's versions
of everything else the package uses, torch and numpy excepted (stand_in_substitutes), and the bundle
fetched for that Python.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
GPU = REPO / "tests" / "gpu"
CACHE = Path.home() / ".cache" / "megatron-swift-test-refs" / "gpu-bundle"
LIMIT = 64 * 2**20
CHECKS = ["conversion", "train", "lora", "kernels", "moe", "post_training"]  # the priority order
# Not carried to the device (far over 64 MiB): the checks run without them.
NOT_BUNDLED = {"transformer-engine", "vllm"}


def image_packages() -> dict[str, str | None]:
    """name -> version seen on the GPU image (None where no version was read)."""
    found = {}
    for line in (GPU / "image-packages.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.strip().partition("==")
            found[canonicalize_name(name)] = version or None
    return found


def bundle_pins() -> dict[str, str]:
    """name -> version of the WHEELS list in bundle.sh."""
    block = re.search(r"^WHEELS=\((.*?)^\)", (GPU / "bundle.sh").read_text(), re.S | re.M).group(1)
    pins = re.findall(r"^\s*([A-Za-z0-9_.-]+)==(\S+)", block, re.M)
    return {canonicalize_name(name): version for name, version in pins}


def setup_requirements() -> tuple[list[Requirement], dict[str, list[Requirement]]]:
    """setup.py's install_requires and extras_require, read without running it."""
    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "setup")
    keywords = {
        k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")
    }
    extras = {name: [Requirement(r) for r in reqs] for name, reqs in keywords["extras_require"].items()}
    return [Requirement(r) for r in keywords["install_requires"]], extras


def test_bundle_carries_every_requirement_the_image_lacks():
    image, bundled = image_packages(), bundle_pins()
    required, extras = setup_requirements()
    # post_training_gpu.py quantizes to int8 (the quant extra); triton (gpu extra) compiles kernels/.
    needed = required + extras["quant"] + [r for r in extras["gpu"] if canonicalize_name(r.name) not in NOT_BUNDLED]
    missing = [str(r) for r in needed if canonicalize_name(r.name) not in image.keys() | bundled.keys()]
    assert not missing, f"neither on the GPU image nor in tests/gpu/bundle.sh: {missing}"
    # Where a version is known (every bundled one, some of the image's), it is in setup.py's range.
    versions = {**image, **bundled}
    known = [(r, versions[canonicalize_name(r.name)]) for r in needed]
    unmet = [f"{r}: {version}" for r, version in known if version and not r.specifier.contains(version)]
    assert not unmet, unmet
    redundant = sorted(bundled.keys() & image.keys())
    assert not redundant, f"bundled but already on the image (two versions stop the install there): {redundant}"


def run_all(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict, str]:
    env = {**os.environ, "PYTHON": sys.executable}
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(GPU / "run_all.sh"), "--out", str(out), *args], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    return done, json.loads((out / "summary.json").read_text()), (out / "summary.md").read_text()


def test_run_all_lists_every_check_in_order_when_the_budget_is_spent(tmp_path):
    done, summary, text = run_all(tmp_path, "--budget", "0")
    assert done.returncode == 1, done.stderr
    assert [c["name"] for c in summary["checks"]] == CHECKS
    assert {c["status"] for c in summary["checks"]} == {"skipped"} and not summary["all_passed"]
    assert all(f"| {name} | skipped |" in text for name in CHECKS)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["checks.log", "summary.json", "summary.md"]


def test_summary_keeps_every_figure_and_the_failures_log(tmp_path):
    parts = tmp_path / "parts"
    (parts / "train").mkdir(parents=True)
    result = {"device": "NVIDIA H200", "runs": [{"variant": "bf16", "step_s": 0.4321, "mfu": 0.5123, "fusions": ["a"]}],
              "int8": {"size_ratio": 0.3889, "results": {"int8": {"perplexity": 28.16}}}}  # fmt: skip
    (parts / "train" / "gpu_train.json").write_text(json.dumps(result))
    (parts / "lora.log").write_text("".join(f"line {i}\n" for i in range(40)) + "SystemExit: LoRA logits differ\n")
    (parts / "status.tsv").write_text("train\ttrain_gpu.py\tpassed\t0\t42\t150\nlora\tlora_gpu.py\tfailed\t1\t7\t60\n")
    done = subprocess.run([sys.executable, str(GPU / "summary.py"), str(parts), str(tmp_path / "dest"),
                           "--budget", "480", "--elapsed", "49"], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 1  # one check failed
    summary = json.loads((tmp_path / "dest" / "summary.json").read_text())
    assert summary["checks"][0]["result"] == result and summary["checks"][0]["seconds"] == 42
    assert summary["checks"][1]["log_tail"][-1] == "SystemExit: LoRA logits differ"
    text = (tmp_path / "dest" / "summary.md").read_text()
    for figure in ("| bf16 | 0.4321 | 0.5123 | [a] |", "int8.size_ratio: 0.3889", "int8.results.int8.perplexity: 28.16",
                   "| lora | failed | 7 | 60 |", "SystemExit: LoRA logits differ"):  # fmt: skip
        assert figure in text, figure


# ---- slow (pytest -m slow): a timeout, then downloads, offline installs and the smoke modes ----


@pytest.mark.slow
def test_run_all_moves_on_after_a_failure_and_a_timeout(tmp_path):
    """A stand-in interpreter: the conversion check fails at once, the training check never ends (it is stopped
    when the 20 s budget runs out), and the rest find no budget left; the summary still comes from summary.py."""
    fake = tmp_path / "python"
    fake.write_text(f"""#!/bin/sh
case "$1" in
    *summary.py) exec {sys.executable} "$@" ;;
    *check_gpu.py) echo "conversion broke" >&2; exit 3 ;;
    *train_gpu.py) exec sleep 600 ;;
    *) exit 0 ;;
esac
""")
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": str(fake)}
    done = subprocess.run(["bash", str(GPU / "run_all.sh"), "--out", str(out), "--budget", "20"], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    statuses = [(c["name"], c["status"], c["exit_code"]) for c in summary["checks"]]
    assert done.returncode == 1
    assert statuses[:2] == [("conversion", "failed", 3), ("train", "timed_out", 124)], statuses
    assert [s for _, s, _ in statuses[2:]] == ["skipped"] * 4, statuses
    assert summary["checks"][0]["log_tail"] == ["conversion broke"]
    assert 18 <= summary["checks"][1]["seconds"] <= 22 and summary["checks"][1]["cap_seconds"] == 20


def clean_env(**extra: str) -> dict[str, str]:
    """This machine's environment without its pip settings (local mirrors) or Python paths: the device has neither."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "PIP_CONFIG_FILE": os.devnull, **extra}


def offline(command: list[str]) -> list[str]:
    """`command` in a network namespace of its own (loopback only, for gloo): proof that it needs no network."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-n", "true"]).returncode != 0:
        pytest.fail("unshare -n is not usable here (needs root): cannot show the install is offline")
    return ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', *command]


def make_bundle(python_version: str) -> tuple[Path, str]:
    """bundle.sh's wheels for `python_version` (downloaded anew each run) and the command it printed."""
    folder = CACHE / f"wheels-py{python_version}"
    env = {**os.environ, "BUNDLE_PYTHON": python_version}
    done = subprocess.run(["bash", str(GPU / "bundle.sh"), str(folder)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    command = done.stdout.strip().splitlines()[-1]
    assert command.startswith("python3 -m pip install") and "--no-index --no-deps" in command, command
    return folder, command


def venv(path: Path, python: str, requirements: list[str]) -> Path:
    """A venv at `path` holding `requirements`, built once (a finished build leaves a marker)."""
    marker = path / "ready"
    if not marker.exists():
        shutil.rmtree(path, ignore_errors=True)
        subprocess.run([python, "-m", "venv", str(path)], check=True)
        if requirements:
            subprocess.run([str(path / "bin" / "python"), "-m", "pip", "install", "-q", *requirements], check=True,
                           timeout=1800)  # fmt: skip
        marker.write_text("\n".join(requirements) + "\n")
    return path / "bin" / "python"


def python312() -> str:
    """A Python 3.12 that runs (a pyenv shim on PATH may not, when 3.12 is not the selected version)."""
    candidates = [shutil.which("python3.12"), *map(str, Path.home().glob(".pyenv/versions/3.12*/bin/python3.12"))]
    for python in filter(None, candidates):
        if subprocess.run([python, "-c", "pass"], capture_output=True).returncode == 0:
            return python
    pytest.fail(f"no working Python 3.12 to install the bundle with (tried {candidates})")


def wheel_requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(archive.read(name).decode())
    return [Requirement(r) for r in metadata.get_all("Requires-Dist") or []]


@pytest.mark.slow
def test_bundle_fits_and_installs_offline_on_python_312(tmp_path):
    folder, command = make_bundle("3.12")
    wheels = sorted(folder.glob("*.whl"))
    assert {canonicalize_name(w.name.split("-")[0]) for w in wheels} == bundle_pins().keys()
    repo = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                          capture_output=True, check=True).stdout.decode().split("\0")  # fmt: skip
    total = sum(w.stat().st_size for w in wheels) + sum((REPO / f).stat().st_size for f in repo if f)
    assert total < LIMIT, f"bundle + repo = {total / 2**20:.1f} MiB"

    # Every requirement of a bundled wheel, as the device's Python 3.12 on Linux x86-64 reads it, is met there.
    have = image_packages().keys() | bundle_pins().keys()
    target_env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
                  "platform_system": "Linux", "platform_machine": "x86_64", "extra": ""}  # fmt: skip
    needs = [
        (w.name, r) for w in wheels for r in wheel_requirements(w) if r.marker is None or r.marker.evaluate(target_env)
    ]
    unmet = [f"{wheel}: {r}" for wheel, r in needs if canonicalize_name(r.name) not in have]
    assert not unmet, unmet

    python = venv(CACHE / "py312-empty", python312(), [])
    site = tmp_path / "site"
    install = command.split(" && ")[0].replace("python3 ", f"{python} ", 1).replace("/tmp/site", str(site))
    done = subprocess.run(offline(["bash", "-c", install]), cwd=REPO, env=clean_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    # The compiled part of megatron-core (cp312) loads in Python 3.12 (the rest needs torch, absent here).
    extension = next(site.glob("megatron/core/datasets/helpers_cpp.cpython-312-*.so"))
    load = (
        "import importlib.util, sys; s = importlib.util.spec_from_file_location('helpers_cpp', sys.argv[1]); "
        "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); print(m.build_sample_idx_int32)"
    )
    loaded = subprocess.run([str(python), "-c", load, str(extension)], capture_output=True, text=True)
    assert loaded.returncode == 0 and "built-in method" in loaded.stdout, loaded.stderr


def stand_in_substitutes() -> dict[str, str]:
    """The image's packages that cannot be had here at the image's version: what stands in for each, and why."""
    return {
        # No CPU build of torch 2.11 can be had here: the suite's own CPU torch.
        "torch": re.search(r"^torch==\S+", (REPO / "requirements-cpu.txt").read_text(), re.M).group(0),
        # The image's numpy 2.5 needs Python >= 3.12; and with numpy >= 2.4 the Triton 3.6 interpreter, which only
        # --smoke uses (the GPU compiles the kernels), fails ("only 0-dimensional arrays can be converted to
        # Python scalars"): the image's own numpy would fail kernels_gpu.py --smoke.
        "numpy": "numpy<2.4",
    }


def stand_in_requirements() -> list[str]:
    """The image's versions of what the package needs from the image, with stand_in_substitutes() applied."""
    image, substitutes = image_packages(), stand_in_substitutes()
    required, extras = setup_requirements()
    names = {canonicalize_name(r.name) for r in required + extras["gpu"]} & image.keys()
    return sorted(substitutes.get(name) or (f"{name}=={image[name]}" if image[name] else name) for name in names)


@pytest.mark.slow
def test_smoke_modes_pass_offline_in_a_stand_in_for_the_image(tmp_path):
    requirements = stand_in_requirements()
    key = hashlib.sha256("\n".join([sys.version, *requirements]).encode()).hexdigest()[:12]
    python = venv(CACHE / f"stand-in-{key}", sys.executable, requirements)
    # pip also brought what those packages need; anything the image does not list goes, so that a
    # dependency the image lacks fails here instead of on the GPU machine.
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=json"], capture_output=True, check=True)
    extra = sorted(p["name"] for p in json.loads(listed.stdout) if canonicalize_name(p["name"]) not in image_packages())
    if extra:
        subprocess.run([str(python), "-m", "pip", "uninstall", "-q", "-y", *extra], check=True)

    _, command = make_bundle(f"{sys.version_info.major}.{sys.version_info.minor}")
    command = command.replace("/tmp/site", str(tmp_path / "site")) + " --smoke"
    env = clean_env(PATH=f"{python.parent}:{os.environ['PATH']}", OUT=str(tmp_path / "out"))
    done = subprocess.run(offline(["bash", "-c", command]), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1200)  # fmt: skip
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    failed = {c["name"]: c.get("log_tail") for c in summary["checks"] if c["status"] != "passed"}
    assert done.returncode == 0 and not failed, failed or done.stdout[-3000:]
    assert summary["smoke"] and [c["name"] for c in summary["checks"]] == CHECKS
    image = image_packages()
    for name in ("transformers", "triton", "tokenizers", "safetensors"):
        assert summary["packages"][name] == image[name], (name, summary["packages"][name])
    assert summary["packages"]["megatron-core"] == bundle_pins()["megatron-core"]
    print(
        f"stand-in {requirements}, less {extra} (not on the image): smoke runs (s): "
        f"{ {c['name']: c['seconds'] for c in summary['checks']} }"
    )
