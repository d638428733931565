"""BERT pretraining data from WikiText (d2l "The Dataset for Pretraining BERT"), vectorised and seeded.

The book's pipeline, step by step, with its semantics (d2l's bert-dataset.md and bert-pretraining.md):

1. `read_wiki`: every line of the corpus with at least two sentences when split on ' . ' is a
   paragraph; it is `strip().lower().split(' . ')`. The paragraphs are shuffled.
2. The vocabulary: word tokens of every sentence, `min_freq=5`, reserved tokens
   `<pad> <mask> <cls> <sep>` after `<unk>` (`Vocab`, d2l r0.17 order).
3. Next-sentence pairs: for each two adjacent sentences of a paragraph, the second is kept with
   probability 0.5 (`is_next`), otherwise replaced by a random sentence of a random paragraph;
   a pair with `len(a) + len(b) + 3 > max_len` is skipped.
4. Masked LM: `num_mlm_preds = max(1, round(len(tokens) * 0.15))` positions are drawn from those
   that are not `<cls>`/`<sep>`; each becomes `<mask>` (80%), stays (10%) or becomes a random
   token of the whole vocabulary (10%, special tokens included, as the book). Predictions are
   sorted by position.
5. Padding: ids with `<pad>` to `max_len`, segments with 0, and the predictions to
   `max_num_mlm_preds = round(max_len * 0.15)` (positions 0, weights 1/0, labels 0).

Differences from the book, none in what the data means: every step is array work on all examples
at once (no per-token Python loop, no process pool), all randomness comes from one seeded
`np.random.Generator` (the book uses the global `random`), and the 80/10/10 choice takes one
uniform draw per prediction instead of two (the same probabilities). Masks are drawn once, when
the dataset is built, as in the book (no dynamic re-masking per epoch).

dtypes: token ids, segments and prediction positions are int32, `valid_lens` and `mlm_weights`
float32 (as the book), MLM and NSP labels int64.
"""
from __future__ import annotations

import os
from typing import Iterator, Sequence

import numpy as np

from .batching import batch_indices
from .vocab import RESERVED_TOKENS, Vocab, tokenize

MIN_FREQ = 5
MLM_FRACTION = 0.15

# The book reads wiki.train.tokens. Without it (offline here), every split that is there is read.
WIKI_FILES = ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens")


def wiki_files(data_dir: str | os.PathLike) -> list[str]:
    """The corpus files of a WikiText folder: `wiki.train.tokens` alone when it is there (the
    book's choice), else every `wiki.*.tokens` file present (valid, then test, then others by name)."""
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"{data_dir}: no such corpus folder")
    train = os.path.join(data_dir, WIKI_FILES[0])
    if os.path.isfile(train):
        return [train]
    present = sorted(n for n in os.listdir(data_dir) if n.startswith("wiki.") and n.endswith(".tokens"))
    ordered = [n for n in WIKI_FILES if n in present] + [n for n in present if n not in WIKI_FILES]
    if not ordered:
        raise FileNotFoundError(f"{data_dir}: no wiki.*.tokens file (expected {', '.join(WIKI_FILES)})")
    return [os.path.join(data_dir, n) for n in ordered]


def read_wiki_files(paths: Sequence[str | os.PathLike], rng: np.random.Generator | None = None
                    ) -> list[list[str]]:
    """Paragraphs (lists of lower-cased sentences) of the given files, in file order, then shuffled
    by `rng` if one is given (the book shuffles with `random.shuffle`)."""
    paragraphs: list[list[str]] = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            paragraphs += [line.strip().lower().split(" . ") for line in f if len(line.split(" . ")) >= 2]
    if rng is not None:
        paragraphs = [paragraphs[i] for i in rng.permutation(len(paragraphs))]
    return paragraphs


def read_wiki(data_dir: str | os.PathLike, rng: np.random.Generator | None = None) -> list[list[str]]:
    """The book's `_read_wiki`: the shuffled paragraphs of a WikiText folder (see `wiki_files`)."""
    return read_wiki_files(wiki_files(data_dir), rng)


def get_nsp_pairs(sentence_lens: np.ndarray, paragraph_sizes: np.ndarray, max_len: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Next-sentence pairs over sentences numbered across all paragraphs: `(a, b, is_next)`.

    For each two adjacent sentences a, a+1 of one paragraph (in paragraph order, as the book),
    b is a+1 with probability 0.5, else a random sentence of a random paragraph (paragraph first,
    then a sentence in it, as the book). Pairs longer than `max_len` with <cls> and two <sep> are
    dropped after the draw.
    """
    sentence_lens = np.asarray(sentence_lens, dtype=np.int64)
    paragraph_sizes = np.asarray(paragraph_sizes, dtype=np.int64)
    paragraph_of = np.repeat(np.arange(len(paragraph_sizes)), paragraph_sizes)
    paragraph_start = np.concatenate([[0], np.cumsum(paragraph_sizes)[:-1]]).astype(np.int64)
    a = np.flatnonzero(paragraph_of[:-1] == paragraph_of[1:])  # a and a+1 share a paragraph
    is_next = rng.random(len(a)) < 0.5
    b = a + 1
    num_random = int((~is_next).sum())
    if num_random:
        p = rng.integers(0, len(paragraph_sizes), num_random)
        b[~is_next] = paragraph_start[p] + rng.integers(0, paragraph_sizes[p])
    keep = sentence_lens[a] + sentence_lens[b] + 3 <= max_len
    return a[keep], b[keep], is_next[keep]


def pack_nsp_pairs(flat_ids: np.ndarray, sentence_start: np.ndarray, sentence_lens: np.ndarray,
                   a: np.ndarray, b: np.ndarray, max_len: int, vocab: Vocab
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`<cls> a <sep> b <sep>` padded with `<pad>` to max_len: (token_ids, segments, valid_lens)."""
    la, lb = sentence_lens[a][:, None], sentence_lens[b][:, None]  # (N, 1)
    sa, sb = sentence_start[a][:, None], sentence_start[b][:, None]
    n = la + lb + 3
    j = np.arange(max_len)[None, :]  # (1, max_len)
    ids = np.full((len(a), max_len), vocab["<pad>"], dtype=np.int32)
    in_a = (j >= 1) & (j <= la)
    in_b = (j >= la + 2) & (j < n - 1)
    ids[in_a] = flat_ids[np.broadcast_to(sa + j - 1, ids.shape)[in_a]]
    ids[in_b] = flat_ids[np.broadcast_to(sb + j - la - 2, ids.shape)[in_b]]
    rows = np.arange(len(a))
    ids[:, 0] = vocab["<cls>"]
    ids[rows, la[:, 0] + 1] = vocab["<sep>"]
    ids[rows, n[:, 0] - 1] = vocab["<sep>"]
    segments = ((j >= la + 2) & (j < n)).astype(np.int32)
    return ids, segments, n[:, 0].astype(np.float32)


def mask_tokens(token_ids: np.ndarray, valid_lens: np.ndarray, segments: np.ndarray, vocab: Vocab,
                rng: np.random.Generator, max_num_mlm_preds: int | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The book's masked-LM inputs for packed pairs, all rows at once.

    Returns `(mlm_input_ids, pred_positions, mlm_weights, mlm_labels)`, the last three padded to
    `max_num_mlm_preds` (default `round(max_len * 0.15)`). Candidates are every valid position
    except <cls> (0) and the two <sep>; a row predicts `max(1, round(valid_len * 0.15))` of them,
    chosen uniformly without replacement (the book shuffles the candidates and takes the first).
    """
    N, max_len = token_ids.shape
    P = round(max_len * MLM_FRACTION) if max_num_mlm_preds is None else max_num_mlm_preds
    n = valid_lens.astype(np.int64)[:, None]  # (N, 1)
    j = np.arange(max_len)[None, :]
    first_sep = np.argmax(segments == 1, axis=1)[:, None] - 1  # <sep> ending sentence a
    candidates = (j > 0) & (j < n - 1) & (j != first_sep)
    num_preds = np.maximum(1, np.round(n[:, 0] * MLM_FRACTION)).astype(np.int64)
    num_preds = np.minimum(num_preds, candidates.sum(axis=1))  # rows too short to have any
    if num_preds.max(initial=0) > P:
        raise ValueError(f"rows need up to {num_preds.max()} predictions but max_num_mlm_preds is {P}")
    # A random order of each row's candidates: sort random keys, non-candidates last.
    keys = np.where(candidates, rng.random((N, max_len)), 2.0)
    chosen_in_order = np.argsort(keys, axis=1, kind="stable")[:, :P]  # (N, P)
    chosen = np.arange(P)[None, :] < num_preds[:, None]  # (N, P): real prediction slots
    positions = np.sort(np.where(chosen, chosen_in_order, max_len), axis=1)  # by position, pads last
    positions = np.where(chosen, positions, 0)
    rows = np.arange(N)[:, None]
    labels = np.where(chosen, token_ids[rows, positions], 0).astype(np.int64)
    # 80% <mask>, 10% the token itself, 10% a random token of the whole vocabulary.
    u = rng.random((N, P))
    random_tokens = rng.integers(0, len(vocab), (N, P))
    replacement = np.where(u < 0.8, vocab["<mask>"], np.where(u < 0.9, labels, random_tokens))
    mlm_input = token_ids.copy()
    r, c = np.nonzero(chosen)
    mlm_input[r, positions[r, c]] = replacement[r, c]
    return mlm_input, positions.astype(np.int32), chosen.astype(np.float32), labels


class WikiTextDataset:
    """The book's `_WikiTextDataset`: packed, masked next-sentence pairs of WikiText paragraphs.

    `paragraphs` is what `read_wiki` returns (lists of sentence strings). Without `vocab`, one is
    built from every sentence (min_freq 5, `RESERVED_TOKENS`). Items are the book's 7-tuple
    `(token_ids, segments, valid_len, pred_positions, mlm_weights, mlm_labels, nsp_label)`;
    the whole arrays are attributes. `sentence_pairs` holds each example's two sentence numbers
    (into `sentences`) for inspection; `packed_token_ids` the pairs before masking (`remasked`).
    """

    def __init__(self, paragraphs: Sequence[Sequence[str]], max_len: int, vocab: Vocab | None = None,
                 rng: np.random.Generator | None = None, seed: int = 0) -> None:
        rng = np.random.default_rng(seed) if rng is None else rng
        tokenized = [tokenize(list(p), "word") for p in paragraphs]
        self.sentences = [s for p in tokenized for s in p]
        self.vocab = vocab if vocab is not None else Vocab(self.sentences, min_freq=MIN_FREQ,
                                                           reserved_tokens=RESERVED_TOKENS)
        missing = [t for t in RESERVED_TOKENS if t not in self.vocab.token_to_idx]
        if missing:
            raise ValueError(f"the vocabulary lacks the reserved tokens {missing}")
        self.max_len = max_len
        lookup, unk = self.vocab.token_to_idx, self.vocab.unk
        flat_ids = np.fromiter((lookup.get(t, unk) for s in self.sentences for t in s), dtype=np.int32)
        sentence_lens = np.fromiter((len(s) for s in self.sentences), dtype=np.int64, count=len(self.sentences))
        sentence_start = np.concatenate([[0], np.cumsum(sentence_lens)[:-1]]).astype(np.int64)
        paragraph_sizes = np.array([len(p) for p in tokenized], dtype=np.int64)

        a, b, is_next = get_nsp_pairs(sentence_lens, paragraph_sizes, max_len, rng)
        self.packed_token_ids, self.all_segments, self.valid_lens = pack_nsp_pairs(
            flat_ids, sentence_start, sentence_lens, a, b, max_len, self.vocab)
        (self.all_token_ids, self.all_pred_positions, self.all_mlm_weights,
         self.all_mlm_labels) = mask_tokens(self.packed_token_ids, self.valid_lens, self.all_segments, self.vocab, rng)
        self.nsp_labels = is_next.astype(np.int64)
        self.sentence_pairs = np.stack([a, b], axis=1)

    @property
    def arrays(self) -> tuple[np.ndarray, ...]:
        """The seven arrays, in the book's batch order."""
        return (self.all_token_ids, self.all_segments, self.valid_lens, self.all_pred_positions,
                self.all_mlm_weights, self.all_mlm_labels, self.nsp_labels)

    def remasked(self, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        """The seven arrays with the masked-LM inputs, positions, weights and labels drawn afresh
        from `rng` (the same pairs and rule): dynamic masking, for `WikiBatchIterator(remask=True)`."""
        ids, positions, weights, labels = mask_tokens(self.packed_token_ids, self.valid_lens, self.all_segments,
                                                      self.vocab, rng, self.all_pred_positions.shape[1])
        return ids, self.all_segments, self.valid_lens, positions, weights, labels, self.nsp_labels

    def __getitem__(self, idx):
        return tuple(a[idx] for a in self.arrays)

    def __len__(self) -> int:
        return len(self.all_token_ids)


class WikiBatchIterator:
    """Minibatches of a `WikiTextDataset`: each item is the book's 7-tuple of numpy arrays.

    Pass `e` (the e-th `iter()`) uses the order `batch_indices(..., rng=default_rng([seed, e]))`,
    so an order never depends on how earlier passes were consumed, and the iterator can be put
    back exactly where it was: `state_dict()` is `{"epoch", "batch"}` (the pass and how many of its
    batches were handed out) and `load_state_dict` makes the next `iter()` continue from there.
    The last batch of a pass may be smaller (the book's DataLoader keeps it).

    `remask=True` (dynamic masking, as RoBERTa) draws new masks for pass e >= 1 from
    `default_rng([seed, e, 1])` (`WikiTextDataset.remasked`); pass 0 uses the dataset's own. The
    book masks once, so a run of many passes sees the same masked positions again and again and
    its MLM loss falls by memorising them.
    """

    def __init__(self, dataset: WikiTextDataset, batch_size: int, shuffle: bool = True, seed: int = 0,
                 remask: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if len(dataset) == 0:
            raise ValueError("the dataset holds no sentence pairs (is max_len too small for the corpus?)")
        self.dataset, self.batch_size, self.shuffle, self.seed = dataset, batch_size, shuffle, seed
        self.remask = remask
        self._epoch, self._batch = 0, 0

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def _normalized(self) -> tuple[int, int]:
        return (self._epoch + 1, 0) if self._batch >= len(self) else (self._epoch, self._batch)

    def state_dict(self) -> dict:
        epoch, batch = self._normalized()
        return {"epoch": epoch, "batch": batch, "seed": self.seed, "batch_size": self.batch_size,
                "num_examples": len(self.dataset), "remask": self.remask}

    def load_state_dict(self, state: dict) -> None:
        ours = self.state_dict()
        for key in ("seed", "batch_size", "num_examples", "remask"):
            if key in state and state[key] != ours[key]:
                raise ValueError(f"data iterator state is for {key}={state[key]}, this iterator has {ours[key]}")
        self._epoch, self._batch = int(state["epoch"]), int(state["batch"])

    def __iter__(self) -> Iterator[tuple[np.ndarray, ...]]:
        epoch, start = self._normalized()
        rng = np.random.default_rng([self.seed, epoch])
        batches = batch_indices(len(self.dataset), self.batch_size, self.shuffle, rng)
        self._epoch, self._batch = epoch, start
        arrays = self.dataset.arrays
        if self.remask and epoch > 0:
            arrays = self.dataset.remasked(np.random.default_rng([self.seed, epoch, 1]))
        for i in range(start, len(batches)):
            self._batch = i + 1  # counted as handed out before the consumer sees it
            yield tuple(a[batches[i]] for a in arrays)
        self._epoch, self._batch = epoch + 1, 0


def load_data_wiki(batch_size: int, max_len: int, data_dir: str | os.PathLike | None = None,
                   seed: int = 0) -> tuple[WikiBatchIterator, Vocab]:
    """The book's `load_data_wiki`: `(train_iter, vocab)` for WikiText-2, downloaded by name
    (data hub 'wikitext-2', folder 'wikitext-2') unless `data_dir` is given. Seeded."""
    if data_dir is None:
        from .data_hub import download_extract
        data_dir = download_extract("wikitext-2", "wikitext-2")
    rng = np.random.default_rng(seed)
    dataset = WikiTextDataset(read_wiki(data_dir, rng), max_len, rng=rng)
    return WikiBatchIterator(dataset, batch_size, shuffle=True, seed=seed), dataset.vocab
