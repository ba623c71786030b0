"""Device selection: auto/cpu/cuda/mps specs, clear errors for absent or unknown devices."""

import argparse

import pytest
import torch

from ultrasound_ai.core import device as device_mod
from ultrasound_ai.core.device import add_device_argument, available_devices, describe_device, resolve_device
from ultrasound_ai.core.errors import InputError, exit_code_for

HAS_CUDA = torch.cuda.is_available()


def test_auto_picks_cuda_else_cpu():
    expected = "cuda" if HAS_CUDA else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device(None).type == expected
    assert resolve_device().type == expected


def test_cpu_and_torch_device_inputs():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert available_devices()[0] == "cpu"


def test_cuda_without_cuda_is_a_clear_error():
    if HAS_CUDA:
        assert resolve_device("cuda").type == "cuda"
        assert resolve_device("cuda:0") == torch.device("cuda", 0)
    else:
        with pytest.raises(InputError, match=r"device 'cuda'.*not available.*available devices: cpu") as info:
            resolve_device("cuda")
        assert exit_code_for(info.value) == 2
        with pytest.raises(InputError, match="cuda:0"):
            resolve_device(torch.device("cuda", 0))


def test_cuda_index_out_of_range_names_count():
    n = torch.cuda.device_count() if HAS_CUDA else 0
    with pytest.raises(InputError, match=r"cuda:7") as info:
        resolve_device(f"cuda:{n + 7}" if n else "cuda:7")
    assert "available devices: cpu" in str(info.value)


def test_fake_one_gpu_machine(monkeypatch):
    # Simulate a machine with one CUDA device to check the index logic without a GPU.
    monkeypatch.setattr(device_mod, "_cuda_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert available_devices()[:2] == ["cpu", "cuda:0"]
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(InputError, match=r"'cuda:7'.*only 1 CUDA device.*cpu, cuda:0"):
        resolve_device("cuda:7")


def test_mps_only_when_asked_and_present(monkeypatch):
    monkeypatch.setattr(device_mod, "_mps_available", lambda: False)
    with pytest.raises(InputError, match=r"'mps'.*Apple"):
        resolve_device("mps")
    monkeypatch.setattr(device_mod, "_mps_available", lambda: True)
    monkeypatch.setattr(device_mod, "_cuda_count", lambda: 0)
    assert resolve_device("mps") == torch.device("mps")
    assert "mps" in available_devices()
    assert resolve_device("auto") == torch.device("cpu")  # never MPS by default


@pytest.mark.parametrize("spec", ["gpu0", "cuda:x", "cuda:", "cuda:-1", "tpu", "", "cuda0", "cpu:0:1"])
def test_unknown_specs(spec):
    with pytest.raises(InputError, match="unknown device") as info:
        resolve_device(spec)
    assert repr(spec) in str(info.value) and "available devices" in str(info.value)


def test_non_string_spec():
    with pytest.raises(InputError, match="expected a string"):
        resolve_device(3)


def test_add_device_argument():
    parser = argparse.ArgumentParser()
    add_device_argument(parser)
    assert parser.parse_args([]).device == "auto"
    assert parser.parse_args(["--device", "cuda:1"]).device == "cuda:1"
    assert "--device" in parser.format_help()


def test_describe_device():
    assert describe_device("cpu").startswith("cpu (")
