"""Random needle keys and values (numbers, words, UUIDs), variable names, coded words, and a word vocabulary
drawn from local text. Everything comes from a ``random.Random`` the caller seeds.
"""
from __future__ import annotations

import random
import re
import string
import uuid

# adjective-noun pairs stand in for RULER's wonderwords keys (40 x 40 = 1600 distinct keys)
ADJECTIVES = ("amber ancient brave bright calm clever cosmic crimson curious dusty eager fancy fierce gentle "
              "golden hollow humble icy jolly lively lonely lucky marble mellow misty noble obedient odd "
              "pale proud quiet rapid rustic silent silver sleepy smooth spotty tender wild").split()
NOUNS = ("anchor badger basket beacon candle castle cedar comet copper desert falcon fern garden harbor "
         "helmet island jacket kettle lantern meadow mirror monkey needle orchard otter pebble pepper "
         "pillow pocket quartz river saddle shovel spoon thunder tiger tower violin walnut willow").split()

# words never used as extraction targets (too common to be a fair "common word")
STOPWORDS = set("that this with they them then there their were when what your have from said into very just "
                "could would should about after before because while where which some also each other "
                "will been than more only over such like upon shall thou thee thy".split())


def number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def word(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def uuid4(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


MAKERS = {"number": number, "word": word, "uuid": uuid4}
PLURAL = {"number": "numbers", "word": "words", "uuid": "uuids"}


def distinct_with(rng: random.Random, maker, n: int, avoid: set[str] = frozenset()) -> list[str]:
    """``n`` distinct values of ``maker(rng)``, none of them in ``avoid``."""
    out: dict[str, None] = {}
    while len(out) < n:
        v = maker(rng)
        if v not in avoid:
            out[v] = None
    return list(out)


def distinct(rng: random.Random, kind: str, n: int, avoid: set[str] = frozenset()) -> list[str]:
    """``n`` distinct random values of ``kind`` (number, word, uuid), none of them in ``avoid``."""
    return distinct_with(rng, MAKERS[kind], n, avoid)


def variable(rng: random.Random) -> str:
    """A five-letter upper-case variable name (RULER's variable tracking)."""
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(5))


def coded_word(rng: random.Random) -> str:
    """A random lower-case string of 3-6 letters (RULER's frequent-words extraction uses made-up words)."""
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))


def vocabulary(text: str, limit: int = 5000) -> list[str]:
    """Distinct lower-case alphabetic words of >= 4 letters of ``text`` (stopwords out), sorted: a
    deterministic pool for common-words extraction."""
    words = {w for w in re.findall(r"\b[a-z]+\b", text[:2_000_000]) if len(w) >= 4 and w not in STOPWORDS}
    pool = sorted(words)
    return random.Random(0).sample(pool, limit) if len(pool) > limit else pool
