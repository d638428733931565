"""The settings of a run, as objects: the CLI builds one from its arguments, a job takes one.

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

from .schedule import LR_SCHEDULES, LRSchedule
from .tables import FORMATS, Columns

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


def _option(name: str) -> str:
    """The CLI option of a settings field: `batch_size` -> `--batch-size`."""
    return "--" + name.replace("_", "-")


def _check_positive(settings: Any) -> None:
    """Refuse a field of `settings.POSITIVE` that is not a positive integer (None: not set), naming its option."""
    for name in settings.POSITIVE:
        value = getattr(settings, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{_option(name)} must be a positive integer, got {value!r}")


def _check(settings: Any) -> None:
    """Refuse values no run can use, naming the option (`--batch-size`, ...)."""
    _check_positive(settings)
    for name, choices in settings.CHOICES.items():
        if getattr(settings, name) not in choices:
            raise ValueError(f"{_option(name)} {getattr(settings, name)!r}: use one of {', '.join(choices)}")
    if not (isinstance(settings.lr, (int, float)) and math.isfinite(settings.lr) and settings.lr > 0):
        raise ValueError(f"--lr must be a positive finite number, got {settings.lr!r}")
    if not 0.0 <= settings.dropout < 1.0:
        raise ValueError(f"--dropout must be in [0, 1), got {settings.dropout!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _without(settings: Any, names: Sequence[str]) -> dict:
    return {k: v for k, v in dataclasses.asdict(settings).items() if k not in names}


@dataclasses.dataclass(frozen=True)
class FinetuneSettings:
    """One fine-tuning run (`nlibert finetune`; the CLI's options have these names)."""

    backend: str = "torch"
    pretrained: str = "minilm-l6"  # a checkpoint name or folder, or 'random' (a seeded bert.small shape)
    task: str = "snli"  # 'snli' or 'ag_news' (with `data`); with `train_file`, the user's files
    data: str | None = None  # the task's folder or HUB_DATA name; SNLI: None is the embedded NLI sample
    train_file: str | None = None  # the user's CSV/TSV/JSON Lines training file (split 90/10 alone)
    test_file: str | None = None
    text_columns: str | None = None  # 'A' (single texts) or 'A,B' (pairs): the columns of train_file
    label_column: str | None = None
    no_header: bool = False  # train_file has no header line: columns are 0-based indices
    validation_split: float | None = None  # hold out this seeded share of the training examples ...
    validation_file: str | None = None  # ... or validate on this file (SNLI's layout, or train_file's)
    max_len: int = 128
    batch_size: int = 512
    lr: float = 1e-4
    epochs: int = 5
    dropout: float = 0.1
    train_limit: int | None = None  # a seeded random subset of N training pairs
    test_limit: int | None = None
    seed: int = 0
    mode: str = "fast"
    precision: str = "float32"  # fast mode: bfloat16 autocast of the forward pass (torch)
    graph: bool = False  # fast mode: torch.compile / hybridize
    bucketing: bool = True  # fast mode: length-bucketed batches
    micro_batch: int | None = None  # compute each batch in chunks of N rows, gradients summed (memory)
    grad_accum: int | None = None  # each batch as K chunks (micro_batch ceil(batch_size / K))
    optimizer: str = "adam"
    weight_decay: float = 0.0  # adamw's decoupled decay (not on biases and LayerNorm weights)
    warmup_ratio: float | None = None  # warm-up over this fraction of all steps ...
    warmup_steps: int | None = None  # ... or over N steps
    lr_schedule: str = "constant"
    max_grad_norm: float | None = None  # clip the global norm of the batch's mean gradient
    save_best: bool = False  # OUT/model: the epoch of best validation accuracy, not the last
    device: str | None = None
    nproc: int = 1  # processes of a data-parallel job on this machine (core/distributed.py)
    out: str = "nlibert-out"
    cache_dir: str | None = None
    checkpoint_every: int = 50  # steps; a checkpoint also ends every epoch (0: only those)
    resume: bool | None = None  # None: when OUT/resume holds a checkpoint; True: insist; False: start over
    stop_after: int | None = None  # end this run after N steps, as if interrupted
    log_every: int = 50  # steps between log lines and OUT/log.jsonl entries (0: epochs only)

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
            _only_with(self, ("test_file", "text_columns", "label_column", "no_header"), "train_file")
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

    backend: str = "torch"
    corpus: str = "wikitext-2"  # 'wikitext-2' (downloaded) or a folder of wiki.*.tokens files
    steps: int = 50
    batch_size: int = 512
    max_len: int = 64
    num_hiddens: int = 128
    ffn_num_hiddens: int = 256
    num_heads: int = 2
    num_layers: int = 2
    dropout: float = 0.2
    lr: float = 0.01
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    remask: bool = False
    init: str = "book"
    mode: str = "book"
    mlm_loss: str = "masked"
    seed: int = 0
    device: str | None = None
    nproc: int = 1  # processes of a data-parallel job on this machine (core/distributed.py)
    checkpoint_every: int = 100  # 0: only when the run ends
    resume: bool | None = None  # None: when OUT/resume holds a checkpoint; True: insist; False: start over
    stop_after: int | None = None  # end this run after N steps, as if interrupted
    log_every: int = 10  # steps between log lines and OUT/log.jsonl entries (0: none)
    out: str = "nlibert-pretrain"

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


def _only_with(settings: Any, names: Sequence[str], needed: str) -> None:
    """Refuse options of `names` that are set while the option `needed` is not."""
    given = [_option(name) for name in names if getattr(settings, name) not in (None, False)]
    if given:
        raise ValueError(f"{', '.join(given)}: only with {_option(needed)}; add {_option(needed)} or leave "
                         f"{'them' if len(given) > 1 else 'it'} out")


@dataclasses.dataclass(frozen=True)
class PredictSettings:
    """Labelling with a fine-tuned model (`nlibert predict`): one text or pair (`texts`), or every
    row of a CSV/TSV/JSON Lines `file`, written to `output` with the predictions."""

    model: str
    texts: Sequence[str] = ()  # TEXT, or TEXT and TEXT_B for a pair model
    file: str | None = None
    output: str | None = None  # its extension (.csv, .tsv, .jsonl, .json) sets the format
    text_columns: str | None = None  # None: the columns the model was fine-tuned on, if it records them
    no_header: bool | None = None  # None: as the model's training file (a model fine-tuned on files records it)
    batch_size: int = 256
    device: str | None = None

    POSITIVE: ClassVar[tuple[str, ...]] = ("batch_size",)

    def __post_init__(self) -> None:
        _check_positive(self)
        if self.file is None:
            _only_with(self, ("output", "text_columns", "no_header"), "file")
            if not 1 <= len(self.texts) <= 2:
                raise ValueError(f"give TEXT (and TEXT_B for a model of pairs), or --file FILE --output OUT; "
                                 f"found {len(self.texts)} texts")
            return
        if self.texts:
            raise ValueError("--file labels a whole file: leave out TEXT and TEXT_B")
        if self.output is None:
            raise ValueError("--file needs --output OUT: where to write the rows with their predictions "
                             "(.csv, .tsv, .jsonl or .json)")
        if os.path.splitext(self.output)[1].lower() not in FORMATS:
            raise ValueError(f"--output {self.output}: name it .csv, .tsv, .jsonl or .json (the extension "
                             "sets the format)")


@dataclasses.dataclass(frozen=True)
class EvaluateSettings:
    """Measuring a fine-tuned model on a labelled test set (`nlibert evaluate`): the task's own test
    split (`data` None and no `test_file`: the data the model was fine-tuned on), a folder in the
    task's layout (`data`), or the user's `test_file`; reports go to `out`."""

    model: str
    data: str | None = None
    test_file: str | None = None
    text_columns: str | None = None  # None: the columns the model was fine-tuned on, if it records them
    label_column: str | None = None
    no_header: bool | None = None  # None: as the model's training file (a model fine-tuned on files records it)
    out: str | None = None  # None: the model folder's parent (a finetune run's OUT)
    batch_size: int = 256
    device: str | None = None

    POSITIVE: ClassVar[tuple[str, ...]] = ("batch_size",)

    def __post_init__(self) -> None:
        _check_positive(self)
        if self.test_file is None:
            _only_with(self, ("text_columns", "label_column", "no_header"), "test_file")
        elif self.data is not None:
            raise ValueError("--data and --test-file both name the test data; give one of them")

    def out_dir(self) -> str:
        """Where evaluation.json and confusion.png go: `out`, else the model folder's parent."""
        return self.out if self.out is not None else os.path.dirname(os.path.abspath(self.model))
