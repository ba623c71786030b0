"""The `ultrasound-ai` command: `ultrasound-ai GROUP VERB ...` plus `diagnostics` and `demo`.

Each capability contributes a group from its own `cli.py` exposing `add_parser(subparsers)`; the
sub-commands set `func(args) -> int | None`. Exceptions map to the job exit codes: bad input 2,
cancelled 3, anything else 1.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
import traceback

from ultrasound_ai import __version__
from ultrasound_ai.core.errors import EXIT_OK, Cancelled, exit_code_for
from ultrasound_ai.core.threads import apply_thread_policy, choose_threads, parse_threads

# Group name -> module exposing add_parser(subparsers). Modules must import cheaply (no torch at
# module level) so that `ultrasound-ai --help` stays fast.
COMMAND_MODULES = [
    "ultrasound_ai.core.diagnostics_cli",
    "ultrasound_ai.freehand.cli",
    "ultrasound_ai.registration.cli",
    "ultrasound_ai.ulm.cli",
    "ultrasound_ai.foundation.cli",
    "ultrasound_ai.demo",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ultrasound-ai",
        description="UltrasoundAI engine: freehand reconstruction, MRI-TRUS fusion, ULM, foundation model.",
    )
    parser.add_argument("--version", action="version", version=f"ultrasound-ai {__version__}")
    parser.add_argument("--traceback", action="store_true", help="print the full traceback on errors")
    parser.add_argument("--threads", type=parse_threads, metavar="N",
                        help="torch/OpenMP threads (default: OMP_NUM_THREADS if set, else the cores this "
                             "process may use)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            # Only a capability that is not there yet is skipped; a broken import inside it is a bug.
            if exc.name == name:
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_OK
    # Before any command imports torch: OpenMP reads its thread count and wait policy only once.
    apply_thread_policy(choose_threads(args.threads))
    previous = _terminate_as_cancel()
    try:
        code = args.func(args)
    except BaseException as exc:  # noqa: BLE001 - every failure becomes a clear message and an exit code
        if isinstance(exc, SystemExit):
            raise
        if args.traceback:
            traceback.print_exc()
        print(f"ultrasound-ai: error: {exc}", file=sys.stderr)
        return exit_code_for(exc)
    finally:
        if previous is not None:
            with contextlib.suppress(ValueError, OSError):
                signal.signal(signal.SIGTERM, previous)  # main() may be called in a longer-lived process
    return EXIT_OK if code is None else int(code)


def _terminate_as_cancel():
    """SIGTERM raises Cancelled in the main thread, so every `atomic_output` on the way out removes
    its temporary file (the default action would end the process with half-written files left).
    Returns the previous handler (None when none could be installed)."""

    def handler(signum, _frame):
        raise Cancelled(f"received signal {signal.Signals(signum).name}")

    try:
        return signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError, AttributeError):  # not the main thread, or no SIGTERM
        return None


if __name__ == "__main__":
    sys.exit(main())
