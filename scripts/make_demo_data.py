"""Write the demo data in data/01_raw (original text, generated from small seeded templates).

Run: python scripts/make_demo_data.py   (the output is committed; rerunning gives the same files)

The tasks are regular on purpose (arithmetic, word games, unit conversion, a small
shop dialogue), so a tiny model visibly learns them in a minute on a CPU. Two records
are malformed on purpose, to show the rejected-records output.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

RAW = Path(__file__).resolve().parents[1] / "data" / "01_raw"
WORDS = [
    "river",
    "lantern",
    "pepper",
    "orbit",
    "maple",
    "copper",
    "violet",
    "harbor",
    "pixel",
    "meadow",
    "falcon",
    "ginger",
    "quartz",
    "willow",
    "ember",
    "tundra",
    "cobalt",
    "saffron",
    "glacier",
    "thistle",
]
FRUITS = ["apples", "pears", "plums", "lemons", "figs", "peaches", "apricots", "cherries"]
UNITS = [
    ("kilometers", "meters", 1000),
    ("meters", "centimeters", 100),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("kilograms", "grams", 1000),
    ("liters", "milliliters", 1000),
]
SYSTEMS = [
    "You are a careful assistant who answers in one short sentence.",
    "You are a patient tutor. Keep answers brief and exact.",
]


def alpaca_records(rng: random.Random, n: int) -> list[dict]:
    records = []
    for i in range(n):
        kind = i % 6
        if kind == 0:
            a, b = rng.randint(2, 60), rng.randint(2, 60)
            rec = {"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} plus {b} is {a + b}."}
        elif kind == 1:
            words = rng.sample(WORDS, 3)
            rec = {
                "instruction": "Reverse the order of these words.",
                "input": " ".join(words),
                "output": " ".join(reversed(words)),
            }
        elif kind == 2:
            big, small, factor = rng.choice(UNITS)
            x = rng.randint(2, 12)
            rec = {
                "instruction": f"Convert {x} {big} to {small}.",
                "input": "",
                "output": f"{x} {big} is {x * factor} {small}.",
            }
        elif kind == 3:
            word = rng.choice(WORDS)
            rec = {"instruction": "Write this word in capital letters.", "input": word, "output": word.upper()}
        elif kind == 4:
            word = rng.choice(WORDS)
            rec = {
                "instruction": f'How many letters are in the word "{word}"?',
                "input": "",
                "output": f'The word "{word}" has {len(word)} letters.',
            }
        else:
            a, b = rng.randint(10, 90), rng.randint(2, 9)
            first = {"instruction": f"What is {a} minus {b}?", "input": "", "output": f"{a} minus {b} is {a - b}."}
            c = rng.randint(2, 9)
            rec = {
                "instruction": f"And what is that minus {c}?",
                "input": "",
                "output": f"{a - b} minus {c} is {a - b - c}.",
                "history": [[first["instruction"], first["output"]]],
            }
        if i % 5 == 0:
            rec["system"] = rng.choice(SYSTEMS)
        records.append(rec)
    # Malformed on purpose: no "output" column.
    records.insert(17, {"instruction": "Name a colour that rhymes with 'bed'.", "input": ""})
    return records


def sharegpt_records(rng: random.Random, n: int) -> list[dict]:
    records = []
    for i in range(n):
        fruit = rng.choice(FRUITS)
        have, buy, eat = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 3)
        turns = [
            {"from": "human", "value": f"I have {have} {fruit} and buy {buy} more. How many {fruit} do I have?"},
            {"from": "gpt", "value": f"You have {have + buy} {fruit}."},
            {"from": "human", "value": f"I eat {eat} of them. How many are left?"},
            {"from": "gpt", "value": f"{have + buy - eat} {fruit} are left."},
        ]
        if i % 3 == 0:
            turns.insert(0, {"from": "system", "value": "You are a shop assistant who counts fruit."})
        records.append({"conversations": turns})
    # Malformed on purpose: two human turns in a row.
    records.insert(
        9,
        {
            "conversations": [
                {"from": "human", "value": "How many figs fit in a basket?"},
                {"from": "human", "value": "Please answer."},
            ]
        },
    )
    return records


def main() -> None:
    rng = random.Random(2026)
    RAW.mkdir(parents=True, exist_ok=True)
    files = {
        "alpaca_demo.json": alpaca_records(rng, 240),
        "sharegpt_demo.json": sharegpt_records(rng, 120),
    }
    for name, records in files.items():
        (RAW / name).write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    info = {
        "alpaca_demo": {
            "file_name": "alpaca_demo.json",
            "formatting": "alpaca",
            "columns": {
                "prompt": "instruction",
                "query": "input",
                "response": "output",
                "system": "system",
                "history": "history",
            },
        },
        "sharegpt_demo": {
            "file_name": "sharegpt_demo.json",
            "formatting": "sharegpt",
            "columns": {"messages": "conversations"},
            "tags": {
                "role_tag": "from",
                "content_tag": "value",
                "user_tag": "human",
                "assistant_tag": "gpt",
                "system_tag": "system",
            },
        },
    }
    (RAW / "dataset_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
