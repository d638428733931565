"""The command-line jobs: resolve the data and the checkpoint, build the model, train, write
(convert and parity: convert.py; predict and evaluate: inference.py).

Framework-neutral: a job takes a settings object (core/settings.py), loads the backend it names
from the registry (backends/__init__.py) and calls the contract's names in it
(backends/contract.py). Data sources live in core/sources.py, checkpoint folders in
core/folders.py, the epoch and step loops in core/training.py and core/pretraining.py.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import signal
import sys
import time
from types import ModuleType
from typing import Callable, Iterator

import numpy as np

from . import __version__
from .backends import load_backend
from .core.folders import PARAMS_FILES, TaskRecord
from .core.distributed import World, check_job, free_port, launch, quiet_unless_main
from .core import signals
from .core.data_hub import sha1_of
from .core.io import check_output, remove_leftovers, temp_folder_beside, write_folder_whole, write_json
from .core.plot import plot_training
from .core.pretraining import StepRecord, format_pretrain_summary, summarize, train_steps
from .core.runlog import LOG_FILE, RunLog
from .core.resume import ResumeFolder, open_resume, output_lock
from .core.progress import Progress
from .core.settings import FinetuneSettings, PretrainSettings
from .core.sources import FinetuneSource, finetune_source, wiki_source
from .core.training import EpochRecord, LoopState, TrainingDiverged, purpose_seed, train_epochs
from .core.vocab import RESERVED_TOKENS, Vocab, tokenize
from .core.wiki import WikiBatchIterator, WikiTextDataset, read_wiki_files
from .finetune_data import book_batches, data_fingerprint, fast_batches, splits_record
from .convert import run_convert, run_parity  # noqa: F401  the CLI's and the tests' jobs.run_convert / run_parity
from .inference import run_predict  # noqa: F401  the book's callers and the tests label a pair through jobs

# The shape of the book's `bert.small` (2 layers, 256 hidden, 4 heads, FFN 512, max_len 512): what
# `--pretrained random` builds, seeded, when no pretrained checkpoint is wanted.
SEEDED_SHAPE = {"num_hiddens": 256, "ffn_num_hiddens": 512, "num_heads": 4, "num_layers": 2, "dropout": 0.1,
                "max_len": 512}


def _versions(backend: ModuleType) -> dict:
    return {"nlibert": __version__, "python": platform.python_version(), "numpy": np.__version__,
            "platform": platform.platform(), **backend.framework_versions()}


def _diverged(error: TrainingDiverged, lr: float, resume_dir: str) -> ValueError:
    """The user's error for a run whose loss became NaN or infinite."""
    kept = f"; the last good checkpoint stays in {resume_dir}" if os.path.isdir(resume_dir) else ""
    return ValueError(f"{error}: the learning rate (--lr {lr:g}) is likely too high; no model was written{kept}")


# --- finetune ------------------------------------------------------------------------------------

def seeded_vocab(texts: list[str]) -> Vocab:
    """The word vocabulary of a seeded checkpoint: every lower-cased token of `texts`."""
    return Vocab(tokenize([s.lower() for s in texts]), min_freq=1, reserved_tokens=RESERVED_TOKENS)


def build_seeded_checkpoint(backend: ModuleType, folder: str, vocab: Vocab, seed: int) -> str:
    """A randomly initialised, seeded `bert.small`-shaped checkpoint in the backend's book format, with
    `vocab` (`seeded_vocab(texts)`), in `folder`."""
    backend.set_seed(seed)
    backend.save_pretrained(backend.BERTModel(len(vocab), **SEEDED_SHAPE), vocab, folder)
    return folder


def _check_examples(source: FinetuneSource, num_train: int, num_test: int) -> None:
    if not (num_train and num_test):
        noun = "pairs" if source.paired else "examples"
        raise ValueError(f"{source.description}: {num_train} training and {num_test} test {noun}; need both "
                         "(a larger --train-limit/--test-limit, or more data)")


def _pretrained_spec(backend: ModuleType, settings: FinetuneSettings, source: FinetuneSource) -> str:
    """What `--pretrained` names; for 'random', the seeded checkpoint over the run's training text,
    in a folder keyed by what it is built from (the text's vocabulary, the shape, the seed), so that
    other data or another seed never reuses it."""
    if settings.pretrained != "random":
        return settings.pretrained
    train, test = source.texts(settings.seed, settings.train_limit, settings.test_limit)
    _check_examples(source, len(train[-1]), len(test[-1]))  # before anything is written
    vocab = seeded_vocab([text for column in train[:-1] for text in column])
    key = hashlib.sha1(json.dumps([vocab.idx_to_token, SEEDED_SHAPE, settings.seed]).encode()).hexdigest()[:12]
    folder = os.path.join(settings.out, f"seeded-bert-{settings.backend}-{key}")
    if os.path.exists(os.path.join(folder, PARAMS_FILES["pretrained"])):
        return folder
    return build_seeded_checkpoint(backend, folder, vocab, settings.seed)


def run_finetune(settings: FinetuneSettings) -> dict:
    """Fine-tune BERT for SNLI as the chapter does, or for another task (`settings.task`, the user's
    files); write metrics.json, the book's training plot (training.png) and the model into `settings.out`.
    The model folder records the task: its label names, pairs or single texts, and the data options.

    `mode='fast'` (the default) trains the same model on the same examples with the same optimizer,
    faster: length-bucketed batches trimmed to their longest pair, fused attention, the last encoder
    block computed at <cls> only (all the classifier reads), fused Adam (torch), device-side sums read
    once per epoch, and packed data cached on disk (`core.sources.packed_cache_dir`). `precision` and
    `graph` are its opt-ins; `bucketing=False` keeps its kernels but trains on the book path's batches
    (with dropout 0 the two modes then differ by rounding only). `mode='book'` is the chapter's path:
    every batch padded to `max_len`, the book's attention and loop, one host sync per batch.

    The run checkpoints into OUT/resume/ every `checkpoint_every` steps and after every epoch, and
    the same command resumes there (core/resume.py), ending with the parameters and figures of an
    uninterrupted run; `stop_after` ends it early, as if interrupted. One run at a time per OUT.
    In a job of several processes (`--nproc`, torchrun; core/distributed.py) every rank trains its
    shard of every batch and only rank 0 prints and writes.
    """
    pretrained_folder = settings.pretrained if os.path.isdir(settings.pretrained) else None
    check_output("--out", settings.out, folder=True, models={"--pretrained": pretrained_folder},
                 inputs={"--train-file": settings.train_file, "--test-file": settings.test_file})
    backend = load_backend(settings.backend)
    world = backend.init_distributed()
    with _as_rank(world, settings.out):
        result = _finetune(settings, backend, world)
    world.close()  # a job's ranks leave together, once rank 0 has written
    return result


@contextlib.contextmanager
def _as_rank(world: World, out: str) -> Iterator[None]:
    """Rank 0 holds OUT's lock (one run per output folder); the other ranks print nothing."""
    with output_lock(out) if world.main else quiet_unless_main(world):
        yield


def _finetune(settings: FinetuneSettings, backend: ModuleType, world: World) -> dict:
    devices = world.local_devices(backend.parse_devices(settings.device))
    backend.set_seed(settings.seed)
    if not world.main:
        world.barrier()  # rank 0 first writes what every rank reads: the sample, a seeded checkpoint, the cache
    source = finetune_source(settings)
    pretrained = _pretrained_spec(backend, settings, source)
    bert, vocab = backend.load_pretrained_model(pretrained, dropout=settings.dropout, devices=devices)
    fast = settings.mode == "fast"
    start = time.perf_counter()
    train_iter, test_iter, num_train, num_test, extra, valid_iter = (fast_batches if fast else book_batches)(
        source, settings, vocab)
    packing_seconds = time.perf_counter() - start
    if world.main:
        world.barrier()
    print(f"read {num_train} training and {num_test} test examples: {source.description}")
    _check_examples(source, num_train, num_test)
    splits = splits_record(settings, source, num_train, num_test, valid_iter)

    if fast:
        backend.set_fused_attention(bert, True)
    # The head's own seed (torch and JAX draw it as the classifier is built, MXNet as it is
    # initialised): the draws before differ between a first run, which builds a seeded checkpoint,
    # and a rerun into the same OUT, which finds it built.
    backend.set_seed(purpose_seed(settings.seed, "classifier-head"))
    net = backend.BERTClassifier(bert, cls_only=fast, num_classes=len(source.label_names))
    backend.initialize_classifier_head(net, devices)
    trainer = backend.make_trainer(net, settings.lr, fused=fast, optimizer=settings.optimizer,
                                   weight_decay=settings.weight_decay)
    step = backend.FinetuneStep(net, backend.make_loss(), trainer, devices, precision=settings.precision,
                                graph=settings.graph and fast, micro_batch=settings.chunk_rows(),
                                max_grad_norm=settings.max_grad_norm, world=world)
    resume_dir = os.path.join(settings.out, "resume")
    signature = {**settings.signature(), "labels": list(source.label_names),
                 "examples": data_fingerprint(train_iter, test_iter)}
    state = open_resume(resume_dir, signature, settings.resume)
    resume = ResumeFolder(resume_dir, signature=signature, backend=backend, net=net, trainer=trainer,
                          devices=devices, train_iter=train_iter, vocab=vocab, seed=settings.seed)
    loop = LoopState(**resume.restore(state)["loop"]) if state is not None else LoopState()
    if state is not None:
        print(f"resuming from {resume_dir} at epoch {loop.epoch}, step {loop.step + 1}")
    resumed_from = loop.step if state is not None else None
    model_dir = os.path.join(settings.out, "model")
    if world.main:
        remove_leftovers(model_dir)  # of a run killed while it replaced the model
    task = TaskRecord(source.name, tuple(source.label_names), source.paired, settings.max_len,
                      settings.data_options())
    keep_best = _keep_best(backend, net, vocab, bert.config, model_dir, task, loop) if settings.save_best else None
    log = RunLog(settings.out if world.main else None, settings.log_every)
    log.begin(loop.step if state is not None else None, len(loop.records))

    def on_epoch(record) -> None:  # rank 0: the model of the best epoch so far, the plot redrawn
        if keep_best is not None:
            keep_best(record)
        plot_training([EpochRecord(**r) for r in loop.records], os.path.join(settings.out, "training.png"),
                      settings.epochs)

    def checkpoint(loop_state: LoopState) -> None:  # every rank reaches it (its sums are summed over them)
        if world.main:
            resume.save(loop_state.step, {"loop": loop_state.to_dict()})

    stop_check = signals.StopCheck(world)
    try:
        bar = Progress(train_iter, "train", enabled=None if world.main else False)  # one bar per job
        with signals.step_boundaries():
            records = train_epochs(step, bar, test_iter, settings.epochs,
                                   sync="epoch" if fast else "batch", devices=_devices_text(step.devices, world),
                                   state=loop, seed=settings.seed, checkpoint=checkpoint, rank=world.rank,
                                   checkpoint_every=settings.checkpoint_every, stop_after=settings.stop_after,
                                   lr_at=settings.schedule(len(train_iter)).lr_at(),
                                   on_epoch=on_epoch if world.main else None, valid_iter=valid_iter, log=log,
                                   should_stop=stop_check)
    except TrainingDiverged as e:
        raise _diverged(e, settings.lr, resume_dir) from None
    if stop_check.stopped or signals.requested():  # after the checkpoint of the step it stopped at (or the last)
        raise signals.Stopped(signal.SIGTERM)
    if len(records) < settings.epochs:
        print(f"stopped after step {loop.step} (epoch {loop.epoch}); run the same command again to resume")
        return {"completed": False, "step": loop.step, "epoch": loop.epoch, "resume_dir": resume_dir}
    if not world.main:
        return {"completed": True, "rank": world.rank, "model_dir": model_dir}
    if not settings.save_best:
        write_folder_whole(lambda folder: backend.save_classifier(net, vocab, bert.config, folder, task=task), model_dir)
    chosen = records[_best_epoch(records) - 1] if settings.save_best else records[-1]
    if settings.save_best:
        print(f"chose epoch {chosen.epoch} on validation accuracy {chosen.validation_acc:.4f}: its test acc "
              f"{chosen.test_acc:.4f} (last epoch's: {records[-1].test_acc:.4f})")
    metrics = {"backend": settings.backend, "mode": settings.mode, "pretrained": str(pretrained),
               "data": source.description, "num_train": num_train, "num_test": num_test,
               "num_validation": splits["validation"]["examples"] if splits["validation"] else 0,
               "splits": splits, "hyperparameters": settings.hyperparameters(), **extra,
               "epochs": [r.to_dict() for r in records], "test_acc": chosen.test_acc,
               "validation_acc": chosen.validation_acc, "model_epoch": chosen.epoch,
               "chosen_on": "validation accuracy" if settings.save_best else "the last epoch",
               "last_epoch_test_acc": records[-1].test_acc,
               "packing_seconds": packing_seconds, "devices": [str(d) for d in devices], "processes": world.size,
               "model_dir": model_dir, "log": os.path.join(settings.out, LOG_FILE),
               "best_epoch": chosen.epoch if settings.save_best else None,
               "completed": True, "steps": loop.step, "resumed_from_step": resumed_from,
               "versions": _versions(backend)}
    if fast and hasattr(step, "compiles"):  # a backend that compiles per shape counts its programs (JAX)
        compiles = step.compiles
        metrics["fast_path"].update(compiles)
        cached = f" ({compiles['from_cache']} from the compilation cache)" if compiles.get("from_cache") else ""
        print(f"compiled {compiles['compiles']} programs in {compiles['compile_seconds']:.1f} s{cached}")
    write_json(os.path.join(settings.out, "metrics.json"), metrics)
    plot_training(records, os.path.join(settings.out, "training.png"), settings.epochs)
    return metrics


def _devices_text(devices: list, world: World) -> str:
    """Where the run trains, as the book prints it (`[device(type='cpu')]`), and how many processes."""
    return str(devices) if world.size == 1 else f"{devices} x {world.size} processes"


def launch_job(settings: FinetuneSettings | PretrainSettings, nproc: int, argv: list[str],
               oversubscribe: bool = False) -> int:
    """Run `nlibert ARGV` as a job of `nproc` processes on this machine (core/distributed.py's
    `launch`), with the processes the backend's engine needs, meeting on 127.0.0.1; a job that
    cannot work is refused before any process starts (`check_job`)."""
    backend = load_backend(settings.backend)
    check_job(nproc, settings.batch_size, backend.parse_devices(settings.device), oversubscribe)
    return launch([sys.executable, "-m", "nlibert.cli", *argv], backend.launch_processes(nproc, free_port()))


def _best_epoch(records) -> int:
    """The epoch of highest validation accuracy (the first of equals)."""
    return max(records, key=lambda r: r.validation_acc).epoch


def _keep_best(backend: ModuleType, net, vocab, config, model_dir: str, task: TaskRecord, loop: LoopState
               ) -> Callable:
    """`train_epochs`' `on_epoch` for `save_best`: the model into `model_dir` whenever an epoch's
    validation accuracy beats every earlier one's (those of a resumed run's finished epochs too). It
    runs before the epoch's checkpoint, so a run stopped in between redoes the epoch and the write."""
    def keep(record) -> None:
        earlier = [r["validation_acc"] for r in loop.records[:-1]]  # loop.records ends with this epoch's
        if all(record.validation_acc > acc for acc in earlier):
            write_folder_whole(lambda folder: backend.save_classifier(net, vocab, config, folder, task=task), model_dir)
    return keep


# --- pretrain ------------------------------------------------------------------------------------

def run_pretrain(settings: PretrainSettings, on_step: Callable[[StepRecord], bool | None] | None = None) -> dict:
    """Pretrain BERT on WikiText as the book does (MLM + NSP); write the checkpoint into `settings.out`.

    `out` gets `vocab.json` + `pretrained.params` + `config.json` (`save_pretrained`, the backend's
    book format, which `finetune --pretrained OUT` loads) and `metrics.json`. Every `checkpoint_every`
    steps, and when the run ends or stops, the model, optimizer state, step and data position go to
    `OUT/resume/` (core/pretraining.py); a run with the same settings (`PretrainSettings.signature`)
    resumes there. `stop_after` ends this run after that many steps, as if interrupted. `on_step(record)`
    is called after each step, once its checkpoint (if any) is written; a true return stops the run.
    `mode='fast'` uses the fused attention of the fine-tuning fast path and fused Adam (torch).
    A non-finite loss ends the run with an error, nothing written from it. One run at a time per OUT.
    In a job of several processes, every rank trains its shard of every batch; rank 0 alone writes.
    """
    check_output("--out", settings.out, folder=True,
                 models={"--corpus": settings.corpus if os.path.isdir(settings.corpus) else None})
    backend = load_backend(settings.backend)
    world = backend.init_distributed()
    with _as_rank(world, settings.out):
        result = _pretrain(settings, on_step, backend, world)
    world.close()  # a job's ranks leave together, once rank 0 has written
    return result


def _write_pretrained(backend: ModuleType, bert, vocab, out: str) -> None:
    """The pretrained checkpoint into OUT, which holds more than the model (metrics.json, resume/),
    so it cannot be swapped whole: the files are written in a folder beside, then the old
    pretrained.params is removed (OUT then holds no model: a loader refuses it, never mixes), the
    new vocab.json and config.json moved in, and pretrained.params last. A kill leaves the old
    model, none, or the new one; the same command then resumes at the last step and writes it again."""
    tmp = temp_folder_beside(os.path.join(out, PARAMS_FILES["pretrained"]))
    try:
        backend.save_pretrained(bert, vocab, tmp)
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out, PARAMS_FILES["pretrained"]))
        names = sorted(os.listdir(tmp), key=lambda name: name == PARAMS_FILES["pretrained"])  # params last
        for name in names:
            os.replace(os.path.join(tmp, name), os.path.join(out, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _pretrain(settings: PretrainSettings, on_step: Callable[[StepRecord], bool | None] | None,
              backend: ModuleType, world: World) -> dict:
    devices = world.local_devices(backend.parse_devices(settings.device))
    files, description = wiki_source(settings.corpus)
    # Names, sizes and contents: a corpus edited in place (the same size) is other data.
    signature = settings.signature([(os.path.basename(f), os.path.getsize(f), sha1_of(f)) for f in files])
    if world.main:
        remove_leftovers(os.path.join(settings.out, PARAMS_FILES["pretrained"]))
    resume_dir = os.path.join(settings.out, "resume")
    state = open_resume(resume_dir, signature, settings.resume)

    start = time.perf_counter()
    rng = np.random.default_rng(settings.seed)
    dataset = WikiTextDataset(read_wiki_files(files, rng), settings.max_len, rng=rng)
    vocab = dataset.vocab
    train_iter = WikiBatchIterator(dataset, settings.batch_size, shuffle=True, seed=settings.seed,
                                   remask=settings.remask)
    data_seconds = time.perf_counter() - start
    print(f"read {len(dataset)} sentence pairs, vocab size {len(vocab)} ({data_seconds:.1f} s): {description}")

    backend.set_seed(settings.seed)
    bert = backend.BERTModel(len(vocab), settings.num_hiddens, settings.ffn_num_hiddens, settings.num_heads,
                             settings.num_layers, settings.dropout)
    backend.initialize_bert(bert, devices, settings.init)
    fast = settings.mode == "fast"
    if fast:
        backend.set_fused_attention(bert, True)
    trainer = backend.make_trainer(bert, settings.lr, fused=fast)
    resume = ResumeFolder(resume_dir, signature=signature, backend=backend, net=bert, trainer=trainer,
                          devices=devices, train_iter=train_iter, vocab=vocab, seed=settings.seed)
    earlier = [StepRecord(**r) for r in resume.restore(state)["history"]] if state is not None else []
    start_step = int(state["step"]) if state is not None else 0
    if state is not None:
        print(f"resuming from {resume_dir} at step {start_step + 1}")

    def checkpoint(step_no: int, records: list[StepRecord]) -> None:
        if world.main:
            resume.save(step_no, {"history": [r.to_dict() for r in earlier + records]})

    step = backend.PretrainStep(bert, backend.make_loss(), len(vocab), trainer, devices, settings.mlm_loss,
                                world=world)
    # Step lines on a terminal too: pretraining draws no progress bar.
    log = RunLog(settings.out if world.main else None, settings.log_every, step_lines=True)
    log.begin(start_step if state is not None else None)
    stop_check = signals.StopCheck(world)

    def after_step(record: StepRecord) -> bool:
        stop = stop_check()  # on every step of every rank: in a job it is a collective
        return bool(on_step is not None and on_step(record)) or stop

    try:
        with signals.step_boundaries():
            records = train_steps(step, train_iter, settings.steps, start_step=start_step, seed=settings.seed,
                                  lr_at=settings.schedule().lr_at(),
                                  on_step=after_step, checkpoint=checkpoint,
                                  checkpoint_every=settings.checkpoint_every, stop_after=settings.stop_after,
                                  rank=world.rank, log=log)
    except TrainingDiverged as e:
        raise _diverged(e, settings.lr, resume_dir) from None
    last_step = records[-1].step if records else start_step
    if records:
        print(format_pretrain_summary(records, _devices_text(devices, world)))
        checkpoint(last_step, records)  # always resumable from where this run ended
    if stop_check.stopped or signals.requested():  # the checkpoint above is where the same command resumes
        raise signals.Stopped(signal.SIGTERM)
    if not world.main:
        return {"completed": last_step >= settings.steps, "rank": world.rank}
    history = earlier + records
    metrics = {
        "backend": settings.backend, "corpus": description, "num_pairs": len(dataset), "vocab_size": len(vocab),
        "hyperparameters": settings.hyperparameters(signature["corpus"]), "steps": settings.steps,
        "last_step": last_step, "completed": last_step >= settings.steps,
        "resumed_from_step": start_step if state is not None else None,
        "this_run": summarize(records), "all_steps": summarize(history),
        "history": [r.to_dict() for r in history], "data_seconds": data_seconds,
        "devices": [str(d) for d in devices], "processes": world.size, "out_dir": settings.out,
        "log": os.path.join(settings.out, LOG_FILE),
        "versions": _versions(backend),
    }
    if metrics["completed"]:
        _write_pretrained(backend, bert, vocab, settings.out)
    else:
        print(f"stopped after step {last_step} of {settings.steps}; run the same command again to resume")
    write_json(os.path.join(settings.out, "metrics.json"), metrics)
    return metrics
