"""`nlibert` command line: finetune, predict, convert (torch <-> mxnet checkpoints), parity (both backends, one checkpoint)."""
from __future__ import annotations

import argparse
import json
import sys


def _limit(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nlibert", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    ft = sub.add_parser("finetune", help="fine-tune BERT for SNLI as the d2l chapter does")
    ft.add_argument("--backend", choices=("torch", "mxnet"), default="torch")
    ft.add_argument("--pretrained", default=None,
                    help="data-hub name (bert.small, bert.base) or a folder with vocab.json + pretrained.params; "
                         "default: a seeded, randomly initialised bert.small-shaped checkpoint built here")
    ft.add_argument("--data", default=None,
                    help="folder in SNLI's layout (train+test files, or the dev file to split 90/10), or 'SNLI' "
                         "to download; default: the embedded NLI sample")
    ft.add_argument("--max-len", type=int, default=128)
    ft.add_argument("--batch-size", type=int, default=512)
    ft.add_argument("--lr", type=float, default=1e-4)
    ft.add_argument("--epochs", type=int, default=5)
    ft.add_argument("--dropout", type=float, default=0.1)
    ft.add_argument("--train-limit", type=_limit, default=None, help="use a seeded random subset of N training pairs")
    ft.add_argument("--test-limit", type=_limit, default=None, help="use a seeded random subset of N test pairs")
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--device", default=None, help="cpu, cuda, or a list like cuda:0,cuda:1 (default: every GPU, else cpu)")
    ft.add_argument("--out", default="nlibert-out", help="folder for metrics.json and the fine-tuned model")

    pr = sub.add_parser("predict", help="label a premise/hypothesis pair with a fine-tuned model")
    pr.add_argument("--model", required=True, help="the model folder `finetune` wrote (OUT/model)")
    pr.add_argument("--device", default=None)
    pr.add_argument("premise")
    pr.add_argument("hypothesis")

    cv = sub.add_parser("convert", help="convert a checkpoint folder between the torch and MXNet formats")
    cv.add_argument("src", help="folder with vocab.json + pretrained.params (or a fine-tuned model folder)")
    cv.add_argument("dst")
    cv.add_argument("--to", choices=("torch", "mxnet"), required=True)

    pa = sub.add_parser("parity", help="run one checkpoint through both backends and compare the outputs")
    pa.add_argument("--checkpoint", required=True, help="a checkpoint folder in either format")
    pa.add_argument("--data", default=None, help="an SNLI-format .txt file for the inputs (default: the embedded sample)")
    pa.add_argument("--tolerance", type=float, default=1e-5, help="largest allowed max |difference| (default 1e-5)")
    pa.add_argument("--num-pairs", type=_limit, default=256)
    pa.add_argument("--max-len", type=int, default=128)
    pa.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from . import jobs  # imported late so `nlibert --help` does not load a framework
    try:
        if args.command == "finetune":
            metrics = jobs.run_finetune(
                backend_name=args.backend, pretrained=args.pretrained, data=args.data, max_len=args.max_len,
                batch_size=args.batch_size, lr=args.lr, epochs=args.epochs, train_limit=args.train_limit,
                test_limit=args.test_limit, seed=args.seed, device=args.device, out_dir=args.out,
                dropout=args.dropout)
            print(f"wrote {args.out}/metrics.json and the fine-tuned model to {metrics['model_dir']}")
        elif args.command == "predict":
            result = jobs.run_predict(args.model, args.premise, args.hypothesis, args.device)
            print(result["label"])
            print(json.dumps(result["probabilities"], indent=2))
        elif args.command == "convert":
            jobs.run_convert(args.src, args.dst, args.to)
            print(f"wrote {args.to} checkpoint to {args.dst}")
        elif args.command == "parity":
            report = jobs.run_parity(args.checkpoint, args.data, args.tolerance, args.num_pairs, args.max_len, args.seed)
            print(f"{report['kind']} checkpoint ({report['format']} format), {report['num_pairs']} pairs, "
                  f"max_len {report['max_len']}: max |torch - mxnet|")
            for key, value in report["max_abs_diff"].items():
                print(f"  {key:28s} {value:.3e}")
            if "label_agreement" in report:
                print(f"  predicted labels agree on {report['label_agreement']:.1%}")
            print(f"{'PASS' if report['passed'] else 'FAIL'} at tolerance {report['tolerance']:g}")
            return 0 if report["passed"] else 1
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"nlibert {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
