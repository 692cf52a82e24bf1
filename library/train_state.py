"""Where a run stands (epoch, step) and how it is saved and resumed.

A state folder holds what accelerate saves (LoRA weights, optimizer, scheduler, RNG states) plus
`train_state.json`. It is written to a temporary folder and renamed into place, so a run killed while
saving leaves the previous state intact.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

STATE_FILE = "train_state.json"


@dataclass
class TrainState:
    """Progress of a run. `epoch` counts completed epochs, `global_step` optimizer steps; `seed` is the run's
    resolved seed, so a run started without --seed still resumes exactly."""

    epoch: int = 0
    global_step: int = 0
    seed: int | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def read(cls, folder: Path) -> "TrainState":
        path = folder / STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"--resume {folder}: no {STATE_FILE} inside; is this a state folder saved with --save_state?")
        data = json.loads(path.read_text())
        return cls(epoch=int(data["epoch"]), global_step=int(data["global_step"]), seed=data.get("seed"))


def save_state_folder(folder: Path, state: TrainState, save_accelerator_state: Callable[[str], None], *,
                      is_main: bool = True, barrier: Callable[[], None] = lambda: None) -> None:
    """Save accelerate's state and our progress into `folder`, replacing it only once complete.

    Every process calls this (each writes its own random_states_<rank>.pkl); only the main process cleans,
    renames and deletes, and `barrier` keeps the others from writing into a folder being cleaned or moved.
    """
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if is_main and tmp.exists():
        shutil.rmtree(tmp)
    barrier()
    save_accelerator_state(str(tmp))
    barrier()
    if is_main:
        (tmp / STATE_FILE).write_text(state.to_json())
        old = folder.with_name(folder.name + ".old")
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
        if old.exists():
            shutil.rmtree(old)
    barrier()


def resolve_resume_folder(resume: str) -> Path:
    folder = Path(resume)
    if not folder.is_dir():
        raise FileNotFoundError(f"--resume {resume}: folder not found")
    return folder
