"""Write one marked section of BENCHMARKS.md, leaving every other section as it was.

Each benchmark owns sections keyed by a name (and the device kind), so a CPU-only re-run never erases a
GPU figure. A section records the machine, the command and the date.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
HEADER = (
    "# UltrasoundAI benchmarks\n\n"
    "Each section is written by a script in `bench/` (`make bench` runs them all); the command, the "
    "machine and the date are recorded in it. Data sets are frozen: simulator versions and seeds are "
    "given per section.\n"
)


def machine_description(device: str = "cpu") -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    threads = None
    try:
        import torch

        threads = torch.get_num_threads()
        if device.startswith("cuda") and torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__}), host {cpu}"
        return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {threads} threads"
    except ImportError:
        return f"{cpu}, {os.cpu_count()} cores"


def write_section(key: str, title: str, body: str, *, device: str = "cpu", command: str | None = None,
                  path: Path = BENCHMARKS) -> None:
    """Replace (or append) the section `key`/`device` of BENCHMARKS.md with `body` (markdown)."""
    marker = f"{key}:{'gpu' if device.startswith('cuda') else 'cpu'}"
    command = command or "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    section = (
        f"<!-- BEGIN {marker} -->\n## {title} ({'GPU' if device.startswith('cuda') else 'CPU'})\n\n"
        f"Machine: {machine_description(device)}. Date: {stamp}. Command: `{command}`.\n\n"
        f"{body.strip()}\n<!-- END {marker} -->\n"
    )
    text = path.read_text() if path.exists() else HEADER
    pattern = re.compile(rf"<!-- BEGIN {re.escape(marker)} -->.*?<!-- END {re.escape(marker)} -->\n?", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _m: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
