"""Block-wise learning rates (--network_args down_lr_weight / mid_lr_weight / up_lr_weight / block_lr_zero_threshold):
the per-block weights sd-scripts computes, the optimizer groups they give, the blocks they drop, and the errors."""

from __future__ import annotations

import math

import pytest
import torch
from train_helpers import base_argv, lora_tensors, make_dataset, scalars
from transformers import CLIPTextConfig, CLIPTextModel

import library.trainer
import sd3_train_network
import sdxl_train_network
import train_network
from library.models.sd_unet import SDXL_UNET_CONFIG, SdUNet, SdUNetConfig, SdxlUNet
from networks.lora import create_network, create_network_from_weights
from networks.lora_block_lr import parse_block_lr_weights
from networks.lora_config import NetworkArgsError
from networks.lora_targets import SD_UNET_TARGETS, SDXL_UNET_TARGETS

UNET_LR, TE_LR = 1e-4, 5e-5


def _sd_models():
    with torch.device("meta"):
        return CLIPTextModel(CLIPTextConfig()), SdUNet(SdUNetConfig())


def _sdxl_unet():
    with torch.device("meta"):
        return SdxlUNet(SDXL_UNET_CONFIG)


def _groups(network, text_encoder_lr=TE_LR, unet_lr=UNET_LR, default_lr=1e-3):
    """(description, lr, names of the modules whose weights the group holds, which weights) per group."""
    owner = {id(param): (lora.lora_name, name.split(".")[0]) for lora in network.text_encoder_loras + network.unet_loras
             for name, param in lora.named_parameters()}
    params, descriptions = network.prepare_optimizer_params(text_encoder_lr, unet_lr, default_lr)
    return [(description, group.get("lr"), {owner[id(p)][0] for p in group["params"]}, {owner[id(p)][1] for p in group["params"]})
            for description, group in zip(descriptions, params)]


def _lrs(groups) -> dict[str, float]:
    return {description: lr for description, lr, _, _ in groups}


# ----------------------------------------------------------------------------- the weights
DOWN = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1]
UP = [1.5, 1.4, 1.3, 1.2, 1.1, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4]


def _csv(values) -> str:
    return ",".join(str(v) for v in values)


def test_explicit_weights_give_each_sd_block_its_share_of_the_unet_lr():
    text_encoder, unet = _sd_models()
    network = create_network(1.0, 4, 1.0, None, text_encoder, unet, down_lr_weight=_csv(DOWN), mid_lr_weight="2.5",
                             up_lr_weight=_csv(UP))
    groups = _groups(network)
    # Attention blocks of SD1.5 (no conv_dim): IN01 IN02 IN04 IN05 IN07 IN08, MID, OUT03..OUT11 (ids 16..24).
    expected = {"textencoder": TE_LR}
    expected.update({f"unet_block{b}": UNET_LR * DOWN[b] for b in (1, 2, 4, 5, 7, 8)})
    expected["unet_block12"] = UNET_LR * 2.5
    expected.update({f"unet_block{b}": UNET_LR * UP[b - 13] for b in range(16, 25)})
    assert _lrs(groups) == pytest.approx(expected)
    members = {description: names for description, _, names, _ in groups}
    # down_blocks.1.attentions.1 is IN05 (1 + 3*1 + 1); up_blocks.1.attentions.0 is OUT03 (id 16); the mid block is 12.
    assert members["unet_block5"] == {lora.lora_name for lora in network.unet_loras
                                      if lora.lora_name.startswith("lora_unet_down_blocks_1_attentions_1_")}
    assert members["unet_block16"] == {lora.lora_name for lora in network.unet_loras
                                       if lora.lora_name.startswith("lora_unet_up_blocks_1_attentions_0_")}
    assert all(name.startswith("lora_unet_mid_block_") for name in members["unet_block12"])
    assert set().union(*(names for d, _, names, _ in groups if d != "textencoder")) == {l.lora_name for l in network.unet_loras}


def _sine(i, n):
    return math.sin(math.pi / 2 * i / (n - 1))


def _cosine(i, n):
    return math.cos(math.pi / 2 * i / (n - 1))


@pytest.mark.parametrize("preset, curve, offset", [
    ("sine", _sine, 0.0), ("cosine", _cosine, 0.0), ("linear", lambda i, n: i / (n - 1), 0.0),
    ("reverse_linear", lambda i, n: 1 - i / (n - 1), 0.0), ("zeros", lambda i, n: 0.0, 0.0),
    ("cosine+.25", _cosine, 0.25), ("zeros+0.5", lambda i, n: 0.0, 0.5), ("linear+1", lambda i, n: i / (n - 1), 1.0),
])
@pytest.mark.parametrize("layout, down_ids, up_ids", [
    (SD_UNET_TARGETS, range(0, 12), range(13, 25)), (SDXL_UNET_TARGETS, range(1, 10), range(13, 22)),
])
def test_presets_draw_sd_scripts_curves_over_the_down_and_up_blocks(preset, curve, offset, layout, down_ids, up_ids):
    weights = parse_block_lr_weights({"down_lr_weight": preset, "up_lr_weight": preset}, layout).weights
    n = len(down_ids)
    expected = [curve(i, n) + offset for i in range(n)]
    expected = [w if w > 1e-12 else 0.0 for w in expected]  # cos(pi/2) is 6e-17 in floats; the curve reaches 0
    assert [weights[b] for b in down_ids] == pytest.approx(expected, abs=1e-12)
    assert [weights[b] for b in up_ids] == pytest.approx(expected, abs=1e-12)
    others = [w for b, w in enumerate(weights) if b not in down_ids and b not in up_ids]
    assert others == [1.0] * (len(weights) - 2 * n)  # mid (not given) and SDXL's BASE / OUT


def test_sdxl_takes_9_down_3_mid_9_up_weights_and_keeps_base_and_out_at_1():
    down, mid, up = [0.1 * i for i in range(1, 10)], [0.5, 0.0, 2.0], [1.0 + 0.1 * i for i in range(9)]
    weights = parse_block_lr_weights({"down_lr_weight": _csv(down), "mid_lr_weight": _csv(mid),
                                      "up_lr_weight": _csv(up)}, SDXL_UNET_TARGETS).weights
    assert list(weights) == pytest.approx([1.0, *down, *mid, *up, 1.0])

    network = create_network(1.0, 4, 1.0, None, None, _sdxl_unet(), mid_lr_weight=_csv(mid), conv_dim="4")
    names = {lora.lora_name for lora in network.unet_loras}
    # middle_block.1 is the mid transformer (MID01, weight 0): no LoRA; its ResNets MID00 / MID02 train at 0.5x / 2x.
    assert not any(name.startswith("lora_unet_middle_block_1_") for name in names)
    assert any(name.startswith("lora_unet_middle_block_0_") for name in names)
    lrs = _lrs(_groups(network))
    assert (lrs["unet_block10"], lrs["unet_block12"]) == pytest.approx((UNET_LR * 0.5, UNET_LR * 2.0))
    assert "unet_block11" not in lrs
    assert lrs["unet_block5"] == lrs["unet_block21"] == UNET_LR  # down / up lists not given: weight 1


def test_weights_at_or_below_the_threshold_drop_their_blocks_lora():
    text_encoder, unet = _sd_models()
    # linear: IN i weighs i/11; reverse_linear: OUT j weighs (11-j)/11. With threshold 0.5, IN00..IN05 and
    # OUT06..OUT11 go; an explicit 0.5 at the threshold goes too (sd-scripts keeps only weights above it).
    network = create_network(1.0, 4, 1.0, None, text_encoder, unet, conv_dim="2", block_lr_zero_threshold="0.5",
                             down_lr_weight="linear", mid_lr_weight="0.5", up_lr_weight="reverse_linear")
    names = {lora.lora_name for lora in network.unet_loras}
    for gone in ("down_blocks_0_", "down_blocks_1_attentions_", "down_blocks_1_resnets_", "mid_block_", "up_blocks_2_",
                 "up_blocks_3_"):
        assert not any(name.startswith("lora_unet_" + gone) for name in names), gone
    for kept in ("down_blocks_1_downsamplers_0_", "down_blocks_2_attentions_0_", "down_blocks_2_resnets_1_", "down_blocks_3_resnets_0_",
                 "up_blocks_0_resnets_0_", "up_blocks_1_attentions_2_", "up_blocks_1_upsamplers_0_"):
        assert any(name.startswith("lora_unet_" + kept) for name in names), kept
    assert {lora.lora_dim for lora in network.unet_loras if lora.lora_down.weight.dim() == 2} == {4}
    assert len(network.text_encoder_loras) == 72  # text encoders have no blocks

    # cosine reaches exactly 0 at the deepest down block: IN11 (down_blocks.3.resnets.1) loses its LoRA at threshold 0.
    network = create_network(1.0, 4, 1.0, None, text_encoder, unet, conv_dim="2", down_lr_weight="cosine")
    names = {lora.lora_name for lora in network.unet_loras}
    assert not any(name.startswith("lora_unet_down_blocks_3_resnets_1_") for name in names)
    assert any(name.startswith("lora_unet_down_blocks_3_resnets_0_") for name in names)


def test_with_dim_from_weights_zero_weight_blocks_keep_their_modules_frozen(tmp_path):
    torch.manual_seed(0)
    config = SdUNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                          context_dim=32, norm_groups=8)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                                num_attention_heads=4, max_position_embeddings=16))
    unet = SdUNet(config)
    path = tmp_path / "lora.safetensors"
    create_network(1.0, 4, 1.0, None, text_encoder, unet).save_weights(str(path), None, None)
    network, _ = create_network_from_weights(1.0, str(path), None, text_encoder, unet, down_lr_weight="zeros",
                                             up_lr_weight=_csv(UP))
    down_modules = {l.lora_name for l in network.unet_loras if l.lora_name.startswith("lora_unet_down_blocks_")}
    assert down_modules  # the file's modules are all built ...
    groups = _groups(network)
    trained = set().union(*(names for _, _, names, _ in groups))
    assert not down_modules & trained  # ... but the down blocks (weight 0) are in no optimizer group
    # Tiny U-Net: up_blocks.0 attentions are OUT00/OUT01 (ids 13, 14), up_blocks.1 attentions OUT03/OUT04 (16, 17).
    assert _lrs(groups) == pytest.approx({"textencoder": TE_LR, "unet_block12": UNET_LR, "unet_block13": UNET_LR * UP[0],
                                          "unet_block14": UNET_LR * UP[1], "unet_block16": UNET_LR * UP[3],
                                          "unet_block17": UNET_LR * UP[4]})


def test_loraplus_splits_each_block_and_text_encoder_rates_stay_their_own():
    text_encoder, unet = _sd_models()
    network = create_network(1.0, 4, 1.0, None, text_encoder, unet, down_lr_weight=_csv(DOWN), mid_lr_weight="3",
                             loraplus_unet_lr_ratio="4", loraplus_text_encoder_lr_ratio="2")
    groups = _groups(network)
    expected = [("textencoder", TE_LR), ("textencoder plus", TE_LR * 2)]
    for block, weight in [(1, DOWN[1]), (2, DOWN[2]), (4, DOWN[4]), (5, DOWN[5]), (7, DOWN[7]), (8, DOWN[8]), (12, 3.0),
                          *((b, 1.0) for b in range(16, 25))]:
        expected += [(f"unet_block{block}", UNET_LR * weight), (f"unet_block{block} plus", UNET_LR * weight * 4)]
    assert [d for d, *_ in groups] == [d for d, _ in expected]
    assert [lr for _, lr, *_ in groups] == pytest.approx([lr for _, lr in expected])
    by_name = {d: (names, weights) for d, _, names, weights in groups}
    assert by_name["unet_block5"][1] == {"lora_down"} and by_name["unet_block5 plus"][1] == {"lora_up"}
    assert by_name["unet_block5"][0] == by_name["unet_block5 plus"][0]

    # No --unet_lr: the blocks scale --learning_rate (the default); no rate at all cannot be scaled.
    assert _lrs(_groups(network, unet_lr=None, default_lr=2e-4))["unet_block12"] == pytest.approx(2e-4 * 3)
    plain = create_network(1.0, 4, 1.0, None, text_encoder, unet, mid_lr_weight="3")
    with pytest.raises(NetworkArgsError, match="block-wise learning rates.*--learning_rate or --unet_lr"):
        plain.prepare_optimizer_params(None, None, None)


def test_a_threshold_alone_changes_nothing_and_says_so(caplog):
    text_encoder, unet = _sd_models()
    plain = create_network(1.0, 4, 1.0, None, text_encoder, unet)
    network = create_network(1.0, 4, 1.0, None, text_encoder, unet, block_lr_zero_threshold="0.5")
    assert [d for d, *_ in _groups(network)] == ["textencoder", "unet"]
    assert len(network.unet_loras) == len(plain.unet_loras)
    assert "block_lr_zero_threshold has no effect" in caplog.text


@pytest.mark.parametrize("unet, kwargs, message", [
    ("sd", {"down_lr_weight": "1,1,1"}, r"--network_args down_lr_weight=1,1,1: expected 12 comma-separated weights "
                                         r"\(IN00..IN11\), got 3"),
    ("sd", {"up_lr_weight": _csv([1] * 13)}, r"up_lr_weight=.*expected 12 .*\(OUT00..OUT11\), got 13"),
    ("sd", {"mid_lr_weight": "1,2"}, r"mid_lr_weight=1,2: expected 1 weight \(MID\), got 2"),
    ("sd", {"down_lr_weight": "cosin"}, r"down_lr_weight=cosin: unknown preset 'cosin'; expected .*sine, cosine, linear, "
                                        r"reverse_linear, zeros"),
    ("sd", {"down_lr_weight": "0.5"}, r"down_lr_weight=0.5: expected 12 comma-separated weights"),
    ("sd", {"up_lr_weight": "sine+x"}, r"up_lr_weight=sine\+x: the offset after '\+' must be a number"),
    ("sd", {"mid_lr_weight": "sine"}, r"mid_lr_weight=sine: expected comma-separated numbers"),
    ("sd", {"down_lr_weight": "sine", "block_lr_zero_threshold": "high"}, r"block_lr_zero_threshold='high'"),
    ("sdxl", {"mid_lr_weight": "0.5"}, r"mid_lr_weight=0.5: expected 3 comma-separated weights \(MID00..MID02\), got 1"),
    ("sdxl", {"down_lr_weight": _csv(DOWN)}, r"down_lr_weight=.*expected 9 comma-separated weights \(IN00..IN08\), got 12"),
])
def test_bad_weights_are_errors_naming_the_arg(unet, kwargs, message):
    model = _sd_models()[1] if unet == "sd" else _sdxl_unet()
    with pytest.raises(NetworkArgsError, match=message):
        create_network(1.0, 4, 1.0, None, None, model, **kwargs)


# ----------------------------------------------------------------------------- through the entry scripts
def _error_line(capsys, main, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code not in (0, None)
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_cli_errors_are_one_line_naming_the_arg(tiny_sd1_checkpoint, tokenizer_cache_dir, tiny_sd3_checkpoints,
                                                sd3_tokenizer_cache_dir, tmp_path, capsys, no_model_loading):
    dataset = make_dataset(tmp_path / "data")
    argv = base_argv(tiny_sd1_checkpoint, tokenizer_cache_dir, dataset, tmp_path / "out", "--dry_run",
                     "--network_args", "down_lr_weight=cosin")
    assert "--network_args down_lr_weight=cosin: unknown preset 'cosin'" in _error_line(capsys, train_network.main, argv)
    # sd-scripts' SD3 LoRA has no block-wise learning rates: asking for them is refused, not ignored.
    argv = base_argv(tiny_sd3_checkpoints["sd3.5-medium"], sd3_tokenizer_cache_dir, dataset, tmp_path / "out", "--dry_run",
                     "--network_args", "up_lr_weight=sine")
    line = _error_line(capsys, sd3_train_network.main, argv)
    assert "--network_args up_lr_weight: block-wise learning rates exist for the SD1/SD2 and SDXL U-Nets only" in line


def test_dry_run_lists_the_block_groups(tiny_sdxl_checkpoint, sdxl_tokenizer_cache_dir, tmp_path, capsys, monkeypatch,
                                        no_model_loading):
    plans = []
    original = library.trainer.format_dry_run
    monkeypatch.setattr(library.trainer, "format_dry_run", lambda plan: plans.append(plan) or original(plan))
    dataset = make_dataset(tmp_path / "data")
    sdxl_train_network.main(base_argv(tiny_sdxl_checkpoint, sdxl_tokenizer_cache_dir, dataset, tmp_path / "out",
                                      "--dry_run", "--network_train_unet_only", "--unet_lr=2e-4", "--network_args",
                                      "mid_lr_weight=0.5,0,2", "up_lr_weight=reverse_linear"))
    out = capsys.readouterr().out
    # Tiny SDXL U-Net: transformers in input_blocks 3 and 5 (IN03, IN05: ids 4, 6), the middle block (MID01,
    # weight 0: dropped) and output_blocks 0-3 (OUT00..OUT03, ids 13..16).
    up = [1 - j / 8 for j in range(9)]
    expected = {"unet_block4": 2e-4, "unet_block6": 2e-4} | {f"unet_block{13 + j}": 2e-4 * up[j] for j in range(4)}
    assert {group.description: group.lr for group in plans[-1].lr_groups} == pytest.approx(expected)
    assert "  unet_block15 (OUT02, weight 0.75): 0.00015\n" in out
    assert "  unet_block4 (IN03, weight 1): 0.0002\n" in out
    assert "unet_block11" not in out


def test_block_rates_reach_the_logs_and_dropped_blocks_the_file(tiny_sd1_checkpoint, tokenizer_cache_dir, tmp_path):
    dataset, logs, out = make_dataset(tmp_path / "data"), tmp_path / "logs", tmp_path / "out"
    # Tiny SD1 U-Net: attention blocks IN01, IN04 (down), MID, OUT00, OUT01, OUT03, OUT04 (ids 13, 14, 16, 17).
    down = [1.0] * 4 + [0.0] + [1.0] * 7  # IN04 off
    train_network.main(base_argv(tiny_sd1_checkpoint, tokenizer_cache_dir, dataset, out, "--max_train_steps=1",
                                 f"--logging_dir={logs}", "--unet_lr=2e-3", "--network_args", f"down_lr_weight={_csv(down)}",
                                 "mid_lr_weight=0.25", "up_lr_weight=cosine"))
    assert scalars(logs, "lr/unet_block12") == [pytest.approx(2e-3 * 0.25)]
    assert scalars(logs, "lr/unet_block16") == [pytest.approx(2e-3 * math.cos(math.pi / 2 * 3 / 11))]
    assert scalars(logs, "lr/unet_block1") == [pytest.approx(2e-3)]
    assert scalars(logs, "lr/textencoder") == [pytest.approx(1e-3)]
    assert scalars(logs, "lr/unet_block4") == [] and scalars(logs, "lr/unet") == []
    keys = lora_tensors(out / "lora.safetensors")
    assert any(key.startswith("lora_unet_down_blocks_0_attentions_0_") for key in keys)
    assert not any(key.startswith("lora_unet_down_blocks_1_attentions_0_") for key in keys)  # IN04
