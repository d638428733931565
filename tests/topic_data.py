"""Small, learnable text classification files the task tests write: filler words around one topic
word, whose topic is the label. A model that finds the topic word is right; chance is 1/3."""
import csv
import random

FILLER = "the a of and to in is was for on with as by at from this that".split()
TOPICS = {"money": "bank stock price market profit".split(), "science": "atom cell planet laser gene".split(),
          "sport": "goal match team coach league".split()}


def _filler(rng: random.Random) -> list[str]:
    return [rng.choice(FILLER) for _ in range(rng.randint(2, 6))]


def topic_rows(n: int, seed: int, paired: bool = False) -> list[dict]:
    """`n` rows {'id', 'text', 'topic'} (single texts), or {'id', 'a', 'b', 'topic'} whose topic word
    is in text a or in text b, the other text filler only (pairs)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = rng.choice(sorted(TOPICS))
        words = _filler(rng)
        words.insert(rng.randint(0, len(words)), rng.choice(TOPICS[topic]))
        if not paired:
            rows.append({"id": str(i), "text": " ".join(words), "topic": topic})
            continue
        texts = [" ".join(words), " ".join(_filler(rng))]
        rng.shuffle(texts)
        rows.append({"id": str(i), "a": texts[0], "b": texts[1], "topic": topic})
    return rows


def write_csv(path, rows: list[dict]) -> str:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)
