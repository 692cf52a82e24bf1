"""Shared session fixtures: tiny SD1/SD2 single-file checkpoints and a tokenizer cache folder.

Built once per session from library.fixtures (seeded, well under a second each); tests must treat them as
read-only and copy them before changing anything.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from library.fixtures.tiny_sd import write_tiny_sd_checkpoint, write_tiny_tokenizer_cache


# Tests run two workers on two cores; more torch threads per worker oversubscribe the CPU and run far slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sd1_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_sd_checkpoint(tmp_path_factory.mktemp("sd1") / "tiny_sd1.safetensors", v2=False)


@pytest.fixture(scope="session")
def tiny_sd2_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_sd_checkpoint(tmp_path_factory.mktemp("sd2") / "tiny_sd2.safetensors", v2=True)


@pytest.fixture(scope="session")
def tokenizer_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_tokenizer_cache(tmp_path_factory.mktemp("tokenizer_cache"))
