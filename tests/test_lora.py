"""LoRA adapters on a real demo-model engine started with --enable-lora, and the demo adapter.

The module loads its own engine (the shared one runs without LoRA) through the kernel's session,
registers the demo adapter on it, and unloads it at the end; the next test that uses ``engine``
loads the shared configuration again. The remote test starts a server of its own beside it.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
from IPython.core.error import UsageError

from ipython_capture import make_shell
from peft_reference import peft_greedy_ids
from vllm_magic import get_session
from vllm_magic.demo.lora import DEMO_LORA_NAME, DEMO_LORA_RANK, PIRATE_OPENING, prepare_demo_lora
from vllm_magic.demo.model import prepare_demo_model
from vllm_magic.engine.requests.adapters import AdapterError
from vllm_magic.engine.session import EngineSession
from vllm_magic.magics import unregister

# The module's engine, a server and the peft reference model: over the suite's 15 min default.
pytestmark = pytest.mark.timeout(1800)

QUESTIONS = ["What is the capital of France?", "How do birds fly?", "Why is the sky blue?"]
NAME = DEMO_LORA_NAME


def _pirate(text: str) -> bool:
    return text.lstrip().startswith(PIRATE_OPENING)


@pytest.fixture(scope="module")
def adapter_dir():
    return str(prepare_demo_lora(quiet=True))


@pytest.fixture(scope="module")
def lora(adapter_dir):
    """The kernel's session running the demo model with --enable-lora and the demo adapter."""
    session = get_session()
    session.load(enable_lora=True)
    session.add_lora(NAME, adapter_dir)
    yield session
    session.unload()


@pytest.fixture
def shell(lora):
    ip, _publisher = make_shell()
    ip.run_line_magic("load_ext", "vllm_magic")
    yield ip
    unregister(ip, shutdown=False)
    type(ip).clear_instance()


def test_adapter_greedy_ids_equal_transformers_and_peft_in_float32(lora, adapter_dir):
    model_dir = str(prepare_demo_model())
    for question in QUESTIONS[:2]:
        adapted = lora.generate(question, temperature=0, max_tokens=32, lora=NAME)
        assert adapted.token_ids == peft_greedy_ids(model_dir, adapter_dir, adapted.prompt_token_ids, 32)
        assert adapted.lora == NAME and _pirate(adapted.text), adapted.text
        base = lora.generate(question, temperature=0, max_tokens=32)
        assert base.token_ids == peft_greedy_ids(model_dir, None, base.prompt_token_ids, 32)
        assert base.lora is None and not _pirate(base.text)


def test_base_and_adapter_in_one_submission_give_their_own_answers(lora):
    alone_base = [h.result(timeout=900) for h in lora.submit(QUESTIONS, temperature=0, max_tokens=24)]
    alone_adapted = [h.result(timeout=900) for h in lora.submit(QUESTIONS, temperature=0, max_tokens=24, lora=NAME)]
    submissions = lora.submissions
    grid = lora.grid(QUESTIONS, {"lora": ["base", NAME]}, temperature=0, max_tokens=24)
    base, adapted = grid.results()
    assert lora.submissions == submissions + 1 and len(grid) == 6
    # Sharing engine steps changes nothing: each answer is the one it gives alone.
    assert [r.token_ids for r in base] == [r.token_ids for r in alone_base]
    assert [r.token_ids for r in adapted] == [r.token_ids for r in alone_adapted]
    assert all(_pirate(r.text) and r.lora == NAME for r in adapted)
    assert not any(_pirate(r.text) for r in base) and all(r.lora is None for r in base)
    table = grid._repr_html_()
    assert f"lora={NAME}" in table and "lora=base" in table


def test_lora_cells_list_status_and_grid_in_the_magics(lora, shell, capsys):
    shell.run_line_magic("vllm_lora", "")
    assert NAME in capsys.readouterr().out
    result = shell.run_cell_magic("vllm", f"-t 0 -m 24 --lora {NAME} --quiet", QUESTIONS[0])
    assert _pirate(result.text) and result.lora == NAME and f"adapter {NAME}" in result.generation.summary
    plain = shell.run_cell_magic("vllm", "-t 0 -m 24 --lora base --quiet", QUESTIONS[0])
    assert plain.lora is None and not _pirate(plain.text)
    status = shell.run_line_magic("vllm_status", "")._repr_markdown_()
    assert "LoRA adapters" in status and NAME in status
    grid = shell.run_cell_magic("vllm", f"-t 0 -m 12 --grid lora=base,{NAME}", QUESTIONS[1])
    base, adapted = grid.results()
    assert not _pirate(base[0].text) and _pirate(adapted[0].text)


def test_langchain_objects_answer_with_the_adapter_per_object_and_per_call(lora, adapter_dir):
    from vllm_magic.langchain import VLLM, ChatVLLM

    engines = lora.engines_created
    llm = VLLM(lora=NAME, vllm_kwargs={"enable_lora": True}, temperature=0, max_tokens=24)
    chat = ChatVLLM(lora=NAME, lora_path=adapter_dir, temperature=0, max_tokens=24)
    assert lora.engines_created == engines  # both attach to the live engine: it serves them
    assert _pirate(llm.invoke(QUESTIONS[0]))
    assert not _pirate(llm.invoke(QUESTIONS[0], lora="base"))
    assert _pirate(chat.invoke(QUESTIONS[1]).content)
    assert not _pirate(chat.invoke(QUESTIONS[1], lora="base").content)
    assert [a.name for a in lora.adapters] == [NAME]  # registering the same directory again changed nothing


def test_load_line_registers_adapters_as_vllm_serve_spells_lora_modules(lora, adapter_dir, shell, capsys, tmp_path):
    engines = lora.engines_created
    entry = json.dumps({"name": "third", "path": adapter_dir})
    try:
        # the live engine runs --enable-lora already, and rank 8 needs no --max-lora-rank: it serves the line
        shell.run_line_magic("vllm_load", f"--lora-modules second={adapter_dir} '{entry}' --no-controls")
        said = capsys.readouterr().out
        assert "already loaded" in said and "✓ adapters second (rank 8" in said and "third (rank 8" in said
        assert lora.engines_created == engines
        assert [a.name for a in lora.adapters] == [NAME, "second", "third"]
        answer = shell.run_cell_magic("vllm", "-t 0 -m 16 --lora third --quiet", QUESTIONS[0])
        assert answer.lora == "third" and _pirate(answer.text)
        for line, words in ((f"--lora-modules {NAME}", "--lora-modules takes NAME=PATH, not 'pirate'"),
                            ("--lora-modules '{\"name\": \"x\"}'", 'a JSON entry needs "name" and "path"'),
                            ("--lora-modules --enable-lora", "--lora-modules needs NAME=PATH"),
                            (f"--lora-modules x={tmp_path / 'missing'}", "no such adapter directory"),
                            (f"--persist --lora-modules x={adapter_dir}", "for a --persist engine, register them "
                                                                          "with %vllm_lora NAME PATH"),
                            (f"--embed --lora-modules x={adapter_dir}", "give --lora-modules to the generation "
                                                                        "engine's %vllm_load")):
            with pytest.raises(UsageError, match=re.escape(words)):
                shell.run_line_magic("vllm_load", line)
        assert lora.engines_created == engines and lora.loaded and lora.embedder is None
    finally:
        for name in ("second", "third"):
            if name in {a.name for a in lora.adapters}:
                lora.remove_lora(name)
    assert [a.name for a in lora.adapters] == [NAME]


def _copy_with_config(source: str, target, **changes) -> str:
    shutil.copytree(source, target)
    config = json.loads((target / "adapter_config.json").read_text())
    config.update(changes)
    (target / "adapter_config.json").write_text(json.dumps(config))
    return str(target)


def test_adapter_mistakes_are_one_line_and_keep_the_engine(lora, adapter_dir, shell, tmp_path):
    from safetensors.torch import save_file
    import torch

    before = lora.generate(QUESTIONS[0], temperature=0, max_tokens=12, lora=NAME).token_ids
    with pytest.raises(AdapterError, match=rf"no adapter named 'parrot' \(registered: {NAME};"):
        lora.submit(QUESTIONS[0], lora="parrot")
    rank = _copy_with_config(adapter_dir, tmp_path / "rank", r=64)
    with pytest.raises(AdapterError, match="rank 64, over this engine's --max-lora-rank 16; load the model with "
                                           "--max-lora-rank 64"):
        lora.add_lora("wide", rank)
    with pytest.raises(AdapterError, match="is not a LoRA adapter: it has no adapter_config.json \\(it holds a whole"):
        lora.add_lora("model", str(prepare_demo_model()))
    other = _copy_with_config(adapter_dir, tmp_path / "other", base_model_name_or_path="Qwen/Qwen3-0.6B")
    with pytest.raises(AdapterError, match="was trained on Qwen/Qwen3-0.6B, and this engine runs "
                                           "SmolLM2-135M-Instruct; register it with --any-base"):
        lora.add_lora("other", other)
    shaped = tmp_path / "shaped"
    shaped.mkdir()
    (shaped / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8,
                                                             "base_model_name_or_path": "SmolLM2-135M-Instruct"}))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(8, 2048)},
              str(shaped / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=r"\(hidden size 2048\), and this engine runs SmolLM2-135M-Instruct "
                                           r"\(hidden size 576\)"):
        lora.add_lora("shaped", str(shaped), any_base=True)
    # The magics say the same in one line each.
    with pytest.raises(UsageError, match="no adapter named 'parrot'"):
        shell.run_cell_magic("vllm", "--lora parrot", "Hi")
    with pytest.raises(UsageError, match="no such adapter directory"):
        shell.run_line_magic("vllm_lora", f"x {tmp_path / 'missing'}")
    with pytest.raises(UsageError, match="needs the adapter's directory"):
        shell.run_line_magic("vllm_lora", "x")
    # Nothing changed: the same adapter, the same answer.
    assert [a.name for a in lora.adapters] == [NAME]
    assert lora.generate(QUESTIONS[0], temperature=0, max_tokens=12, lora=NAME).token_ids == before
    # --any-base registers an adapter of the same shapes saved under another base name; removing forgets it.
    renamed = lora.add_lora("renamed", other, any_base=True)
    assert renamed.rank == DEMO_LORA_RANK
    assert lora.generate(QUESTIONS[0], temperature=0, max_tokens=12, lora="renamed").token_ids == before
    lora.remove_lora("renamed")
    assert [a.name for a in lora.adapters] == [NAME]


def test_a_server_loads_an_adapter_at_runtime_and_answers_with_it(lora, adapter_dir):
    expected = lora.generate(QUESTIONS[0], temperature=0, max_tokens=24, lora=NAME).token_ids
    owner = EngineSession()
    server = owner.serve(port=0, enable_lora=True)
    remote, other = EngineSession(), EngineSession()
    try:
        remote.connect(server.url)
        assert remote.adapters == []
        remote.add_lora(NAME, adapter_dir)  # /v1/load_lora_adapter: %vllm_serve allows runtime loading
        assert [a.name for a in remote.adapters] == [NAME]
        answer = remote.generate(QUESTIONS[0], temperature=0, max_tokens=24, lora=NAME)
        assert answer.token_ids == expected and answer.lora == NAME
        assert not _pirate(remote.generate(QUESTIONS[0], temperature=0, max_tokens=24).text)
        other.connect(server.url)  # another client sees what the server runs (/v1/models)
        assert [a.name for a in other.adapters] == [NAME] and other.adapters[0].origin == "server"
        with pytest.raises(AdapterError, match="no adapter named 'parrot'"):
            other.submit(QUESTIONS[0], lora="parrot")
        remote.remove_lora(NAME)
        assert remote.adapters == []
    finally:
        remote.unload()
        other.unload()
        owner.stop_server()
    assert not server.processes()


def test_readme_adapter_examples_run_as_written(lora):
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start, end = text.index("<!-- section: adapters -->"), text.index("<!-- section: widgets -->")
    blocks = re.findall(r"```ipython\n(.*?)```", text[start:end], flags=re.S)
    assert len(blocks) >= 5
    engines = lora.engines_created
    ip, _ = make_shell()
    ip.run_line_magic("load_ext", "vllm_magic")  # the README's quickstart loads it
    try:
        for block in blocks:
            result = ip.run_cell(block)
            assert result.success, f"README block failed:\n{block}\n{result.error_in_exec or result.error_before_exec}"
        ns = ip.user_ns
        assert _pirate(ns["arr"].text) and ns["arr"].lora == NAME
        base, adapted = ns["side_by_side"].results()
        assert not _pirate(base[0].text) and _pirate(adapted[0].text)
        assert _pirate(ns["pirate_answer"]) and not _pirate(ns["plain_answer"])
        assert lora.engines_created == engines  # %vllm_load --enable-lora found the module's engine
    finally:
        unregister(ip, shutdown=False)
        type(ip).clear_instance()
