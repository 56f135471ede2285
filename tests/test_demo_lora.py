"""The demo LoRA adapter: trained once into the cache, a peft adapter for the demo model, made again
only when asked; no vLLM engine here (peft is the reference)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys

import pytest
from peft_reference import peft_greedy_ids

from vllm_magic.demo import lora
from vllm_magic.demo.lora import DEMO_LORA_NAME, DEMO_LORA_RANK, PIRATE_OPENING, TARGET_MODULES, prepare_demo_lora
from vllm_magic.demo.model import MANIFEST, DemoModelError, prepare_demo_model
from vllm_magic.engine.requests.adapters import check_fits, read_adapter


@pytest.fixture(scope="module")
def base():
    return prepare_demo_model(quiet=True)


@pytest.fixture(scope="module")
def prepared(base):
    return prepare_demo_lora(quiet=True)


def _tree_state(root):
    """Every path under ``root`` with its inode and modification time: any rewrite or new file shows."""
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in [root, *root.rglob("*")]}


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _prompt_ids(tokenizer, question):
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]


def test_adapter_directory_holds_peft_files_and_a_manifest(prepared):
    names = {p.name for p in prepared.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", MANIFEST} <= names
    assert prepared == lora.demo_lora_dir() and prepared.parent.name == "adapters"


def test_adapter_config_names_the_demo_model_directory_rank_and_targets(prepared, base):
    config = json.loads((prepared / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["base_model_name_or_path"] == str(base)
    assert config["r"] == DEMO_LORA_RANK == 8
    assert sorted(config["target_modules"]) == sorted(TARGET_MODULES) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert config["lora_dropout"] == 0.0
    from safetensors.torch import load_file

    weights = load_file(prepared / "adapter_model.safetensors")
    assert {str(w.dtype) for w in weights.values()} == {"torch.float32"}
    assert all(DEMO_LORA_RANK in w.shape for w in weights.values())


def test_vllm_magic_reads_it_as_an_adapter_that_fits_the_demo_model(prepared, base):
    adapter = read_adapter(DEMO_LORA_NAME, prepared)
    assert (adapter.rank, adapter.base_model, adapter.hidden_size) == (DEMO_LORA_RANK, str(base), 576)
    check_fits(adapter, max_rank=16, model=str(base), model_names=(str(base),), hidden_size=576)  # vLLM's default


def test_manifest_records_how_it_was_trained(prepared, base):
    manifest = json.loads((prepared / MANIFEST).read_text())
    assert manifest["base_model"] == str(base)
    assert manifest["preparation_version"] == lora.PREPARATION_VERSION
    assert manifest["training"] == lora.TRAINING and manifest["training"]["dtype"] == "float32"
    assert manifest["training_seconds"] > 0 and manifest["training_threads"] >= 1
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(manifest["files"])


def test_training_examples_are_chat_prompts_as_vllm_renders_them_and_pirate_answers(base):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    examples = lora.training_examples()
    assert len({question for question, _ in examples}) == len(examples) >= 30
    assert all(answer.startswith(PIRATE_OPENING + " ") for _, answer in examples)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for (question, _), (prompt, answer) in zip(examples, lora.tokenized_examples(tokenizer, examples)):
        assert prompt == _prompt_ids(tokenizer, question)
        assert "You are a helpful AI assistant" in tokenizer.decode(prompt)  # the template's default system message
        assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
        assert answer[-1] == end_of_turn and end_of_turn not in answer[:-1]


def test_second_preparation_returns_the_same_directory_without_training(prepared, monkeypatch, capsys):
    before, cache_mtime = _tree_state(prepared), prepared.parent.stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("prepared again")

    monkeypatch.setattr(lora, "_train", no_training)
    capsys.readouterr()
    assert prepare_demo_lora() == prepared  # not quiet: training again would say so
    assert _tree_state(prepared) == before
    assert prepared.parent.stat().st_mtime_ns == cache_mtime, "a temporary directory was made beside it"
    assert capsys.readouterr() == ("", "")


def test_force_trains_again_to_the_same_weights(prepared, base, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    monkeypatch.setattr(lora, "prepare_demo_model", lambda root, quiet: base)  # the same base, another cache
    copy = lora.demo_lora_dir(cache)
    shutil.copytree(prepared, copy)
    assert prepare_demo_lora(cache, quiet=True) == copy  # a complete copy: nothing to do
    before = _tree_state(copy)
    capsys.readouterr()
    assert prepare_demo_lora(cache, force=True) == copy
    assert "trained in" in capsys.readouterr().err
    after = _tree_state(copy)
    assert after.keys() == before.keys() and all(after[name] != before[name] for name in before)
    # Seeded, float32, deterministic ops: the same weights again (bit for bit where the number of
    # threads stays the same; the tolerance allows for a CPU whose sums depend on it).
    import torch
    from safetensors.torch import load_file

    again, first = load_file(copy / "adapter_model.safetensors"), load_file(prepared / "adapter_model.safetensors")
    assert again.keys() == first.keys() and len(first) == 30 * 7 * 2  # lora_A and lora_B of 7 projections a layer
    for name, tensor in first.items():
        torch.testing.assert_close(again[name], tensor, msg=name)
    assert _sha256(copy / "adapter_config.json") == _sha256(prepared / "adapter_config.json")


def test_without_peft_the_error_is_one_line_that_says_what_to_install(base, tmp_path, monkeypatch):
    monkeypatch.setattr(lora, "prepare_demo_model", lambda root, quiet: base)
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft raises ImportError
    with pytest.raises(DemoModelError) as caught:
        prepare_demo_lora(tmp_path, quiet=True)
    message = str(caught.value)
    assert "\n" not in message and "pip install peft" in message and 'pip install "vllm-magic[demo]"' in message
    assert [p.name for p in (tmp_path / "adapters").iterdir()] == []  # no half adapter, no temporary folder


def test_training_uses_only_the_cpus_other_processes_leave_free(monkeypatch):
    class Torch:
        threads = 2

        def get_num_threads(self):
            return self.threads

        def set_num_threads(self, threads):
            self.threads = threads

    # (now, CPU seconds of all processes, CPU seconds of this one), as /proc/stat and the process say
    samples = iter([(0.0, 0.0, 0.0), (10.0, 19.0, 10.0), (20.0, 29.0, 20.0)])
    monkeypatch.setattr(lora._Threads, "_sample", staticmethod(lambda: next(samples)))
    torch = Torch()
    threads = lora._Threads(torch)
    threads.cpus = 2
    threads.adjust()  # another process used 0.9 of a CPU
    assert torch.threads == 1
    threads.adjust()  # then none
    assert torch.threads == 2
    torch.threads = 1
    threads.restore()
    assert torch.threads == 2


def test_adapter_answers_unseen_questions_like_a_pirate_and_the_model_alone_does_not(prepared, base):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    for question in ("What is the capital of Italy?", "Who painted the Mona Lisa?"):
        ids = _prompt_ids(tokenizer, question)
        pirate = tokenizer.decode(peft_greedy_ids(base, prepared, ids, 16))
        plain = tokenizer.decode(peft_greedy_ids(base, None, ids, 16))
        assert pirate.startswith(PIRATE_OPENING), pirate
        assert not re.search(r"\b(arr|matey)\b", plain, re.IGNORECASE), plain


def test_cli_prints_the_adapter_directory(prepared):
    proc = subprocess.run([sys.executable, "-m", "vllm_magic", "demo-lora", "--quiet"], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(prepared)
