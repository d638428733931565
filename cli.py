"""`nlibert` command line: finetune, predict (convert and parity come with the MXNet backend)."""
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
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"nlibert {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
