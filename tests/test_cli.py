"""The command line: demo-model and notebooks."""

from __future__ import annotations

from vllm_magic.__main__ import main
from vllm_magic.demo.model import demo_model_dir


def test_demo_model_command_prints_the_prepared_directory(capsys):
    assert main(["demo-model", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(demo_model_dir())


def test_notebooks_command_copies_every_tutorial(tmp_path, capsys):
    assert main(["notebooks", str(tmp_path / "tutorials")]) == 0
    names = sorted(p.name for p in (tmp_path / "tutorials").iterdir())
    assert names == ["01-quickstart.ipynb", "02-langchain.ipynb", "03-widgets.ipynb", "04-serving.ipynb",
                     "05-scaling.ipynb", "06-look-inside.ipynb", "07-adapters-and-retrieval.ipynb"]
    assert len(capsys.readouterr().out.splitlines()) == 7
