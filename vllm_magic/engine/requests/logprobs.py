"""Log probabilities of tokens, in one form for every engine and front-end.

vLLM gives, per position, a dict ``{token_id: Logprob(logprob, rank, decoded_token)}`` holding the
token at that position and the top-K alternatives; a server gives OpenAI's lists keyed by text
(plus vLLM's ``prompt_logprobs`` keyed by id). Both become :class:`TokenLogprobs`: the token at
the position, and the alternatives sorted by rank. Which probabilities they are (the model's raw
ones, or those after temperature and top-p) is the engine's ``logprobs_mode``: :func:`mode_label`
says it in words.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

__all__ = ["TokenChoice", "TokenLogprobs", "from_vllm_position", "from_vllm_positions", "from_openai_completion",
           "from_server_prompt_logprobs", "openai_ids", "token_id_of", "mean_logprob",
           "perplexity", "mode_label", "PROCESSED_MODES", "RAW_MODES", "openai_completion_logprobs",
           "openai_chat_logprobs", "visible_positions"]

#: vLLM's ``logprobs_mode`` values, by what they measure.
RAW_MODES = ("raw_logprobs", "raw_logits")
PROCESSED_MODES = ("processed_logprobs", "processed_logits")


@dataclass(frozen=True)
class TokenChoice:
    """One candidate token at a position: its id, its text, its log probability and its rank
    (1 is the most likely; None where the engine did not say)."""

    token_id: int
    text: str
    logprob: float
    rank: int | None = None

    @property
    def prob(self) -> float:
        """The probability, ``exp(logprob)`` (0.0 for a token the sampler ruled out)."""
        return math.exp(self.logprob) if self.logprob > -math.inf else 0.0


@dataclass(frozen=True)
class TokenLogprobs(TokenChoice):
    """The token at one position (its own id, text, log probability and rank) and ``top``: the
    most likely tokens there, best first (the ``K`` of ``logprobs=K``; the token itself among them
    when it is in the top K)."""

    top: tuple[TokenChoice, ...] = field(default=())

    def alternatives(self) -> list[TokenChoice]:
        """The top tokens other than the one at this position."""
        return [choice for choice in self.top if choice.token_id != self.token_id]

    def as_dict(self) -> dict[str, Any]:
        """Plain values (for JSON and DataFrames)."""
        return {"token_id": self.token_id, "text": self.text, "logprob": self.logprob, "rank": self.rank,
                "top": [{"token_id": c.token_id, "text": c.text, "logprob": c.logprob, "rank": c.rank}
                        for c in self.top]}

    def __repr__(self) -> str:
        return f"TokenLogprobs({self.text!r}, logprob={self.logprob:.3f}, rank={self.rank}, top={len(self.top)})"


def from_vllm_position(token_id: int, position: Mapping[int, Any], k: int | None = None) -> TokenLogprobs:
    """One position of vLLM's logprobs (``{id: Logprob}``) as :class:`TokenLogprobs` for ``token_id``.

    vLLM's dict holds the top ``k`` tokens plus the token itself where it ranks lower; ``top``
    keeps the top ``k`` (every entry when ``k`` is None)."""
    choices = [TokenChoice(int(tid), _text(lp.decoded_token), float(lp.logprob), lp.rank) for tid, lp in position.items()]
    own = next((c for c in choices if c.token_id == token_id), None)
    if own is None:  # vLLM always includes the token itself; a foreign engine might not
        own = TokenChoice(token_id, "", -math.inf, None)
    top = tuple(sorted((c for c in choices if k is None or c.rank is None or c.rank <= k), key=_rank_order))
    return TokenLogprobs(own.token_id, own.text, own.logprob, own.rank, top)


def from_vllm_positions(token_ids: Sequence[int], positions: Iterable[Mapping[int, Any] | None],
                        k: int | None = None) -> list[TokenLogprobs | None]:
    """vLLM's per-position logprobs (a list of dicts, or 0.32's ``FlatLogprobs``) for ``token_ids``;
    None where a position has none (the first prompt token)."""
    return [None if position is None else from_vllm_position(tid, position, k)
            for tid, position in zip(token_ids, positions)]


def _rank_order(choice: TokenChoice) -> tuple[int, float]:
    return (choice.rank if choice.rank is not None else 1 << 30, -choice.logprob)


def _text(decoded: Any) -> str:
    return decoded if isinstance(decoded, str) else ""


def mean_logprob(positions: Iterable[TokenLogprobs | None]) -> float | None:
    """The mean log probability of the tokens (None without any)."""
    values = [p.logprob for p in positions if p is not None]
    return sum(values) / len(values) if values else None


def perplexity(positions: Iterable[TokenLogprobs | None]) -> float | None:
    """``exp(-mean logprob)``: how many equally likely tokens the model hesitated between, on average."""
    mean = mean_logprob(positions)
    if mean is None:
        return None
    return math.exp(-mean) if mean > -700 else math.inf


def mode_label(mode: str | None) -> str:
    """What the numbers are, in words, for vLLM's ``logprobs_mode`` (None: a server's, unknown here)."""
    if mode in RAW_MODES:
        return "the model's raw probabilities (before temperature, top-p and penalties)"
    if mode in PROCESSED_MODES:
        return "probabilities after temperature, top-p and penalties (as sampled)"
    return "the server's logprobs (vLLM's default: raw, before temperature and top-p)"


# ----- a server's logprobs (OpenAI's completions shape, vLLM's extras) ------------------------------

def token_id_of(token: str) -> int | None:
    """The id in a server's ``token_id:N`` (vLLM's ``return_tokens_as_token_ids``), else None."""
    if token.startswith("token_id:"):
        try:
            return int(token[9:])
        except ValueError:
            return None
    return None


def openai_ids(logprobs: Mapping[str, Any] | None) -> set[int]:
    """Every token id named in one choice's completions ``logprobs`` (tokens as ``token_id:N``)."""
    ids: set[int] = set()
    if not logprobs:
        return ids
    for token in logprobs.get("tokens") or ():
        if (tid := token_id_of(token)) is not None:
            ids.add(tid)
    for top in logprobs.get("top_logprobs") or ():
        for token in top or {}:
            if (tid := token_id_of(token)) is not None:
                ids.add(tid)
    return ids


def from_openai_completion(logprobs: Mapping[str, Any], token_ids: Sequence[int], k: int | None,
                           texts: Mapping[int, str]) -> list[TokenLogprobs]:
    """One choice's completions ``logprobs`` (tokens as ``token_id:N``; ``texts`` gives each id's
    text) as :class:`TokenLogprobs`. OpenAI's shape has no ranks: the top tokens are ranked by their
    order, and the token itself gets its rank when it is among them (None when it ranks lower)."""
    tokens = list(logprobs.get("tokens") or ())
    values = list(logprobs.get("token_logprobs") or ())
    tops = list(logprobs.get("top_logprobs") or ())
    result = []
    for i, token in enumerate(tokens):
        tid = token_id_of(token)
        if tid is None:
            tid = token_ids[i] if i < len(token_ids) else -1
        value = values[i] if i < len(values) and values[i] is not None else -math.inf
        ranked = sorted(((token_id_of(t), lp) for t, lp in (tops[i] or {}).items() if token_id_of(t) is not None)
                        if i < len(tops) else (), key=lambda pair: -pair[1])
        top = tuple(TokenChoice(t, texts.get(t, ""), float(lp), rank)
                    for rank, (t, lp) in enumerate(ranked[: k if k is not None else len(ranked)], start=1))
        rank = next((c.rank for c in top if c.token_id == tid), None)
        if rank is None and ranked and ranked[0][0] == tid:
            rank = 1
        result.append(TokenLogprobs(tid, texts.get(tid, ""), float(value), rank, top))
    return result


def from_server_prompt_logprobs(prompt_logprobs: Sequence[Mapping[str, Any] | None], token_ids: Sequence[int],
                                k: int | None) -> list[TokenLogprobs | None]:
    """vLLM's ``prompt_logprobs`` of a server's answer (``{"ID": {logprob, rank, decoded_token}}``
    per prompt token) as :class:`TokenLogprobs`."""
    class _Logprob:  # the attributes from_vllm_position reads
        def __init__(self, entry: Mapping[str, Any]) -> None:
            self.logprob = entry.get("logprob", -math.inf)
            self.rank = entry.get("rank")
            self.decoded_token = entry.get("decoded_token")

    return [None if position is None else
            from_vllm_position(tid, {int(key): _Logprob(value) for key, value in position.items()}, k)
            for tid, position in zip(token_ids, prompt_logprobs)]


# ----- in OpenAI's shapes (what LangChain users read from ChatOpenAI and OpenAI) ---------------------

def openai_completion_logprobs(positions: Sequence[TokenLogprobs]) -> dict[str, Any]:
    """Logprobs in OpenAI's completions shape (``tokens``, ``token_logprobs``, ``top_logprobs``,
    ``text_offset``), as ``langchain_openai.OpenAI`` puts them in ``generation_info``."""
    offsets, offset = [], 0
    for position in positions:
        offsets.append(offset)
        offset += len(position.text)
    return {"tokens": [p.text for p in positions], "token_logprobs": [p.logprob for p in positions],
            "top_logprobs": [{c.text: c.logprob for c in p.top} for p in positions], "text_offset": offsets}


def openai_chat_logprobs(positions: Sequence[TokenLogprobs]) -> dict[str, Any]:
    """Logprobs in OpenAI's chat shape (``{"content": [{token, logprob, bytes, top_logprobs}]}``), as
    ``ChatOpenAI`` puts them in ``response_metadata["logprobs"]``; token ids ride along as ``token_id``."""
    def entry(choice: TokenChoice) -> dict[str, Any]:
        return {"token": choice.text, "logprob": choice.logprob, "bytes": list(choice.text.encode("utf-8")),
                "token_id": choice.token_id}

    return {"content": [{**entry(p), "top_logprobs": [entry(c) for c in p.top]} for p in positions]}


def visible_positions(positions: Sequence[TokenLogprobs], text: str, finish_reason: str | None) -> list[TokenLogprobs]:
    """The positions of the answer's visible text: without the end-of-turn token that stopped it
    (OpenAI's logprobs leave it out too; vLLM's keep it, as its token ids do)."""
    positions = list(positions)
    if finish_reason == "stop" and positions and positions[-1].text and not text.endswith(positions[-1].text):
        positions.pop()
    return positions
