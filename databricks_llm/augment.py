"""Span-copy augmentation: training rows whose open values are swapped for invented names.

A model fine-tuned on E2E sees the same 18 restaurant names in every epoch and learns to recall
them; users' data is full of names it has never seen, which it must copy from the input instead
(the unseen-names set in benchmarks/data shows the gap). With `--augment_names=F`, a fraction F of
the training rows get each open value (a field the task's schema gives no closed vocabulary, e.g.
`name`, `near`) that appears verbatim in the input replaced, in the input and the target alike, by
an invented name. The invented names never include the unseen-names test set's (tested).
"""

from __future__ import annotations

import random
import re

import datasets

from databricks_llm.constraints import Schema
from databricks_llm.data import INPUT, OUTPUT
from databricks_llm.formats import OutputFormat, of
from databricks_llm.task import Task

_WORDS = ["Velvet", "Crooked", "Silver", "Amber", "Rusty", "Hidden", "Painted", "Twisted", "Grand", "Sleepy", "Merry",
          "Scarlet", "Northern", "Wandering", "Lucky", "Quiet", "Brass", "Marble", "Juniper", "Hazel", "Cedar",
          "Indigo", "Saffron", "Honey", "Stone", "Willow", "Ember", "Coral", "Ivory", "Blackthorn"]
_THINGS = ["Otter", "Lantern", "Anchor", "Spoon", "Orchard", "Barrel", "Compass", "Teapot", "Badger", "Thistle",
           "Falcon", "Cellar", "Acorn", "Wharf", "Mill", "Table", "Oven", "Ladle", "Hearth", "Sparrow", "Bell",
           "Meadow", "Pantry", "Quay", "Plough", "Harp", "Walrus", "Crow", "Fig", "Lark"]
_PEOPLE = ["Rosie", "Marco", "Priya", "Ahmed", "Olga", "Kenji", "Fatima", "Liam", "Ines", "Tomasz", "Aiko", "Dev"]
_VENUES = ["Kitchen", "Cafe", "Bistro", "Grill", "Diner", "Tavern", "Canteen", "Eatery", "Brasserie", "Trattoria"]
_PLACES = ["Bridge", "Museum", "Library", "Station", "Market", "Theatre", "Park", "Chapel", "Gallery", "Square",
           "Cinema", "Hotel", "Gardens", "Wharf", "Hall"]


def invented_name(rng: random.Random) -> str:
    """A made-up venue or landmark name in one of the shapes real ones take. As in E2E, a capital
    "The" belongs to a name and a lowercase "the" never does: the sentence supplies that one."""
    word, thing, other = rng.choice(_WORDS), rng.choice(_THINGS), rng.choice(_THINGS)
    shapes = [f"The {word} {thing}", f"{word} {thing}", f"The {thing} and {other}" if thing != other else f"The {thing}",
              f"{rng.choice(_PEOPLE)}'s {rng.choice(_VENUES)}", f"Casa {rng.choice(_PEOPLE)}",
              f"{word} {rng.choice(_PLACES)}", f"The {thing}"]
    return rng.choice(shapes)


def open_fields(task: Task) -> set[str]:
    """The task's fields without a closed vocabulary (none for text tasks or without a schema)."""
    if not task.schema:  # text tasks have none
        return set()
    schema = Schema.from_json(task.schema)
    kinds = dict(schema.kinds)
    return {f for f in schema.fields if f not in dict(schema.closed) and kinds.get(f, "string") == "string"}


def substitute(text: str, target: str, fmt: OutputFormat | str, fields: set[str],
               rng: random.Random) -> tuple[str, str]:
    """`text` and `target` with each open value found verbatim in `text` replaced by an invented
    name (longest values first, so a name inside another is not split); the rest unchanged."""
    fmt = of(fmt)
    record = fmt.parse(target) or []
    values = {v for k, v in record if k in fields and isinstance(v, str)}
    swaps: dict[str, str] = {}
    for value in sorted((v for v in values if v and v in text), key=len, reverse=True):
        after_the = re.search(rf"\bthe {re.escape(value)}", text, re.IGNORECASE) is not None
        while ((name := invented_name(rng)) in swaps.values() or name in text
               or (after_the and name.startswith("The "))):  # no "the The Velvet Otter"
            pass
        swaps[value] = name
    if not swaps:
        return text, target
    pattern = re.compile("|".join(re.escape(v) for v in swaps))
    text = pattern.sub(lambda m: swaps[m.group(0)], text)
    return text, fmt.render([(k, swaps.get(v, v) if k in fields and isinstance(v, str) else v) for k, v in record])


def augment_names(train: datasets.Dataset, task: Task, fraction: float, seed: int) -> tuple[datasets.Dataset, int]:
    """`train` with a seeded `fraction` of its rows given invented open values; returns the rows
    and how many of them changed (a row whose open values are not in its input stays as it is)."""
    fields = open_fields(task)
    if not fraction or not fields:
        return train, 0
    texts, targets = list(train[INPUT]), list(train[OUTPUT])
    for i in random.Random(seed).sample(range(len(train)), round(fraction * len(train))):
        texts[i], targets[i] = substitute(texts[i], targets[i], task.output_format, fields, random.Random(seed + i))
    changed = sum(t != o for t, o in zip(targets, train[OUTPUT]))
    columns = {c: train[c] for c in train.column_names} | {INPUT: texts, OUTPUT: targets}
    return datasets.Dataset.from_dict(columns, features=train.features), changed
