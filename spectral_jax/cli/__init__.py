"""`spectral-jax` command line. Each subcommand lives in its own module with `register(subparsers)`.

Contract (DESIGN.md): bad input → one line on stderr naming the problem and the fix, exit code 2, nothing
partial written. Ctrl-C → `spectral-jax CMD: interrupted`, exit code 130; output cut short by a closed pipe
(`spectral-jax ... | head`) ends quietly.

Startup stays fast: this package and the subcommand modules import only the standard library at the top, so
`--help` and argument errors never import JAX; a subcommand imports what it needs when it runs.

Compiled programs are kept in JAX's persistent compilation cache (`compile_cache`): `$XDG_CACHE_HOME/spectral-jax/jax`
or `~/.cache/spectral-jax/jax`, so a repeated command does not compile again. `SPECTRAL_JAX_COMPILE_CACHE=0` turns
it off, `SPECTRAL_JAX_COMPILE_CACHE=DIR` moves it. Only a command-line run turns it on: `main()` with `argv=None`
(the console script, `python -m spectral_jax`); `main([...])` called from Python leaves JAX's configuration alone.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from spectral_jax.cli import compile_cache
from spectral_jax.errors import InputError

# Subcommand modules, in the order `--help` lists them.
SUBCOMMANDS = ("demo", "analyze", "extract", "solve", "dataset")
_MODULES = {"demo": "analyze"}  # demo is registered by the analyze module


EPILOG = f"""\
compiled programs are cached in $XDG_CACHE_HOME/spectral-jax/jax (default ~/.cache/spectral-jax/jax),
so a repeated command does not compile again: {compile_cache.ENV}=0 turns the cache off,
{compile_cache.ENV}=DIR moves it.
exit codes: 0 done, 2 bad input (one line on stderr), 130 interrupted (Ctrl-C)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors: one line, exit 2
        self.exit(2, f"{self.prog}: error: {message} — see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="spectral-jax", description=__doc__.splitlines()[0], epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in dict.fromkeys(_MODULES.get(n, n) for n in SUBCOMMANDS):
        importlib.import_module(f"spectral_jax.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one `spectral-jax` command (`argv` as after the program name; None: `sys.argv[1:]`); returns the exit code.

    With `argv=None` this is the process's command line and it also turns on the persistent compilation cache.
    """
    prog = "spectral-jax"
    try:
        args = build_parser().parse_args(argv)
        prog = f"spectral-jax {args.command}"
        if argv is None:
            compile_cache.enable()
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows up here, not in the interpreter's exit
        return code
    except InputError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, and keep Python's exit-time flush from complaining.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is not a file descriptor (captured in tests, say)
            pass
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by the closed pipe


if __name__ == "__main__":
    sys.exit(main())
