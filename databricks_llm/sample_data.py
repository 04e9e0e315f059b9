"""A small, seeded, E2E-style dataset generated in code.

It makes the demo and the unit tests independent of any download or data file. The slot
inventory and surface forms follow the real E2E NLG data (same keys, values and MR format).
"""

from __future__ import annotations

import random
import re

NAMES = [
    "The Punter", "The Eagle", "The Mill", "Alimentum", "Aromi", "Bibimbap House",
    "Blue Spice", "Browns Cambridge", "Clowns", "Cocum", "Cotto", "Fitzbillies",
    "Giraffe", "Green Man", "Loch Fyne", "Midsummer House", "Strada", "Taste of Cambridge",
    "The Cambridge Blue", "The Cricketers", "The Dumpling Tree", "The Golden Curry",
    "The Golden Palace", "The Olive Grove", "The Phoenix", "The Plough", "The Rice Boat",
    "The Twenty Two", "The Vaults", "The Waterman", "The Wrestlers", "Wildwood", "Zizzi",
    "Travellers Rest Beefeater",
]
NEAR = [
    "Café Sicilia", "Burger King", "Café Adriatic", "Café Brazil", "Café Rouge",
    "Crowne Plaza Hotel", "Express by Holiday Inn", "Rainbow Vegetarian Café",
    "Raja Indian Cuisine", "Ranch", "The Bakers", "The Portland Arms", "The Rice Boat",
    "The Six Bells", "The Sorrento", "Yippee Noodle Bar", "All Bar One", "Avalon",
    "Clare Hall",
]
EAT_TYPES = ["coffee shop", "pub", "restaurant"]
FOODS = ["Chinese", "English", "Fast food", "French", "Indian", "Italian", "Japanese"]
PRICES = {
    "cheap": "cheap",
    "less than £20": "costs less than £20",
    "moderate": "moderately priced",
    "£20-25": "costs £20-25",
    "high": "expensive",
    "more than £30": "costs more than £30",
}
RATINGS = {
    "low": "a low customer rating",
    "average": "an average customer rating",
    "high": "a high customer rating",
    "1 out of 5": "a customer rating of 1 out of 5",
    "3 out of 5": "a customer rating of 3 out of 5",
    "5 out of 5": "a customer rating of 5 out of 5",
}
AREAS = {"city centre": "in the city centre", "riverside": "by the riverside"}


def _example(rng: random.Random) -> tuple[str, str]:
    """One (sentence, meaning representation) pair; the MR uses the canonical slot order."""
    slots: dict[str, str] = {"name": rng.choice(NAMES), "eatType": rng.choice(EAT_TYPES)}
    choices = {
        "food": FOODS,
        "priceRange": list(PRICES),
        "customer rating": list(RATINGS),
        "area": list(AREAS),
        "familyFriendly": ["yes", "no"],
        "near": [n for n in NEAR if n != slots["name"]],
    }
    for key in rng.sample(list(choices), rng.randint(1, 4)):
        slots[key] = rng.choice(choices[key])
    mr = ", ".join(f"{k}[{slots[k]}]" for k in ["name", "eatType", *choices] if k in slots)

    words = [slots["name"], "is a"]
    if "food" in slots:
        words.append(slots["food"])
    words.append(slots["eatType"])
    if "area" in slots:
        words.append(f"located {AREAS[slots['area']]}")
    if "near" in slots:
        words.append(f"near {slots['near']}")
    if "priceRange" in slots:
        phrase = PRICES[slots["priceRange"]]
        words.append(f"that {phrase}" if phrase.startswith("costs") else f"that is {phrase}")
    if "customer rating" in slots:
        words.append(f"with {RATINGS[slots['customer rating']]}")
    sentence = re.sub(r"\ba ([AEIOU])", r"an \1", " ".join(words)) + "."
    if "familyFriendly" in slots:
        sentence += " It is family friendly." if slots["familyFriendly"] == "yes" else " It is not family friendly."
    return sentence, mr


def generate(n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` rows with the columns `mr` (the meaning representation) and `sentence`."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        sentence, mr = _example(rng)
        rows.append({"mr": mr, "sentence": sentence})
    return rows
