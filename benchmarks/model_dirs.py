"""Model directories for speed work with dummy weights (``load_format="dummy"``).

vLLM builds a model from ``config.json`` alone when the weights are dummy, so a directory with a
config and the demo model's tokenizer is enough to measure any Llama shape: the demo model's own
shape (135M) and a Llama-3-8B shape. The 8B config keeps Llama-3's 128,256-row vocabulary; the demo
tokenizer knows 49,152 tokens, so the 8B directory's tokenizer gets placeholder tokens (`` w49152``
...) for the other ids: random dummy weights pick ids from the whole range, and ids without text
would leave a streaming front-end with nothing to show.

    python -m benchmarks.model_dirs DEST     # writes DEST/demo-shape and DEST/llama8b-shape
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

__all__ = ["LLAMA_8B_SHAPE", "write_model_dirs"]

#: Llama-3-8B's shape (hidden 4096, 32 layers, 32 heads, 8 KV heads, MLP 14336, vocab 128256).
LLAMA_8B_SHAPE = {
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 14336,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": False,
    "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
    "rms_norm_eps": 1e-5,
    "dtype": "bfloat16",
    "_model_name_or_path": "llama-3-8b-shape (dummy weights)",
}

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                    "special_tokens_map.json")


def write_model_dirs(dest: str | Path, source: str | Path | None = None) -> dict[str, Path]:
    """Write ``dest/demo-shape`` and ``dest/llama8b-shape`` (config + tokenizer, no weights)."""
    if source is None:
        from vllm_magic.demo.model import demo_model_dir

        source = demo_model_dir()
    source, dest = Path(source), Path(dest)
    config = json.loads((source / "config.json").read_text())
    shapes = {"demo-shape": dict(config), "llama8b-shape": {**config, **LLAMA_8B_SHAPE}}
    shapes["llama8b-shape"].pop("torch_dtype", None)
    written = {}
    for name, cfg in shapes.items():
        out = dest / name
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
        for filename in _TOKENIZER_FILES:
            if (source / filename).is_file():
                shutil.copy2(source / filename, out / filename)
        _pad_tokenizer(out / "tokenizer.json", cfg["vocab_size"])
        written[name] = out
    return written


def _pad_tokenizer(path: Path, vocab_size: int) -> None:
    """Give every id below ``vocab_size`` a (placeholder) token with text."""
    from tokenizers import AddedToken, Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size >= vocab_size:
        return
    tokenizer.add_tokens([AddedToken(f" w{i}", normalized=False, special=False) for i in range(size, vocab_size)])
    tokenizer.save(str(path))


if __name__ == "__main__":
    for name, path in write_model_dirs(sys.argv[1] if len(sys.argv) > 1 else ".model").items():
        print(name, path)
