"""Model flags given as Hugging Face hub ids, resolved offline against a hub cache folder the test builds in the
hub's own layout (models--owner--name/refs/main, snapshots/<commit>/...). Nothing is downloaded."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from train_helpers import base_argv, make_dataset

import library.trainer
import sd3_train_network
import train_network
from library.hub_models import HubModelError, HubReference, hub_reference, resolve_hub_models
from library.models.sd_loading import load_sd_models

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache: Path, repo_id: str) -> Path:
    """An empty snapshot of ``repo_id`` at COMMIT, which refs/main points to (as the hub's downloads leave it)."""
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(COMMIT)
    snapshot = storage / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache that the hub client reads, offline (the constants are read when it is imported)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture(scope="module")
def sd1_pipeline(tiny_sd1_checkpoint, tmp_path_factory) -> Path:
    """The tiny SD1 checkpoint as a diffusers folder, written by diffusers itself."""
    from diffusers_oracle import write_diffusers_folder

    folder = tmp_path_factory.mktemp("sd1_pipeline")
    write_diffusers_folder(tiny_sd1_checkpoint, folder, v2=False)
    return folder


def error_line(capsys) -> str:
    """The one error line the CLI printed (log lines go to stderr too)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1
    return lines[0]


def namespace(**flags) -> argparse.Namespace:
    return argparse.Namespace(**({"pretrained_model_name_or_path": None, "vae": None, "clip_l": None, "clip_g": None,
                                  "t5xxl": None} | flags))


@pytest.mark.parametrize("value, expected", [
    ("stabilityai/stable-diffusion-xl-base-1.0", HubReference("stabilityai/stable-diffusion-xl-base-1.0")),
    ("stabilityai/stable-diffusion-3.5-medium/sd3.5_medium.safetensors",
     HubReference("stabilityai/stable-diffusion-3.5-medium", "sd3.5_medium.safetensors")),
    ("comfyanonymous/flux_text_encoders/split/clip_l.safetensors",
     HubReference("comfyanonymous/flux_text_encoders", "split/clip_l.safetensors")),
    ("models/sd15.safetensors", None),  # a missing local file, not a repo named "sd15.safetensors"
    ("./owner/name", None), ("/abs/owner/name", None), ("~/owner/name", None), (r"C:\models\sd", None),
    ("owner/name/subfolder", None),  # no file named: a local folder path
    ("owner/../name/x.safetensors", None), ("model.safetensors", None),
])
def test_what_a_model_flag_names_on_the_hub(value, expected):
    assert hub_reference(value) == expected


def test_an_existing_local_path_is_never_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner" / "name").mkdir(parents=True)
    assert hub_reference("owner/name") is None
    resolved = resolve_hub_models(namespace(pretrained_model_name_or_path="owner/name"))
    assert resolved.pretrained_model_name_or_path == "owner/name" and resolved.hub_model_ids == {}


def test_repo_id_of_a_diffusers_pipeline_loads_from_the_cache(hub_cache, sd1_pipeline, tiny_sd1_checkpoint):
    """Only the folder's components come back: a repo-root single file in the snapshot is never needed."""
    snapshot = cache_repo(hub_cache, "tiny-org/sd1-pipeline")
    shutil.copytree(sd1_pipeline, snapshot, dirs_exist_ok=True)
    args = namespace(pretrained_model_name_or_path="tiny-org/sd1-pipeline")
    resolved = resolve_hub_models(args)
    assert Path(resolved.pretrained_model_name_or_path) == snapshot
    assert args.pretrained_model_name_or_path == "tiny-org/sd1-pipeline"  # the parsed flags stay as given
    assert resolved.hub_model_ids == {"pretrained_model_name_or_path": "tiny-org/sd1-pipeline"}
    from_hub = load_sd_models(resolved.pretrained_model_name_or_path, v2=False)
    from_file = load_sd_models(tiny_sd1_checkpoint, v2=False)
    for name, tensor in from_file.unet.state_dict().items():
        torch.testing.assert_close(from_hub.unet.state_dict()[name], tensor, rtol=0, atol=0)


def test_cli_takes_a_file_in_a_repo_and_a_vae_repo(hub_cache, sd1_pipeline, tiny_sd1_checkpoint, tokenizer_cache_dir,
                                                   tmp_path, monkeypatch):
    """Through train_network.py (a dry run: the file checks and the header reads see the local copies)."""
    shutil.copy(tiny_sd1_checkpoint, cache_repo(hub_cache, "tiny-org/sd1-files") / "tiny_sd1.safetensors")
    shutil.copytree(sd1_pipeline / "vae", cache_repo(hub_cache, "tiny-org/sd1-vae"), dirs_exist_ok=True)
    plans = []
    monkeypatch.setattr(library.trainer, "format_dry_run", lambda plan: plans.append(plan) or "")
    train_network.main(base_argv("tiny-org/sd1-files/tiny_sd1.safetensors", tokenizer_cache_dir,
                                 make_dataset(tmp_path / "data"), tmp_path / "out",
                                 "--vae=tiny-org/sd1-vae", "--dry_run"))
    assert plans[-1].profile.family == "sd1"
    assert plans[-1].profile.vae.params > 0


def test_sd3_takes_files_in_repos_but_no_repo_folder(hub_cache, tiny_sd3_checkpoints, sd3_tokenizer_cache_dir,
                                                   tiny_sd3_text_encoder_files, tmp_path, capsys, monkeypatch):
    snapshot = cache_repo(hub_cache, "tiny-org/sd3")
    shutil.copy(tiny_sd3_checkpoints["sd3.5-medium"], snapshot / "sd3.5_medium.safetensors")
    (snapshot / "text_encoders").mkdir()
    shutil.copy(tiny_sd3_text_encoder_files["clip_l"], snapshot / "text_encoders" / "clip_l.safetensors")
    plans = []
    monkeypatch.setattr(library.trainer, "format_dry_run", lambda plan: plans.append(plan) or "")
    argv = base_argv("tiny-org/sd3/sd3.5_medium.safetensors", sd3_tokenizer_cache_dir,
                     make_dataset(tmp_path / "data"), tmp_path / "out", "--dry_run")
    sd3_train_network.main([*argv, "--clip_l=tiny-org/sd3/text_encoders/clip_l.safetensors"])
    assert plans[-1].profile.family == "sd3"
    with pytest.raises(SystemExit):
        sd3_train_network.main([*argv, "--clip_l=tiny-org/sd3"])
    assert error_line(capsys).startswith("error: --clip_l tiny-org/sd3: this flag takes a single file")


def test_a_model_missing_from_the_offline_cache_is_one_line_naming_flag_and_id(hub_cache, tokenizer_cache_dir,
                                                                               tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_network.main(base_argv("tiny-org/not-cached", tokenizer_cache_dir, make_dataset(tmp_path / "data"),
                                     tmp_path / "out", "--dry_run"))
    error = error_line(capsys)
    assert error.startswith("error: --pretrained_model_name_or_path tiny-org/not-cached: no such local file or folder")
    assert "HF_HUB_OFFLINE=1" in error and str(hub_cache) in error


def test_a_file_missing_from_a_cached_repo_is_named(hub_cache, tiny_sd1_checkpoint):
    shutil.copy(tiny_sd1_checkpoint, cache_repo(hub_cache, "tiny-org/sd1-files") / "tiny_sd1.safetensors")
    with pytest.raises(HubModelError, match=r"^--vae tiny-org/sd1-files/vae\.safetensors: .*not in the hub cache"):
        resolve_hub_models(namespace(pretrained_model_name_or_path="tiny-org/sd1-files/tiny_sd1.safetensors",
                                     vae="tiny-org/sd1-files/vae.safetensors"))


def test_a_repo_without_a_diffusers_model_asks_for_a_file(hub_cache, tiny_sd1_checkpoint):
    shutil.copy(tiny_sd1_checkpoint, cache_repo(hub_cache, "tiny-org/sd1-files") / "tiny_sd1.safetensors")
    with pytest.raises(HubModelError, match="holds no diffusers model .* name a file in it"):
        resolve_hub_models(namespace(pretrained_model_name_or_path="tiny-org/sd1-files"))
