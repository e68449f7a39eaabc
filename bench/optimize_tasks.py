"""Tasks with programmatic ground truth for the optimization benches.

Each task generates inputs from templates and word lists with a fixed seed, knows the
right answer of every input, and starts from a plain baseline prompt. They are chosen so
that a very small model (SmolLM2-135M) has signal: one field to extract, a small label
set, a short fixed answer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Final

CITIES: Final = (
    "Paris", "Lyon", "Berlin", "Madrid", "Rome", "Vienna", "Oslo", "Lisbon", "Dublin",
    "Prague", "Warsaw", "Athens", "Zurich", "Munich", "Milan", "Porto", "Seville", "Krakow",
    "Helsinki", "Stockholm", "Brussels", "Amsterdam", "Geneva", "Naples", "Valencia",
    "Hamburg", "Bordeaux", "Marseille", "Budapest", "Copenhagen",
)  # fmt: skip
ITEMS: Final = ("boxes", "chairs", "laptops", "bottles", "crates", "lamps", "tables", "books")
DAYS: Final = ("Monday", "Tuesday", "Friday", "next week", "tomorrow", "the weekend")
CITY_SENTENCES: Final = (
    "Please ship {n} {item} to {city} by {day}.",
    "Our office in {city} needs {n} {item} before {day}.",
    "Can you deliver {n} {item} to the {city} store on {day}?",
    "{city} branch here: we want {n} {item} for {day}.",
    "Send {n} {item} over to our team in {city}, ideally {day}.",
    "I am writing from {city} to order {n} {item} for {day}.",
)

THINGS: Final = ("food", "service", "room", "staff", "movie", "book", "phone", "delivery")
POSITIVE: Final = ("wonderful", "excellent", "great", "delightful", "superb", "lovely")
NEGATIVE: Final = ("terrible", "awful", "horrible", "disappointing", "dreadful", "poor")
POS_TAIL: Final = ("I loved it.", "Highly recommended.", "Would come back.", "")
NEG_TAIL: Final = ("I hated it.", "Never again.", "Total waste of money.", "")


@dataclass(frozen=True)
class Item:
    """One input with its right answer."""

    request_id: str
    text: str
    answer: str


@dataclass(frozen=True)
class Task:
    """A task: its baseline template (placeholder ``{text}``), items and DSPy field."""

    name: str
    baseline: str
    instruction: str
    output_field: str
    items: list[Item]


def city_task(n: int, seed: int = 1) -> Task:
    """Extract the city a message is about (one word out of 30)."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        city = rng.choice(CITIES)
        text = rng.choice(CITY_SENTENCES).format(
            n=rng.randint(2, 40), item=rng.choice(ITEMS), city=city, day=rng.choice(DAYS)
        )
        items.append(Item(f"city-{i}", text, city))
    instruction = "What city is this message about?"
    return Task("city", f"{instruction}\n{{text}}", instruction, "city", items)


def sentiment_task(n: int, seed: int = 2) -> Task:
    """Label a short review positive or negative."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        positive = rng.random() < 0.5
        adj = rng.choice(POSITIVE if positive else NEGATIVE)
        tail = rng.choice(POS_TAIL if positive else NEG_TAIL)
        text = f"The {rng.choice(THINGS)} was {adj}. {tail}".strip()
        items.append(Item(f"sent-{i}", text, "positive" if positive else "negative"))
    instruction = "Is this review positive or negative?"
    return Task("sentiment", f"{instruction}\n{{text}}", instruction, "label", items)


TASKS: Final = {"city": city_task, "sentiment": sentiment_task}
