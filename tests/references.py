"""Real chat templates and vocabularies for the template tests, taken from two public packages at test time.

Nothing of them is copied into this tree: `pip download --no-deps` fetches two pinned artifacts, their
sha256 is checked, and the few files the tests read are extracted into CACHE once (later runs read the
cache; the GGUF and tekken vocabularies are converted to `tokenizer.json` once by transformers' own
converters). Without the package registry the tests skip and say so; under CI they fail instead.

- llama-cpp-python sdist: llama.cpp's `models/templates/*.jinja` (templates saved from the models'
  tokenizer_config.json), `models/ggml-vocab-*.gguf` (vocabularies, with llama.cpp's tokenization test
  vectors `.inp`/`.out`, checked here against the converted tokenizer), `tests/test-chat-template.cpp`
  (OpenHermes-2.5's ChatML and Mistral-7B-Instruct-v0.2's templates, quoted there) and `llama_cpp/llama_chat_format.py`
  (Meta-Llama-3-Instruct's template).
- mistral-common wheel: Mistral's own tokenizer files (`tokenizer.model.v1`: Mistral-7B's sentencepiece
  vocabulary; `tekken_240718.json`: Mistral-Nemo's, whose control tokens mistral-common lists in code).
"""

from __future__ import annotations

import ast
import copy
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

CACHE = Path(os.environ.get("MSWIFT_TEST_REFS", Path.home() / ".cache" / "megatron-swift-test-refs"))
LLAMA_CPP = ("llama-cpp-python", "0.3.36", "llama_cpp_python-0.3.36.tar.gz",
             "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e")  # fmt: skip
MISTRAL_COMMON = ("mistral-common", "1.13.1", "mistral_common-1.13.1-py3-none-any.whl",
                  "98b4d0755b8d90bf4691fa8f1b70cb3b4a8cd4dc1653c4ed08ef3d1c7d2c29af")  # fmt: skip
LLAMA_CPP_FILES = {  # cache name -> path inside the sdist (below its top folder)
    "qwen2.5.jinja": "vendor/llama.cpp/models/templates/Qwen-Qwen2.5-7B-Instruct.jinja",
    "llama3.1.jinja": "vendor/llama.cpp/models/templates/meta-llama-Llama-3.1-8B-Instruct.jinja",
    "hermes3.jinja": "vendor/llama.cpp/models/templates/NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja",
    "mistral-nemo.jinja": "vendor/llama.cpp/models/templates/mistralai-Mistral-Nemo-Instruct-2407.jinja",
    "test-chat-template.cpp": "vendor/llama.cpp/tests/test-chat-template.cpp",
    "llama_chat_format.py": "llama_cpp/llama_chat_format.py",
    **{f"ggml-vocab-{v}.gguf{ext}": f"vendor/llama.cpp/models/ggml-vocab-{v}.gguf{ext}"
       for v in ("qwen2", "llama-bpe") for ext in ("", ".inp", ".out")},
}  # fmt: skip
MISTRAL_COMMON_FILES = {
    "tokenizer.model.v1": "mistral_common/data/tokenizer.model.v1",
    "tekken_240718.json": "mistral_common/data/tekken_240718.json",
    "tekken.py": "mistral_common/tokens/tokenizers/tekken.py",
    "base.py": "mistral_common/tokens/tokenizers/base.py",
}


@dataclass(frozen=True)
class Reference:
    """A real model's chat template on the model's real vocabulary."""

    template: str  # how to get the template text (see _template)
    vocab: str  # qwen2 / llama-bpe (GGUF), mistral-spm (tokenizer.model.v1), tekken (Nemo)
    bos: str | None
    eos: str
    extra_special: tuple[str, ...] = ()  # tokens the model added to its base vocabulary


REFERENCES = {
    "Qwen2.5-7B-Instruct": Reference("file:qwen2.5.jinja", "qwen2", None, "<|im_end|>"),
    # plain ChatML; OpenHermes-2.5 is Mistral's vocabulary plus the two ChatML tokens, which Qwen2's has too
    "OpenHermes-2.5-Mistral-7B": Reference("cpp:teknium/OpenHermes-2.5-Mistral-7B", "qwen2", None, "<|im_end|>"),
    "Meta-Llama-3-8B-Instruct": Reference("py:LLAMA3_INSTRUCT_CHAT_TEMPLATE", "llama-bpe", "<|begin_of_text|>",
                                          "<|eot_id|>"),
    "Llama-3.1-8B-Instruct": Reference("file:llama3.1.jinja", "llama-bpe", "<|begin_of_text|>", "<|eot_id|>"),
    # Hermes 3 is Llama-3.1 with <|im_start|> / <|im_end|> added as special tokens.
    "Hermes-3-Llama-3.1-8B (tool_use)": Reference("file:hermes3.jinja", "llama-bpe", "<|begin_of_text|>",
                                                  "<|im_end|>", ("<|im_start|>", "<|im_end|>")),
    # llama.cpp's test names for the two templates Mistral-7B-Instruct-v0.2 shipped (first without, then
    # with system prompt support).
    "Mistral-7B-Instruct-v0.2 (old)": Reference("cpp:Old pre-v1 without a system prompt", "mistral-spm", "<s>",
                                                "</s>"),
    "Mistral-7B-Instruct-v0.2": Reference("cpp:'v1' template with a system prompt", "mistral-spm", "<s>", "</s>"),
    "Mistral-Nemo-Instruct-2407": Reference("file:mistral-nemo.jinja", "tekken", "<s>", "</s>"),
}  # fmt: skip


def _unavailable(why: str):
    if os.environ.get("CI"):  # CI reaches the registry: a failure there is a failure, not a skip
        pytest.fail(f"reference packages: {why}")
    pytest.skip(f"reference packages unavailable ({why}); these tests need the Python package registry")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch(package: tuple[str, str, str, str], files: dict[str, str]) -> Path:
    """The package's needed files, extracted into CACHE/<package>-<version>/ (downloaded on first use)."""
    name, version, artifact, sha256 = package
    folder = CACHE / f"{name}-{version}"
    if all((folder / f).exists() for f in files):
        return folder
    with tempfile.TemporaryDirectory() as tmp:
        binary = ["--no-binary", ":all:"] if artifact.endswith(".tar.gz") else ["--only-binary", ":all:"]
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", *binary, "-d", tmp,
                               f"{name}=={version}"], capture_output=True, text=True, timeout=600)  # fmt: skip
        path = Path(tmp) / artifact
        if done.returncode or not path.exists():
            _unavailable(f"pip download {name}=={version} failed: {(done.stderr.strip() or '?').splitlines()[-1]}")
        if _sha256(path) != sha256:  # the pinned artifact changed: never test against something unreviewed
            pytest.fail(f"{artifact}: sha256 {_sha256(path)} is not the pinned {sha256}")
        CACHE.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=CACHE))
        if artifact.endswith(".tar.gz"):
            top = artifact.removesuffix(".tar.gz")
            with tarfile.open(path) as archive:
                for local, inside in files.items():
                    with archive.extractfile(f"{top}/{inside}") as src, (staging / local).open("wb") as dst:
                        shutil.copyfileobj(src, dst)
        else:
            with zipfile.ZipFile(path) as archive:
                for local, inside in files.items():
                    (staging / local).write_bytes(archive.read(inside))
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)  # atomic: a crash never leaves half a cache
    return folder


def _cpp_template(source: str, name_part: str) -> str:
    """The template_str of the test case in llama.cpp's test-chat-template.cpp whose name contains `name_part`."""
    match = re.search(r'/\* \.name= \*/ "[^"]*' + re.escape(name_part) + r'[^"]*",\s*'
                      r'/\* \.template_str= \*/ (?:u8)?"((?:[^"\\]|\\.)*)"', source)  # fmt: skip
    assert match, f"no test case named like {name_part!r} in test-chat-template.cpp"
    # C string escapes are Python's for these ASCII templates
    return match.group(1).encode().decode("unicode_escape")


def _py_constant(source: str, name: str) -> str:
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == name:
            return ast.literal_eval(node.value)
    raise AssertionError(f"no constant {name} in llama_chat_format.py")


def _template(spec: str) -> str:
    kind, _, what = spec.partition(":")
    folder = _fetch(LLAMA_CPP, LLAMA_CPP_FILES)
    if kind == "file":
        return (folder / what).read_text()
    if kind == "cpp":
        return _cpp_template((folder / "test-chat-template.cpp").read_text(), what)
    return _py_constant((folder / "llama_chat_format.py").read_text(), what)


def _tekken_specials(base_py: str, tekken_py: str) -> list[dict]:
    """mistral-common's control tokens of the old tekken files (kept in its code, not in the JSON)."""
    names = {}
    for node in ast.walk(ast.parse(base_py)):
        if isinstance(node, ast.ClassDef) and node.name == "SpecialTokens":
            names = {s.targets[0].id: s.value.value for s in node.body
                     if isinstance(s, ast.Assign) and isinstance(s.value, ast.Constant)}  # fmt: skip
    for node in ast.walk(ast.parse(tekken_py)):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "DEPRECATED_SPECIAL_TOKENS":
            calls = [{k.arg: k.value for k in call.keywords} for call in node.value.elts]
            return [{"rank": c["rank"].value, "token_str": names[c["token_str"].attr], "is_control": True}
                    for c in calls]  # fmt: skip
    raise AssertionError("no DEPRECATED_SPECIAL_TOKENS in mistral-common's tekken.py")


def _llama_cpp_vectors(folder: Path, vocab: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's tokenizer test vectors for a GGUF vocabulary (tests/test-tokenizer-0.cpp reads them so)."""
    texts = (folder / f"ggml-vocab-{vocab}.gguf.inp").read_text().split("\n__ggml_vocab_test__\n")
    ids = (folder / f"ggml-vocab-{vocab}.gguf.out").read_text().splitlines()
    texts = texts[:-1] if texts[-1] == "" else texts
    assert len(texts) == len(ids), vocab
    return [(t, [int(i) for i in line.split()]) for t, line in zip(texts, ids, strict=True)]


def _convert(vocab: str, target: Path) -> None:
    """Convert one vocabulary to a tokenizer.json with transformers' converters (done once, then cached)."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, LlamaTokenizer

    if vocab in ("qwen2", "llama-bpe"):
        folder = _fetch(LLAMA_CPP, LLAMA_CPP_FILES)
        converted = AutoTokenizer.from_pretrained(folder, gguf_file=f"ggml-vocab-{vocab}.gguf").backend_tokenizer
        # llama.cpp's test vectors were made with the models' own HF tokenizers: the conversion is checked
        checks = _llama_cpp_vectors(folder, vocab)
    elif vocab == "mistral-spm":
        folder = _fetch(MISTRAL_COMMON, MISTRAL_COMMON_FILES)
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(folder / "tokenizer.model.v1", Path(tmp) / "tokenizer.model")
            converted = LlamaTokenizer.from_pretrained(tmp).backend_tokenizer
        checks = []  # no test vectors: HF's BPE and sentencepiece split runs of spaces differently anyway
    else:
        from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

        folder = _fetch(MISTRAL_COMMON, MISTRAL_COMMON_FILES)
        raw = json.loads((folder / "tekken_240718.json").read_text())
        raw["special_tokens"] = _tekken_specials((folder / "base.py").read_text(), (folder / "tekken.py").read_text())
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "tekken.json").write_text(json.dumps(raw))
            converted = convert_tekken_tokenizer(str(Path(tmp) / "tekken.json"), chat_template="").backend_tokenizer
        checks = []
    data = json.loads(converted.to_str())
    if vocab == "llama-bpe":  # Llama-3's tokenizer.json sets it (a whole word in the vocabulary is one token);
        data["model"]["ignore_merges"] = True  # the GGUF converter does not, and the test vectors then differ
    tokenizer = Tokenizer.from_str(json.dumps(data))
    for text, expected in checks:
        got = tokenizer.encode(text, add_special_tokens=False).ids
        assert got == expected, f"converted {vocab} vocabulary: {text!r} -> {got}, the reference says {expected}"
    staging = target.with_name(target.name + ".tmp")
    tokenizer.save(str(staging))
    staging.rename(target)


def _tokenizer_file(vocab: str) -> Path:
    target = CACHE / "tokenizers" / f"{vocab}.json"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        _convert(vocab, target)
    return target


@functools.cache
def _vocab_tokenizer(vocab: str, bos: str | None, eos: str, extra_special: tuple[str, ...]):
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(_tokenizer_file(vocab)), bos_token=bos, eos_token=eos)
    if extra_special:
        tokenizer.add_special_tokens({"additional_special_tokens": list(extra_special)})
    return tokenizer


@functools.cache
def reference_tokenizer(name: str):
    """The PreTrainedTokenizerFast of REFERENCES[name]: its real vocabulary and real chat template."""
    reference = REFERENCES[name]
    # Loading a vocabulary costs seconds: references with the same one share it through a shallow copy
    # (only chat_template, a plain attribute, differs; the special tokens are part of the cache key).
    tokenizer = copy.copy(_vocab_tokenizer(reference.vocab, reference.bos, reference.eos, reference.extra_special))
    tokenizer.chat_template = _template(reference.template)
    return tokenizer
