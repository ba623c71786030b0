"""Checkpoints and model cards (save/load, sha256, corrupt files, strict loading) and the model registry."""

import json
import os
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from ultrasound_ai.core.atomic import is_partial
from ultrasound_ai.core.errors import ChecksumError, InputError
from ultrasound_ai.models import registry
from ultrasound_ai.models.checkpoint import (
    CARD_VERSION,
    REQUIRED_CARD_KEYS,
    card_path_for,
    check_input_spacing,
    load_checkpoint,
    load_into,
    read_card,
    save_checkpoint,
    sha256_file,
)
from ultrasound_ai.models.registry import default_model, find_model, list_models, model_dirs


class Tiny(nn.Module):
    def __init__(self, hidden=5):
        super().__init__()
        self.conv = nn.Conv1d(2, hidden, 3)
        self.norm = nn.BatchNorm1d(hidden)
        self.head = nn.Linear(hidden, 1)


def make_card(name="tiny", method="toy", **extra):
    card = {
        "name": name,
        "method": method,
        "configuration": {"hidden": 5},
        "input": {"pixel_spacing_mm": [0.3, 0.7], "frame_size": [64, 48]},
        "training": {"simulator_version": 1, "seeds": [0, 1]},
        "metrics": {"mse": 0.25},
    }
    card.update(extra)
    return card


def trained_model(seed=0):
    torch.manual_seed(seed)
    model = Tiny()
    model.norm.running_mean.uniform_(-1, 1)  # buffers must round-trip too
    model.norm.num_batches_tracked.fill_(17)
    return model


def test_card_path_for():
    assert card_path_for("/a/b/fima_small.pt") == Path("/a/b/fima_small.card.json")
    with pytest.raises(InputError, match=r"\.pt"):
        card_path_for("/a/model.pth")


def test_fp32_round_trip_and_card_contents(tmp_path):
    model = trained_model()
    pt = tmp_path / "tiny.pt"
    card = save_checkpoint(model.state_dict(), pt, make_card())
    on_disk = json.loads(card_path_for(pt).read_text())
    assert on_disk == card
    assert card["sha256"] == sha256_file(pt) and len(card["sha256"]) == 64
    assert card["size_bytes"] == pt.stat().st_size
    assert card["storage_dtype"] == "float32" and card["card_version"] == CARD_VERSION
    assert card["file"] == "tiny.pt" and card["metrics"] == {"mse": 0.25}
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00$", card["created"])
    assert card["n_parameters"] == sum(v.numel() for v in model.state_dict().values() if v.is_floating_point())
    assert not [p for p in os.listdir(tmp_path) if is_partial(p)]

    state, card2 = load_checkpoint(pt)
    assert card2 == card
    assert set(state) == set(model.state_dict())
    for key, value in model.state_dict().items():
        assert state[key].dtype == value.dtype
        assert torch.equal(state[key], value)

    fresh = Tiny()
    assert load_into(fresh, pt)["name"] == "tiny"
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)
    assert int(fresh.norm.num_batches_tracked) == 17


def test_fp16_storage(tmp_path):
    model = trained_model(1)
    pt32, pt16 = tmp_path / "m32.pt", tmp_path / "m16.pt"
    save_checkpoint(model.state_dict(), pt32, make_card("m32"))
    card = save_checkpoint(model.state_dict(), pt16, make_card("m16"), fp16=True)
    assert card["storage_dtype"] == "float16"
    assert pt16.stat().st_size < pt32.stat().st_size
    stored, _ = load_checkpoint(pt16, dtype=None)
    assert stored["head.weight"].dtype == torch.float16
    assert stored["norm.num_batches_tracked"].dtype == torch.int64  # integers are never cast
    state, _ = load_checkpoint(pt16)
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            assert state[key].dtype == torch.float32
            torch.testing.assert_close(state[key], value, rtol=1e-3, atol=1e-4)
            assert torch.equal(state[key], value.half().float())  # exactly the fp16 rounding
        else:
            assert torch.equal(state[key], value)
    state64, _ = load_checkpoint(pt16, dtype=torch.float64)
    assert state64["head.weight"].dtype == torch.float64


def test_flipped_byte_is_a_checksum_error(tmp_path):
    pt = tmp_path / "tiny.pt"
    save_checkpoint(trained_model().state_dict(), pt, make_card())
    data = bytearray(pt.read_bytes())
    data[len(data) // 2] ^= 0x01
    pt.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"tiny\.pt.*sha256.*does not match"):
        load_checkpoint(pt)
    with pytest.raises(ChecksumError):
        load_into(Tiny(), pt)


def test_truncated_file(tmp_path):
    pt = tmp_path / "tiny.pt"
    save_checkpoint(trained_model().state_dict(), pt, make_card())
    data = pt.read_bytes()
    pt.write_bytes(data[: len(data) // 2])
    with pytest.raises(ChecksumError, match=r"tiny\.pt.*bytes but its card says.*truncated"):
        load_checkpoint(pt)
    # Without verification the loader itself must still fail clearly, not with a zip traceback.
    with pytest.raises(InputError, match=r"tiny\.pt: cannot be loaded.*truncated or corrupt"):
        load_checkpoint(pt, verify=False)


def test_card_for_another_file(tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    save_checkpoint(trained_model(0).state_dict(), a, make_card("a"))
    save_checkpoint(trained_model(1).state_dict(), b, make_card("b"))
    card_path_for(b).write_text(card_path_for(a).read_text())
    with pytest.raises(ChecksumError, match=r"b\.pt.*card belongs to another file \(a\.pt\)"):
        load_checkpoint(b)


def test_missing_files_and_bad_cards(tmp_path):
    with pytest.raises(InputError, match=r"nothing\.pt: not found"):
        load_checkpoint(tmp_path / "nothing.pt")
    pt = tmp_path / "tiny.pt"
    save_checkpoint(trained_model().state_dict(), pt, make_card())
    card_file = card_path_for(pt)
    good = card_file.read_text()
    card_file.unlink()
    with pytest.raises(InputError, match=r"model card tiny\.card\.json not found"):
        load_checkpoint(pt)
    card_file.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_checkpoint(pt)
    broken = json.loads(good)
    del broken["metrics"], broken["input"]
    card_file.write_text(json.dumps(broken))
    with pytest.raises(InputError, match="missing required key.*input, metrics"):
        read_card(pt)
    newer = json.loads(good)
    newer["card_version"] = CARD_VERSION + 1
    card_file.write_text(json.dumps(newer))
    with pytest.raises(InputError, match="newer than this engine"):
        load_checkpoint(pt)


def test_save_validates_before_writing(tmp_path):
    pt = tmp_path / "bad.pt"
    for key in REQUIRED_CARD_KEYS:
        card = make_card()
        del card[key]
        with pytest.raises(InputError, match=f"missing required key.*{key}"):
            save_checkpoint(trained_model().state_dict(), pt, card)
    with pytest.raises(InputError, match="'name' must be a non-empty string"):
        save_checkpoint(trained_model().state_dict(), pt, make_card(name=""))
    with pytest.raises(InputError, match="not JSON-serialisable"):
        save_checkpoint(trained_model().state_dict(), pt, make_card(metrics={"x": object()}))
    with pytest.raises(InputError, match="expected a tensor"):
        save_checkpoint({"w": [1.0, 2.0]}, pt, make_card())
    with pytest.raises(InputError, match=r"\.pt"):
        save_checkpoint(trained_model().state_dict(), tmp_path / "bad.pth", make_card())
    assert os.listdir(tmp_path) == []


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    def broken_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(trained_model().state_dict(), tmp_path / "tiny.pt", make_card())
    assert os.listdir(tmp_path) == []


def test_non_tensor_pickle_is_refused(tmp_path):
    # A .pt holding arbitrary objects must not load (weights_only) even if its checksum is right.
    import argparse

    pt = tmp_path / "evil.pt"
    save_checkpoint({"w": torch.ones(2)}, pt, make_card("evil"))
    torch.save({"w": argparse.Namespace(code="anything")}, pt)
    card = json.loads(card_path_for(pt).read_text())
    card.update(sha256=sha256_file(pt), size_bytes=pt.stat().st_size)
    card_path_for(pt).write_text(json.dumps(card))
    with pytest.raises(InputError, match="cannot be loaded as a weights-only state dict"):
        load_checkpoint(pt)


def test_load_into_wrong_architecture_lists_keys(tmp_path):
    pt = tmp_path / "tiny.pt"
    save_checkpoint(trained_model().state_dict(), pt, make_card())
    with pytest.raises(InputError) as info:
        load_into(Tiny(hidden=7), pt)
    message = str(info.value)
    assert "tiny.pt" in message and "shape mismatches" in message
    assert "head.weight: checkpoint (1, 5) vs model (1, 7)" in message
    assert '"hidden": 5' in message  # the card's configuration, to tell the user what to build

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(2, 5, 3)
            self.body = nn.Linear(5, 1)

    with pytest.raises(InputError) as info:
        load_into(Other(), pt)
    message = str(info.value)
    assert "missing keys (2): body.weight, body.bias" in message
    assert "unexpected keys" in message and "head.weight" in message and "norm.running_mean" in message


def test_load_into_follows_model_dtype(tmp_path):
    pt = tmp_path / "tiny.pt"
    save_checkpoint(trained_model().state_dict(), pt, make_card(), fp16=True)
    model = Tiny().double()
    load_into(model, pt)
    assert model.head.weight.dtype == torch.float64
    torch.testing.assert_close(model.head.weight.float(), trained_model().head.weight, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
def test_load_into_cuda_model(tmp_path):
    pt = tmp_path / "tiny.pt"
    save_checkpoint(trained_model().state_dict(), pt, make_card())
    model = Tiny().cuda()
    load_into(model, pt)
    assert model.head.weight.is_cuda
    assert torch.equal(model.head.weight.cpu(), trained_model().head.weight)


def test_check_input_spacing():
    card = make_card()
    assert check_input_spacing(card, [0.301, 0.7], "sweep frames") == [0.3, 0.7]
    with pytest.raises(InputError, match=r"sweep frames: spacing \[0\.7, 0\.3\] mm does not match.*'tiny'"):
        check_input_spacing(card, [0.7, 0.3], "sweep frames")
    with pytest.raises(InputError, match="expects 2"):
        check_input_spacing(card, [0.3, 0.7, 1.0], "sweep frames")
    with pytest.raises(InputError, match="input.lambda_mm is not recorded"):
        check_input_spacing(card, [0.1], "IQ", key="lambda_mm")


# -- registry ----------------------------------------------------------------------------------------
@pytest.fixture
def model_folders(tmp_path, monkeypatch):
    first, second = tmp_path / "user", tmp_path / "site"
    first.mkdir()
    second.mkdir()
    state = trained_model().state_dict()
    save_checkpoint(state, first / "fima_user.pt", make_card("fima_user", "fima"))
    save_checkpoint(state, second / "fima_small.pt", make_card("fima_small", "fima", default=True))
    save_checkpoint(state, second / "fima_user.pt", make_card("fima_user", "fima"))  # shadowed by `first`
    save_checkpoint(state, second / "ulm_net.pt", make_card("ulm_resnet", "ULM"))
    (second / "orphan.card.json").write_text(json.dumps(make_card("orphan")))  # no .pt: not a model
    monkeypatch.setenv(registry.ENV_VAR, os.pathsep.join([str(first), str(tmp_path / "absent"), str(second)]))
    return first, second


def test_model_dirs_order(model_folders):
    first, second = model_folders
    dirs = model_dirs()
    assert dirs[:2] == [first, second]
    if registry.SHIPPED_MODELS_DIR.is_dir():
        assert dirs[2:] == [registry.SHIPPED_MODELS_DIR]
    else:
        assert len(dirs) == 2
    assert registry.SHIPPED_MODELS_DIR == Path(registry.ultrasound_ai.__file__).resolve().parent.parent / "Resources" / "Models"
    assert any(d.name == "absent" for d in model_dirs(existing_only=False))


def test_list_and_find_models(model_folders):
    first, second = model_folders
    ours = [e for e in list_models() if e.pt_path.parent in (first, second)]
    assert [(e.name, e.method, e.pt_path) for e in ours] == [
        ("fima_user", "fima", first / "fima_user.pt"),
        ("fima_small", "fima", second / "fima_small.pt"),
        ("ulm_resnet", "ULM", second / "ulm_net.pt"),
    ]
    assert [e.name for e in list_models("ulm") if e.pt_path.parent == second] == ["ulm_resnet"]
    assert find_model("fima_user") == first / "fima_user.pt"
    assert find_model("ulm_resnet") == second / "ulm_net.pt"
    assert find_model("ulm_net") == second / "ulm_net.pt"  # the file stem works too
    explicit = second / "fima_user.pt"
    assert find_model(explicit) == explicit and find_model(str(explicit)) == explicit
    entry = default_model("fima")
    assert entry.name == "fima_small" and entry.is_default
    assert os.fspath(entry) == str(second / "fima_small.pt")
    state, card = load_checkpoint(entry)  # an entry goes wherever a path goes
    assert card["name"] == "fima_small" and "head.weight" in state
    assert default_model("ulm").name == "ulm_resnet"


def test_find_model_errors_list_names(model_folders):
    with pytest.raises(InputError, match=r"model 'fima_large': unknown; known models: .*fima_user, fima_small, "
                                         r"ulm_resnet.*ULTRASOUND_AI_MODELS"):
        find_model("fima_large")
    with pytest.raises(InputError, match=r"model file .*missing\.pt: not found"):
        find_model(str(model_folders[0] / "missing.pt"))
    with pytest.raises(InputError, match=r"method 'moglonet': no model installed.*fima"):
        default_model("moglonet")


def test_unreadable_card_is_skipped_with_warning(model_folders):
    first, _ = model_folders
    (first / "broken.pt").write_bytes(b"x")
    (first / "broken.card.json").write_text("{")
    with pytest.warns(UserWarning, match="broken.card.json"):
        names = [e.name for e in list_models()]
    assert "broken" not in names and "fima_user" in names
