"""An IPython shell for tests, with a display publisher that records every output and update."""

from __future__ import annotations

from typing import Any, Callable

from IPython.core.displaypub import DisplayPublisher
from IPython.core.interactiveshell import InteractiveShell
from traitlets.config import Config


class RecordingPublisher(DisplayPublisher):
    """Keeps ``(data, display_id, update)`` of every display; ``on_update`` can raise (Ctrl-C)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.calls: list[dict] = []
        self.on_update: Callable[[int], None] | None = None

    def publish(self, data, metadata=None, source=None, *, transient=None, update=False, **kwargs):
        self.calls.append({"data": dict(data), "display_id": (transient or {}).get("display_id"),
                           "update": update})
        if update and self.on_update is not None:
            self.on_update(sum(1 for c in self.calls if c["update"]))

    def clear(self) -> None:
        self.calls.clear()
        self.on_update = None

    def outputs(self) -> list[dict]:
        """Data of the outputs a notebook keeps as new outputs (not the in-place updates)."""
        return [c["data"] for c in self.calls if not c["update"]]

    def updates(self) -> list[dict]:
        return [c for c in self.calls if c["update"]]


def make_shell() -> tuple[InteractiveShell, RecordingPublisher]:
    """A fresh shell (history off, no sampling panel) whose displays are recorded."""
    config = Config()
    config.HistoryManager.enabled = False
    config.VllmMagics.show_controls = False
    InteractiveShell.clear_instance()
    shell = InteractiveShell.instance(config=config)
    publisher = RecordingPublisher(shell=shell)
    shell.display_pub = publisher
    return shell, publisher
