"""--resume from a state folder in sd-scripts' layout (a LoRA run of train_network.py).

The folder is written here as sd-scripts writes it: accelerate's files (model.safetensors = the network's state
dict, optimizer.bin, scheduler.bin, random_states_0.pkl) and its train_state.json {"current_epoch",
"current_step"}. optimizer.bin numbers the parameters in the order sd-scripts' network hands them over. For SD1 that
order follows sd-scripts' U-Net, which has diffusers' block layout and module names but keeps ldm's order inside a
transformer block (attn1, ff, attn2; diffusers registers attn1, attn2, ff). The test takes it from our network built
on diffusers' UNet2DConditionModel with that one rule applied, independently of the code under test (whose own
rule was checked against sd-scripts' code on full-size SD1, SDXL and SD3 models).
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import base_argv, lora_metadata, lora_tensors, make_dataset

import train_network
from library.models.sd_loading import load_sd_models
from library.resume import read_resume_point, sd_scripts_param_order
from networks import lora as lora_network

# Conv LoRA (resnets between the attentions) and LoRA+ (a "plus" group per part) make sd-scripts' order differ from
# ours in every way it can for SD1; the text encoder trains too.
NETWORK_ARGS = ("conv_dim=2", "conv_alpha=1", "loraplus_lr_ratio=4")
COMMON = ("--max_train_steps=4", "--save_every_n_steps=2", "--save_state", "--lr_scheduler=cosine",
          "--lr_warmup_steps=1", "--network_args", *NETWORK_ARGS)


def train(*argv: str) -> None:
    train_network.main(list(argv))


@pytest.fixture
def argv(tiny_sd1_checkpoint, tokenizer_cache_dir, tmp_path):
    dataset = make_dataset(tmp_path / "data")

    def build(*extra: str, output: Path) -> list[str]:
        return base_argv(tiny_sd1_checkpoint, tokenizer_cache_dir, dataset, output, *extra)

    return build


def optimizer_order(text_encoder, unet) -> list[str]:
    """Parameter names in the order networks.lora hands them to the optimizer, for these models."""
    network = lora_network.create_network(1.0, 4, 2.0, None, text_encoder, unet,
                                          **dict(arg.split("=") for arg in NETWORK_ARGS))
    network.apply_to(text_encoder, unet, True, True)
    groups, _ = network.prepare_optimizer_params(None, None, 1e-3)
    names = {id(param): name for name, param in network.named_parameters()}
    order = [names[id(param)] for group in groups for param in group["params"]]
    network.apply_to(text_encoder, unet, False, False)  # hand the layers their own forward back
    return order


_TRANSFORMER_PART = re.compile(r"^(.*_transformer_blocks_\d+)_(attn1|ff|attn2)_")
_LDM_PART_RANK = {"attn1": 0, "ff": 1, "attn2": 2}


def ldm_order_in_transformer_blocks(names: list[str]) -> list[str]:
    """``names`` with each run of one transformer block's parameters in ldm's order (attn1, ff, attn2)."""
    def key(indexed: tuple[int, str]) -> tuple:
        index, name = indexed
        match = _TRANSFORMER_PART.match(name)
        return (match.group(1), _LDM_PART_RANK[match.group(2)], index) if match else (name, 0, index)

    result: list[str] = []
    for _, run in itertools.groupby(enumerate(names), lambda item: key(item)[0]):
        result += [name for _, name in sorted(run, key=key)]
    return result


@pytest.fixture(scope="module")
def orders(tiny_sd1_checkpoint, tmp_path_factory) -> tuple[list[str], list[str]]:
    """(ours, sd-scripts'): the same names, in our U-Net's order and in the order of a diffusers-layout U-Net."""
    from diffusers import UNet2DConditionModel
    from diffusers_oracle import write_diffusers_folder

    folder = tmp_path_factory.mktemp("sd1_diffusers")
    write_diffusers_folder(tiny_sd1_checkpoint, folder, v2=False)
    models = load_sd_models(tiny_sd1_checkpoint, v2=False)
    ours = optimizer_order(models.text_encoder, models.unet)
    theirs = ldm_order_in_transformer_blocks(
        optimizer_order(models.text_encoder, UNet2DConditionModel.from_pretrained(folder / "unet")))
    assert sorted(ours) == sorted(theirs) and ours != theirs
    return ours, theirs


def write_sd_scripts_state(ours_folder: Path, folder: Path, step: int, epoch: int, orders) -> None:
    """Our state folder at ``step``, rewritten in sd-scripts' layout: its optimizer.bin numbers the parameters in
    sd-scripts' order, its train_state.json has sd-scripts' keys."""
    ours, theirs = orders
    folder.mkdir()
    for name in ("model.safetensors", "scheduler.bin", "random_states_0.pkl"):
        shutil.copy(ours_folder / name, folder / name)
    saved = torch.load(ours_folder / "optimizer.bin", weights_only=True)
    index = {name: i for i, name in enumerate(ours)}
    state = {k: saved["state"][index[name]] for k, name in enumerate(theirs) if index[name] in saved["state"]}
    torch.save({"state": state, "param_groups": saved["param_groups"]}, folder / "optimizer.bin")
    (folder / "train_state.json").write_text(json.dumps({"current_epoch": epoch, "current_step": step}))


def test_resume_from_an_sd_scripts_state_continues_to_the_uninterrupted_weights(argv, tmp_path, orders):
    """Weights, step and optimizer state all taken: steps 3 and 4 land exactly where the uninterrupted run did."""
    train(*argv(*COMMON, output=tmp_path / "full"))
    sd_scripts = tmp_path / "sd_scripts_state"
    write_sd_scripts_state(tmp_path / "full" / "lora-step00000002-state", sd_scripts, step=2, epoch=1, orders=orders)
    assert read_resume_point(str(sd_scripts)).from_sd_scripts

    train(*argv(*COMMON, f"--resume={sd_scripts}", output=tmp_path / "resumed"))
    full, resumed = lora_tensors(tmp_path / "full" / "lora.safetensors"), lora_tensors(tmp_path / "resumed" / "lora.safetensors")
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    assert lora_metadata(tmp_path / "resumed" / "lora.safetensors")["ss_steps"] == "4"


def test_another_optimizer_type_starts_fresh_with_the_weights_and_step_taken(argv, tmp_path, orders, capsys):
    train(*argv(*COMMON, "--max_train_steps=2", output=tmp_path / "first"))
    sd_scripts = tmp_path / "sd_scripts_state"
    write_sd_scripts_state(tmp_path / "first" / "lora-state", sd_scripts, step=2, epoch=1, orders=orders)
    # The run is already at its last step: the file it writes holds exactly the weights it resumed with.
    train(*argv(*COMMON, "--max_train_steps=2", "--optimizer_type=SGDNesterov", f"--resume={sd_scripts}",
                output=tmp_path / "resumed"))
    warnings = [line for line in capsys.readouterr().err.splitlines() if "WARNING" in line and "starts fresh" in line]
    assert len(warnings) == 1 and "another optimizer" in warnings[0] and "momentum_buffer" in warnings[0]
    saved, resumed = load_file(str(sd_scripts / "model.safetensors")), lora_tensors(tmp_path / "resumed" / "lora.safetensors")
    assert saved.keys() == resumed.keys()
    for key in saved:
        assert torch.equal(saved[key], resumed[key]), key
    assert lora_metadata(tmp_path / "resumed" / "lora.safetensors")["ss_steps"] == "2"


def error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1
    return lines[0]


def test_a_state_of_another_rank_is_one_line_naming_the_tensor(argv, tmp_path, capsys):
    state = tmp_path / "state"
    state.mkdir()
    network = lora_tensors_of_rank(argv, tmp_path, rank=8)
    torch.save({}, state / "optimizer.bin")
    from safetensors.torch import save_file

    save_file(network, str(state / "model.safetensors"))
    (state / "train_state.json").write_text(json.dumps({"current_epoch": 1, "current_step": 1}))
    with pytest.raises(SystemExit):
        train(*argv("--max_train_steps=2", f"--resume={state}", output=tmp_path / "out"))
    error = error_line(capsys)
    assert error.startswith(f"error: --resume {state}: lora_") and "in the state but" in error
    assert "--network_dim" in error


def lora_tensors_of_rank(argv, tmp_path: Path, rank: int) -> dict[str, torch.Tensor]:
    """A LoRA of this model at another rank (one step of training, so every tensor exists)."""
    train(*argv("--max_train_steps=1", f"--network_dim={rank}", output=tmp_path / f"rank{rank}"))
    return lora_tensors(tmp_path / f"rank{rank}" / "lora.safetensors")


def test_an_sd_scripts_folder_without_its_train_state_says_how_to_start_from_it(argv, tmp_path, capsys):
    state = tmp_path / "old_state"
    state.mkdir()
    (state / "model.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit):
        train(*argv("--max_train_steps=2", f"--resume={state}", output=tmp_path / "out"))
    error = error_line(capsys)
    assert error.startswith(f"error: --resume {state}: no train_state.json, so the step it stopped at is unknown")
    assert f"--network_weights {state / 'model.safetensors'} --initial_step N" in error


# The block order of sd-scripts' full-size SD1 U-Net with conv LoRA, as its network module lists the parameters
# (read off sd-scripts' own networks/lora.py on its original_unet): diffusers' layout, the middle block last.
SD1_SD_SCRIPTS_BLOCKS = """
down_blocks_0_attentions_0 down_blocks_0_attentions_1 down_blocks_0_resnets_0 down_blocks_0_resnets_1
down_blocks_0_downsamplers_0 down_blocks_1_attentions_0 down_blocks_1_attentions_1 down_blocks_1_resnets_0
down_blocks_1_resnets_1 down_blocks_1_downsamplers_0 down_blocks_2_attentions_0 down_blocks_2_attentions_1
down_blocks_2_resnets_0 down_blocks_2_resnets_1 down_blocks_2_downsamplers_0 down_blocks_3_resnets_0
down_blocks_3_resnets_1 up_blocks_0_resnets_0 up_blocks_0_resnets_1 up_blocks_0_resnets_2 up_blocks_0_upsamplers_0
up_blocks_1_attentions_0 up_blocks_1_attentions_1 up_blocks_1_attentions_2 up_blocks_1_resnets_0 up_blocks_1_resnets_1
up_blocks_1_resnets_2 up_blocks_1_upsamplers_0 up_blocks_2_attentions_0 up_blocks_2_attentions_1
up_blocks_2_attentions_2 up_blocks_2_resnets_0 up_blocks_2_resnets_1 up_blocks_2_resnets_2 up_blocks_2_upsamplers_0
up_blocks_3_attentions_0 up_blocks_3_attentions_1 up_blocks_3_attentions_2 up_blocks_3_resnets_0 up_blocks_3_resnets_1
up_blocks_3_resnets_2 mid_block_attentions_0 mid_block_resnets_0 mid_block_resnets_1
""".split()
_BLOCK = re.compile(r"^lora_unet_((?:down|up)_blocks_\d+_[a-z]+_\d+|mid_block_[a-z]+_\d+)_")


def sd_scripts_order_of(text_encoder, denoiser, **network_args: str) -> list[str]:
    network = lora_network.create_network(1.0, 4, 1.0, None, text_encoder, denoiser, **network_args)
    network.apply_to(text_encoder, denoiser, text_encoder is not None, True)
    groups, _ = network.prepare_optimizer_params(None, None, 1e-4)
    names = {id(param): name for name, param in network.named_parameters()}
    return sd_scripts_param_order(network, {names[id(param)] for group in groups for param in group["params"]})


def test_full_size_sd1_order_is_sd_scripts_block_order():
    from library.models.sd_unet import SdUNet, SdUNetConfig

    with torch.device("meta"):
        unet = SdUNet(SdUNetConfig())  # SD1.5's U-Net
    order = sd_scripts_order_of(None, unet, conv_dim="4")
    assert [block for block, _ in itertools.groupby(_BLOCK.match(name).group(1) for name in order)] == SD1_SD_SCRIPTS_BLOCKS


def test_sdxl_text_encoders_are_one_part_in_sd_scripts_order():
    """sd-scripts' SDXL network gives both text encoders one group, so with LoRA+ every lora_down of both comes
    before their lora_up weights (ours: a group pair per encoder)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from library.fixtures.tiny_sdxl import tiny_sdxl_text_config, tiny_sdxl_unet_config
    from library.models.sd_unet import SdxlUNet

    with torch.device("meta"):
        encoders = [CLIPTextModel(tiny_sdxl_text_config("clip_l")),
                    CLIPTextModelWithProjection(tiny_sdxl_text_config("clip_g"))]
        unet = SdxlUNet(tiny_sdxl_unet_config())
    order = sd_scripts_order_of(encoders, unet, loraplus_lr_ratio="4")
    text = [name for name in order if name.startswith("lora_te")]
    kinds = [(name[:8], name.rsplit(".", 2)[1]) for name in text]  # ("lora_te1", "lora_down"), ...
    assert [kind for kind, _ in itertools.groupby(kinds)] == [
        ("lora_te1", "lora_down"), ("lora_te2", "lora_down"), ("lora_te1", "lora_up"), ("lora_te2", "lora_up")]
    assert order[:len(text)] == text  # the text encoders' part first, the U-Net's after


def test_sdxl_optimizer_state_with_one_text_encoder_group_loads_into_our_groups(tmp_path):
    """sd-scripts' SDXL optimizer.bin has one text-encoder group (with LoRA+: all lora_down of both encoders, then
    all their lora_up) where we have a pair per encoder: every parameter still gets its own moments, and our
    groups keep their learning rates."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from library.fixtures.tiny_sdxl import tiny_sdxl_text_config, tiny_sdxl_unet_config
    from library.models.sd_unet import SdxlUNet
    from library.optim import OptimizerConfig
    from library.resume import load_sd_scripts_optimizer

    with torch.device("meta"):
        encoders = [CLIPTextModel(tiny_sdxl_text_config("clip_l")),
                    CLIPTextModelWithProjection(tiny_sdxl_text_config("clip_g"))]
        unet = SdxlUNet(tiny_sdxl_unet_config())
    network = lora_network.create_network(1.0, 4, 1.0, None, encoders, unet, loraplus_lr_ratio="4")
    network.apply_to(encoders, unet, True, True)
    groups, descriptions = network.prepare_optimizer_params(None, None, 1e-3)
    assert descriptions == ["textencoder 1", "textencoder 1 plus", "textencoder 2", "textencoder 2 plus", "unet", "unet plus"]
    trained = torch.optim.AdamW(groups, lr=1e-3)
    for param in network.parameters():
        param.grad = torch.randn_like(param)
    trained.step()
    # sd-scripts' groups: [te1 + te2 lora_down], [te1 + te2 lora_up], [unet lora_down], [unet lora_up]
    sd_groups = [groups[0]["params"] + groups[2]["params"], groups[1]["params"] + groups[3]["params"],
                 groups[4]["params"], groups[5]["params"]]
    flat = [param for params in sd_groups for param in params]
    ours = trained.state_dict()["state"]
    our_index = {id(param): i for i, param in enumerate(p for group in groups for p in group["params"])}
    saved_groups, start = [], 0
    for params, lr in zip(sd_groups, (1e-3, 4e-3, 1e-3, 4e-3)):
        saved_groups.append(dict(trained.state_dict()["param_groups"][0], lr=lr, params=list(range(start, start + len(params)))))
        start += len(params)
    torch.save({"state": {k: ours[our_index[id(param)]] for k, param in enumerate(flat)}, "param_groups": saved_groups},
               tmp_path / "optimizer.bin")

    fresh = torch.optim.AdamW(network.prepare_optimizer_params(None, None, 1e-3)[0], lr=1e-3)
    assert load_sd_scripts_optimizer(tmp_path, fresh, network, OptimizerConfig("AdamW", 1e-3, (), 0.0)) == ""
    assert [group["lr"] for group in fresh.param_groups] == [1e-3, 4e-3, 1e-3, 4e-3, 1e-3, 4e-3]
    for param in network.parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(fresh.state[param][key], trained.state[param][key])
