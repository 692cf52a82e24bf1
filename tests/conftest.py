"""Shared session fixtures: tiny SD1/SD2/SDXL/SD3 single-file checkpoints, separate SD3 text-encoder files and
tokenizer cache folders.

Built once per session from library.fixtures (seeded, well under a second each); tests must treat them as
read-only and copy them before changing anything.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from library.fixtures.tiny_sd import write_tiny_sd_checkpoint, write_tiny_tokenizer_cache
from library.fixtures.tiny_sd3 import (
    VARIANTS,
    write_tiny_sd3_checkpoint,
    write_tiny_sd3_text_encoder_files,
    write_tiny_sd3_tokenizer_cache,
)
from library.fixtures.tiny_sdxl import write_tiny_sdxl_checkpoint, write_tiny_sdxl_tokenizer_cache


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


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps its state in process-wide singletons; in-process training runs with different
    precisions would otherwise see the first run's settings."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="session")
def tiny_sd3_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One single-file checkpoint per SD3 variant ("sd3-medium", "sd3.5-medium", "sd3.5-large"), each with
    CLIP-L, CLIP-G (fp16) and T5 (fp8) under ``text_encoders.*`` like sd3_medium_incl_clips_t5xxlfp8."""
    folder = tmp_path_factory.mktemp("sd3")
    return {name: write_tiny_sd3_checkpoint(folder / f"{name}.safetensors", variant=name) for name in VARIANTS}


@pytest.fixture(scope="session")
def tiny_sd3_text_encoder_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Separate ``--clip_l`` / ``--clip_g`` / ``--t5xxl`` files holding the checkpoints' encoder tensors."""
    return write_tiny_sd3_text_encoder_files(tmp_path_factory.mktemp("sd3_text_encoders"))


@pytest.fixture(scope="session")
def sd3_tokenizer_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``--tokenizer_cache_dir`` with the CLIP-L, CLIP-G and T5 tokenizers under sd-scripts' folder names."""
    return write_tiny_sd3_tokenizer_cache(tmp_path_factory.mktemp("sd3_tokenizer_cache"))


@pytest.fixture(scope="session")
def tiny_sdxl_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SDXL base single file: sgm U-Net, VAE, CLIP-L (HF naming) and OpenCLIP bigG under their real prefixes."""
    return write_tiny_sdxl_checkpoint(tmp_path_factory.mktemp("sdxl") / "tiny_sdxl.safetensors")


@pytest.fixture(scope="session")
def sdxl_tokenizer_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``--tokenizer_cache_dir`` with the CLIP-L and bigG tokenizers under sd-scripts' folder names."""
    return write_tiny_sdxl_tokenizer_cache(tmp_path_factory.mktemp("sdxl_tokenizer_cache"))


@pytest.fixture
def no_model_loading(monkeypatch):
    """Any attempt to read model weights fails the test (for --dry_run, which must load none)."""
    import library.trainer
    import sd3_train_network
    import sdxl_train_network
    import train_network

    def refuse(*args, **kwargs):
        raise AssertionError("a dry run loaded a model")

    for module, name in ((train_network, "load_sd_models"), (sdxl_train_network, "load_sdxl_models"),
                         (sd3_train_network, "load_sd3_models"), (library.trainer.NetworkTrainer, "prepare_models")):
        monkeypatch.setattr(module, name, refuse)
