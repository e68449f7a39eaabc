"""A scripted two-step pipeline where the steps must fit together: extract, then answer.

Episodes ask for the **country** of the city a message names. Step ``extract`` reads the
message, step ``answer`` reads the extraction's output. The scripted model:

* ``extract``: "city and its country" in the prompt → ``Lyon, France``; "city name only" →
  ``Lyon``; otherwise a chatty sentence naming the city;
* ``answer``: "country only" in the prompt → the country named in its notes, else
  ``unknown``; otherwise it repeats its notes.

So the steps interact: the answer prompt that is best alone (repeat the notes) is not
the best response to the extractor that is best alone (city and country), and optimizing
each prompt against the other as it is today stops at token F1 2/3, while choosing the
extractor in anticipation of the answer step's best response reaches 1.0.
"""

from __future__ import annotations

import re
from typing import Any, Final

from promptd.optimization.examples import Example
from promptd.optimization.pipeline import Episode
from promptd.optimization.program import Program
from promptd.replacement.pipelines import Pipeline, Step
from tests.optimize_fake_llm import user_text

COUNTRIES: Final = {
    "Lyon": "France",
    "Berlin": "Germany",
    "Madrid": "Spain",
    "Rome": "Italy",
    "Vienna": "Austria",
    "Oslo": "Norway",
    "Lisbon": "Portugal",
    "Dublin": "Ireland",
}
EXTRACT: Final = "Read the message.\nMessage: {text}"
ANSWER: Final = "Answer from the notes.\nNotes: {notes}"
CITY_ONLY: Final = "Reply with the city name only."
CITY_COUNTRY: Final = "Reply with the city and its country."
COUNTRY_ONLY: Final = "Reply with the country only."
PIPELINE: Final = Pipeline(
    "geo",
    (
        Step("extract", {"text": "input.text"}),
        Step("answer", {"notes": "extract.output"}),
    ),
)
ACTIVE: Final = {"extract": Program.text(EXTRACT), "answer": Program.text(ANSWER)}


def model_answer(prompt: str) -> str:
    """The scripted model."""
    if "Message:" in prompt:
        city = re.findall(r"to ([A-Z][a-z]+) soon", prompt)[-1]
        if CITY_COUNTRY.lower() in prompt.lower():
            return f"{city}, {COUNTRIES[city]}"
        if CITY_ONLY.lower() in prompt.lower():
            return city
        return f"The message talks about {city} I believe"
    notes = prompt.split("Notes:")[-1]
    if COUNTRY_ONLY.lower() in prompt.lower():
        found = [c for c in COUNTRIES.values() if c in notes]
        return found[0] if found else "unknown"
    return notes.strip()


def proposer_answer(prompt: str) -> str:
    """The scripted proposer: different instructions for each step and tip."""
    if "Message: {text}" in prompt:
        if "exact form" in prompt:
            return f"<instruction>{CITY_ONLY}</instruction>"
        if "short and direct" in prompt:
            return f"<instruction>{CITY_COUNTRY}</instruction>"
        return "<instruction>Read it twice.</instruction>"
    if "exact form" in prompt:
        return f"<instruction>{COUNTRY_ONLY}</instruction>"
    return "<instruction>Answer politely.</instruction>"


def responder(body: dict[str, Any]) -> str:
    """The scripted server."""
    text = user_text(body)
    if "expert prompt engineer" in text:
        return proposer_answer(text)
    return model_answer(text)


def episodes(n: int) -> list[Episode]:
    """``n`` production episodes run by the active pipeline, every other one corrected."""
    out = []
    cities = list(COUNTRIES)
    for i in range(n):
        city = cities[i % len(cities)]
        text = f"Ship order {i} to {city} soon."
        extracted = f"The message talks about {city} I believe"
        calls = {
            "extract": Example(f"e{i}-1", "v1", 0.0, {"text": text}, extracted, 0.2, 1, None, None),
            "answer": Example(
                f"e{i}-2", "v1", 0.0, {"notes": extracted}, extracted, 0.2, 1, None, None
            ),
        }
        correction = COUNTRIES[city] if i % 2 == 0 else None
        out.append(Episode(f"ep{i}", {"text": text}, calls, 0.2, correction, extracted))
    return out
