"""The `hashmoe` command line."""

from __future__ import annotations

import argparse
import sys

from trainer import __version__

DESCRIPTION = """\
hashmoe trains Mixture-of-Experts language models (Hash, Switch, BASE, top-k routing) next to dense,
recurrent and frozen-parameter baselines on DeepSpeed with expert parallelism, and compares them.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hashmoe", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"hashmoe {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
