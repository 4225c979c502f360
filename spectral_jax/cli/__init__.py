"""`spectral-jax` command line. Each subcommand lives in its own module with `register(subparsers)`.

Contract (DESIGN.md): bad input → one line on stderr naming the problem and the fix, exit code 2, nothing
partial written.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from spectral_jax.errors import InputError

# Subcommand modules, in the order `--help` lists them.
SUBCOMMANDS = ("demo", "analyze", "extract", "solve", "dataset")
_MODULES = {"demo": "analyze"}  # demo is registered by the analyze module


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors: one line, exit 2
        self.exit(2, f"{self.prog}: error: {message} — see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="spectral-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in dict.fromkeys(_MODULES.get(n, n) for n in SUBCOMMANDS):
        importlib.import_module(f"spectral_jax.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except InputError as e:
        print(f"spectral-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
