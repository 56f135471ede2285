"""Load, reload, switch, and the control: LangChain community's ``VLLM``, constructed twice.

``langchain_community.llms.VLLM`` builds a new ``vllm.LLM`` in its validator on every construction,
so re-running a notebook cell that creates it starts a second engine while the first one is still
referenced. When langchain-community is importable the control uses it; otherwise it does exactly
what that validator does (``vllm.LLM(model, tensor_parallel_size, trust_remote_code, dtype,
download_dir, **vllm_kwargs)``) and says so in the row's note.
"""

from __future__ import annotations

import gc
import shlex
import time
from typing import Any

__all__ = ["reload_session", "reload_magic", "magic_load_line", "community_vllm_twice"]


def reload_session(session: Any, model: str | None, engine_kwargs: dict, repeats: int) -> tuple[list[float], bool]:
    """Times (ms) of ``session.load`` with the running configuration; and whether none started an engine."""
    created = session.engines_created
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.load(model, **engine_kwargs)
        times.append((time.perf_counter() - start) * 1e3)
    return times, session.engines_created == created


def magic_load_line(model: str | None, engine_kwargs: dict) -> str:
    """The ``%vllm_load`` line for a model and ``vllm.LLM`` keyword arguments."""
    parts = [model] if model else []
    for key, value in engine_kwargs.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif value is False:
            parts.append("--no-" + key.replace("_", "-"))
        else:
            parts += [flag, str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def reload_magic(shell: Any, session: Any, line: str, repeats: int) -> tuple[list[float], bool]:
    """Times (ms) of re-running a ``%vllm_load`` cell; and whether none started an engine."""
    shell.bind(session)  # the served rows may have left the shell's magics on another session
    created = session.engines_created
    times = []
    for _ in range(repeats):
        start, end, _ = shell.run(f"%vllm_load {line}")
        times.append((end - start) * 1e3)
    return times, session.engines_created == created


def _community_class() -> Any:
    try:
        from langchain_community.llms import VLLM

        return VLLM
    except Exception:
        return None


def _construct(cls: Any, model: str, dtype: str, vllm_kwargs: dict) -> Any:
    if cls is not None:
        return cls(model=model, dtype=dtype, vllm_kwargs=dict(vllm_kwargs))
    from vllm import LLM  # what VLLM.validate_environment runs

    return LLM(model=model, tensor_parallel_size=1, trust_remote_code=False, dtype=dtype, download_dir=None,
               **vllm_kwargs)


def _shutdown(obj: Any) -> None:
    from vllm_magic.engine.compat import shutdown_engine

    llm = getattr(obj, "client", obj)
    try:
        shutdown_engine(llm)
    except Exception:
        pass


def community_vllm_twice(session: Any, model: str, engine_kwargs: dict, sampler: Any,
                         keep_first: bool) -> dict[str, Any]:
    """Construct the control twice, as re-running its cell does; returns times, memory and labels.

    ``keep_first``: the first object stays referenced while the second is built (what a re-run
    cell does); False drops it first (used where two engines would not fit).
    """
    cls = _community_class()
    kwargs = dict(engine_kwargs)
    dtype = str(kwargs.pop("dtype", "auto"))
    label = ("langchain_community.llms.VLLM" if cls is not None
             else "vllm.LLM(...) as langchain_community.llms.VLLM builds it (package not installed)")
    out: dict[str, Any] = {"label": label, "times": [], "errors": [], "memory": [], "kept_first": keep_first}
    alive: list[Any] = []
    log = session.log  # vLLM's output goes to the session's log file, not the terminal
    for attempt in (1, 2):
        sampler.set_phase(f"control #{attempt}")
        start = time.perf_counter()
        offset = log.size()
        try:
            with log.capture(False):
                alive.append(_construct(cls, model, dtype, kwargs))
            out["times"].append(time.perf_counter() - start)
        except Exception as exc:  # e.g. no device memory left: the first engine still holds it
            out["times"].append(None)
            # vLLM's root cause is in the engine process's output, not in the exception.
            causes = [line for line in log.errors_since(offset) if "Error" in line]
            reason = causes[-1] if causes else f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            out["errors"].append(f"failed after {time.perf_counter() - start:.1f} s: {reason.strip()[:300]}")
        out["memory"].append(sampler.mark(f"after control construction #{attempt}"))
        if attempt == 1 and not keep_first:
            for obj in alive:
                _shutdown(obj)
            alive.clear()
            gc.collect()
    for obj in alive:
        _shutdown(obj)
    alive.clear()
    gc.collect()
    sampler.set_phase("after control")
    out["memory_after_cleanup"] = sampler.mark("after control shut down")
    return out
