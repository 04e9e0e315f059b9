"""The rules by which the cleaned E2E references were labelled, restated: which value of which slot
a sentence expresses.

The cleaned E2E data (Dušek, Howcroft & Rieser, INLG 2019) relabelled each crowd sentence with a
rule-based aligner (`slot_error.py` in github.com/tuetschek/e2e-cleaning). Its rules, as this module
restates them in its own terms:

1. Every slot value has a set of wordings, regular expressions matched case-insensitively on word
   boundaries (names and `near` values are matched verbatim; `food` by its name or a stem such as
   "Chines" or "British" for English).
2. All wordings of all values are found in the sentence. A wording found inside a longer wording
   of any slot (e.g. "Café" inside "Café Adriatic", "low rating" inside "low rating 1 out of 5") is
   dropped.
3. Where several values' wordings cover exactly the same words ("cheap" is a wording of both
   `cheap` and `less than £20`; "The Rice Boat" of `name` and `near`), one value is kept: the one
   in the crowd worker's original meaning representation, else the first in the aligner's value
   order (`VALUE_ORDER` below). This is the only place the aligner looks beyond the sentence.
4. The label is the set of (slot, value) found: a value found twice counts once, two values of one
   slot both stay (`eatType[pub], eatType[coffee shop]`).

`align(text, original)` applies them; `ties(text)` lists the decisions rule 3 takes for a sentence,
which the sentence alone cannot make.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from databricks_llm.scoring import parse_mr

# The slot-value order the aligner breaks ties in (rule 3, no original value among the tied ones).
PRICES = ("cheap", "less than £20", "more than £30", "high", "moderate", "£20-25")
RATINGS = ("1 out of 5", "3 out of 5", "5 out of 5", "high", "average", "low")

_PRICE_WORD = r"prices?(?: range)?(?: \w+){0,3} "  # "price range is quite low", "prices are high"
_LOW_PRICE, _HIGH_PRICE = r"low[- ]+price[ds]?", r"high[- ]+price[ds]?"
_CHEAP, _AFFORDABLE = r"(?:inexpensive|cheap)(?:ly)?", r"affordabl[ey]"
_MID_PRICE = r"(?:moderate|reasonable|ok|average)(?:ly)?[- ]+price[ds]?"
_MID_WORDS = _PRICE_WORD + r"(?:ok|average|moderate|reasonable)"
_PRICE = {
    "cheap": [_CHEAP, _LOW_PRICE, _AFFORDABLE, _PRICE_WORD + "low"],
    "less than £20": [_CHEAP, _AFFORDABLE, r"(?:less than|under) £? *20", "moderately priced", _LOW_PRICE,
                      _PRICE_WORD + "low"],
    "more than £30": [r"(?:more than|over) £? *30", _HIGH_PRICE, "expensive", "not cheap", _PRICE_WORD + "high"],
    "high": [_HIGH_PRICE, "expensive", _PRICE_WORD + "high"],
    "moderate": [_MID_PRICE, "not cheap", "affordable", r"mid[- ]+(?:range[- ]+)price[ds]?", _MID_WORDS],
    "£20-25": [r"£? *20 *(?:[-–]*|to) *25", _MID_PRICE, _MID_WORDS, "affordable"],
}


def _stars(digit: str, word: str, stars_after_five: bool = True) -> str:
    """"3 out of 5", "three of five stars", "3-star"."""
    after = r"(?: stars?)?" if stars_after_five else ""
    return rf"(?:{digit}|{word})(?:(?: out)? of (?:5|five){after}|[- ]+stars?)"


_RATING_NOUN = r"(?:rat(?:ings?|e[ds]?)|reviews?|standards?|quality)"
_RATED_NOUN = r"(?:rat(?:ings?|ed)|reviews?|standards?|quality)"


def _noun_then(adjective: str, stars: str = "") -> str:
    """"rating is low", "reviews rated as average" (optionally followed by the stars)."""
    return rf"{_RATING_NOUN}(?: \w+){{0,2}} (?:as )?{adjective}" + (rf"(?:(?: \w+){{0,3}} {stars})?" if stars else "")


def _then_noun(adjective: str, stars: str = "") -> str:
    """"low customer rating", "highly rated" (optionally followed by the stars)."""
    return rf"{adjective}(?:ly)?(?:[ -]+\w+){{0,2}}[ -]+{_RATED_NOUN}" + (rf"(?:(?: \w+){{0,3}} {stars})?" if stars else "")


_BAD, _MID, _GOOD = r"(?:low|bad|poor)", r"(?:average|(?<!very )(?:good|well))", r"(?:high|excellent|very good|great)"
_NOT_GOOD = r"(?:low|bad|poor|(?:not|doesn't|isn't)(?: \w+){0,2} (?:good|well))"
_RATING = {
    "1 out of 5": [_stars("1", "one"), _noun_then(_BAD, _stars("1", "one", False)), _then_noun(_NOT_GOOD, _stars("1", "one"))],
    "3 out of 5": [_stars("3", "three"), _noun_then("average", _stars("3", "three", False)), _then_noun(_MID, _stars("3", "three"))],
    "5 out of 5": [_stars("5", "five"), _noun_then("high", _stars("5", "five", False)), _then_noun(_GOOD, _stars("5", "five"))],
    "high": [_stars("5", "five"), _noun_then("high"), _then_noun(r"(?:high|excellent|very good|great|well)")],
    "average": [_stars("3", "three"), _noun_then("average"), _then_noun(_MID)],
    "low": [_stars("1", "one"), _noun_then(_BAD), _then_noun(_NOT_GOOD)],
}
_KIDS, _FAMILY = r"(?:kids?|child(?:ren)?|famil(?:y|ies))", r"(?:child|children|family|kids|kid)"
_FRIENDLY = {
    "no": [rf"(?:isn't|not|non|no)[ -]+(?:\w+ ){{0,2}}{_FAMILY}[ -]+(?:friendly|orien(?:ta)?ted)",
           rf"{_FAMILY}[ -]+unfriendly", r"adults?[ -]+only", "only for adults", r"(?:no|not) (?:kids|children|famil(?:y|ies))",
           r"(?:not|no)(?: good| suitable| friendly| orien(?:ta)?ted| open(?:ed))? (?:at|for|to|with)(?: the)? "
           r"(?:kids|children|family|families|all age)",
           rf"{_KIDS} (?:are|is)(?:n't| not) (?:welcome|allowed|accepted)",
           rf"(?:does not|doesn't) (?:welcome|allow|accept) (?:\w+ ){{0,2}}(?:{_KIDS}|all age)",
           r"adult (?:establishment|venue|place|establish)"],
    # the fourth wording needs " the" glued to the noun ("for thekids"): as in the aligner, it never fires
    "yes": [r"for (?:kids|children|family|families)", "family place", r"place to bring the(?: whole)? family",
            r"(?:friendly|suitable|good|orien(?:ta)?ted|open(?:ed)) (?:at|with|to|for)(?: the)(?:kids?|child(?:ren)?|famil(?:y|ies)?|all age)",
            rf"{_FAMILY}[ -]+(?:friendly|orien(?:ta)?ted)", rf"{_KIDS} (?:are|is) (?:welcome|allowed|accepted)",
            rf"(?:welcomes?|allows?|accepts?) (?:\w+ ){{0,2}}(?:{_KIDS}|all age)"],
}
NAMES = ("Alimentum|Aromi|Bibimbap House|Blue Spice|Browns Cambridge|Clowns|Cocum|Cotto|Fitzbillies|Giraffe|Green Man|"
         "Loch Fyne|Midsummer House|Strada|Taste of Cambridge|The Cambridge Blue|The Cricketers|The Dumpling Tree|The Eagle|"
         "The Golden Curry|The Golden Palace|The Mill|The Olive Grove|The Phoenix|The Plough|The Punter|The Rice Boat|"
         "The Twenty Two|The Vaults|The Waterman|The Wrestlers|Travellers Rest Beefeater|Wildwood|Zizzi").split("|")
NEAR = ("All Bar One|Avalon|Burger King|Café Adriatic|Café Brazil|Café Rouge|Café Sicilia|Clare Hall|Crowne Plaza Hotel|"
        "Express by Holiday Inn|Rainbow Vegetarian Café|Raja Indian Cuisine|Ranch|The Bakers|The Portland Arms|"
        "The Rice Boat|The Six Bells|The Sorrento|Yippee Noodle Bar").split("|")
# slot: {value: wordings}, slots and values in the aligner's order (ties go to the first, rule 3)
WORDINGS: dict[str, dict[str, list[str]]] = {
    "area": {"city centre": [r"(?:city|town) cent(?:re|er)", r"cent(?:re|er) of (?:the )?(?:city|town)", r"in the cent(?:re|er)"],
             "riverside": ["riverside", r"(?:near|by|at|close to|along|on|off|beside) the river"]},
    "eatType": {"coffee shop": [r"coffee[- ]+shop", "caf[eé]", "coffee"], "pub": ["pub"], "restaurant": ["restaurant"]},
    "familyFriendly": _FRIENDLY,
    "food": {"Chinese": ["Chinese", "Chines"], "English": ["English", "British"], "Fast food": ["Fast food"],
             "French": ["French"], "Indian": ["Indian"], "Italian": ["Italian"], "Japanese": ["Japanese"]},
    "name": {None: NAMES},  # one pattern; the value is the name found
    "near": {None: NEAR},
    "priceRange": _PRICE,
    "customer rating": _RATING,
}


def _compiled(patterns: list[str]) -> re.Pattern:
    return re.compile("|".join(rf"\b{p}\b" for p in patterns), re.IGNORECASE)


_PATTERNS = [(slot, value, _compiled(patterns)) for slot, values in WORDINGS.items() for value, patterns in values.items()]
_CANONICAL = {slot: {v.lower(): v for v in (NAMES if slot == "name" else NEAR)} for slot in ("name", "near")}


@dataclass(frozen=True)
class Found:
    slot: str
    value: str
    start: int
    end: int

    def inside(self, other: Found) -> bool:
        """Strictly inside `other`'s words (rule 2)."""
        return other.start <= self.start and self.end <= other.end and (self.start, self.end) != (other.start, other.end)


def found(text: str) -> list[Found]:
    """Every wording of every value in `text` (rule 1), in the aligner's order."""
    return [Found(slot, value if value is not None else _CANONICAL[slot][m.group(0).lower()], m.start(), m.end())
            for slot, value, pattern in _PATTERNS for m in pattern.finditer(text)]


def align(text: str, original: str = "") -> set[tuple[str, str]]:
    """The (slot, value) pairs the aligner labels `text` with, given the original MR (rules 2-4)."""
    given = {(k, v.lower()) for k, v in parse_mr(original)}
    matches, kept = found(text), []
    for match in matches:
        beaten = any(match.inside(other) or ((other.start, other.end) == (match.start, match.end) and
                                             ((other.slot, other.value.lower()) in given or other in kept))
                     for other in matches if other is not match)
        if not beaten:
            kept.append(match)
    return {(m.slot, m.value) for m in kept}


def ties(text: str) -> list[tuple[tuple[tuple[str, str], ...], int, int]]:
    """The groups of (slot, value) whose wordings cover the same words of `text` and none longer,
    with where those words start and end: each group is one choice rule 3 makes from the original MR."""
    matches = found(text)
    spans: dict[tuple[int, int], list[Found]] = {}
    for match in matches:
        if not any(match.inside(other) for other in matches):
            spans.setdefault((match.start, match.end), []).append(match)
    return [(tuple((m.slot, m.value) for m in group), start, end)
            for (start, end), group in spans.items() if len(group) > 1]
