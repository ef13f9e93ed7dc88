"""A small instruction data set that a tiny model learns in a few hundred steps on a CPU (train/demo.py).

Two kinds of questions:
  facts   the capital, currency and language of fictional countries (a fixed table), each asked with
          several phrasings: "What is the capital of Zorbia?", "Name the capital city of Zorbia." ...
  parity  "Is 348 even or odd?" for numbers 0-999.

Held-out prompts are new combinations of parts seen in training: a fact asked with a phrasing that training
never paired with it (the fact and the phrasing each appear in training), and numbers never seen in training.
Every answer token of the held-out set appears in training answers: a model with untied embeddings could not
produce a token whose output row never got a gradient, whatever it understood.
"""

from __future__ import annotations

import random

# country: (capital, currency, language)
COUNTRIES = {
    "Zorbia": ("Quenville", "crowns", "Zorbic"),
    "Valdoria": ("Port Amsel", "florins", "Valdic"),
    "Mirevia": ("Selhaven", "marks", "Mireth"),
    "Tarnis": ("Oldbridge", "shells", "Tarnese"),
    "Oskaria": ("Kettering", "pearls", "Oskan"),
    "Belvaro": ("Duskfall", "tokens", "Belvan"),
    "Corvinia": ("Ravenmoor", "ducats", "Corvish"),
    "Drakmor": ("Emberton", "scales", "Drakish"),
}

TEMPLATES = {
    "capital": [
        "What is the capital of {c}?",
        "Name the capital city of {c}.",
        "Which city is the capital of {c}?",
        "Tell me the capital of {c}.",
        "{c} has which capital?",
    ],
    "currency": [
        "What is the currency of {c}?",
        "Name the currency used in {c}.",
        "Which currency does {c} use?",
        "Tell me the currency of {c}.",
        "{c} pays with which currency?",
    ],
    "language": [
        "What language is spoken in {c}?",
        "Name the language of {c}.",
        "Which language do people in {c} speak?",
        "Tell me the language of {c}.",
        "{c} speaks which language?",
    ],
}
ATTRIBUTES = tuple(TEMPLATES)

PARITY_TEMPLATES = ["Is {n} even or odd?", "Is the number {n} odd or even?", "{n}: even or odd?"]


def _facts(rng: random.Random) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    train, held_out = [], []
    for country, answers in COUNTRIES.items():
        for attribute, answer in zip(ATTRIBUTES, answers):
            templates = TEMPLATES[attribute]
            hold = rng.randrange(len(templates))  # one phrasing of each fact is kept for evaluation
            for i, template in enumerate(templates):
                pair = (template.format(c=country), answer)
                (held_out if i == hold else train).append(pair)
    return train, held_out


def _parity(rng: random.Random, n_train: int, n_held_out: int) -> tuple[list, list]:
    numbers = rng.sample(range(1000), n_train + n_held_out)

    def ask(n):
        return rng.choice(PARITY_TEMPLATES).format(n=n), "odd" if n % 2 else "even"

    return [ask(n) for n in numbers[:n_train]], [ask(n) for n in numbers[n_train:]]


def make_dataset(seed: int = 0, parity_train: int = 150, parity_held_out: int = 24):
    """(train, held_out): lists of (prompt, answer), shuffled, deterministic for a seed."""
    rng = random.Random(seed)
    facts_train, facts_held = _facts(rng)
    parity_train_rows, parity_held = _parity(rng, parity_train, parity_held_out)
    train = facts_train + parity_train_rows
    held_out = facts_held + parity_held
    rng.shuffle(train)
    rng.shuffle(held_out)
    return train, held_out


def to_jsonl_rows(pairs) -> list[dict]:
    """{"messages": [user, assistant]} rows, as data.load_examples reads."""
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]
