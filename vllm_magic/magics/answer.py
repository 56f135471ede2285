"""A ``%%vllm`` cell's answer: streamed into the output, then assembled into ``VllmResult`` objects.

Also the few things the magics show besides answers (a prompt as sent, client code, a widget) and
the one-line wording of an engine that died or refused a request.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

from IPython.core.error import UsageError

from ..errors import EngineDiedError, VllmMagicError
from .display import AnswerStream, stream_answers
from .results import VllmResult

__all__ = ["stream_results", "usage_errors", "died_message", "one_line", "display_text", "display_code", "display_widget"]


def stream_results(handles: list, prompts: list[str], items: list, parse: Callable[[str], Any] | None, *,
                   fmt: str, live: bool, interval: float, show_prompt: bool = False,
                   quiet: bool = False) -> tuple[list[VllmResult], bool]:
    """Stream the answers of one cell's requests into its output; ``(results, interrupted)``.

    ``items`` are what was sent for each prompt (a message list for a conversation); ``parse``
    turns a structured answer into its value. The engine dying or refusing a request is a
    ``UsageError``, with what had arrived left on screen.
    """
    if show_prompt:
        for handle in handles:
            display_text(handle.prompt)
    batch = len(handles) > 1
    echo = not batch and (handles[0].sampling_params.n or 1) == 1  # a terminal prints a single answer as it comes
    streams = [AnswerStream(h, fmt, live=live, label=_label(i, p) if batch else None, echo=echo)
               for i, (h, p) in enumerate(zip(handles, prompts))]
    interrupted = stream_answers(streams, interval)
    results = []
    for index, (stream, prompt, item) in enumerate(zip(streams, prompts, items)):
        try:
            generation = stream.handle.result(timeout=10) if stream.handle.done else stream.handle.snapshot()
        except EngineDiedError as exc:
            for s in streams[index:]:  # what arrived before the engine died stays on screen
                s.finish(s.handle.snapshot(), quiet=True)
            raise UsageError(died_message(exc)) from None
        except Exception as exc:  # the engine refused this request (e.g. a schema it cannot compile)
            for s in streams:
                s.discard()
            raise UsageError(f"the engine refused the request: {one_line(exc)}") from None
        parsed = None
        if parse is not None and generation.text and not generation.aborted:
            try:
                parsed = parse(generation.text)
            except ValueError:
                parsed = None
        stream.finish(generation, parsed=parsed, quiet=quiet)
        messages = list(item) if isinstance(item, list) else []
        results.append(VllmResult(generation, prompt, stream.handle.sampling_params, parsed, messages))
    return results, interrupted


@contextmanager
def usage_errors(interrupted: str | None = None) -> Iterator[None]:
    """The package's errors raised inside, as the one-line ``UsageError`` a cell shows (an engine
    that died says how to start it again); with ``interrupted``, Ctrl-C too, as that line."""
    try:
        yield
    except EngineDiedError as exc:
        raise UsageError(died_message(exc)) from None
    except VllmMagicError as exc:
        raise UsageError(str(exc)) from None
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        raise UsageError(interrupted) from None


def died_message(exc: BaseException) -> str:
    """One line for an engine that died, saying how to go on."""
    message = one_line(exc)
    if "%vllm_load" not in message:
        message += "; run %vllm_load again to restart it (%vllm_log shows why it died)"
    return message


def one_line(exc: BaseException) -> str:
    """An exception's message on one line of at most about 300 characters."""
    text = " ".join(str(exc).split())
    return text[:300] + ("…" if len(text) > 300 else "")


def _label(index: int, prompt: str) -> str:
    first = prompt.strip().splitlines()[0] if prompt.strip() else ""
    first = first if len(first) <= 60 else first[:59] + "…"
    return f"[{index + 1}] {first}"


def display_text(text: str) -> None:
    """Show plain text as an output of the cell."""
    from IPython.display import display

    display({"text/plain": text}, raw=True)


def display_code(code: str) -> None:
    """Show Python code as an output of the cell (highlighted where Markdown renders)."""
    from IPython.display import display

    display({"text/markdown": f"```python\n{code}\n```", "text/plain": code}, raw=True)


def display_widget(widget: Any) -> None:
    """Show a widget as an output of the cell."""
    from IPython.display import display

    display(widget)
