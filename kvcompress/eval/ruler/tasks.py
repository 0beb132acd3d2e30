"""RULER's synthetic tasks (Hsieh et al., 2024, "RULER: What's the Real Context Size of Your Long-Context
Language Models?"), generated here from a seed and local text.

* needle retrieval (``niah_*``): sentences "One of the special magic <values> for <key> is: <value>." hidden in
  a haystack of repeated noise, of real text, or of other needles; single, multi-key (distractor needles),
  multi-value (every value of one key), multi-query (several keys asked at once);
* ``vt``, variable tracking: a chain VAR A = v, VAR B = VAR A, ... hidden in noise; name every variable bound to v;
* ``cwe``, common-words extraction: a numbered word list where ``num`` words occur ``freq`` times and the others
  at most ``freq_rare`` times; name the ``num`` most common;
* ``fwe``, frequent-words extraction: made-up words with Zipf counts c_r = floor(c_1 / r^alpha); name the top 3.

Every task builds a prompt of exactly ``length`` units (``haystack.assemble``) and lists its references; all of
them are scored "all-of" (the fraction of references found in the output). The ``max_new_tokens`` defaults are
smaller than RULER's (128 for needles) so CPU runs stay short; ``eval.max_new_tokens`` overrides them.
"""
from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property

from kvcompress.eval.passkey import FILLER
from kvcompress.eval.ruler import words
from kvcompress.eval.ruler.haystack import Codec, Prompt, Source, assemble, fill_items, insert, too_short

NEEDLE = " One of the special magic {kind} for {key} is: {value}."
NIAH_INTRO = ("Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
              "I will quiz you about the {kind} afterwards.\n")
NIAH_QUERY = "\nWhat are all the special magic {kind} for {keys} mentioned in the provided text?"
NIAH_ANSWER = " The special magic {kind} for {keys} mentioned in the provided text are"
VT_INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n"
VT_QUERY = "\nQuestion: Find all variables that are assigned the value {value} in the text above."
VT_ANSWER = (" Answer: According to the chain(s) of variable assignment in the text above, {n} variables are "
             "assigned the value {value}, they are:")
CWE_INTRO = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
             "ones that appear most often.\n")
CWE_QUERY = "\nQuestion: What are the {n} most common words in the above list?"
CWE_ANSWER = " Answer: The top {n} words that appear most often in the list are:"
FWE_INTRO = ("Read the following coded text and track the frequency of each coded word. Find the {n} most "
             "frequently appeared coded words.\n")
FWE_QUERY = "\nQuestion: What are the {n} most frequently appeared words in the above coded text?"
FWE_ANSWER = " Answer: According to the coded text above, the {n} most frequently appeared words are:"
DEPTH_GRID = 40  # needles go at distinct depths of a 40-point grid over [0, 1], as RULER samples them


@dataclass
class Sample:
    task: str
    length: int
    prompt: Prompt
    references: list[str]
    metric: str = "all"                                  # "all": all-of; "part": part-of (QA)
    needles: list[str] = field(default_factory=list)     # the inserted sentences, order of prompt.needles
    depths: list[float] = field(default_factory=list)


class Haystacks:
    """The run's haystacks, built once: repeated noise, the real text, its word vocabulary."""

    def __init__(self, codec: Codec, text: Callable[[], str]):
        self.codec, self._text = codec, text

    @cached_property
    def noise(self) -> Source:
        return Source(self.codec, FILLER * 16, random_start=False)

    @cached_property
    def text(self) -> Source:
        return Source(self.codec, self._text())

    @cached_property
    def vocabulary(self) -> list[str]:
        pool = words.vocabulary(self._text())
        if len(pool) < 200:
            raise ValueError(f"the haystack text has {len(pool)} distinct words (>= 4 letters); cwe needs >= 200")
        return pool


def join_keys(keys: list[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + " and " + keys[-1]


def grid_depths(rng: random.Random, n: int) -> list[float]:
    return [d / (DEPTH_GRID - 1) for d in sorted(rng.sample(range(DEPTH_GRID), n))]


@dataclass(frozen=True)
class Needles:
    haystack: str                 # noise | text | needles
    key: str = "word"             # number | word | uuid
    value: str = "number"
    keys: int = 1                 # needles with distinct keys (the distractors are keys - queries)
    values: int = 1               # values of each queried key
    queries: int = 1              # keys asked at once
    max_new_tokens: int = 32

    def make(self, rng: random.Random, hay: Haystacks, length: int, name: str) -> Sample:
        codec, kind = hay.codec, words.PLURAL[self.value]
        keys = words.distinct(rng, self.key, max(self.keys, self.queries))
        asked = keys[: self.queries]
        values = {k: words.distinct(rng, self.value, self.values if k in asked else 1) for k in keys}
        pairs = [(k, v) for k in keys for v in values[k]]
        rng.shuffle(pairs)
        sentences = [NEEDLE.format(kind=kind, key=k, value=v) for k, v in pairs]
        depths = grid_depths(rng, len(sentences))

        def body(room: int) -> tuple[list, list[int]]:
            units = [codec.encode(s) for s in sentences]
            room -= sum(len(u) for u in units)
            if room < 1:
                raise too_short(length, name)
            if self.haystack == "needles":
                hay_units, _, points = fill_items(codec, self._distractors(rng, set(keys)), room)
            else:
                hay_units, points = getattr(hay, self.haystack).take(rng, room)
            return insert(hay_units, points, units, depths)

        joined = join_keys(asked)
        prompt = assemble(codec, length, NIAH_INTRO.format(kind=kind), NIAH_QUERY.format(kind=kind, keys=joined),
                          NIAH_ANSWER.format(kind=kind, keys=joined), body, name)
        refs = [v for k in asked for v in values[k]]
        return Sample(name, length, prompt, refs, needles=sentences, depths=depths)

    def _distractors(self, rng: random.Random, avoid: set[str]) -> Iterator[str]:
        kind = words.PLURAL[self.value]
        while True:
            key = words.distinct(rng, self.key, 1, avoid)[0]
            yield NEEDLE.format(kind=kind, key=key, value=words.MAKERS[self.value](rng))


@dataclass(frozen=True)
class VariableTracking:
    chains: int = 1
    hops: int = 4
    max_new_tokens: int = 32

    def make(self, rng: random.Random, hay: Haystacks, length: int, name: str) -> Sample:
        names = words.distinct_with(rng, words.variable, self.chains * (self.hops + 1))
        values = words.distinct_with(rng, lambda r: words.number(r, 5), self.chains)
        sentences, groups = [], []
        for c in range(self.chains):
            chain = names[c * (self.hops + 1) : (c + 1) * (self.hops + 1)]
            groups.append(chain)
            sentences += [f" VAR {chain[0]} = {values[c]}."]
            sentences += [f" VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:], strict=False)]
        depths = grid_depths(rng, len(sentences))  # chains interleave; each chain stays in order

        def body(room: int) -> tuple[list, list[int]]:
            units = [hay.codec.encode(s) for s in sentences]
            room -= sum(len(u) for u in units)
            if room < 1:
                raise too_short(length, name)
            hay_units, points = hay.noise.take(rng, room)
            return insert(hay_units, points, units, depths)

        prompt = assemble(hay.codec, length, VT_INTRO, VT_QUERY.format(value=values[0]),
                          VT_ANSWER.format(n=self.hops + 1, value=values[0]), body, name)
        return Sample(name, length, prompt, groups[0], needles=sentences, depths=depths)


def fit_list(room: int, build: Callable[[float], tuple[list, list[str], bool]], name: str, length: int):
    """Try the list plan at decreasing fill fractions until every planned item fits (its tail absorbs the rest)."""
    for fraction in (0.85, 0.7, 0.55, 0.4, 0.25):
        units, kept, ok = build(fraction)
        if ok:
            return units, kept
    raise too_short(length, name)


@dataclass(frozen=True)
class CommonWords:
    num: int = 10          # words to find
    freq: int = 30         # their count (lowered to fit short prompts, never to <= freq_rare + 1)
    freq_rare: int = 3     # count of every other word
    max_new_tokens: int = 96

    def make(self, rng: random.Random, hay: Haystacks, length: int, name: str) -> Sample:
        pool = rng.sample(hay.vocabulary, min(len(hay.vocabulary), 4000))
        common, rest = pool[: self.num], pool[self.num :]
        unit_len = sum(len(hay.codec.encode(f"\n{100 + i}. {w}")) for i, w in enumerate(rest[:16])) / 16

        def build(fraction: float, room: int):
            cap = room / unit_len * fraction
            freq = min(self.freq, int(cap * 0.75 / self.num))  # common words take at most 3/4 of the list
            if freq <= self.freq_rare + 1:
                return [], [], False
            rare = rest[: max(0, int((cap - freq * self.num) / self.freq_rare))]
            main = common * freq + rare * self.freq_rare
            rng.shuffle(main)
            seq = main + rest[len(rare) :]  # then words seen once
            units, kept, _ = fill_items(hay.codec, (f"\n{i + 1}. {w}" for i, w in enumerate(seq)), room)
            counts = Counter(k.split(". ", 1)[1] for k in kept)
            top = counts.most_common(self.num + 1)
            ok = len(kept) >= len(main) and {w for w, _ in top[: self.num]} == set(common) and (
                len(top) <= self.num or top[self.num][1] < freq)
            return units, kept, ok

        prompt = assemble(hay.codec, length, CWE_INTRO, CWE_QUERY.format(n=self.num), CWE_ANSWER.format(n=self.num),
                          lambda room: (fit_list(room, lambda f: build(f, room), name, length)[0], []), name)
        return Sample(name, length, prompt, common)


@dataclass(frozen=True)
class FrequentWords:
    alpha: float = 2.0
    top: int = 3
    max_new_tokens: int = 32

    def make(self, rng: random.Random, hay: Haystacks, length: int, name: str) -> Sample:
        vocab = words.distinct_with(rng, words.coded_word, length + 64)  # enough to fill any room once
        unit_len = sum(len(hay.codec.encode(f" {w}")) for w in vocab[:32]) / 32
        zeta = sum(r ** -self.alpha for r in range(1, 1000))

        def build(fraction: float, room: int):
            c1 = int(room / unit_len * fraction / zeta)
            counts = [int(c1 / r**self.alpha) for r in range(1, len(vocab))]
            counts = [c for c in counts if c >= 1]  # then words seen once
            if len(counts) < self.top or counts[self.top - 1] <= max([1, *counts[self.top : self.top + 1]]):
                return [], [], False
            main = [w for w, c in zip(vocab, counts, strict=False) for _ in range(c)]
            rng.shuffle(main)
            seq = main + vocab[len(counts) :]
            units, kept, _ = fill_items(hay.codec, (f" {w}" for w in seq), room)
            return units, kept, len(kept) >= len(main)

        prompt = assemble(hay.codec, length, FWE_INTRO.format(n=self.top), FWE_QUERY.format(n=self.top),
                          FWE_ANSWER.format(n=self.top),
                          lambda room: (fit_list(room, lambda f: build(f, room), name, length)[0], []), name)
        return Sample(name, length, prompt, vocab[: self.top])


TASKS = {
    "niah_single_1": Needles("noise", "word", "number"),
    "niah_single_2": Needles("text", "word", "number"),
    "niah_single_3": Needles("text", "word", "uuid", max_new_tokens=48),
    "niah_single_word": Needles("text", "word", "word"),
    "niah_multikey_1": Needles("text", keys=4),
    "niah_multikey_2": Needles("needles", "word", "number"),
    "niah_multikey_3": Needles("needles", "uuid", "uuid", max_new_tokens=48),
    "niah_multivalue": Needles("text", values=4, max_new_tokens=64),
    "niah_multiquery": Needles("text", keys=4, queries=4, max_new_tokens=64),
    "vt": VariableTracking(),
    "cwe": CommonWords(),
    "fwe": FrequentWords(),
}
