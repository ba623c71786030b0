"""`ultrasound-ai diagnostics [--json] [--output PATH]`: what the engine runs on (see diagnostics.py)."""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> None:
    from ultrasound_ai.core.deprecation import add_argument

    parser = subparsers.add_parser(
        "diagnostics",
        help="show versions, CPU, memory, GPU devices and mamba_ssm availability",
        description="Show the engine's environment: versions, CPU, memory, CUDA/MPS devices, mamba_ssm.",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    add_argument(parser, "--out", deprecated=("--output",), dest="output", metavar="PATH",
                 help="also write the JSON report to PATH")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here: the report imports torch, which must not slow down `ultrasound-ai --help`.
    from ultrasound_ai.core.atomic import atomic_output
    from ultrasound_ai.core.diagnostics import collect_diagnostics, format_diagnostics

    report = collect_diagnostics()
    if args.output:
        with atomic_output(args.output) as tmp:
            tmp.write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(json.dumps(report, indent=2) if args.json else format_diagnostics(report))
    return 0
