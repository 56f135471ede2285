"""What nbval cannot check in the stored notebooks: outputs its sanitizers replace before comparing.

notebooks/sanitize.cfg turns every "2.66 GiB" into "<MEM>", so the scaling notebook's memory table
would pass nbval with any numbers at all, garbage included. Its stored values are checked here
(pure, no engine); test_scaling checks the same relations on the engines it runs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
ROW = re.compile(r"^(?P<name>TP 1|TP 2|AWQ) +(?P<gib>\d+(?:\.\d+)?) GiB$")


def _output_of(notebook: str, source_part: str) -> str:
    cells = json.loads((NOTEBOOKS / notebook).read_text())["cells"]
    matching = [c for c in cells if c["cell_type"] == "code" and source_part in "".join(c["source"])]
    assert len(matching) == 1, f"{notebook}: {len(matching)} cells contain {source_part!r}"
    return "".join("".join(o.get("text", "")) for o in matching[0].get("outputs", []) if o.get("name") == "stdout")


def test_scaling_notebook_memory_table_is_a_plausible_measurement():
    text = _output_of("05-scaling.ipynb", "for name, used in memory.items()")
    rows = text.strip().splitlines()
    parsed = [ROW.match(line) for line in rows]
    assert rows and all(parsed), f"rows that are not '<engine> <n> GiB': {rows}"
    memory = {m["name"]: float(m["gib"]) for m in parsed}
    assert list(memory) == ["TP 1", "TP 2", "AWQ"], rows
    assert_plausible_engine_memory({name: gib * 2**30 for name, gib in memory.items()})


def assert_plausible_engine_memory(memory: dict[str, float]) -> None:
    """Host memory (bytes) of the demo model's engines under TP 1, TP 2 and AWQ, as measured on CPU.

    Each engine is a process (or two ranks) holding a 135M model plus vLLM's runtime: between a few
    hundred MiB and tens of GiB. Two ranks each hold the runtime: TP 2 takes clearly more than TP 1,
    and less than three times as much. AWQ weights are 4-bit instead of float32: less than TP 1.
    """
    gib = {name: used / 2**30 for name, used in memory.items()}
    assert all(0.25 < used < 64 for used in gib.values()), gib
    assert 1.3 * gib["TP 1"] < gib["TP 2"] < 3 * gib["TP 1"], gib
    assert gib["AWQ"] < gib["TP 1"], gib
