"""train_network.py under DDP: two CPU processes (gloo) through the real `accelerate launch` command line.

`accelerate launch --cpu --num_processes 2` quietly starts ONE process (accelerate only runs several CPU
processes through mpirun), so the runs here use `--multi_gpu` (torchrun underneath) with ACCELERATE_USE_CPU=true,
which makes accelerate pick the MULTI_CPU distributed type and the gloo backend.

tests/distributed_driver.py is train_network.py plus a per-rank record (batches drawn, learning rates, files
written, final LoRA parameters); the assertions compare the two ranks' records.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from library.fixtures.images import write_fixture_images

ROOT = Path(__file__).resolve().parent.parent
DRIVER = Path(__file__).resolve().parent / "distributed_driver.py"
NUM_IMAGES, BATCH_SIZE, PROCESSES = 8, 2, 2
STEPS_PER_EPOCH = NUM_IMAGES // BATCH_SIZE // PROCESSES  # 2: each rank takes every other batch
LEARNING_RATE = 1e-3


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_sd1_checkpoint, tokenizer_cache_dir) -> dict[str, Path]:
    """Eight distinct 64×64 images shown once per epoch, so every image key occurs exactly once in an epoch."""
    work = tmp_path_factory.mktemp("ddp")
    images = work / "images"
    write_fixture_images(images, NUM_IMAGES, sizes=((64, 64),), caption_extension=".txt", seed=3)
    dataset = work / "dataset.toml"
    dataset.write_text(
        "[general]\ncaption_extension = \".txt\"\n\n"
        f"[[datasets]]\nresolution = 64\nbatch_size = {BATCH_SIZE}\n\n"
        f"  [[datasets.subsets]]\n  image_dir = '{images.as_posix()}'\n  num_repeats = 1\n")
    prompts = work / "prompts.txt"
    prompts.write_text("a red square --w 64 --h 64 --d 1 --s 2\n")
    return {"work": work, "images": images, "dataset": dataset, "prompts": prompts,
            "checkpoint": tiny_sd1_checkpoint, "tokenizers": tokenizer_cache_dir}


def launch_ddp(space: dict[str, Path], output: Path, *extra: str) -> None:
    """Train with two processes through `accelerate launch`; fails the test with the run's log tail on error."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(PROCESSES),
        "--num_machines", "1", "--main_process_port", str(_free_port()), "--mixed_precision", "no",
        "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1", str(DRIVER),
        f"--pretrained_model_name_or_path={space['checkpoint']}", f"--tokenizer_cache_dir={space['tokenizers']}",
        f"--dataset_config={space['dataset']}", f"--output_dir={output}", "--output_name=lora",
        "--save_model_as=safetensors", "--network_module=networks.lora", "--network_dim=4", "--network_alpha=2",
        f"--learning_rate={LEARNING_RATE}", "--optimizer_type=AdamW", "--seed=11", "--cache_latents_to_disk",
        "--max_data_loader_n_workers=0", *extra,
    ]
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    # A new session, so that a hung run (one rank dead, the other waiting in a collective) can be ended whole.
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail("the two-process run hung for 300 s:\n" + stderr[-4000:])
    assert process.returncode == 0, stdout[-2000:] + stderr[-4000:]


def rank_record(output: Path, rank: int) -> dict:
    return json.loads((output / f"rank{rank}.json").read_text())


def rank_weights(output: Path, rank: int) -> dict[str, torch.Tensor]:
    return load_file(str(output / f"rank{rank}.safetensors"))


def assert_same_tensors(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    assert first.keys() == second.keys()
    differing = [key for key in first if not torch.equal(first[key], second[key])]
    assert not differing, f"{len(differing)} of {len(first)} tensors differ, e.g. {differing[:3]}"


@pytest.fixture(scope="module")
def ddp_run(workspace) -> Path:
    """Four optimizer steps (two epochs) on two ranks, with a linear schedule, step saves, state saves and a sample."""
    output = workspace["work"] / "full"
    launch_ddp(workspace, output, "--max_train_steps=4", "--lr_scheduler=linear", "--save_every_n_steps=2",
               "--save_state", f"--sample_prompts={workspace['prompts']}", "--sample_every_n_steps=4")
    return output


@pytest.mark.slow
def test_each_rank_trains_on_its_own_half_of_every_epoch(ddp_run, workspace):
    records = [rank_record(ddp_run, rank) for rank in range(PROCESSES)]
    all_keys = {str(path) for path in workspace["images"].glob("*.png")}
    assert len(all_keys) == NUM_IMAGES
    for record in records:
        assert record["num_processes"] == PROCESSES
        assert record["global_step"] == 4
        assert len(record["batches"]) == 4 and all(len(batch) == BATCH_SIZE for batch in record["batches"])
    for epoch in range(2):
        window = slice(epoch * STEPS_PER_EPOCH, (epoch + 1) * STEPS_PER_EPOCH)
        seen = [[key for batch in record["batches"][window] for key in batch] for record in records]
        assert not set(seen[0]) & set(seen[1]), f"epoch {epoch}: both ranks trained on {set(seen[0]) & set(seen[1])}"
        assert sorted(seen[0] + seen[1]) == sorted(all_keys), f"epoch {epoch} did not cover every image exactly once"


@pytest.mark.slow
def test_lora_weights_stay_identical_on_both_ranks(ddp_run):
    weights = [rank_weights(ddp_run, rank) for rank in range(PROCESSES)]
    trained_up = [key for key, value in weights[0].items() if key.endswith("lora_up.weight") and value.abs().sum() > 0]
    assert trained_up, "lora_up starts at zero; some must have moved after four steps"
    assert_same_tensors(weights[0], weights[1])
    saved = load_file(str(ddp_run / "lora.safetensors"))
    assert_same_tensors(saved, weights[0])


@pytest.mark.slow
def test_the_schedule_counts_optimizer_steps_not_process_steps(ddp_run):
    """accelerate steps a prepared scheduler once per process; a linear decay over 4 steps must still end at 0."""
    expected = [LEARNING_RATE * (1 - step / 4) for step in range(1, 5)]
    for rank in range(PROCESSES):
        assert rank_record(ddp_run, rank)["lrs"] == pytest.approx(expected, abs=1e-12)


@pytest.mark.slow
def test_only_rank_zero_writes_lora_files_and_samples(ddp_run):
    main, other = rank_record(ddp_run, 0), rank_record(ddp_run, 1)
    assert main["saved"] == ["lora-step00000002.safetensors", "lora.safetensors"]
    assert len(main["samples"]) == 1
    assert other["saved"] == [] and other["samples"] == []
    lora_files = sorted(p.name for p in ddp_run.glob("*.safetensors") if not p.name.startswith("rank"))
    assert lora_files == ["lora-step00000002.safetensors", "lora.safetensors"]
    assert sorted(p.name for p in (ddp_run / "sample").iterdir()) == main["samples"]


@pytest.mark.slow
def test_state_folders_hold_every_ranks_rng_state(ddp_run, workspace):
    """Every rank writes its own random_states_<rank>.pkl into the shared folder; none may be lost to a rename."""
    for name, step in (("lora-step00000002-state", 2), ("lora-state", 4)):
        files = sorted(p.name for p in (ddp_run / name).iterdir())
        assert files == ["model.safetensors", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl",
                         "scheduler.bin", "train_state.json"], (name, files)
        assert json.loads((ddp_run / name / "train_state.json").read_text())["global_step"] == step
    assert sorted(p.name for p in ddp_run.iterdir() if p.is_dir()) == ["lora-state", "lora-step00000002-state", "sample"]
    # Both ranks cached latents to disk (rank 0 first): one cache file per image and nothing half-written left over.
    cache_files = [p.name for p in workspace["images"].iterdir() if p.suffix not in (".png", ".txt")]
    assert all(name.endswith("_lat.safetensors") for name in cache_files), cache_files
    assert sorted(name.rsplit("_", 2)[0] for name in cache_files) == sorted(p.stem for p in workspace["images"].glob("*.png"))


@pytest.mark.slow
def test_resumed_ddp_run_ends_where_the_uninterrupted_one_did(ddp_run, workspace):
    """Resume both ranks from the step-2 state: they draw the same batches and end on the same weights."""
    output = workspace["work"] / "resumed"
    launch_ddp(workspace, output, "--max_train_steps=4", "--lr_scheduler=linear",
               f"--resume={ddp_run / 'lora-step00000002-state'}")
    for rank in range(PROCESSES):
        resumed, full = rank_record(output, rank), rank_record(ddp_run, rank)
        assert resumed["batches"] == full["batches"][2:]
        assert resumed["lrs"] == pytest.approx(full["lrs"][2:], abs=1e-12)
        assert_same_tensors(rank_weights(output, rank), rank_weights(ddp_run, rank))
