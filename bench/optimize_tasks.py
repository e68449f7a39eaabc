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


# Ten departments, each with its own kinds of message: the label is a word the model
# cannot guess from the instruction alone, but can copy from a similar message's answer.
# A fixed set of a few demonstrations shows only a few labels; per-input demonstrations
# show the ones that matter for this message.
DEPARTMENTS: Final = {
    "billing": (
        "I was charged twice for my {month} invoice.",
        "Why is there an extra fee of {n} dollars on my bill?",
        "Please update the credit card used for my subscription.",
    ),
    "shipping": (
        "My package to {city} has not arrived after {n} days.",
        "The tracking number of my parcel stopped updating on {day}.",
        "Can the courier deliver my order to a different address in {city}?",
    ),
    "returns": (
        "I want to send back the {item} I bought, they do not fit.",
        "How do I return {n} damaged {item}?",
        "Can I exchange my {item} for another model?",
    ),
    "helpdesk": (
        "My laptop will not connect to the office VPN since {day}.",
        "I forgot my password and I am locked out of my email.",
        "The printer on floor {n} shows a paper jam error.",
    ),
    "hr": (
        "How many vacation days do I have left this year?",
        "I need a copy of my employment contract for my bank in {city}.",
        "When is the first payroll date for new hires starting {day}?",
    ),
    "facilities": (
        "The heating in meeting room {n} is broken.",
        "A light is flickering in the kitchen on floor {n}.",
        "The elevator in the {city} building is out of order again.",
    ),
    "legal": (
        "Can you review this NDA before I sign it on {day}?",
        "Do we need a license to use this font in our {city} ads?",
        "A supplier is threatening to sue us over a late payment.",
    ),
    "security": (
        "Someone followed me through the badge door at the {city} entrance.",
        "I received a phishing email pretending to be the CEO.",
        "My access badge was stolen from my car on {day}.",
    ),
    "sales": (
        "I would like a quote for {n} {item} for our company.",
        "Do you offer volume discounts for schools buying {item}?",
        "Can I schedule a product demo {day}?",
    ),
    "marketing": (
        "Can we get the new logo files for the {city} campaign?",
        "Who approves posts on our social media accounts?",
        "We need banners for the trade fair in {city}.",
    ),
}
MONTHS: Final = ("January", "March", "May", "July", "September", "November")


def routing_task(n: int, seed: int = 3) -> Task:
    """Route a message to one of ten departments (varied inputs: ten kinds of message,
    thirty phrasings, each label a word to copy rather than to guess)."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        label = rng.choice(sorted(DEPARTMENTS))
        text = rng.choice(DEPARTMENTS[label]).format(
            n=rng.randint(2, 40),
            item=rng.choice(ITEMS),
            city=rng.choice(CITIES),
            day=rng.choice(DAYS),
            month=rng.choice(MONTHS),
        )
        items.append(Item(f"route-{i}", text, label))
    instruction = "Which department should handle this message? Answer with one word."
    return Task("routing", f"{instruction}\n{{text}}", instruction, "department", items)


TASKS: Final = {"city": city_task, "sentiment": sentiment_task, "routing": routing_task}
