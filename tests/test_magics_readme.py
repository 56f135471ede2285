"""The README's magic examples (```ipython blocks of its quickstart and magics sections) run as written."""

from __future__ import annotations

import re
from pathlib import Path

from ipython_capture import make_shell

README = Path(__file__).resolve().parent.parent / "README.md"


def _ipython_blocks() -> list[str]:
    text = README.read_text()
    start, end = text.index("<!-- section: quickstart -->"), text.index("<!-- section: hub -->")
    return re.findall(r"```ipython\n(.*?)```", text[start:end], flags=re.S)


def test_readme_magic_examples_run(engine, capsys):
    blocks = _ipython_blocks()
    assert len(blocks) >= 5
    ip, _ = make_shell()
    try:
        for block in blocks:
            result = ip.run_cell(block)
            assert result.success, f"README block failed:\n{block}\n{result.error_in_exec or result.error_before_exec}"
        out = capsys.readouterr().out
        assert "already loaded" in out
        assert "Paris" in ip.user_ns["answers"][0].text
        assert ip.user_ns["verdict"].parsed in ("positive", "negative")
        capital, branch = ip.user_ns["capital"], ip.user_ns["branch"]
        assert len(capital.logprobs[0].top) == 3 and capital.perplexity >= 1
        assert branch.token_ids[5] == capital.logprobs[5].alternatives()[0].token_id
        assert branch.token_ids[:5] == capital.token_ids[:5] and len(ip.user_ns["explorer"].results) == 2
        grid = ip.user_ns["grid"]
        assert len(grid) == 12 and grid.done and all(row["text"] for row in grid.rows())
    finally:
        from vllm_magic.magics import unregister

        unregister(ip, shutdown=False)
        type(ip).clear_instance()


def test_readme_serving_examples_run(capsys, monkeypatch):
    import vllm_magic
    from vllm_magic.engine.session import EngineSession
    from vllm_magic.magics import register, unregister

    text = README.read_text()
    start, end = text.index("<!-- section: serving -->"), text.index("<!-- section: persist -->")
    blocks = re.findall(r"```ipython\n(.*?)```", text[start:end], flags=re.S)
    assert blocks[0].strip() == "%vllm_serve" and blocks[-1].strip() == "%vllm_serve --stop"
    # A session of the test's own, so that the suite's in-process engine stays loaded beside it.
    session = EngineSession()
    monkeypatch.setattr(vllm_magic, "get_session", lambda: session)
    ip, _ = make_shell()
    try:
        register(ip, session=session)
        for block in blocks:
            result = ip.run_cell(block)
            assert result.success, f"README block failed:\n{block}\n{result.error_in_exec or result.error_before_exec}"
            if block.strip() == "%vllm_serve":
                server = session.server
        out = capsys.readouterr().out
        assert "served at http://127.0.0.1:" in out and "on the vLLM server at" in out
        assert out.count("Paris") >= 1 and "Paris" in ip.user_ns["_"].text
        assert session.server is None and not server.processes()
    finally:
        if session.server is not None:
            session.stop_server()
        unregister(ip, shutdown=False)
        type(ip).clear_instance()
