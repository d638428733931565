"""The project's own small NLI data set, made from templates and written in SNLI's `.txt` layout.

It stands in for SNLI where the real train split is not at hand (tests, quick runs, demos). Each
premise describes a scene: a subject (count, noun, optional adjective), an action (with an optional
object) and a few optional details: clothing, a companion, a place, a time, a purpose. As in SNLI,
every premise gets one hypothesis per label:

- entailment: the hypothesis mentions some of the premise's details, some of them generalized
  ('a man' -> 'a person', 'in a kitchen' -> 'indoors', 'in a red shirt' -> 'in a shirt');
- contradiction: one mentioned detail is swapped for an incompatible one ('is sleeping' vs
  'is running', 'inside' vs 'outside', 'two' vs 'three', 'with a friend' vs 'alone', 'red' vs 'blue');
- neutral: the hypothesis adds a detail the premise does not have (a purpose, a companion, a feeling,
  a time, ...) or names a more specific subject than the premise's ('a person' -> 'a woman').

Hypotheses of all three labels mention the same number of details, so their lengths overlap and a
model must compare hypothesis with premise (word overlap, a few antonym pairs) to do well.
A few rows whose annotators disagree get gold label '-', which readers drop, as in SNLI.

Everything is drawn from `random.Random` seeded with a string, which is stable across Python versions.
"""
from __future__ import annotations

import os
import random
from typing import Optional

from .io import atomic_write
from .snli import LABEL_NAMES

HEADER = ("gold_label", "sentence1_binary_parse", "sentence2_binary_parse", "sentence1_parse",
          "sentence2_parse", "sentence1", "sentence2", "captionID", "pairID",
          "label1", "label2", "label3", "label4", "label5")

# noun: (plural, kind, more general noun or None, incompatible nouns)
NOUNS: dict[str, tuple[str, str, Optional[str], tuple[str, ...]]] = {
    "man": ("men", "person", "person", ("woman", "girl")),
    "woman": ("women", "person", "person", ("man", "boy")),
    "boy": ("boys", "person", "child", ("girl", "woman")),
    "girl": ("girls", "person", "child", ("boy", "man")),
    "child": ("children", "person", "person", ()),
    "chef": ("chefs", "person", "person", ()),
    "doctor": ("doctors", "person", "person", ()),
    "teacher": ("teachers", "person", "person", ()),
    "student": ("students", "person", "person", ()),
    "person": ("people", "person", None, ()),
    "dog": ("dogs", "animal", "animal", ("cat", "horse")),
    "cat": ("cats", "animal", "animal", ("dog", "bird")),
    "horse": ("horses", "animal", "animal", ("cow", "dog")),
    "cow": ("cows", "animal", "animal", ("horse", "cat")),
    "bird": ("birds", "animal", "animal", ("cat", "dog")),
    "puppy": ("puppies", "animal", "dog", ("kitten",)),
    "kitten": ("kittens", "animal", "cat", ("puppy",)),
    "animal": ("animals", "animal", None, ()),
}
GENERIC_NOUNS = {"person": "person", "animal": "animal"}  # kind -> the noun that names only the kind
NUMBERS = {1: "a", 2: "two", 3: "three", 4: "four"}

ADJECTIVE_PAIRS = [("happy", "sad"), ("calm", "angry"), ("young", "old"), ("tired", "energetic")]
ANTONYM = {a: b for a, b in ADJECTIVE_PAIRS} | {b: a for a, b in ADJECTIVE_PAIRS}

COLORS = ["red", "blue", "green", "yellow", "black", "white"]
GARMENTS = {"person": ["shirt", "jacket", "hat", "coat", "dress"], "animal": ["collar", "blanket"]}

# Objects an action can take: name -> (objects, more general object or None).
OBJECTS: dict[str, tuple[list[str], Optional[str]]] = {
    "food": (["an apple", "a sandwich", "a pizza", "some soup"], "some food"),
    "text": (["a book", "a newspaper", "a letter"], "something"),
    "dish": (["dinner", "pasta", "some eggs"], "a meal"),
    "instrument": (["a guitar", "a piano", "the drums", "a violin"], "an instrument"),
    "ride": (["a bike", "a skateboard", "a horse"], None),
    "load": (["a box", "a bag", "a basket"], "something"),
    "toy": (["a ball", "a stick", "a frisbee"], "something"),
}

# action: (kinds that do it, object key or None, object required?, more general action or None, state)
# States that cannot hold at once give the contradictions (see INCOMPATIBLE).
ACTIONS: dict[str, tuple[tuple[str, ...], Optional[str], bool, Optional[str], str]] = {
    "sleeping": (("person", "animal"), None, False, None, "asleep"),
    "napping": (("person", "animal"), None, False, "sleeping", "asleep"),
    "sitting": (("person", "animal"), None, False, None, "sitting"),
    "lying down": (("person", "animal"), None, False, None, "lying"),
    "standing": (("person", "animal"), None, False, None, "standing"),
    "running": (("person", "animal"), None, False, None, "moving"),
    "sprinting": (("person", "animal"), None, False, "running", "moving"),
    "jogging": (("person",), None, False, "running", "moving"),
    "walking": (("person", "animal"), None, False, None, "moving"),
    "jumping": (("person", "animal"), None, False, None, "moving"),
    "dancing": (("person",), None, False, None, "moving"),
    "swimming": (("person", "animal"), None, False, None, "moving"),
    "eating": (("person", "animal"), "food", False, None, "busy"),
    "reading": (("person",), "text", False, None, "busy"),
    "cooking": (("person",), "dish", False, None, "busy"),
    "playing": (("person",), "instrument", True, None, "busy"),
    "riding": (("person",), "ride", True, None, "moving"),
    "carrying": (("person", "animal"), "load", True, None, "busy"),
    "chasing": (("animal",), "toy", True, None, "moving"),
    "barking": (("animal",), None, False, None, "busy"),
    "laughing": (("person",), None, False, None, "laughing"),
    "crying": (("person",), None, False, None, "crying"),
}
INCOMPATIBLE = {
    "asleep": ("moving", "busy", "standing", "laughing", "crying"),
    "sitting": ("standing", "lying", "moving"),
    "lying": ("standing", "sitting", "moving"),
    "standing": ("sitting", "lying", "asleep"),
    "moving": ("asleep", "sitting", "lying"),
    "busy": ("asleep",),
    "laughing": ("crying", "asleep"),
    "crying": ("laughing", "asleep"),
}

PLACES = {  # indoors?: places
    True: ["in a kitchen", "in a library", "in a classroom", "at a restaurant", "in a gym", "in an office",
           "in a barn"],
    False: ["in a park", "on a beach", "in a forest", "on a street", "in a field", "in a garden", "on a farm"],
}
PLACE_GENERAL = {True: ["inside", "indoors", "in a building"], False: ["outside", "outdoors", "in the open air"]}

TIMES = {  # daytime?: times
    True: ["in the morning", "in the afternoon", "on a sunny day"],
    False: ["at night", "at midnight"],
}
TIME_GENERAL = {True: "during the day", False: "at night"}

COMPANIONS = {"person": ["with a friend", "with a neighbor", "with a classmate", "with two friends"],
              "animal": ["with its owner", "with a child"]}
COMPANION_GENERAL = "with someone"
ALONE = "alone"

PURPOSES = {"person": ["for a contest", "for a school project", "to make money", "to relax",
                       "for a birthday party"],
            "animal": ["for a treat", "to stay warm", "for the first time"]}

DETAILS = ("adjective", "attire", "object", "companion", "place", "time", "purpose")
CONTRADICTABLE = ("adjective", "attire", "companion", "place", "time")  # details `_contradict` can flip


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(count: int | str, noun: str, adjective: Optional[str]) -> list[str]:
    """'a happy man', 'two dogs', 'some people'; `count` is 1..4 or 'some'."""
    words = ([adjective] if adjective else []) + [noun if count == 1 else NOUNS[noun][0]]
    first = _article(words[0]) if count == 1 else (count if isinstance(count, str) else NUMBERS[count])
    return [first] + words


def _attire_phrase(kind: str, color: Optional[str], garment: str) -> list[str]:
    words = ([color] if color else []) + [garment]
    return ["in" if kind == "person" else "with", _article(words[0])] + words


class _Scene:
    """A premise's content: subject and action always, some of DETAILS."""

    def __init__(self, rng: random.Random) -> None:
        self.kind = rng.choice(["person"] * 3 + ["animal"])
        specific = [n for n, v in NOUNS.items() if v[1] == self.kind and n not in GENERIC_NOUNS]
        self.noun = GENERIC_NOUNS[self.kind] if rng.random() < 0.12 else rng.choice(specific)
        self.count = 1 if rng.random() < 0.65 else rng.choice([2, 3, 4])
        self.action = rng.choice([a for a, v in ACTIONS.items() if self.kind in v[0]])
        _, object_key, required, _, _ = ACTIONS[self.action]
        details = [d for d in DETAILS if d != "object" or (object_key and not required)]
        present = set(rng.sample(details, rng.randint(1, 3)))
        self.details: dict[str, object] = {}
        if object_key and (required or "object" in present):
            self.details["object"] = rng.choice(OBJECTS[object_key][0])
        for d in details:  # a fixed order: iterating the set would follow the per-process string hash
            if d in present and d != "object":
                self.details[d] = _draw_detail(d, self, rng)

    def absent(self) -> list[str]:
        _, object_key, _, _, _ = ACTIONS[self.action]
        return [d for d in DETAILS if d not in self.details and (d != "object" or object_key)]


def _draw_detail(detail: str, scene: _Scene, rng: random.Random):
    """A random value for a detail of this scene."""
    if detail == "adjective":
        return rng.choice(sorted(ANTONYM))
    if detail == "attire":
        return rng.choice(COLORS), rng.choice(GARMENTS[scene.kind])
    if detail == "object":
        return rng.choice(OBJECTS[ACTIONS[scene.action][1]][0])
    if detail == "companion":
        return ALONE if rng.random() < 0.2 else rng.choice(COMPANIONS[scene.kind])
    if detail == "place":
        indoors = rng.random() < 0.5
        return indoors, rng.choice(PLACES[indoors])
    if detail == "time":
        day = rng.random() < 0.5
        return day, rng.choice(TIMES[day])
    if detail == "purpose":
        return rng.choice(PURPOSES[scene.kind])
    raise KeyError(detail)


def _render(kind: str, count, noun: str, action: str, details: dict) -> list[str]:
    """Tokens of 'Subject [attire] is/are action [object] [companion] [place] [time] [purpose] .'"""
    words = _noun_phrase(count, noun, details.get("adjective"))
    if "attire" in details:
        words += _attire_phrase(kind, *details["attire"])
    words += ["is" if count == 1 else "are"] + action.split()
    if "object" in details:
        words += details["object"].split()
    for d in ("companion", "place", "time"):
        if d in details:
            value = details[d]
            words += (value[1] if isinstance(value, tuple) else value).split()
    if "purpose" in details:
        words += details["purpose"].split()
    words[0] = words[0].capitalize()
    return words + ["."]


def _generalize(detail: str, value, scene: _Scene, rng: random.Random):
    """A value the premise's value entails (possibly the same)."""
    if detail == "attire":
        return None, value[1]
    if detail == "object":
        general = OBJECTS[ACTIONS[scene.action][1]][1]
        return general if general else value
    if detail == "companion":
        return value if value == ALONE else COMPANION_GENERAL
    if detail == "place":
        return value[0], rng.choice(PLACE_GENERAL[value[0]])
    if detail == "time":
        return value[0], TIME_GENERAL[value[0]]
    return value  # adjective, purpose: kept as they are


def _contradict(detail: str, value, scene: _Scene, rng: random.Random):
    """A value incompatible with the premise's value (for the details in CONTRADICTABLE)."""
    if detail == "adjective":
        return ANTONYM[value]
    if detail == "attire":
        return rng.choice([c for c in COLORS if c != value[0]]), value[1]
    if detail == "companion":
        return rng.choice(COMPANIONS[scene.kind]) if value == ALONE else ALONE
    if detail == "place":
        other = not value[0]
        return other, rng.choice(PLACES[other] + PLACE_GENERAL[other])
    if detail == "time":
        other = not value[0]
        return other, rng.choice(TIMES[other] + [TIME_GENERAL[other]])
    raise KeyError(detail)


def _hypothesis(scene: _Scene, label: str, rng: random.Random) -> list[str]:
    """Tokens of a hypothesis with the given relation to the scene."""
    kind, count, noun, action = scene.kind, scene.count, scene.noun, scene.action
    details = dict(scene.details)
    required_object = ACTIONS[action][2]
    optional = [d for d in details if not (d == "object" and required_object)]
    # Same number of mentioned details for every label, so length alone does not give the label away.
    k = min(rng.choice([1, 1, 2, 2, 3]), len(optional))
    if label == "neutral":
        k = max(k - 1, 0)  # one more detail is added below
    mentioned = set(rng.sample(optional, k))
    hyp = {d: v for d, v in details.items() if d in mentioned or (d == "object" and required_object)}

    p_generalize = 0.6 if label == "entailment" else 0.3
    for d in list(hyp):
        if rng.random() < p_generalize:
            hyp[d] = _generalize(d, hyp[d], scene, rng)
    if rng.random() < p_generalize and NOUNS[noun][2]:
        noun = NOUNS[noun][2]
    if rng.random() < p_generalize and count > 1:
        count = "some"
    if rng.random() < p_generalize and ACTIONS[action][3]:
        action = ACTIONS[action][3]

    if label == "contradiction":
        choices = [d for d in hyp if d in CONTRADICTABLE]
        choices += ["action", "action", "count"] + (["noun"] if NOUNS[scene.noun][3] else [])
        what = rng.choice(choices)
        if what == "action":
            states = INCOMPATIBLE[ACTIONS[scene.action][4]]
            action = rng.choice([a for a, v in ACTIONS.items() if v[4] in states and kind in v[0]])
            object_key, required = ACTIONS[action][1], ACTIONS[action][2]
            hyp.pop("object", None)
            if object_key and (required or rng.random() < 0.3):
                hyp["object"] = rng.choice(OBJECTS[object_key][0])
        elif what == "count":
            count = rng.choice([c for c in NUMBERS if c != scene.count])
        elif what == "noun":
            noun = rng.choice(NOUNS[scene.noun][3])
        else:
            hyp[what] = _contradict(what, details[what], scene, rng)
    elif label == "neutral":
        additions = scene.absent()
        if scene.noun == GENERIC_NOUNS[kind]:
            additions.append("noun")
        what = rng.choice(additions)
        if what == "noun":
            noun = rng.choice([n for n, v in NOUNS.items() if v[1] == kind and n not in GENERIC_NOUNS])
        else:
            hyp[what] = _draw_detail(what, scene, rng)
    return _render(kind, count, noun, action, hyp)


def _binary_parse(tokens: list[str]) -> str:
    """A right-branching binary tree with SNLI's spacing: '( A ( man ( is ( sleeping . ) ) ) )'."""
    if len(tokens) == 1:
        return tokens[0]
    return "( " + " ( ".join(tokens[:-1]) + " " + tokens[-1] + " )" * (len(tokens) - 1)


def _flat_parse(tokens: list[str]) -> str:
    """A placeholder constituency parse (one flat clause) for the `*_parse` columns."""
    return "(ROOT (S " + " ".join(f"({'.' if t == '.' else 'W'} {t})" for t in tokens) + "))"


def _sentence(tokens: list[str]) -> str:
    return " ".join(tokens[:-1]) + tokens[-1]


def _rows(num_examples: int, split: str, seed: int, seen_premises: set[str]) -> list[list[str]]:
    """SNLI rows for one split: `num_examples` labelled rows (premises in groups of three, one per
    label) plus about 1% rows with gold label '-'."""
    rng = random.Random(f"nlibert-sample-{seed}-{split}")
    num_unlabelled = max(1, num_examples // 100) if num_examples else 0
    rows: list[list[str]] = []
    labelled = 0
    caption = 0
    unlabelled_at = set(rng.sample(range(num_examples // 3 + 1), min(num_unlabelled, num_examples // 3 + 1)))
    while labelled < num_examples:
        scene = _Scene(rng)
        premise = _render(scene.kind, scene.count, scene.noun, scene.action, scene.details)
        if " ".join(premise) in seen_premises:
            continue  # keep test premises apart from train ones
        seen_premises.add(" ".join(premise))
        labels = LABEL_NAMES[:]
        rng.shuffle(labels)
        labels = labels[: num_examples - labelled]
        caption_id = f"{seed % 1000:03d}{caption:07d}.jpg#{0 if split == 'train' else 1}"
        if caption in unlabelled_at:
            labels.append("-")
        for label in labels:
            relation = rng.choice(LABEL_NAMES) if label == "-" else label
            hypothesis = _hypothesis(scene, relation, rng)
            if label == "-":  # annotators disagree: no label has 3 of 5 votes
                others = [n for n in LABEL_NAMES if n != relation]
                votes = [relation, relation, others[0], others[0], others[1]]
            elif split == "train":  # like SNLI train: one annotator label per row
                votes = [label, "", "", "", ""]
            else:  # like SNLI dev/test: five votes, gold label has a majority
                votes = [label] * 3 + [rng.choice(LABEL_NAMES), label]
            rows.append([label, _binary_parse(premise), _binary_parse(hypothesis), _flat_parse(premise),
                         _flat_parse(hypothesis), _sentence(premise), _sentence(hypothesis), caption_id,
                         f"{caption_id}r{2 if label == '-' else 1}{relation[0]}", *votes])
            labelled += label != "-"
        caption += 1
    return rows


def write_sample_snli(folder: str | os.PathLike, num_train: int = 3000, num_test: int = 600, seed: int = 0) -> str:
    """Write `snli_1.0_train.txt` (num_train labelled rows) and `snli_1.0_test.txt` (num_test) into
    `folder` in SNLI's 14-column tab-separated layout; the same seed gives the same bytes.
    Returns the folder."""
    folder = os.fspath(folder)
    seen: set[str] = set()
    for split, num in (("train", num_train), ("test", num_test)):
        with atomic_write(os.path.join(folder, f"snli_1.0_{split}.txt"), "w") as f:
            f.write("\t".join(HEADER) + "\n")
            for row in _rows(num, split, seed, seen):
                f.write("\t".join(row) + "\n")
    return folder
