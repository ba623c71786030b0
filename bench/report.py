"""The benchmarks' shared harness: quiet-machine check, load record, repeats, and BENCHMARKS.md sections.

Each benchmark owns sections keyed by a name (and the device kind), so a CPU-only re-run never erases a
GPU figure. A section records the machine, the command, the date and the load: the load average and the
cores other processes kept busy, before the measurement and after it.

A benchmark script takes part with one line, ``args = report.parse_bench_args(ap, argv)`` in place of
``ap.parse_args(argv)``: it adds ``--allow-busy`` and ``--quiet-timeout``, then waits until other
processes leave the cores the benchmark uses free (``--threads``, else every core), or refuses with exit
status 3 after the timeout. `write_section` then adds the load record to the section. Timings use
`repeat` (best and median of several runs) and `ratio` against a baseline measured in the same run.
"""

# No "from __future__ import annotations": scripts load this file by path, outside sys.modules, where
# dataclasses cannot resolve string annotations.
import datetime as _dt
import os
import platform
import re
import statistics
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

# ULTRASOUND_AI_BENCHMARKS_FILE sends every section elsewhere (gpu_check.sh's dry run writes a scratch file).
BENCHMARKS = Path(os.environ.get("ULTRASOUND_AI_BENCHMARKS_FILE")
                  or Path(__file__).resolve().parent.parent / "BENCHMARKS.md")
HEADER = (
    "# UltrasoundAI benchmarks\n\n"
    "Each section is written by a script in `bench/` (`make bench` runs them all); the command, the "
    "machine and the date are recorded in it. Data sets are frozen: simulator versions and seeds are "
    "given per section.\n"
)


def vector_isa(flags: str) -> str | None:
    """The widest x86 vector units in a /proc/cpuinfo flags line ("AVX-512 with VNNI and BF16", "AVX2", ...).

    Why: "AMD EPYC, 2 cores" has meant both AVX2 and AVX-512 machines here, and CPU network speeds (int8
    with VNNI above all) differ ~2x between them, so a speed figure names the units it ran on."""
    f = set(flags.split())
    extras = [name for name, keys in (("VNNI", ("avx512_vnni", "avx_vnni")), ("BF16", ("avx512_bf16",)))
              if f.intersection(keys)]
    base = "AVX-512" if "avx512f" in f else "AVX2" if "avx2" in f else None
    if base is None:
        return None
    return f"{base} with {' and '.join(extras)}" if extras else base


def machine_description(device: str = "cpu") -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            lines = fh.readlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        flags = [line.split(":", 1)[1] for line in lines if line.startswith("flags")]
        if names:
            cpu = names[0]
        isa = vector_isa(flags[0]) if flags else None
        if isa:
            cpu = f"{cpu} ({isa})"
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
        f"{load_record()}\n\n"
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


# ------------------------------------------------------------------------------------------------
# load record and quiet-machine check
# ------------------------------------------------------------------------------------------------

# A core counts as free while other processes keep less than this fraction of it busy (system daemons,
# the shells of the people sharing the machine).
FREE_CORE_SLACK = 0.3
BUSY_EXIT_STATUS = 3
ENV_ALLOW_BUSY = "ULTRASOUND_AI_BENCH_ALLOW_BUSY"
ENV_QUIET_TIMEOUT = "ULTRASOUND_AI_BENCH_QUIET_TIMEOUT"
DEFAULT_QUIET_TIMEOUT_S = 600.0


class BusyMachine(RuntimeError):
    """Other processes keep busy cores the benchmark needs (raised after the wait times out)."""


@dataclass(frozen=True)
class CpuCounters:
    """Cumulative CPU seconds: busy over all cores (/proc/stat) and this process with its children."""

    wall: float
    machine_busy: float
    own: float


@dataclass(frozen=True)
class LoadSample:
    """The load at one moment: load averages (1, 5, 15 min) and the cores other processes kept busy."""

    loadavg: tuple
    others_busy: float  # cores busy with other processes over the sampling window
    cpu_count: int
    counters: Optional[CpuCounters] = None

    @property
    def free_cores(self) -> float:
        return self.cpu_count - self.others_busy

    def describe(self) -> str:
        la = "/".join(f"{v:.2f}" for v in self.loadavg)
        return f"load average {la}, other processes busy on {self.others_busy:.2f} of {self.cpu_count} cores"


def _read_cpu_counters() -> CpuCounters:
    """Machine-wide busy CPU seconds from /proc/stat and this process's own (children included)."""
    hz = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is already inside user)
    busy = sum(fields[:8]) - fields[3] - (fields[4] if len(fields) > 4 else 0)
    t = os.times()
    return CpuCounters(time.monotonic(), busy / hz, t.user + t.system + t.children_user + t.children_system)


def others_busy_between(a: CpuCounters, b: CpuCounters) -> float:
    """Average cores other processes kept busy between two counter readings (never below 0)."""
    wall = b.wall - a.wall
    if wall <= 0:
        return 0.0
    return max(0.0, ((b.machine_busy - a.machine_busy) - (b.own - a.own)) / wall)


class LoadProbe:
    """Samples the load: the load average, and over `window_s` the CPU time others used.

    The gate uses the cores other processes keep busy rather than the load average, which lags by a
    minute and counts this benchmark's own earlier sections.
    """

    def __init__(self, window_s: Optional[float] = None, cpu_count: Optional[int] = None,
                 read_counters: Callable[[], CpuCounters] = _read_cpu_counters,
                 read_loadavg: Callable[[], tuple] = os.getloadavg, sleep: Callable[[float], None] = time.sleep):
        # ULTRASOUND_AI_BENCH_PROBE_S shortens the sampling (gpu_check.sh's dry run).
        self.window_s = float(os.environ.get("ULTRASOUND_AI_BENCH_PROBE_S", 3.0)) if window_s is None else window_s
        self.cpu_count = cpu_count or os.cpu_count() or 1
        self._read_counters, self._read_loadavg, self._sleep = read_counters, read_loadavg, sleep

    def counters(self) -> Optional[CpuCounters]:
        try:
            return self._read_counters()
        except (OSError, ValueError, IndexError):  # no /proc/stat (not Linux): load average only
            return None

    def loadavg(self) -> tuple:
        try:
            return tuple(float(v) for v in self._read_loadavg())
        except OSError:
            return (float("nan"),) * 3

    def sample(self) -> LoadSample:
        a = self.counters()
        self._sleep(self.window_s)
        b = self.counters()
        others = others_busy_between(a, b) if a and b else max(0.0, self.loadavg()[0])
        return LoadSample(self.loadavg(), others, self.cpu_count, b)


@dataclass
class QuietCheck:
    """The outcome of `require_quiet`: the load at the start and how the start was reached."""

    cores: int
    before: LoadSample
    waited_s: float = 0.0
    busy_override: bool = False
    timing: bool = True


def require_quiet(cores: int, *, timeout_s: float = DEFAULT_QUIET_TIMEOUT_S, poll_s: float = 15.0,
                  allow_busy: bool = False, probe: Optional[LoadProbe] = None,
                  clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                  log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> QuietCheck:
    """Wait (up to `timeout_s`) until other processes leave `cores` cores free; BusyMachine if they never do.

    `allow_busy` measures at once whatever the load (the section then says so).
    """
    probe = probe or LoadProbe()
    cores = max(1, int(cores))
    start = None
    while True:
        s = probe.sample()
        start = clock() if start is None else start  # the wait starts after the first sample
        waited = clock() - start
        if cores <= s.cpu_count and s.free_cores + FREE_CORE_SLACK >= cores:
            return QuietCheck(cores, s, waited)
        if allow_busy:
            log(f"benchmark: measuring on a busy machine (--allow-busy): {s.describe()}, {cores} needed free")
            return QuietCheck(cores, s, waited, busy_override=True)
        if cores > s.cpu_count:
            raise BusyMachine(f"this benchmark uses {cores} cores but the machine has {s.cpu_count}; pass "
                              "fewer --threads, or --allow-busy to measure anyway")
        if waited >= timeout_s:
            raise BusyMachine(
                f"the machine is busy: {s.describe()}, and this benchmark needs {cores} free "
                f"core{'s' if cores > 1 else ''}; waited {waited:.0f} s for them. Timings taken now would "
                "measure the other jobs. Re-run when the machine is quiet, wait longer with --quiet-timeout "
                "SECONDS, or pass --allow-busy to measure anyway (the section then says it was busy).")
        log(f"benchmark: waiting for {cores} free cores ({s.describe()}; waited {waited:.0f} of "
            f"{timeout_s:.0f} s)")
        sleep(poll_s)


def _session():
    """State shared by every copy of this module in the process (scripts load it by file path, often twice)."""
    return sys.modules.setdefault("_ultrasound_ai_bench_session", types.ModuleType("_ultrasound_ai_bench_session"))


def begin_section(cores: int, *, timing: bool = True, allow_busy: bool = False,
                  timeout_s: float = DEFAULT_QUIET_TIMEOUT_S, probe: Optional[LoadProbe] = None,
                  **kwargs) -> QuietCheck:
    """Start a measured section: the quiet check for a timing benchmark (a load record only otherwise).

    The next `write_section` reports the load at this start and at its own time.
    """
    probe = probe or LoadProbe()
    if timing:
        check = require_quiet(cores, timeout_s=timeout_s, allow_busy=allow_busy, probe=probe, **kwargs)
    else:
        check = QuietCheck(cores, probe.sample(), timing=False)
    _session().check, _session().probe = check, probe
    return check


def end_section() -> Optional[str]:
    """The load record of the current section (None when `begin_section` was not called); clears it."""
    session = _session()
    check = getattr(session, "check", None)
    if check is None:
        return None
    probe = session.probe
    after_counters = probe.counters()
    before = check.before
    during = (f"{others_busy_between(before.counters, after_counters):.2f}"
              if before.counters and after_counters else "unknown")
    after_la = "/".join(f"{v:.2f}" for v in probe.loadavg())
    session.check = None
    text = (f"Load: at the start {before.describe()}; during the run other processes kept {during} cores busy "
            f"on average; load average at the end {after_la} (this benchmark included).")
    if check.timing:
        text += f" The benchmark uses {check.cores} core{'s' if check.cores > 1 else ''}"
        text += f", waited {check.waited_s:.0f} s for them." if check.waited_s >= 1 else "."
    if check.busy_override:
        text += (" **Taken on a busy machine (--allow-busy): other processes held cores it needed; timings "
                 "understate the speed.**")
    return text


def load_record() -> str:
    """The section's load line: the record since `begin_section`, else the load at writing time."""
    record = end_section()
    if record is not None:
        return record
    la = "/".join(f"{v:.2f}" for v in LoadProbe().loadavg())
    return f"Load: load average {la} when the section was written (no quiet check was made)."


def _cores_from_args(args) -> int:
    threads = getattr(args, "threads", None)
    if isinstance(threads, str):  # "2,1": the largest setting
        threads = max(int(v) for v in threads.split(",") if v.strip())
    return min(int(threads), os.cpu_count() or 1) if threads else (os.cpu_count() or 1)


def parse_bench_args(parser, argv=None, *, cores=None, timing: bool = True, probe: Optional[LoadProbe] = None):
    """`parser.parse_args(argv)` plus --allow-busy / --quiet-timeout, then `begin_section`.

    cores: cores the benchmark uses, an int or a function of the parsed args (default: its --threads,
    else every core). timing=False (accuracy benchmarks) records the load without waiting. Exits with
    status 3 and the reason on a busy machine.
    """
    parser.add_argument("--allow-busy", action="store_true", default=os.environ.get(ENV_ALLOW_BUSY) == "1",
                        help="measure even when other processes hold the cores this benchmark needs")
    parser.add_argument("--quiet-timeout", type=float, metavar="SECONDS",
                        default=float(os.environ.get(ENV_QUIET_TIMEOUT, DEFAULT_QUIET_TIMEOUT_S)),
                        help="how long to wait for free cores before refusing (default %(default)s s)")
    args = parser.parse_args(argv)
    try:
        n = cores(args) if callable(cores) else cores
        begin_section(n if n is not None else _cores_from_args(args), timing=timing,
                      allow_busy=args.allow_busy, timeout_s=args.quiet_timeout, probe=probe)
    except BusyMachine as exc:
        parser.exit(BUSY_EXIT_STATUS, f"{parser.prog}: {exc}\n")
    return args


# ------------------------------------------------------------------------------------------------
# repeats and ratios
# ------------------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Seconds of repeated runs of one case."""

    seconds: list = field(default_factory=list)

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def rate(self, count: float) -> tuple:
        """(best, median) of count / seconds, e.g. frames per second."""
        return count / self.best, count / self.median


def repeat(fn: Callable[[], object], repeats: int = 5, warmup: int = 1,
           timer: Callable[[], float] = time.perf_counter,
           sync: Optional[Callable[[], None]] = None) -> Timing:
    """Run fn `warmup` times untimed, then `repeats` times timed (sync, e.g. torch.cuda.synchronize,
    runs before each clock reading)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    out = Timing()
    for _ in range(repeats):
        if sync:
            sync()
        t = timer()
        fn()
        if sync:
            sync()
        out.seconds.append(timer() - t)
    return out


def ratio(timing: Timing, baseline: Timing) -> float:
    """How many times faster than the baseline (best against best): baseline.best / timing.best."""
    return baseline.best / timing.best


def timing_cells(timing: Timing, baseline: Optional[Timing] = None, *, count: Optional[float] = None,
                 unit: str = "ms", fmt: str = ",.1f") -> list:
    """Table cells: best, median (as ms or as count/s), and the speed-up against `baseline` (best/best)."""
    if count is None:
        scale = {"ms": 1e3, "s": 1.0}[unit]
        cells = [f"{timing.best * scale:{fmt}}", f"{timing.median * scale:{fmt}}"]
    else:
        best, median = timing.rate(count)
        cells = [f"{best:{fmt}}", f"{median:{fmt}}"]
    if baseline is not None:
        cells.append(f"{ratio(timing, baseline):.2f}×")
    return cells


def median_of(values: Sequence[float]) -> float:
    return statistics.median(values)
