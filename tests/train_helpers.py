"""Shared pieces of the end-to-end training tests: a per-test dataset, the base command line, and readers."""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file

from library.fixtures.images import write_fixture_images

CAPTIONS = ["a red square", "a blue circle", "a green stripe", "a yellow dot"]


def make_dataset(root: Path, *, count: int = 4, batch_size: int = 2, extra_general: str = "", fmt: str = "png") -> Path:
    """Four small images with captions and a dataset TOML (64×64 buckets); returns the TOML path."""
    images = root / "images"
    write_fixture_images(images, count, sizes=((64, 64),), caption_extension=".txt", captions=CAPTIONS[:count], fmt=fmt)
    toml_path = root / "dataset.toml"
    toml_path.write_text(
        f"[general]\ncaption_extension = \".txt\"\n{extra_general}\n"
        f"[[datasets]]\nresolution = 64\nbatch_size = {batch_size}\n\n"
        f"  [[datasets.subsets]]\n  image_dir = '{images.as_posix()}'\n  num_repeats = 1\n")
    return toml_path


def base_argv(checkpoint: Path, tokenizers: Path, dataset: Path, output: Path, *extra: str) -> list[str]:
    return [
        f"--pretrained_model_name_or_path={checkpoint}", f"--tokenizer_cache_dir={tokenizers}",
        f"--dataset_config={dataset}", f"--output_dir={output}", "--output_name=lora",
        "--network_module=networks.lora", "--network_dim=4", "--network_alpha=2", "--learning_rate=1e-3",
        "--seed=7", "--max_data_loader_n_workers=0", "--max_train_steps=2", *extra,
    ]


def lora_tensors(path: Path) -> dict:
    return load_file(str(path))


def lora_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}


def scalars(logging_dir: Path, tag: str) -> list[float]:
    """Values of one tensorboard scalar, in step order, from every event file under logging_dir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for events in sorted(logging_dir.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events.parent))
        accumulator.Reload()
        if tag in accumulator.Tags().get("scalars", []):
            values += [(e.step, e.value) for e in accumulator.Scalars(tag)]
    return [value for _, value in sorted(values)]
