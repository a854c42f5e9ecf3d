"""EvalScope's packaged ToolBench-Static scorer, loaded for cross-checking ours; tests only, nothing is installed.

The pinned evalscope wheel is fetched once with `pip download --no-deps` into
$MSWIFT_TEST_REFS (default ~/.cache/megatron-swift-test-refs) and checked against a pinned sha256.
Only three files are taken out of it and loaded by path:

- `evalscope/benchmarks/tool_bench/utils.py`: `calculate_metrics` (one step) and the parsing it uses;
- `evalscope/metrics/utils/rouge.py`: `compute_rouge_score_one_sample`, the Rouge-L it calls;
- `evalscope/metrics/utils/bundled_rouge_score/rouge_scorer.py`: the LCS scorer behind that.

Their third-party imports (rouge-score, nltk, absl-py, six, jieba, rouge-chinese) come from the
`dev` extra. Stubbed, only while the files load: the evalscope-internal imports the scoring code
does not use — `get_logger` (log messages) and `check_nltk_data` (called only when no tokenizer is
given; rouge.py always passes one) — and the package names on the import paths.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
import types
import zipfile
from functools import cache
from pathlib import Path
from unittest import mock

import pytest

VERSION = "1.14.1"
WHEEL = f"evalscope-{VERSION}-py3-none-any.whl"
SHA256 = "ae4bb15908862d6ae22c9ffe2af3c11e8f446a0ea798912870178f4347ef90c4"
MODULES = {  # module name as evalscope imports it -> path inside the wheel
    "evalscope.metrics.utils.bundled_rouge_score.rouge_scorer": (
        "evalscope/metrics/utils/bundled_rouge_score/rouge_scorer.py"
    ),
    "evalscope.metrics.utils.rouge": "evalscope/metrics/utils/rouge.py",
    "evalscope.benchmarks.tool_bench.utils": "evalscope/benchmarks/tool_bench/utils.py",
}
# pip's words when it reached no index at all (as opposed to a wrong pin or checksum, which must fail).
_OFFLINE = ("(from versions: none)", "NewConnectionError", "Temporary failure in name resolution", "unreachable")


def _cache_dir() -> Path:
    return Path(os.environ.get("MSWIFT_TEST_REFS", Path.home() / ".cache" / "megatron-swift-test-refs"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _wheel() -> Path:
    """The pinned wheel, downloaded on first use; skips the calling test only when no index can be reached."""
    wheel = _cache_dir() / WHEEL
    if not wheel.is_file():
        _cache_dir().mkdir(parents=True, exist_ok=True)
        # Downloaded aside, then renamed into place: a parallel run never sees half a file.
        with tempfile.TemporaryDirectory(dir=_cache_dir()) as staging:
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", staging]
            done = subprocess.run([*command, f"evalscope=={VERSION}"], capture_output=True, text=True)
            if done.returncode != 0:
                output = done.stdout + done.stderr
                if any(words in output for words in _OFFLINE):
                    pytest.skip(f"evalscope=={VERSION} is not in {_cache_dir()} and PyPI cannot be reached (offline)")
                raise RuntimeError(f"pip download evalscope=={VERSION} failed:\n{output[-2000:]}")
            (Path(staging) / WHEEL).replace(wheel)
    if _sha256(wheel) != SHA256:
        raise RuntimeError(f"{wheel}: sha256 {_sha256(wheel)} is not the pinned {SHA256}; delete the file and rerun")
    return wheel


def _stub(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = []  # a package, so that `from evalscope.x import y` can resolve submodules
    module.__dict__.update(attributes)
    return module


@cache
def toolbench_scorer() -> types.ModuleType:
    """`evalscope.benchmarks.tool_bench.utils` of the pinned release (call `calculate_metrics` on it)."""
    root = _cache_dir() / f"evalscope-{VERSION}"
    with zipfile.ZipFile(_wheel()) as archive:
        for member in MODULES.values():
            archive.extract(member, root)

    def get_logger(*_args, **_kwargs):
        return logging.getLogger("evalscope-reference")

    def check_nltk_data(*_args, **_kwargs):
        raise AssertionError("the ToolBench scorer always passes a tokenizer; check_nltk_data must not run")

    packages = ("evalscope", "evalscope.metrics.utils", "evalscope.metrics.utils.bundled_rouge_score")
    stubs = {name: _stub(name) for name in (*packages, "evalscope.benchmarks", "evalscope.benchmarks.tool_bench")}
    stubs["evalscope.utils"] = _stub("evalscope.utils", get_logger=get_logger)
    stubs["evalscope.utils.logger"] = _stub("evalscope.utils.logger", get_logger=get_logger)
    stubs["evalscope.utils.resource_utils"] = _stub("evalscope.utils.resource_utils", check_nltk_data=check_nltk_data)
    stubs["evalscope.metrics"] = metrics = _stub("evalscope.metrics")
    loaded = {}
    # Only while loading: nothing named evalscope stays in sys.modules (the modules keep what they imported).
    with mock.patch.dict(sys.modules, stubs):
        for name, member in MODULES.items():
            spec = importlib.util.spec_from_file_location(name, root / member)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = loaded[name] = module
            spec.loader.exec_module(module)
            if name == "evalscope.metrics.utils.rouge":  # what `from evalscope.metrics import ...` finds
                metrics.compute_rouge_score_one_sample = module.compute_rouge_score_one_sample
    return loaded["evalscope.benchmarks.tool_bench.utils"]
