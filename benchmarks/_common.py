"""Shared by the benchmarks: the SNLI length distribution at scale, bert.small's shape, FLOP counts,
peak memory, and a machine-load note. Benchmarks are scripts, not tests: nothing here is timed in CI."""
from __future__ import annotations

import os
import pathlib
import resource
import threading
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("NLIBERT_SHARED_DATA", REPO.parent / "shared" / "data"))
DEV_FILE = SHARED_DATA / "snli_1.0" / "snli_1.0_dev.txt"
RESERVED = ["<pad>", "<mask>", "<cls>", "<sep>"]
# bert.small, as the chapter loads it (`load_pretrained_model('bert.small', 256, 512, 4, 2, 0.1, 512)`): vocabulary 20,256, H 256, F 512, 4 heads, 2 layers.
BERT_SMALL = dict(vocab_size=20256, num_hiddens=256, ffn_num_hiddens=512, num_heads=4, num_layers=2,
                  dropout=0.1, max_len=512)
SNLI_TRAIN_PAIRS = 549_367  # the size of SNLI's training split (SNLI 1.0; the book prints `read 549367 examples`)


def dev_file() -> pathlib.Path:
    if not DEV_FILE.exists():
        raise SystemExit(f"{DEV_FILE} not found: set NLIBERT_SHARED_DATA to the folder holding snli_1.0/")
    return DEV_FILE


def bert_small_vocab(premises, hypotheses, size: int = BERT_SMALL["vocab_size"]):
    """The dev file's words (every one, so nothing is <unk>) padded with filler tokens to bert.small's
    vocabulary size, so the embedding table and its optimizer state have the real size."""
    from nlibert.core.vocab import Vocab
    vocab = Vocab([s.lower().split() for s in list(premises) + list(hypotheses)], min_freq=1,
                  reserved_tokens=RESERVED)
    fillers = [f"<filler{i}>" for i in range(max(0, size - len(vocab)))]
    return Vocab.from_idx_to_token(vocab.idx_to_token + fillers)


def tiled_dev(max_len: int, tile: int):
    """The dev file packed at `max_len` and repeated `tile` times: SNLI's length distribution at scale
    (the dev pairs average 26.5 of 128 positions, 99% fit in 51). Returns (arrays, labels, vocab)."""
    from nlibert.core.packing import pack_pairs
    from nlibert.core.snli import read_snli_file
    premises, hypotheses, labels = read_snli_file(dev_file())
    vocab = bert_small_vocab(premises, hypotheses)
    ids, segments, valid_lens = pack_pairs(premises, hypotheses, vocab, max_len)
    arrays = tuple(np.tile(a, (tile,) + (1,) * (a.ndim - 1)) for a in (ids, segments, valid_lens))
    return arrays, np.tile(np.asarray(labels, dtype=np.int64), tile), vocab


def forward_flops(lengths: np.ndarray, width: int | None, H: int, F: int, layers: int,
                  cls_only: bool = False) -> float:
    """Matmul FLOPs of bert.small's classifier forward pass over a batch.

    With `width` None, each example counts only its own valid tokens (L): per layer, Q/K/V/O
    projections 8 L H^2, the FFN 4 L H F, attention scores and weighted values 4 L^2 H; plus the
    pooler and output layer on <cls>. These are the useful FLOPs. With a `width`, every example
    counts `width` positions: what a padded batch actually executes; with `cls_only` too, the last
    block computes keys and values for every position (4 L H^2) but the rest for <cls> alone."""
    L = np.asarray(lengths, dtype=np.float64) if width is None else np.full(len(lengths), float(width))
    per_layer = 8 * L * H * H + 4 * L * H * F + 4 * L * L * H
    total = layers * per_layer.sum()
    if cls_only:
        last_cls = 4 * L * H * H + 4 * H * H + 4 * H * F + 4 * L * H  # K, V for all; Q, O, FFN, attention at <cls>
        total += (last_cls - per_layer).sum()
    return float(total + len(L) * (2 * H * H + 6 * H))


def training_flops(lengths, width: int | None, H: int, F: int, layers: int, cls_only: bool = False) -> float:
    """Forward plus backward (twice the forward's matmuls): 3x the forward FLOPs.

    The useful FLOPs of one training step (`width` None), summed over the examples, each with its
    valid length L (padding counts nothing; embedding look-ups are free; softmax, layer norm and the
    other element-wise work are left out, as MFU conventionally does):

        2 (FLOPs per multiply-add) * 3 (forward + backward) * (
            layers * [4 L H^2      Q, K, V and output projections
                      + 2 L^2 H    Q K^T and the attention-weighted V
                      + 2 L H F]   the position-wise FFN, H -> F -> H
            + H^2 + 3 H)           pooler (H -> H) and classifier (H -> 3) at <cls>"""
    return 3.0 * forward_flops(lengths, width, H, F, layers, cls_only)


class PeakRSS:
    """This process's peak resident memory between start() and stop(), above the reading at start()
    (activations, gradients, optimizer state, workspace): `stop()` returns that growth in bytes.

    A thread samples /proc/self/statm every few milliseconds; and when the kernel's own high-water
    mark (`ru_maxrss`, monotonic over the process's life) rose during the window, that mark is the
    window's exact peak, so a spike between two samples is not missed."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")
        self._stop = threading.Event()
        self.base = self.peak = self._maxrss_at_start = 0

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    @staticmethod
    def maxrss() -> int:
        """The process's lifetime peak RSS in bytes (Linux reports kilobytes)."""
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def start(self) -> "PeakRSS":
        self.base = self.peak = self.rss()
        self._maxrss_at_start = self.maxrss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())
        if self.maxrss() > self._maxrss_at_start:  # a new lifetime high, reached inside the window
            self.peak = max(self.peak, self.maxrss())
        return self.peak - self.base


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown CPU"


# Student's t quantile t(0.975, df) for df = 1..10; beyond, the normal 1.96 is within 0.2.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def seed_interval(differences) -> tuple[float, float]:
    """95% t-interval of the mean of per-seed differences (needs two or more)."""
    d = np.asarray(differences, dtype=float)
    if len(d) < 2:
        raise ValueError(f"need two or more per-seed differences, got {len(d)}")
    half = T_975.get(len(d) - 1, 1.96) * d.std(ddof=1) / np.sqrt(len(d))
    return float(d.mean() - half), float(d.mean() + half)
