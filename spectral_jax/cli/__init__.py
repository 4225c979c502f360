"""`spectral-jax` command line. Each subcommand lives in its own module with `register(subparsers)`.

Contract (docs/design.md): bad input → one line on stderr naming the problem and the fix, exit code 2, nothing
partial written. Ctrl-C → `spectral-jax CMD: interrupted`, exit code 130 (SIGTERM, as `kill` or a scheduler sends
it: the same clean stop, `spectral-jax CMD: terminated`, exit code 143); output cut short by a closed pipe
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
import errno
import importlib
import importlib.machinery
import os
import signal
import sys
import threading
import time
import warnings

from spectral_jax.cli import compile_cache
from spectral_jax.errors import InputError

# Subcommand modules, in the order `--help` lists them.
SUBCOMMANDS = ("demo", "analyze", "extract", "solve", "dataset")
_MODULES = {"demo": "analyze"}  # demo is registered by the analyze module


EPILOG = f"""\
compiled programs are cached in $XDG_CACHE_HOME/spectral-jax/jax (default ~/.cache/spectral-jax/jax),
so a repeated command does not compile again: {compile_cache.ENV}=0 turns the cache off,
{compile_cache.ENV}=DIR moves it.
exit codes: 0 done, 2 bad input (one line on stderr), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors: one line, exit 2
        self.exit(2, f"{self.prog}: error: {message} — see `{self.prog} --help`\n")

    def parse_args(self, args=None, namespace=None):
        """argparse's, but an unknown flag is refused by the command's own parser ("spectral-jax analyze: error:
        unrecognized arguments: ... — see `spectral-jax analyze --help`"), not the top-level one."""
        ns, extra = self.parse_known_args(args, namespace)
        if extra:
            getattr(ns, "_parser", self).error(f"unrecognized arguments: {' '.join(extra)}")
        return ns


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="spectral-jax", description=__doc__.splitlines()[0], epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in dict.fromkeys(_MODULES.get(n, n) for n in SUBCOMMANDS):
        importlib.import_module(f"spectral_jax.cli.{name}").register(sub)
    for command in sub.choices.values():
        command.set_defaults(_parser=command)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one `spectral-jax` command (`argv` as after the program name; None: `sys.argv[1:]`); returns the exit code.

    With `argv=None` this is the process's command line and it also turns on the persistent compilation cache;
    once the command is over, the process's exit is not interruptible: a Ctrl-C after the result was written no
    longer turns a finished run into a traceback or a death by SIGINT, and an interrupted run exits 130 at once
    (its outputs already removed) instead of tearing JAX down under threads it interrupted (seen: SIGSEGV).
    """
    code = _run(argv)
    if argv is None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if code in (130, 143):
            hard_exit(code)
    return code


def hard_exit(code: int) -> None:
    """Flush stdout and stderr and leave the process at once with `code` (`os._exit`: no interpreter teardown, which
    would run JAX's shutdown under threads that were interrupted or wait on peers that are gone)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


# errno of a write the filesystem refused → the fix the one-line error gives (`_run`)
_DISK_ERRORS = {errno.ENOSPC: "free space there, or write elsewhere (--out)",
                errno.EDQUOT: "free space within your quota, or write elsewhere (--out)",
                errno.EROFS: "write elsewhere (--out): that filesystem is read-only",
                errno.EXDEV: "write elsewhere (--out), on the filesystem of its parent folder"}


def _run(argv: list[str] | None) -> int:
    """`main` without the process-exit handling: the command, its errors and its interruption → the exit code."""
    prog, ctrl_c, out = "spectral-jax", _CtrlC(), None
    try:
        with ctrl_c, _OneLineWarnings() as said:
            args = build_parser().parse_args(argv)
            prog = said.prog = f"spectral-jax {args.command}"
            out = getattr(args, "out", None)
            if argv is None:
                compile_cache.enable()
            code = int(args.func(args) or 0)
            sys.stdout.flush()  # a closed pipe shows up here, not in the interpreter's exit
            return code
    except InputError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: {'terminated' if ctrl_c.terminated else 'interrupted'}", file=sys.stderr)
        return 143 if ctrl_c.terminated else 130
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, and keep Python's exit-time flush from complaining.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is not a file descriptor (captured in tests, say)
            pass
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by the closed pipe
    except OSError as e:   # after BrokenPipeError, one of them
        # numpy's tofile reports a short write without an errno
        short = e.errno is None and " requested and " in str(e) and str(e).endswith(" written")
        if e.errno not in _DISK_ERRORS and not short:
            raise
        # the filesystem refused a write (full, read-only, ...): one line; what was staged is already removed
        why = f"a write came short ({e}): the disk is likely full" if short else e.strerror or str(e)
        print(f"{prog}: error: {e.filename or (f'--out {out}' if out else 'an output')}: {why} — {_DISK_ERRORS[e.errno or errno.ENOSPC]}",
              file=sys.stderr)
        return 1
    except Exception:
        if not ctrl_c.pressed:
            raise
        # A Ctrl-C inside a C extension's import (numpy, jaxlib) surfaces as an ImportError: still an interrupt.
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


class _OneLineWarnings:
    """While a command runs, a warning the package itself gives (its file under spectral_jax, or the `models`
    folder the install maps into it) prints as one line, `spectral-jax CMD: warning: MESSAGE`, not Python's two
    (file:line: Category: message, then the source line it points at); other libraries' warnings print as
    before. Filters (`-W`, `filterwarnings`) still apply first, and a `catch_warnings(record=True)` around the
    command (pytest's, a caller's) still records them."""

    def __init__(self):
        self.prog = "spectral-jax"
        import spectral_jax

        here = os.path.dirname(os.path.abspath(spectral_jax.__file__))
        self._roots = (here + os.sep, os.path.join(os.path.dirname(here), "models") + os.sep)

    def __enter__(self):
        self._previous = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            recording = getattr(getattr(warnings, "_showwarnmsg_impl", None), "__qualname__",
                                "_showwarnmsg_impl") != "_showwarnmsg_impl"     # catch_warnings(record=True)
            if recording or not os.path.abspath(filename).startswith(self._roots):
                return self._previous(message, category, filename, lineno, file, line)
            try:
                print(f"{self.prog}: warning: {message}", file=sys.stderr if file is None else file)
            except (OSError, ValueError):   # stderr closed: nothing to tell
                pass
            return None

        warnings.showwarning = show
        return self

    def __exit__(self, *exc):
        warnings.showwarning = self._previous


class _CtrlC:
    """Notes every Ctrl-C during a command and makes it stop the command as one KeyboardInterrupt, even where
    Python would lose it or crash on it.

    - Raised while a C extension module initialises, a KeyboardInterrupt can kill the process (numpy's prints
      its own traceback; jaxlib's calls std::terminate): there the interrupt is held and delivered again as soon
      as that initialisation is over (`spectral-jax` imports JAX lazily, so this window is common).
    - Raised in a garbage-collector callback (JAX registers one) or a `__del__`, Python prints "Exception ignored
      in ..." and drops it, and the command would run on to the end: it is delivered again a moment later.
    A SIGINT handler the caller installed (or SIG_IGN) is left alone; only Python's default one is replaced.
    SIGTERM, where it has its default action (death without cleanup), stops the command the same way (`terminated`
    set): outputs removed, checkpoints kept, as for a Ctrl-C.
    """

    def __init__(self):
        self.pressed = self.terminated = False
        self._signum = signal.SIGINT        # what `_again_later` sends again
        self._closed = False
        self._waiter: threading.Thread | None = None

    def __enter__(self):
        self._hook, sys.unraisablehook = sys.unraisablehook, self._unraisable
        self._handler = None
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._handler = signal.signal(signal.SIGINT, self._interrupt)
        self._term = None
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            self._term = signal.signal(signal.SIGTERM, self._terminate)
        return self

    def __exit__(self, *exc):
        self._closed = True
        sys.unraisablehook = self._hook
        if self._handler is not None:
            signal.signal(signal.SIGINT, self._handler)
        if self._term is not None:
            signal.signal(signal.SIGTERM, self._term)

    def _terminate(self, signum, frame):
        self.terminated = True
        self._interrupt(signum, frame)

    def _interrupt(self, signum, frame):
        self.pressed = True
        self._signum = signum
        if _in_extension_init(frame):
            self._again_later()
            return
        raise KeyboardInterrupt

    def _unraisable(self, unraisable):
        # a KeyboardInterrupt Python dropped: where SIGINT is ours, or where it came from our SIGTERM handler (SIGINT
        # ignored: a job started with `&` from a script, nohup)
        if isinstance(unraisable.exc_value, KeyboardInterrupt) and (self._handler is not None or self.pressed):
            self._again_later()
        else:
            self._hook(unraisable)

    def _again_later(self):
        """Send the signal (SIGINT, or SIGTERM) again once no extension initialises on the main thread (polled every
        20 ms, in a thread)."""
        if self._waiter is not None and self._waiter.is_alive():
            return
        main_id = threading.main_thread().ident

        def wait():
            while not self._closed:
                time.sleep(0.02)
                frame = sys._current_frames().get(main_id)
                if frame is None or not _in_extension_init(frame):
                    if not self._closed:
                        os.kill(os.getpid(), self._signum)
                    return

        self._waiter = threading.Thread(target=wait, name="spectral-jax-ctrl-c", daemon=True)
        self._waiter.start()


def _in_extension_init(frame) -> bool:
    """Whether `frame` or a caller is a C extension module's initialisation (Python code it calls included)."""
    while frame is not None:
        code = frame.f_code
        if code.co_name in ("create_module", "exec_module"):
            qualname = getattr(code, "co_qualname", None)  # Python ≥ 3.11; before, look at the loader itself
            if qualname == f"ExtensionFileLoader.{code.co_name}" or qualname is None and \
                    isinstance(frame.f_locals.get("self"), importlib.machinery.ExtensionFileLoader):
                return True
        frame = frame.f_back
    return False


if __name__ == "__main__":
    sys.exit(main())
