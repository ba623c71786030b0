import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("bench_report", Path(__file__).parents[2] / "bench" / "report.py")
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)


def test_sections_replace_only_themselves(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    report.write_section("comp", "Compounding", "cpu figure 1", device="cpu", command="x", path=md)
    report.write_section("comp", "Compounding", "gpu figure", device="cuda", command="x", path=md)
    report.write_section("metrics", "Metrics", "table", command="y", path=md)
    report.write_section("comp", "Compounding", "cpu figure 2", device="cpu", command="x", path=md)
    text = md.read_text()
    assert "cpu figure 2" in text and "cpu figure 1" not in text
    assert "gpu figure" in text and "table" in text
    assert text.count("<!-- BEGIN comp:cpu -->") == 1
    assert text.index("comp:cpu") < text.index("comp:gpu") < text.index("metrics:cpu")


def test_vector_isa_names_the_widest_vector_units_from_cpu_flags():
    # CPU speeds of the int8 and fp32 networks differ ~2x between these, so a section names them.
    assert report.vector_isa("fpu sse2 avx avx2 fma") == "AVX2"
    assert report.vector_isa("avx2 avx512f avx512bw avx512vl") == "AVX-512"
    assert report.vector_isa("avx2 avx512f avx512_vnni avx512_bf16") == "AVX-512 with VNNI and BF16"
    assert report.vector_isa("avx2 avx_vnni") == "AVX2 with VNNI"
    assert report.vector_isa("asimd fp") is None


def test_markdown_table():
    assert report.markdown_table(["a", "b"], [[1, 2]]).splitlines() == ["| a | b |", "|---|---|", "| 1 | 2 |"]


# --- quiet-machine check, load record, repeats (fake load values: nothing here depends on the machine) ---


class FakeProbe(report.LoadProbe):
    """Replays other-process loads (cores busy) one sample at a time; counters advance 3 s per sample."""

    def __init__(self, others, cpu_count=2, loadavg=(1.5, 1.0, 0.5)):
        self.others = list(others)
        self.cpu_count = cpu_count
        self._loadavg = loadavg
        self.samples = 0
        self._c = report.CpuCounters(0.0, 0.0, 0.0)

    def counters(self):
        return self._c

    def loadavg(self):
        return self._loadavg

    def sample(self):
        o = self.others[min(self.samples, len(self.others) - 1)]
        self.samples += 1
        self._c = report.CpuCounters(self._c.wall + 3.0, self._c.machine_busy + 3.0 * o, self._c.own)
        return report.LoadSample(self._loadavg, o, self.cpu_count, self._c)


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.t += s


def test_quiet_check_waits_until_enough_cores_are_free():
    clock = FakeClock()
    probe = FakeProbe([1.6, 1.1, 0.2])  # 2 cores: 0.4, 0.9, then 1.8 free
    check = report.require_quiet(2, timeout_s=100, poll_s=10, probe=probe, clock=clock, sleep=clock.sleep,
                                 log=lambda m: None)
    assert probe.samples == 3 and check.waited_s == 20 and not check.busy_override
    assert check.before.others_busy == 0.2
    # One core needed: 0.4 free (+ 0.3 slack) is not enough, 1.2 free is.
    probe1 = FakeProbe([1.6, 0.8])
    assert report.require_quiet(1, timeout_s=100, poll_s=5, probe=probe1, clock=clock, sleep=clock.sleep,
                                log=lambda m: None).before.others_busy == 0.8


def test_quiet_check_refuses_a_busy_machine_after_the_timeout_with_the_reason():
    clock = FakeClock()
    probe = FakeProbe([1.5])
    with pytest.raises(report.BusyMachine) as err:
        report.require_quiet(2, timeout_s=60, poll_s=15, probe=probe, clock=clock, sleep=clock.sleep,
                             log=lambda m: None)
    msg = str(err.value)
    assert "1.50 of 2 cores" in msg and "needs 2 free cores" in msg and "--allow-busy" in msg
    assert clock.t == 60 and probe.samples == 5
    with pytest.raises(report.BusyMachine, match="machine has 2"):
        report.require_quiet(4, timeout_s=60, probe=FakeProbe([0.0]), clock=clock, sleep=clock.sleep)


def test_allow_busy_measures_at_once_and_the_section_says_so(tmp_path):
    probe = FakeProbe([1.9, 1.0])
    check = report.begin_section(2, allow_busy=True, probe=probe, log=lambda m: None)
    assert check.busy_override and probe.samples == 1
    probe._c = report.CpuCounters(13.0, 5.7 + 10.0 * 1.0, 0.0)  # 10 s later, others busy on 1 core
    md = tmp_path / "B.md"
    report.write_section("s", "S", "table", command="x", path=md)
    text = md.read_text()
    assert "busy on 1.90 of 2 cores" in text and "kept 1.00 cores busy on average" in text
    assert "Taken on a busy machine" in text and "uses 2 cores" in text
    # The record belongs to one section: the next one without begin_section only reports the load.
    report.write_section("t", "T", "table", command="x", path=md)
    assert "no quiet check was made" in md.read_text().split("<!-- BEGIN t:cpu -->")[1]


def test_parse_bench_args_exits_with_status_3_and_threads_set_the_cores(capsys):
    import argparse

    ap = argparse.ArgumentParser(prog="bench_x")
    ap.add_argument("--threads", type=int, default=1)
    with pytest.raises(SystemExit) as err:
        report.parse_bench_args(ap, ["--threads", "2", "--quiet-timeout", "0"], probe=FakeProbe([1.2]))
    assert err.value.code == report.BUSY_EXIT_STATUS
    assert "needs 2 free cores" in capsys.readouterr().err
    ap = argparse.ArgumentParser(prog="bench_x")
    ap.add_argument("--threads", type=int, default=1)
    args = report.parse_bench_args(ap, ["--quiet-timeout", "0"], probe=FakeProbe([1.2]))  # 1 thread: 0.8 free
    assert args.threads == 1 and not args.allow_busy
    report.end_section()


def test_others_busy_subtracts_this_process():
    a = report.CpuCounters(wall=10.0, machine_busy=100.0, own=5.0)
    b = report.CpuCounters(wall=12.0, machine_busy=103.0, own=6.0)  # 3 CPU-s in 2 s, 1 of them ours
    assert report.others_busy_between(a, b) == pytest.approx(1.0)
    assert report.others_busy_between(b, a) == 0.0


def test_repeat_reports_best_and_median_and_ratio():
    ticks = iter([0.0, 3.0, 10.0, 11.0, 20.0, 22.0])  # runs of 3, 1 and 2 s
    calls = []
    t = report.repeat(lambda: calls.append(1), repeats=3, warmup=1, timer=lambda: next(ticks))
    assert len(calls) == 4 and t.seconds == [3.0, 1.0, 2.0] and t.best == 1.0 and t.median == 2.0
    base = report.Timing([4.0, 5.0])
    assert report.ratio(t, base) == 4.0
    assert report.timing_cells(t, base, count=100, fmt=".0f") == ["100", "50", "4.00×"]
    assert report.timing_cells(t) == ["1,000.0", "2,000.0"]
