"""The token explorer: an answer's tokens coloured by probability, their alternatives, and branches.

``result.explore()`` (and ``%%vllm --explore``) shows a :class:`TokenExplorer`. Clicking a token
shows the alternatives the model had there; choosing one branches: the engine continues from the
prompt, the answer's tokens before that position and the chosen token (token ids, so nothing is
re-tokenized), with the answer's own sampling settings. Branches share their prefix, so vLLM's
prefix cache serves it: each branch says how many of its prompt tokens came from the cache. Every
path of the tree is a :class:`~vllm_magic.magics.results.VllmResult` (:attr:`TokenExplorer.results`),
and the tree can be walked back and forth. Outside a live notebook (a static render, nbval) the
explorer shows as HTML: the tokens coloured, their alternatives in each token's tooltip.
"""

from __future__ import annotations

import html
import threading
import time
from dataclasses import dataclass
from typing import Any

import ipywidgets as widgets

from ..engine.requests.handles import Completion, GenerationResult
from ..engine.requests.logprobs import TokenChoice, TokenLogprobs, mode_label
from ..engine.requests.prompts import TokenPrompt
from ..errors import RequestError

__all__ = ["TokenExplorer", "Branch", "probability_colour", "tokens_html"]

_REFRESH = 0.1  # seconds between updates of a growing branch (each update is one comm message)


@dataclass
class Branch:
    """One path of the tree: its result, where it left its parent (the position and the token
    chosen there) and how many of its prompt tokens the prefix cache served."""

    result: Any
    parent: int | None = None
    position: int | None = None
    chosen: TokenChoice | None = None

    @property
    def label(self) -> str:
        if self.parent is None:
            return "answer"
        return f"at token {self.position + 1}: {_show(self.chosen.text)!s}"  # type: ignore[operator,union-attr]


def probability_colour(prob: float) -> str:
    """A background for a token of probability ``prob``: green when likely, through yellow, to red."""
    prob = min(1.0, max(0.0, prob))
    return f"hsl({round(120 * prob)}, 70%, 82%)"


def _show(text: str) -> str:
    """A token's text as a label shows it: spaces kept visible, line breaks as ⏎."""
    return text.replace("\n", "⏎").replace(" ", "\u00a0") or "∅"


def _percent(prob: float) -> str:
    return f"{prob:.1%}" if prob >= 0.001 else "<0.1%"


def _tooltip(position: TokenLogprobs) -> str:
    lines = [f"{position.text!r}: p={position.prob:.3f}, logprob={position.logprob:.3f}, rank {position.rank}"]
    lines += [f"  {c.rank}. {c.text!r} p={c.prob:.3f}" for c in position.top]
    return "\n".join(lines)


def tokens_html(logprobs: list[TokenLogprobs], title: str = "") -> str:
    """An answer's tokens as coloured spans (tooltips list the alternatives): the static render."""
    spans = "".join(
        f'<span class="vllm-token" title="{html.escape(_tooltip(t))}" style="background:{probability_colour(t.prob)};'
        f'white-space:pre-wrap;border-radius:3px;padding:0 1px;margin:0 1px 0 0">{html.escape(t.text)}</span>'
        for t in logprobs)
    head = f'<div style="opacity:0.7;font-size:0.85em">{html.escape(title)}</div>' if title else ""
    return f'<div class="vllm-token-explorer-static">{head}<div style="line-height:1.9">{spans}</div></div>'


class TokenExplorer(widgets.VBox):
    """An answer's tokens by probability, their alternatives, and the branches taken from them.

    ``branch(position, token)`` continues from the answer's tokens before ``position`` plus
    ``token`` (an id, a :class:`TokenChoice` or the text of one of the alternatives there) and
    returns the branch's :class:`VllmResult`; clicking a token then an alternative does the same.
    ``results`` holds every path (the answer first), ``select(i)`` shows one, ``wait()`` waits for a
    branch that is still growing.
    """

    def __new__(cls, result: Any, session: Any = None, **kwargs: Any) -> "TokenExplorer":
        # Refused before any widget exists (a half-built widget would be closed again when collected).
        if result.logprobs is None:
            raise RequestError("the token explorer needs the answer's logprobs: ask for them with --logprobs K "
                               "(%%vllm --explore asks for 5), logprobs=K in Python")
        return super().__new__(cls)

    def __init__(self, result: Any, session: Any = None, **kwargs: Any) -> None:
        self._handle: Any = None
        self._thread: threading.Thread | None = None
        if session is None:
            from ..engine import get_session

            session = get_session()
        self.session = session
        self.branches: list[Branch] = [Branch(result)]
        self.current = 0
        self.focused: int | None = None
        self.error: str | None = None
        self._shown: int | None = None  # the path whose token buttons are shown

        self.header = widgets.HTML()
        self.header.add_class("vllm-explorer-header")
        self.paths = widgets.Dropdown(options=[], description="path", layout=widgets.Layout(width="max-content"))
        self.paths.add_class("vllm-explorer-paths")
        self.paths.observe(self._path_chosen, names="value")
        self.parent_button = widgets.Button(description="parent", icon="arrow-up", tooltip="the path this one left")
        self.parent_button.add_class("vllm-explorer-parent")
        self.parent_button.on_click(lambda _b: self._to_parent())
        self.tokens = widgets.Box(layout=widgets.Layout(display="flex", flex_flow="row wrap", align_items="center"))
        self.tokens.add_class("vllm-explorer-tokens")
        self.detail = widgets.HTML()
        self.detail.add_class("vllm-explorer-detail")
        self.alternatives = widgets.Box(layout=widgets.Layout(display="flex", flex_flow="row wrap"))
        self.alternatives.add_class("vllm-explorer-alternatives")
        self.stats = widgets.HTML()
        self.stats.add_class("vllm-explorer-stats")
        super().__init__([self.header, widgets.HBox([self.paths, self.parent_button]), self.tokens, self.detail,
                          self.alternatives, self.stats], **kwargs)
        self.add_class("vllm-token-explorer")
        self._refresh_paths()
        self._render()

    # ----- public API ----------------------------------------------------------------------------
    @property
    def results(self) -> list[Any]:
        """Every path's result: the answer first, then the branches in the order they were taken."""
        return [branch.result for branch in self.branches]

    @property
    def result(self) -> Any:
        """The result of the path shown now."""
        return self.branches[self.current].result

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def select(self, index: int) -> None:
        """Show path ``index`` (0: the answer)."""
        if not 0 <= index < len(self.branches):
            raise IndexError(f"there are {len(self.branches)} paths, numbered 0 to {len(self.branches) - 1}")
        self.current = index
        self.focused = None
        if self.paths.value != index:
            self.paths.value = index
        self._render()

    def focus(self, position: int) -> TokenLogprobs:
        """Show the alternatives at ``position`` of the path shown (what clicking its token does)."""
        logprobs = self.result.logprobs or []
        if not 0 <= position < len(logprobs):
            raise IndexError(f"the path has {len(logprobs)} tokens, numbered 0 to {len(logprobs) - 1}")
        self.focused = position
        self._render_detail()
        return logprobs[position]

    def branch(self, position: int, token: int | str | TokenChoice, *, wait: bool = True) -> Any:
        """Continue the path shown from its tokens before ``position`` plus ``token``.

        The branch is generated with the answer's sampling settings (its ``max_tokens`` counting the
        tokens before the branch) and grows in the widget as it streams; with ``wait=False`` this
        returns at once (``wait()`` later) and gives None. Raises :class:`RequestError` for a
        position or a token text that is not there, or while another branch is still growing.
        """
        if self.running:
            raise RequestError("a branch is still growing: wait for it (explorer.wait()) before taking another")
        parent = self.result
        logprobs = parent.logprobs or []
        if not 0 <= position < len(logprobs):
            raise RequestError(f"the path has {len(logprobs)} tokens, numbered 0 to {len(logprobs) - 1}, not {position}")
        chosen = self._choice(logprobs[position], token)
        params = parent.sampling_params
        prompt = TokenPrompt(list(parent.generation.prompt_token_ids) + list(parent.token_ids[:position])
                             + [chosen.token_id])
        sampling = params.clone()
        if getattr(params, "max_tokens", None) is not None:
            left = max(1, int(params.max_tokens) - position - 1)
            if hasattr(sampling, "values"):  # a server's RemoteParams
                sampling.values["max_tokens"] = left
            else:
                sampling.max_tokens = left
        handle = self.session.submit(prompt, sampling, lora=parent.generation.lora)[0]  # the same adapter
        self._handle = handle
        self.branches.append(Branch(self._compose(parent, position, chosen, handle.snapshot(), handle), self.current,
                                    position, chosen))
        index = len(self.branches) - 1
        self.current, self.focused = index, None
        self._refresh_paths()
        self.stats.value = "<i>generating…</i>"
        self._thread = threading.Thread(target=self._grow, args=(index, parent, position, chosen, handle),
                                        name="vllm-magic-explorer", daemon=True)
        self._thread.start()
        if not wait:
            return None
        self.wait()
        return self.branches[index].result

    def wait(self, timeout: float | None = None) -> Any:
        """Wait for the branch that is growing; returns the path shown."""
        thread = self._thread
        if thread is not None:
            try:
                thread.join(timeout)
            except KeyboardInterrupt:
                self.stop()
                raise
            if thread.is_alive():
                raise TimeoutError(f"the branch did not finish in {timeout} s")
        if self.error:
            raise RequestError(self.error)
        return self.result

    def stop(self) -> None:
        """Abort the branch that is growing (what it generated stays)."""
        if self._handle is not None:
            self._handle.abort()

    def html(self) -> str:
        """The path shown, as static HTML (coloured tokens, alternatives in tooltips)."""
        return tokens_html(self.result.logprobs or [], self._title())

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        bundle = super()._repr_mimebundle_(**kwargs) or {}
        bundle = dict(bundle)
        bundle["text/html"] = self.html()  # where widgets do not render: a static picture of the tokens
        bundle["text/plain"] = repr(self)
        return bundle

    def close(self) -> None:
        self.stop()
        for child in list(self.tokens.children) + list(self.alternatives.children):
            child.close()
        for child in (self.header, self.paths, self.parent_button, self.tokens, self.detail, self.alternatives,
                      self.stats):
            child.close()
        super().close()

    def __repr__(self) -> str:
        tokens = len(self.results[0].logprobs or [])
        return f"TokenExplorer({tokens} tokens, {len(self.branches)} path{'s' * (len(self.branches) != 1)})"

    # ----- branches ------------------------------------------------------------------------------
    @staticmethod
    def _choice(position: TokenLogprobs, token: int | str | TokenChoice) -> TokenChoice:
        if isinstance(token, TokenChoice):
            return token
        candidates = list(position.top) or [position]
        if isinstance(token, int):
            found = next((c for c in candidates if c.token_id == token), None)
            return found or TokenChoice(token, "", float("-inf"), None)
        found = next((c for c in candidates if c.text == token), None)
        if found is None:
            shown = ", ".join(repr(c.text) for c in candidates)
            raise RequestError(f"{token!r} is not one of the alternatives there ({shown}); give a token id to "
                               "branch to any token")
        return found

    @staticmethod
    def _compose(parent: Any, position: int, chosen: TokenChoice, tail: GenerationResult,
                 handle: Any) -> Any:
        """The whole path of a branch: the parent's tokens before ``position``, the chosen token,
        then what the engine generated after it (``tail``)."""
        before = (parent.logprobs or [])[:position]
        at = TokenLogprobs(chosen.token_id, chosen.text, chosen.logprob, chosen.rank,
                           (parent.logprobs or [])[position].top)
        continued = tail.completions[0] if tail.completions else Completion(0)
        logprobs = before + [at] + list(continued.logprobs or [])
        text = "".join(t.text for t in before) + chosen.text + continued.text
        completion = Completion(0, text, list(parent.token_ids[:position]) + [chosen.token_id] + list(continued.token_ids),
                                continued.finish_reason, "", logprobs)
        generation = GenerationResult(
            request_id=tail.request_id, prompt=parent.prompt,
            prompt_token_ids=list(parent.generation.prompt_token_ids), completions=[completion], ttft=tail.ttft,
            elapsed=tail.elapsed, aborted=tail.aborted, error=tail.error, cached_tokens=tail.cached_tokens,
            logprobs_mode=tail.logprobs_mode, lora=tail.lora)
        # The parent's own class (a VllmResult): the results module shows the explorer, not the reverse.
        return type(parent)(generation, parent.user_prompt, handle.sampling_params, None, list(parent.messages))

    def _grow(self, index: int, parent: Any, position: int, chosen: TokenChoice, handle: Any) -> None:
        # Its own thread: it only sets widget traits (comm messages are thread-safe).
        shown = 0.0
        try:
            count = 0
            while not handle.done:
                handle.wait_for_delta(count, timeout=_REFRESH)
                count = handle.delta_count
                now = time.monotonic()
                if now - shown >= _REFRESH:
                    self._update(index, parent, position, chosen, handle.snapshot(), handle)
                    shown = now
            self._update(index, parent, position, chosen, handle.result(), handle)
            self.error = None
        except Exception as exc:  # noqa: BLE001 - shown in the widget, raised by wait()
            self.error = f"the branch failed: {' '.join(str(exc).split())[:300]}"
            self.stats.value = f"<span style='color: var(--jp-error-color1, #c00)'>{html.escape(self.error)}</span>"
        finally:
            self._handle = None

    def _update(self, index: int, parent: Any, position: int, chosen: TokenChoice, tail: GenerationResult,
                handle: Any) -> None:
        self.branches[index].result = self._compose(parent, position, chosen, tail, handle)
        if self.current == index:
            self._render(growing=not handle.done)
        if handle.done:
            self._refresh_paths()

    # ----- rendering -----------------------------------------------------------------------------
    def _title(self) -> str:
        branch = self.branches[self.current]
        result = branch.result
        return (f"{len(result.logprobs or [])} tokens · coloured by probability: "
                f"{mode_label(result.generation.logprobs_mode)}")

    def _refresh_paths(self) -> None:
        options = []
        for i, branch in enumerate(self.branches):
            depth, parent = 0, branch.parent
            while parent is not None:
                depth, parent = depth + 1, self.branches[parent].parent
            options.append(("\u00a0\u00a0" * depth + f"{i}: {branch.label}", i))
        self.paths.unobserve(self._path_chosen, names="value")
        try:
            self.paths.options = options
            self.paths.value = self.current
        finally:
            self.paths.observe(self._path_chosen, names="value")
        self.parent_button.disabled = self.branches[self.current].parent is None

    def _path_chosen(self, change: dict) -> None:
        if change["new"] is not None and change["new"] != self.current:
            self.select(change["new"])

    def _to_parent(self) -> None:
        parent = self.branches[self.current].parent
        if parent is not None:
            self.select(parent)

    def _render(self, growing: bool = False) -> None:
        branch = self.branches[self.current]
        result = branch.result
        self.header.value = f"<b>Token explorer</b> · {html.escape(self._title())} · click a token for its alternatives"
        logprobs = result.logprobs or []
        old = list(self.tokens.children)
        if self._shown == self.current and len(old) <= len(logprobs):  # a growing branch: add its new tokens
            self.tokens.children = old + [self._token_button(i, logprobs[i], i == branch.position)
                                          for i in range(len(old), len(logprobs))]
        else:
            self.tokens.children = [self._token_button(i, t, i == branch.position) for i, t in enumerate(logprobs)]
            for child in old:
                child.close()
        self._shown = self.current
        self.parent_button.disabled = branch.parent is None
        if growing:
            self.stats.value = "<i>generating…</i>"
        else:
            self.stats.value = html.escape(self._stats(branch))
        self._render_detail()

    def _stats(self, branch: Branch) -> str:
        result = branch.result
        parts = [result.generation.summary]
        if branch.parent is not None:
            prompt = len(result.generation.prompt_token_ids) + (branch.position or 0) + 1
            parts.append(f"branch prompt {prompt} tokens, {result.cached_tokens or 0} from the prefix cache")
        return " · ".join(parts)

    def _token_button(self, index: int, token: TokenLogprobs, chosen: bool) -> widgets.Button:
        button = widgets.Button(description=_show(token.text), tooltip=_tooltip(token),
                                layout=widgets.Layout(width="auto", height="auto", padding="0 2px", margin="1px"))
        button.style.button_color = probability_colour(token.prob)
        button.add_class("vllm-explorer-token")
        if chosen:
            button.add_class("vllm-explorer-branch-point")
            button.style.font_weight = "bold"
        button.on_click(lambda _b, i=index: self.focus(i))
        return button

    def _render_detail(self) -> None:
        old = list(self.alternatives.children)
        position = self.focused
        logprobs = self.result.logprobs or []
        if position is None or position >= len(logprobs):
            self.detail.value = ""
            self.alternatives.children = []
        else:
            token = logprobs[position]
            self.detail.value = (f"token {position + 1}: <code>{html.escape(repr(token.text))}</code> "
                                 f"p={token.prob:.3f} (logprob {token.logprob:.3f}, rank {token.rank}) · "
                                 "choose another to branch from here:")
            buttons = []
            for choice in token.top:
                button = widgets.Button(description=f"{_show(choice.text)} {_percent(choice.prob)}",
                                        tooltip=f"branch: continue with {choice.text!r} (logprob {choice.logprob:.3f})",
                                        layout=widgets.Layout(width="auto", margin="1px"),
                                        disabled=choice.token_id == token.token_id)
                button.style.button_color = probability_colour(choice.prob)
                button.add_class("vllm-explorer-alternative")
                button.on_click(lambda _b, p=position, c=choice: self._clicked_alternative(p, c))
                buttons.append(button)
            self.alternatives.children = buttons
        for child in old:
            child.close()

    def _clicked_alternative(self, position: int, choice: TokenChoice) -> None:
        try:
            self.branch(position, choice, wait=False)
        except RequestError as exc:
            self.stats.value = f"<span style='color: var(--jp-error-color1, #c00)'>{html.escape(str(exc))}</span>"
