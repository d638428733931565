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
from .core.data_hub import DownloadError
from .core.inference_settings import EvaluateSettings, PredictSettings
from .core.options import add_options, positive_int
from .core.settings import PARITY_TOLERANCE, FinetuneSettings, PretrainSettings

# What a user's input or environment can cause (bad values, missing or unreadable files, no
# network, a backend not installed): one line and exit 2, no traceback (unless --debug).
USER_ERRORS = (ValueError, KeyError, OSError, ImportError, DownloadError)


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
    """The commands and their options: those of finetune, pretrain, predict and evaluate generated from
    their settings' fields (core/options.py), so that defaults, choices and help are written once."""
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error (also: NLIBERT_DEBUG=1)")
    parser = _Parser(prog="nlibert", description=__doc__)
    parser.add_argument("--version", action=_Version, nargs=0, help="show the versions of nlibert and its backends")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    # Which backends exist is the registry's, the default the first installed: known when the CLI starts.
    backend = {"choices": BACKENDS, "default": default_backend()}
    after_nproc = {"nproc": _add_oversubscribe}

    ft = sub.add_parser("finetune", parents=[common],
                        help="fine-tune BERT for SNLI as the d2l chapter does, or for AG News or your own files")
    add_options(ft, FinetuneSettings, after_nproc, backend=backend)
    pr = sub.add_parser("predict", parents=[common],
                        help="label a text, a pair (premise and hypothesis for SNLI) or every row of a file "
                             "with a fine-tuned model")
    add_options(pr, PredictSettings)
    ev = sub.add_parser("evaluate", parents=[common],
                        help="accuracy, per-class precision/recall/F1, macro-F1 and the confusion matrix of a "
                             "fine-tuned model on a labelled test set")
    add_options(ev, EvaluateSettings)

    cv = sub.add_parser("convert", parents=[common],
                        help="convert a checkpoint folder from one backend's format to another's")
    cv.add_argument("src", help="folder with vocab.json + pretrained.params (or a fine-tuned model folder), "
                                "or a Hugging Face BERT folder / minilm-l6 (written in the book's format)")
    cv.add_argument("dst", help="the folder to write (refused if it holds files, unless --overwrite)")
    cv.add_argument("--to", choices=BACKENDS, required=True, help="the backend whose format DST is written in")
    cv.add_argument("--overwrite", action="store_true", help="replace DST if it already holds files")

    pa = sub.add_parser("parity", parents=[common],
                        help="run one checkpoint through every installed backend and compare the outputs")
    pa.add_argument("--checkpoint", required=True, help="a checkpoint folder in any backend's format (the book's own, "
                    "without config.json, too), a Hugging Face BERT folder, minilm-l6, or bert.small")
    pa.add_argument("--data", default=None, help="an SNLI-format .txt file for the inputs (default: the embedded sample)")
    pa.add_argument("--tolerance", type=float, default=PARITY_TOLERANCE,
                    help="largest allowed max |difference| as a fraction of the outputs' scale, max(1, max |value|) "
                         f"(default {PARITY_TOLERANCE:g})")
    pa.add_argument("--num-pairs", type=positive_int, default=256,
                    help="compare on this many seeded pairs of the data (default %(default)s)")
    pa.add_argument("--max-len", type=int, default=128, help="pack pairs to this length (at most the model's max_len)")
    pa.add_argument("--seed", type=int, default=0,
                    help="the seed that draws the pairs and their MLM positions (default %(default)s)")
    pt = sub.add_parser("pretrain", parents=[common],
                        help="pretrain BERT (masked LM + next sentence) on WikiText as the d2l book does")
    add_options(pt, PretrainSettings, after_nproc, backend=backend)
    return parser


def _add_oversubscribe(parser: argparse.ArgumentParser) -> None:
    """An option of the job's launcher, not of the run (so no settings field)."""
    parser.add_argument("--oversubscribe", action="store_true",
                        help="--nproc: start more processes than this machine has CPU cores (or several on one "
                             "GPU); refused otherwise, as they would fight for the cores and memory")


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
