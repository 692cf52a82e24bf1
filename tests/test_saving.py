"""Atomic file writes, weight files by suffix, the sshs_* hashes, file names and rotation."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from library import saving
from library.saving import (SaveError, atomic_write, checkpoint_hashes, epoch_file_name, epoch_pattern, epoch_state_name,
                            last_state_name, model_hashes, rotate, save_lora_file, save_tensors, step_file_name, step_pattern,
                            step_state_name, steps_keep_count)


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "lora_unet_a.lora_down.weight": torch.randn(4, 8, generator=generator),
        "lora_unet_a.lora_up.weight": torch.randn(8, 4, generator=generator),
        "lora_unet_a.alpha": torch.tensor(4.0),
        "step_counts": torch.arange(3, dtype=torch.int64),
    }


def _disk_full_after_half(write_bytes: bytes):
    """A writer that gets half its bytes out and then hits a full disk."""
    def write(temp: Path) -> None:
        with open(temp, "wb") as file:
            file.write(write_bytes[: len(write_bytes) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return write


# ----------------------------------------------------------------------------- atomic_write
def test_disk_full_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "lora.safetensors"
    target.write_bytes(b"previous contents")
    with pytest.raises(SaveError) as error:
        atomic_write(target, _disk_full_after_half(b"x" * 1000))
    assert isinstance(error.value, OSError)
    assert str(target) in str(error.value) and "No space left on device" in str(error.value)
    assert "previous file is unchanged" in str(error.value)
    assert target.read_bytes() == b"previous contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors"]


def test_disk_full_on_a_first_save_leaves_nothing(tmp_path):
    with pytest.raises(SaveError):
        atomic_write(tmp_path / "new.safetensors", _disk_full_after_half(b"abc" * 10))
    assert list(tmp_path.iterdir()) == []


def test_other_writer_errors_pass_through_and_clean_up(tmp_path):
    target = tmp_path / "a.pt"
    target.write_bytes(b"old")

    def write(temp: Path) -> None:
        temp.write_bytes(b"partial")
        raise RuntimeError("serialiser bug")

    with pytest.raises(RuntimeError, match="serialiser bug"):
        atomic_write(target, write)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.pt"]


def test_atomic_write_replaces_creates_folders_and_keeps_normal_permissions(tmp_path):
    target = tmp_path / "out" / "deeper" / "file.bin"
    atomic_write(target, lambda temp: temp.write_bytes(b"first"))
    atomic_write(target, lambda temp: temp.write_bytes(b"second"))
    assert target.read_bytes() == b"second"
    reference = tmp_path / "plain.bin"
    reference.write_bytes(b"")  # what open() gives under the current umask
    assert target.stat().st_mode & 0o777 == reference.stat().st_mode & 0o777
    assert [p.name for p in target.parent.iterdir()] == ["file.bin"]


# ----------------------------------------------------------------------------- save_tensors
def test_safetensors_round_trip_with_metadata_and_dtype(tmp_path):
    path = tmp_path / "lora.safetensors"
    metadata = {"ss_network_dim": "4", "modelspec.title": "test"}
    save_tensors(path, _tensors(), metadata, dtype=torch.float16)
    with safetensors.safe_open(str(path), framework="pt") as file:
        assert file.metadata() == metadata
        loaded = {key: file.get_tensor(key) for key in file.keys()}
    for key, original in _tensors().items():
        expected = original.to(torch.float16) if original.is_floating_point() else original
        assert loaded[key].dtype == expected.dtype
        assert torch.equal(loaded[key], expected)


@pytest.mark.parametrize("suffix", [".pt", ".ckpt"])
def test_pickle_formats_round_trip_and_log_dropped_metadata(tmp_path, suffix, caplog):
    path = tmp_path / f"lora{suffix}"
    with caplog.at_level(logging.DEBUG, logger=saving.__name__):
        save_tensors(path, _tensors(), {"ss_network_dim": "4"}, dtype=torch.bfloat16)
    assert "cannot hold metadata" in caplog.text
    loaded = torch.load(path, weights_only=True)
    assert loaded.keys() == _tensors().keys()
    assert loaded["lora_unet_a.lora_up.weight"].dtype == torch.bfloat16
    assert torch.equal(loaded["lora_unet_a.lora_up.weight"], _tensors()["lora_unet_a.lora_up.weight"].to(torch.bfloat16))
    assert torch.equal(loaded["step_counts"], torch.arange(3))


def test_save_tensors_keeps_old_file_when_the_disk_fills(tmp_path, monkeypatch):
    path = tmp_path / "lora.safetensors"
    save_tensors(path, {"w": torch.ones(3)}, None)

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 10)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(SaveError, match="No space left on device"):
        save_tensors(path, {"w": torch.zeros(3)}, None)
    monkeypatch.undo()
    assert torch.equal(safetensors.torch.load_file(str(path))["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["lora.safetensors"]


def test_save_tensors_rejects_unknown_suffix_and_non_string_metadata(tmp_path):
    with pytest.raises(ValueError, match=r"lora\.bin: unknown suffix '\.bin'.*--save_model_as"):
        save_tensors(tmp_path / "lora.bin", _tensors(), None)
    with pytest.raises(ValueError, match="metadata 'ss_network_dim' has a int value"):
        save_tensors(tmp_path / "lora.safetensors", _tensors(), {"ss_network_dim": 4})
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- hashes
def _data_section(file_bytes: bytes) -> bytes:
    """safetensors layout: 8-byte little-endian header length, JSON header, then the tensor bytes."""
    return file_bytes[8 + int.from_bytes(file_bytes[:8], "little"):]


def test_model_hash_is_sha256_of_the_tensor_bytes():
    # One dtype: safetensors stores tensors sorted by name, raw little-endian, so the data section is known exactly.
    tensors = {"b": torch.tensor([1.0, 2.0]), "a": torch.tensor([[3.0], [4.0]])}
    expected = hashlib.sha256(tensors["a"].numpy().tobytes() + tensors["b"].numpy().tobytes()).hexdigest()
    model_hash, legacy_hash = model_hashes(tensors, {"ss_network_dim": "4"})
    assert model_hash == expected
    assert legacy_hash == hashlib.sha256(b"").hexdigest()[:8]  # a file under 1 MiB has nothing at the offset


def test_hashes_match_the_written_file_and_ignore_non_training_metadata(tmp_path):
    generator = torch.Generator().manual_seed(1)
    tensors = {"lora_unet_x.lora_down.weight": torch.randn(320, 1024, generator=generator)}  # 1.25 MiB
    training = {"ss_network_dim": "320", "ss_network_alpha": "1.0"}
    path = tmp_path / "ref.safetensors"
    safetensors.torch.save_file(tensors, str(path), training)
    file_bytes = path.read_bytes()
    expected = (hashlib.sha256(_data_section(file_bytes)).hexdigest(),
                hashlib.sha256(file_bytes[0x100000:0x110000]).hexdigest()[:8])

    assert model_hashes(tensors, training) == expected
    assert model_hashes(tensors, {**training, "modelspec.title": "a long user title " * 20, "comment": "x"}) == expected
    longer = model_hashes(tensors, {**training, "ss_training_comment": "shifts the data by its length"})
    assert longer[0] == expected[0] and longer[1] != expected[1]  # legacy hash reads at a fixed file offset


def test_save_lora_file_stores_hashes_of_the_saved_dtype(tmp_path):
    path = tmp_path / "lora.safetensors"
    metadata = {"ss_network_dim": "4", "modelspec.title": "t"}
    save_lora_file(path, _tensors(), metadata, dtype=torch.float16)
    with safetensors.safe_open(str(path), framework="pt") as file:
        stored = file.metadata()
    assert stored["sshs_model_hash"] == hashlib.sha256(_data_section(path.read_bytes())).hexdigest()
    half = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in _tensors().items()}
    assert (stored["sshs_model_hash"], stored["sshs_legacy_hash"]) == model_hashes(half, metadata)
    assert {k: stored[k] for k in metadata} == metadata and "sshs_model_hash" not in metadata


def test_save_lora_file_as_ckpt_has_no_hashes(tmp_path):
    save_lora_file(tmp_path / "lora.ckpt", _tensors(), None)
    assert torch.load(tmp_path / "lora.ckpt", weights_only=True).keys() == _tensors().keys()


def test_checkpoint_hashes(tmp_path):
    path = tmp_path / "model.safetensors"
    content = os.urandom(0x100000 + 0x18000)
    path.write_bytes(content)
    assert checkpoint_hashes(path) == (hashlib.sha256(content[0x100000:0x110000]).hexdigest()[:8],
                                       hashlib.sha256(content).hexdigest())
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        checkpoint_hashes(tmp_path / "missing.safetensors")


# ----------------------------------------------------------------------------- names and rotation
def test_sd_scripts_file_and_state_names():
    assert epoch_file_name("my_lora", 3, ".safetensors") == "my_lora-000003.safetensors"
    assert step_file_name("my_lora", 500, ".ckpt") == "my_lora-step00000500.ckpt"
    assert epoch_state_name("my_lora", 12) == "my_lora-000012-state"
    assert step_state_name("my_lora", 7) == "my_lora-step00000007-state"
    assert last_state_name("my_lora") == "my_lora-state"


def _touch_saves(folder: Path, names: list[str]) -> None:
    for name in names:
        if name.endswith("-state"):
            (folder / name).mkdir()
            (folder / name / "optimizer.bin").write_bytes(b"s")
        else:
            (folder / name).write_bytes(b"w")


def test_rotate_keeps_the_newest_epochs_and_nothing_else_matches(tmp_path):
    name = "lora[v1]"  # glob characters in the output name must not break matching
    epochs = [epoch_file_name(name, e, ".safetensors") for e in (1, 2, 3, 4, 5)]
    others = [f"{name}.safetensors", step_file_name(name, 10, ".safetensors"), epoch_state_name(name, 1),
              epoch_file_name(name, 1, ".ckpt"), epoch_file_name("other", 1, ".safetensors")]
    _touch_saves(tmp_path, epochs + others)
    removed = rotate(tmp_path, epoch_pattern(name, ".safetensors"), keep=2)
    assert [p.name for p in removed] == epochs[:3]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(epochs[3:] + others)


def test_rotate_state_folders_by_step(tmp_path):
    states = [step_state_name("run", s) for s in (100, 200, 1000, 1100)]  # 1000 sorts after 200 (zero padding)
    _touch_saves(tmp_path, states + [last_state_name("run")])
    removed = rotate(tmp_path, step_pattern("run", "-state"), keep=1)
    assert [p.name for p in removed] == states[:3]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([states[3], last_state_name("run")])
    assert rotate(tmp_path, step_pattern("run", "-state"), keep=0) == [tmp_path / states[3]]


def test_rotate_with_simple_globs_and_bad_arguments(tmp_path):
    _touch_saves(tmp_path, [step_file_name("run", s, ".safetensors") for s in (5, 10, 15)])
    assert [p.name for p in rotate(tmp_path, "run-step*.safetensors", keep=2)] == ["run-step00000005.safetensors"]
    assert rotate(tmp_path, "run-step*.safetensors", keep=5) == []
    with pytest.raises(ValueError, match="keep must be >= 0"):
        rotate(tmp_path, "*", keep=-1)
    with pytest.raises(ValueError, match="directly inside"):
        rotate(tmp_path, "sub/*.safetensors", keep=1)


@pytest.mark.parametrize("every, last_n", [(10, 30), (10, 25), (5, 5), (3, 10)])
def test_steps_keep_count_matches_sd_scripts_removal_rule(tmp_path, every, last_n):
    """sd-scripts removes, at each save, the save from `last_n + 1` steps ago rounded down to a save step."""
    sd_scripts_kept: set[int] = set()
    for step in range(every, 200 + 1, every):
        sd_scripts_kept.add(step)
        remove = step - last_n - 1
        sd_scripts_kept.discard(remove - remove % every)
        _touch_saves(tmp_path, [step_file_name("run", step, ".safetensors")])
        rotate(tmp_path, step_pattern("run", ".safetensors"), steps_keep_count(last_n, every))
    assert sorted(int(p.name[len("run-step"):-len(".safetensors")]) for p in tmp_path.iterdir()) == sorted(sd_scripts_kept)
