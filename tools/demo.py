"""End-to-end demo on CPU: a tiny random-weight SD1 checkpoint, tiny tokenizers and a few images are generated
in a work folder, then train_network.py trains a LoRA through its real command line and draws a sample image.

    python -m tools.demo [--work_dir demo_work] [--steps 40]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from library.fixtures.images import write_fixture_images
from library.fixtures.tiny_sd import write_tiny_sd_checkpoint, write_tiny_tokenizer_cache

ROOT = Path(__file__).resolve().parent.parent


def prepare(work: Path) -> dict[str, Path]:
    """Write the model, tokenizers, images, dataset TOML and sample prompts; returns their paths."""
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = write_tiny_sd_checkpoint(work / "tiny_sd15.safetensors", seed=0)
    tokenizers = write_tiny_tokenizer_cache(work / "tokenizers")
    images = work / "images"
    write_fixture_images(images, 4, sizes=((64, 64), (96, 64)), caption_extension=".txt",
                         captions=["a red square", "a blue circle", "a green stripe", "a yellow dot"], seed=0)
    dataset = work / "dataset.toml"
    dataset.write_text(
        "[general]\nenable_bucket = true\ncaption_extension = \".txt\"\n\n"
        "[[datasets]]\nresolution = 64\nbatch_size = 2\nmin_bucket_reso = 64\nmax_bucket_reso = 128\nbucket_reso_steps = 32\n\n"
        f"  [[datasets.subsets]]\n  image_dir = '{images.as_posix()}'\n  num_repeats = 2\n")
    prompts = work / "prompts.txt"
    prompts.write_text("a red square --n blurry --w 64 --h 64 --d 1 --l 4 --s 8\n")
    return {"checkpoint": checkpoint, "tokenizers": tokenizers, "dataset": dataset, "prompts": prompts, "output": work / "output"}


def train_command(paths: dict[str, Path], steps: int) -> list[str]:
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1", "--cpu",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "2",
        str(ROOT / "train_network.py"),
        f"--pretrained_model_name_or_path={paths['checkpoint']}", f"--tokenizer_cache_dir={paths['tokenizers']}",
        f"--dataset_config={paths['dataset']}", f"--output_dir={paths['output']}", "--output_name=demo_lora",
        "--save_model_as=safetensors", "--network_module=networks.lora", "--network_dim=8", "--network_alpha=4",
        "--learning_rate=1e-3", "--optimizer_type=AdamW", "--lr_scheduler=constant", f"--max_train_steps={steps}",
        "--seed=42", "--cache_latents", "--max_data_loader_n_workers=0", "--sdpa",
        f"--sample_prompts={paths['prompts']}", f"--sample_every_n_steps={steps}", "--sample_sampler=euler_a",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", default=str(ROOT / "demo_work"))
    parser.add_argument("--steps", type=int, default=200)
    options = parser.parse_args()
    started = time.time()
    paths = prepare(Path(options.work_dir))
    subprocess.run(train_command(paths, options.steps), check=True, cwd=ROOT)
    lora = paths["output"] / "demo_lora.safetensors"
    samples = sorted((paths["output"] / "sample").glob("*.png"))
    print(f"\nLoRA:          {lora}")
    print(f"sample image:  {samples[-1] if samples else 'none'}")
    print(f"took {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
