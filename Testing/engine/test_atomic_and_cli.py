import subprocess
import sys

import pytest

from ultrasound_ai.cli import main
from ultrasound_ai.core.atomic import atomic_output, is_partial
from ultrasound_ai.core.errors import EXIT_BAD_INPUT, EXIT_CANCELLED, EXIT_FAILURE, Cancelled, InputError, exit_code_for


def test_atomic_output_renames_on_success(tmp_path):
    target = tmp_path / "out" / "volume.nrrd"
    with atomic_output(target) as tmp:
        assert tmp.suffix == ".nrrd" and is_partial(tmp)
        tmp.write_bytes(b"data")
        assert not target.exists()
    assert target.read_bytes() == b"data"
    assert [p.name for p in target.parent.iterdir()] == ["volume.nrrd"]


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "result.h5"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old"  # the previous result is not lost
    assert [p.name for p in tmp_path.iterdir()] == ["result.h5"]


def test_exit_codes():
    assert exit_code_for(InputError("x")) == EXIT_BAD_INPUT
    assert exit_code_for(FileNotFoundError("x")) == EXIT_BAD_INPUT
    assert exit_code_for(Cancelled()) == EXIT_CANCELLED
    assert exit_code_for(RuntimeError()) == EXIT_FAILURE


def test_cli_help_runs_as_console_script():
    out = subprocess.run([sys.executable, "-m", "ultrasound_ai.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "ultrasound-ai" in out.stdout


def test_cli_without_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage" in capsys.readouterr().out
