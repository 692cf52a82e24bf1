"""State folders: written whole or not at all, and read back."""

import pytest

from library.train_state import STATE_FILE, TrainState, save_state_folder


def test_state_round_trip(tmp_path):
    save_state_folder(tmp_path / "s", TrainState(epoch=2, global_step=9, seed=5), lambda d: _fake_accelerate(d, "v1"))
    assert TrainState.read(tmp_path / "s") == TrainState(epoch=2, global_step=9, seed=5)
    assert (tmp_path / "s" / "weights").read_text() == "v1"


def test_a_save_killed_halfway_leaves_the_previous_state(tmp_path):
    folder = tmp_path / "s"
    save_state_folder(folder, TrainState(1, 4, 0), lambda d: _fake_accelerate(d, "good"))

    def dies_while_writing(directory: str) -> None:
        _fake_accelerate(directory, "half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        save_state_folder(folder, TrainState(2, 8, 0), dies_while_writing)
    assert TrainState.read(folder) == TrainState(1, 4, 0)
    assert (folder / "weights").read_text() == "good"
    # The next save cleans the half-written folder up and replaces the state.
    save_state_folder(folder, TrainState(3, 12, 0), lambda d: _fake_accelerate(d, "new"))
    assert TrainState.read(folder).global_step == 12 and not (tmp_path / "s.tmp").exists()


def test_reading_a_folder_that_is_not_a_state(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no {STATE_FILE}"):
        TrainState.read(tmp_path)


def _fake_accelerate(directory: str, content: str) -> None:
    from pathlib import Path

    Path(directory).mkdir(parents=True, exist_ok=True)
    (Path(directory) / "weights").write_text(content)
