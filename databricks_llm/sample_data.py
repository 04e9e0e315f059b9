"""Small, seeded datasets generated in code: E2E-style restaurant descriptions and support tickets.

They make the demo and the unit tests independent of any download or data file. The E2E slot
inventory and surface forms follow the real E2E NLG data (same keys, values and MR format); the
tickets are a second, non-restaurant extraction task with JSON targets.
"""

from __future__ import annotations

import json
import random
import re

from databricks_llm.scoring import E2E_VOCABULARY

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
EAT_TYPES = list(E2E_VOCABULARY["eatType"])
FOODS = list(E2E_VOCABULARY["food"])
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


TICKETS_INSTRUCTION = ("Extract the product, the severity (low, medium, high or critical) and the customer "
                       "from the support ticket as one JSON object.")
PRODUCTS = ["Billing Portal", "Mobile App", "Data Warehouse", "SSO Login", "Email Gateway", "Reporting API",
            "Checkout Service", "Search Index", "Backup Agent", "VPN Client"]
CUSTOMERS = ["Acme Corp", "Globex", "Initech", "Umbrella Health", "Stark Logistics", "Wayne Foods", "Hooli",
             "Vandelay Imports", "Soylent Labs", "Cyberdyne Systems", "Tyrell Bank", "Wonka Retail"]
PROBLEMS = {
    "low": ["has a typo on the settings page", "shows the wrong icon in dark mode", "asks for a feature: CSV export"],
    "medium": ["is slow to load since Monday", "sends duplicate notifications", "times out now and then"],
    "high": ["rejects valid payments for some users", "lost the last two days of reports", "fails for all EU users"],
    "critical": ["is down for everyone", "exposed another tenant's data", "corrupts every file it writes"],
}
OPENINGS = ["Hi team,", "Hello,", "Urgent:", "Good morning,", ""]
CLOSINGS = ["Thanks, {customer} IT", "Regards, the {customer} admin team", "Please advise. ({customer})",
            "Sent on behalf of {customer}."]


def _ticket(rng: random.Random) -> tuple[str, dict[str, str]]:
    fields = {"product": rng.choice(PRODUCTS), "severity": rng.choice(list(PROBLEMS)), "customer": rng.choice(CUSTOMERS)}
    problem = rng.choice(PROBLEMS[fields["severity"]])
    body = f"{rng.choice(['Our', 'The'])} {fields['product']} {problem}."
    closing = rng.choice(CLOSINGS).format(customer=fields["customer"])
    return " ".join(part for part in (rng.choice(OPENINGS), body, closing) if part), fields


def tickets(n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` support tickets: `prompt` (the ticket text) and `completion` (a JSON object with the
    product, severity and customer)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        text, fields = _ticket(rng)
        rows.append({"prompt": text, "completion": json.dumps(fields)})
    return rows


# Names that never occur in the E2E NLG data (nor in NAMES/NEAR above): the generalization test set
# checks that a model extracts names it has never seen, as users' data is full of them. UNSEEN_NEAR
# is how the sentences write each place; its label follows E2E's convention (`_label`).
UNSEEN_NAMES = [
    "The Crown and Anchor", "Bite Street Diner", "Saffron Lane", "The Copper Kettle", "Blue Heron", "Mama Rosa's",
    "The Hungry Fox", "Little Lisbon", "The Old Granary", "Golden Lotus", "Harbour Lights", "The Salt House",
    "Pepper Tree", "The Black Swan Inn", "Noodle Nook", "The Red Lion", "Kasbah Kitchen", "The Lantern Room",
    "Olive and Vine", "Sakura Garden", "The Bramble", "Casa Verde", "The Fat Pigeon", "Maple and Rye",
    "The Jolly Miller", "Spice Route", "The Tin Pot", "Wild Garlic", "Bombay Brasserie", "The Pickled Onion",
    "Chez Margot", "The Green Door", "Tandoor Palace", "The Gilded Pear", "Harvest Moon", "The Fox and Hounds",
]
UNSEEN_NEAR = [
    "the Corn Exchange", "St Mary's Church", "Riverside Cinema", "the Botanic Garden", "Magdalene Bridge",
    "the Round Church", "Station Road Hotel", "the Fitzwilliam Museum", "Parker's Piece", "the Leisure Park",
    "Quayside Market", "the Guildhall", "Midsummer Common", "the Arts Theatre", "Hobson's Conduit",
]
_FAMILY = {"yes": ["It is family friendly.", "Children are welcome.", "It is kid friendly."],
           "no": ["It is not family friendly.", "It is not suitable for children.", "It is adults only."]}


def _label(phrase: str) -> str:
    """A name as E2E labels it: a capital "The" is part of the name ("The Bakers"), a lowercase
    "the" before it is the sentence's ("near the Crowne Plaza Hotel" -> `near[Crowne Plaza Hotel]`)."""
    return phrase.removeprefix("the ")


def _unseen_example(rng: random.Random) -> tuple[str, str]:
    """One (sentence, MR) pair with an unseen name and near place, in one of several phrasings."""
    slots: dict[str, str] = {"name": rng.choice(UNSEEN_NAMES), "eatType": rng.choice(EAT_TYPES)}
    choices = {"food": FOODS, "priceRange": list(PRICES), "customer rating": list(RATINGS), "area": list(AREAS),
               "familyFriendly": ["yes", "no"], "near": UNSEEN_NEAR}
    for key in rng.sample(list(choices), rng.randint(2, 5)):
        slots[key] = rng.choice(choices[key])
    mr = ", ".join(f"{k}[{_label(slots[k])}]" for k in ["name", "eatType", *choices] if k in slots)
    kind = f"{slots['food']} {slots['eatType']}" if "food" in slots else slots["eatType"]
    where = " ".join(p for p in (AREAS[slots["area"]] if "area" in slots else "",
                                 f"near {slots['near']}" if "near" in slots else "") if p)
    extras = []
    if "priceRange" in slots:
        phrase = PRICES[slots["priceRange"]]
        extras.append(f"it {phrase}" if phrase.startswith("costs") else f"it is {phrase}")
    if "customer rating" in slots:
        extras.append(f"it has {RATINGS[slots['customer rating']]}")
    openings = [f"{slots['name']} is a {kind}" + (f" {where}" if where else "") + ".",
                (f"{where[0].upper() + where[1:]}, you will find {slots['name']}, a {kind}." if where
                 else f"There is a {kind} called {slots['name']}."),
                f"If you want a {kind}, try {slots['name']}" + (f" {where}" if where else "") + "."]
    sentence = re.sub(r"\ba ([AEIOU])", r"an \1", rng.choice(openings))
    if extras:
        sentence += " " + " and ".join(extras)[0].upper() + " and ".join(extras)[1:] + "."
    if "familyFriendly" in slots:
        sentence += " " + rng.choice(_FAMILY[slots["familyFriendly"]])
    return sentence, mr


def unseen_names(n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` E2E-style rows (`mr`, `sentence`) whose names and near places never occur in E2E."""
    rng = random.Random(seed)
    return [dict(zip(("sentence", "mr"), _unseen_example(rng))) for _ in range(n)]
