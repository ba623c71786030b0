"""``python -m ultrasound_ai.jobs run JOB.json [--events PATH | --events-fd N] [--cancel-file PATH]
[--threads N | --leave-free-cores K]``.

Also ``python -m ultrasound_ai.jobs tasks`` lists the task names a job may use. See worker.py for the
event channel and cancellation, protocol.py for JOB.json and the messages.
"""

from __future__ import annotations

import argparse
import sys

from ultrasound_ai.core.threads import parse_threads


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ultrasound_ai.jobs", description="Run one UltrasoundAI job.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="run the task described by JOB.json")
    run.add_argument("job", help="path of JOB.json")
    channel = run.add_mutually_exclusive_group()
    channel.add_argument("--events", metavar="PATH", help="append JSON event lines to this file or named pipe")
    channel.add_argument("--events-fd", metavar="N", type=int, help="write JSON event lines to this inherited fd")
    run.add_argument("--cancel-file", metavar="PATH", help="cancel as soon as this file exists")
    run.add_argument("--threads", metavar="N", type=parse_threads,
                     help="torch/OpenMP threads (default: the cores this process may use, less --leave-free-cores)")
    run.add_argument("--leave-free-cores", metavar="K", type=int, default=0,
                     help="cores to leave for other programs, e.g. 1 for Slicer's GUI (default: 0)")
    sub.add_parser("tasks", help="list the available task names")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        from ultrasound_ai.jobs.worker import run

        return run(args.job, events=args.events, events_fd=args.events_fd, cancel_file=args.cancel_file,
                   threads=args.threads, leave_free_cores=max(0, args.leave_free_cores))
    if args.command == "tasks":
        from ultrasound_ai.core.errors import InputError, exit_code_for
        from ultrasound_ai.jobs.registry import available_tasks

        try:
            table = available_tasks()
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exit_code_for(exc)
        for name, target in sorted(table.items()):
            print(f"{name}\t{target}")
        return 0
    build_parser().print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
