"""The `ultrasound-ai` command: `ultrasound-ai GROUP VERB ...` plus `diagnostics` and `demo`.

Each capability contributes a group from its own `cli.py` exposing `add_parser(subparsers)`; the
sub-commands set `func(args) -> int | None`. Exceptions map to the job exit codes: bad input 2,
cancelled 3, anything else 1.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from ultrasound_ai import __version__
from ultrasound_ai.core.errors import EXIT_OK, exit_code_for

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
    try:
        code = args.func(args)
    except BaseException as exc:  # noqa: BLE001 - every failure becomes a clear message and an exit code
        if isinstance(exc, SystemExit):
            raise
        if args.traceback:
            traceback.print_exc()
        print(f"ultrasound-ai: error: {exc}", file=sys.stderr)
        return exit_code_for(exc)
    return EXIT_OK if code is None else int(code)


if __name__ == "__main__":
    sys.exit(main())
