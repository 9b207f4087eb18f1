"""The `cart` command line."""
from __future__ import annotations

import argparse
import sys

from cart_core.corpus import CorpusError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cart", description="CART generative cross-modal retrieval")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the whole method on real data on this machine")
    demo.add_argument("--data", help="folder with items.parquet + captions.parquet (default: Flickr8k from ../shared/data)")
    demo.add_argument("--out", default="out/demo", help="output folder for metrics.json and the plot")
    demo.add_argument("--quick", action="store_true", help="smaller model and fewer epochs (<= 3 minutes)")
    demo.add_argument("--config", help="YAML config (default: configs/demo.yaml or demo-quick.yaml)")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config value, e.g. --set train.epochs=5")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from pipelines.demo import run_demo

            run_demo(args.data, args.out, quick=args.quick, config=args.config, overrides=args.overrides)
    except (CorpusError, ValueError, FileNotFoundError) as exc:
        print(f"cart {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
