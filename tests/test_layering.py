"""Dependencies point one way: kernels <- megatron_swift <- converters, launch."""

import ast
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
     ("kernels", {"megatron_swift", "converters", "launch", "tests", "benchmarks"})],
)  # fmt: skip
def test_library_imports_nothing_above_it(package, forbidden):
    offending = {module: tops & forbidden for module, tops in _imported_packages(package).items() if tops & forbidden}
    assert not offending, offending
