"""Dependencies point one way: kernels <- megatron_swift <- converters, launch."""

import ast
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imported_packages(package: str) -> dict[str, set[str]]:
    """module path -> top-level packages it imports (absolute imports, anywhere in the file)."""
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        tops = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                tops |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = tops
    return found


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [("megatron_swift", {"converters", "launch", "tests", "benchmarks"}),
     ("kernels", {"megatron_swift", "converters", "launch", "tests", "benchmarks"})],  # megatron_swift_kernels
)  # fmt: skip
def test_library_imports_nothing_above_it(package, forbidden):
    offending = {module: tops & forbidden for module, tops in _imported_packages(package).items() if tops & forbidden}
    assert not offending, offending


def test_no_folder_of_the_repo_root_shadows_an_installed_package():
    """`python -m ...` run from the repo root puts it first on sys.path, so a package folder there is imported in
    place of any installed package of the same name. transformers >= 5.25 imports Hugging Face's `kernels`: our
    Triton kernels are the package `megatron_swift_kernels` inside the folder kernels/, not a package `kernels`."""
    installed = importlib.metadata.packages_distributions()
    shadowing = {
        path.name: installed[path.stem]
        for path in ROOT.iterdir()
        if ((path / "__init__.py").exists() or path.suffix == ".py")
        and set(installed.get(path.stem, [])) - {"megatron-swift"}
    }
    assert not shadowing, f"repo-root names that shadow installed distributions: {shadowing}"


def test_transformers_imports_from_the_repo_root():
    """The failure the check above prevents, end to end: transformers' hub-kernels integration imports from here."""
    script = "import transformers.activations, megatron_swift_kernels.select; print('ok')"
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
