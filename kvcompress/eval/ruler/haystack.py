"""Prompts of an exact length: the units they are counted in, haystacks, needle insertion, assembly.

A prompt is ``head + body + tail`` with
  head = BOS + chat prefix + instruction,   tail = question + chat suffix + answer prefix,
and the body (haystack, needles, word lists) filling exactly ``room = length - |head| - |tail|`` units.
Units are the model's tokens (``token_codec``) or characters (``char_codec``, for the lm-eval tasks, which
hand text to the model). Pieces are encoded separately and concatenated, so every offset is exact.
Needles go on sentence boundaries (after a unit whose text ends in ``. ! ?`` or holds a newline), at the
boundary nearest to ``depth x |haystack|``, as RULER (Hsieh et al., 2024) places them in its essays.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from kvcompress.eval.data import tokenize

SENTINEL = "\u2063KVC_RULER_MESSAGE\u2063"


@dataclass
class Codec:
    """How text becomes counted units. ``ends(units)`` marks units after which a sentence may end."""

    encode: Callable[[str], list]
    ends: Callable[[Sequence], np.ndarray]
    bos: list = field(default_factory=list)
    chat: tuple[list, list] = ((), ())  # units before and after the user message (and generation prompt)


def _sentence_end(text: str) -> bool:
    return "\n" in text or text.rstrip(" ").endswith((".", "!", "?"))


def token_codec(tokenizer, bos: int | None = None, chat: bool = False) -> Codec:
    """The model's tokens; ``chat`` wraps the user message in the tokenizer's chat template when it has one."""
    memo: dict[int, bool] = {}

    def ends(units: Sequence[int]) -> np.ndarray:
        for u in set(units) - memo.keys():
            memo[u] = _sentence_end(tokenizer.decode([u]))
        return np.fromiter((memo[u] for u in units), dtype=bool, count=len(units))

    wrap: tuple[list, list] = ([], [])
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": SENTINEL}], tokenize=False,
                                             add_generation_prompt=True)
        before, after = text.split(SENTINEL)
        wrap = (tokenize(tokenizer, before), tokenize(tokenizer, after))
    first = [bos] if bos is not None and wrap[0][:1] != [bos] else []
    return Codec(lambda s: tokenize(tokenizer, s), ends, first, wrap)


def char_codec() -> Codec:
    return Codec(list, lambda units: np.fromiter((_sentence_end(u) for u in units), dtype=bool, count=len(units)))


class Source:
    """A haystack: units and sentence ends, tiled when shorter than asked; windows start on a sentence."""

    def __init__(self, codec: Codec, text: str, random_start: bool = True):
        self.units = codec.encode(text)
        if not self.units:
            raise ValueError("the haystack text is empty")
        self.mask = codec.ends(self.units)
        self.random_start = random_start

    def take(self, rng: random.Random, room: int) -> tuple[list, list[int]]:
        """``room`` units from a sentence start, and the insertion points (sentence boundaries, 0 and room)."""
        units, mask = self.units, self.mask
        if len(units) < 2 * room + 1:
            times = (2 * room + 1) // len(units) + 1
            units, mask = units * times, np.tile(mask, times)
        starts = np.flatnonzero(mask[: len(units) - room - 1]) + 1
        start = int(starts[rng.randrange(len(starts))]) if self.random_start and len(starts) else 0
        body = units[start : start + room]
        return body, [0, *(np.flatnonzero(mask[start : start + room - 1]) + 1).tolist(), room]


def too_short(length: int, task: str) -> ValueError:
    return ValueError(f"eval.lengths: {length} is too short for task {task}")


def insert(body: list, points: list[int], needles: list[list], depths: list[float]) -> tuple[list, list[int]]:
    """Insert each needle at the insertion point nearest ``depth x len(body)``; returns the units and each
    needle's offset in them (in the order given)."""
    at = [min(points, key=lambda p: (abs(p - d * len(body)), p)) for d in depths]
    order = sorted(range(len(needles)), key=lambda i: (at[i], depths[i], i))
    out, offsets, done = [], [0] * len(needles), 0
    for i in order:
        out += body[done : at[i]]
        done = at[i]
        offsets[i] = len(out)
        out += needles[i]
    return out + body[done:], offsets


def fill_items(codec: Codec, items: Iterator[str], room: int) -> tuple[list, list[str], list[int]]:
    """Encode items one by one while they fit in ``room``; the next item is cut to fill the rest exactly.
    Returns the units, the items kept whole, and where each of them (and the cut one) starts."""
    units: list = []
    kept: list[str] = []
    starts: list[int] = []
    for item in items:
        ids = codec.encode(item)
        starts.append(len(units))
        if len(units) + len(ids) > room:
            return units + ids[: room - len(units)], kept, starts
        units += ids
        kept.append(item)
    raise ValueError("fill_items: ran out of items before filling the room")


@dataclass
class Prompt:
    context: list        # what query-agnostic compresses before the question arrives
    question: list       # the question, chat suffix and answer prefix
    needles: list[int] = field(default_factory=list)  # offsets of the needles in context + question

    @property
    def units(self) -> list:
        return self.context + self.question


def assemble(codec: Codec, length: int, intro: str, query: str, answer_prefix: str,
             body: Callable[[int], tuple[list, list[int]]], task: str) -> Prompt:
    """head + body(room) + tail of exactly ``length`` units; ``body`` returns (units, needle offsets in it)."""
    head = codec.bos + list(codec.chat[0]) + codec.encode(intro)
    tail = codec.encode(query) + list(codec.chat[1]) + codec.encode(answer_prefix)
    room = length - len(head) - len(tail)
    if room < 16:
        raise too_short(length, task)
    units, offsets = body(room)
    if len(units) != room:
        raise AssertionError(f"{task}: body of {len(units)} units for a room of {room}")
    return Prompt(head + units, tail, [len(head) + o for o in offsets])
