"""vLLM in a plain Python script: the one mistake spawn-started engines punish, explained."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_a_script_that_loads_at_import_is_told_to_use_a_main_guard(tmp_path):
    script = tmp_path / "no_main_guard.py"
    script.write_text(textwrap.dedent("""
        from vllm_magic.langchain import VLLM

        llm = VLLM(model="SmolLM2-135M-Instruct", max_new_tokens=8, temperature=0)
        print(llm.invoke("What is the capital of France?"))
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "loads the model when it is imported" in last and 'if __name__ == "__main__":' in last, proc.stderr[-3000:]
