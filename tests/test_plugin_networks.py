"""Third-party --network_module (sd-scripts' plug-in contract), with LyCORIS (`lycoris.kohya`) as the plug-in.

LyCORIS finds layers by sd-scripts' class names and module paths. What it must adapt on each family is worked out
here without the view (networks/plugin_view.py), from independent facts: networks.lora's layouts (which name the
containers sd-scripts' models call Transformer2DModel / ResnetBlock2D / Downsample2D / Upsample2D, SingleDiTBlock,
CLIPAttention / CLIPMLP), LyCORIS' own preset lists, sd-scripts' module paths from the checkpoint key adapter, and
sd-scripts' SD3 embedder classes. Files are checked the way a loader reads them: each module name must name a
checkpoint weight (networks/lora_checkpoint_map.py), and its tensors must describe a change of that weight's shape.
"""

from __future__ import annotations

import functools
import importlib.abc
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable

import lycoris.kohya as lycoris_kohya
import pytest
import torch
from lycoris.config import FULL_UNET_MODULES, FULL_UNET_NAMES
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from train_helpers import base_argv, lora_tensors, make_dataset

import sd3_train_network
import sdxl_train_network
import train_network
from library.models.mmdit import MMDiT
from library.models.sd3_loading import load_sd3_models
from library.models.sd_loading import load_sd_models
from library.models.sd_unet_keys import ldm_to_diffusers_unet_key
from library.models.sdxl_loading import load_sdxl_models
from networks.lora_checkpoint_map import LoRACheckpointMap, map_checkpoint
from networks.lora_targets import find_target_layers, resolve_targets
from networks.plugin_view import network_models

ALGOS = {"locon": ("algo=locon",), "loha": ("algo=loha",), "lokr": ("algo=lokr",),
         "dora": ("algo=locon", "dora_wd=True")}
# sd-scripts' library/sd3_models.py: the classes of the MMDiT's parts outside the joint blocks.
SD3_SD_SCRIPTS_CLASSES = {"x_embedder": "PatchEmbed", "t_embedder": "TimestepEmbedding", "y_embedder": "Embedder",
                          "final_layer": "UnPatch"}


@dataclass(frozen=True)
class Family:
    script: ModuleType
    checkpoint: str  # fixture name
    tokenizers: str  # fixture name
    load: Callable[[Path], tuple[list[nn.Module], nn.Module]]  # text encoders (in lora_teN order), denoiser
    resume_algo: str | None  # the algorithm the save/resume run uses (None: no end-to-end run)


def _load_sd(v2: bool) -> Callable[[Path], tuple[list[nn.Module], nn.Module]]:
    def load(path: Path) -> tuple[list[nn.Module], nn.Module]:
        models = load_sd_models(path, v2=v2)
        return [models.text_encoder], models.unet
    return load


def _load_sdxl(path: Path) -> tuple[list[nn.Module], nn.Module]:
    models = load_sdxl_models(path)
    return [models.text_encoder_l, models.text_encoder_g], models.unet


def _load_sd3(path: Path) -> tuple[list[nn.Module], nn.Module]:
    models = load_sd3_models(path)
    return [models.text.clip_l, models.text.clip_g, models.text.t5xxl], models.mmdit


FAMILIES = {
    "sd1": Family(train_network, "tiny_sd1_checkpoint", "tokenizer_cache_dir", _load_sd(False), "loha"),
    "sd2": Family(train_network, "tiny_sd2_checkpoint", "tokenizer_cache_dir", _load_sd(True), None),
    "sdxl": Family(sdxl_train_network, "tiny_sdxl_checkpoint", "sdxl_tokenizer_cache_dir", _load_sdxl, "lokr"),
    "sd3": Family(sd3_train_network, "tiny_sd3_checkpoints", "sd3_tokenizer_cache_dir", _load_sd3, "dora"),
}


def _checkpoint(request, family: str) -> Path:
    value = request.getfixturevalue(FAMILIES[family].checkpoint)
    return value["sd3.5-medium"] if family == "sd3" else value  # the variant with qk norm and x_block.attn2


# ----------------------------------------------------------------------------- what LyCORIS must adapt
def _sd_scripts_paths(denoiser: nn.Module) -> set[str]:
    """The denoiser's module paths in sd-scripts' model: diffusers paths for SD1/2, ours for SDXL and SD3."""
    keys = [key for key in denoiser.state_dict() if key.endswith(".weight")]
    if type(denoiser).__name__ == "SdUNet":
        keys = [ldm_to_diffusers_unet_key(key, denoiser.config) for key in keys]
    return {key.rsplit(".", 1)[0] for key in keys}


def _sd_scripts_parameter_names(model: nn.Module) -> list[str]:
    """Our model's parameter names as sd-scripts' model of the family names them: its SD1/2 U-Net is diffusers-named,
    and transformers 4 (which sd-scripts uses) nests every CLIP text model under `text_model`."""
    names = [name for name, _ in model.named_parameters()]
    if type(model).__name__ == "SdUNet":
        return [ldm_to_diffusers_unet_key(name, model.config) for name in names]
    if type(model).__name__ == "CLIPTextModel" and not hasattr(model, "text_model"):
        return ["text_model." + name for name in names]
    return names


def expected_names(text_encoders: list[nn.Module | None], denoiser: nn.Module) -> tuple[set[str], list[set[str]]]:
    """LyCORIS' default preset ("full") on sd-scripts' model of this family: the denoiser's module names and each
    text encoder's."""
    targets = resolve_targets(text_encoders, denoiser)
    ours = find_target_layers(denoiser, targets.denoiser, "lora_unet", with_conv=True)
    denoiser_names = {layer.lora_name for layer in ours if not layer.opt_in}
    if isinstance(denoiser, MMDiT):
        adapted_roots = {root for root, cls in SD3_SD_SCRIPTS_CLASSES.items() if cls in FULL_UNET_MODULES}
        denoiser_names |= {layer.lora_name for layer in ours if layer.opt_in and layer.part in adapted_roots}
    by_name = set(FULL_UNET_NAMES) & _sd_scripts_paths(denoiser)  # SD1/2: conv_in, conv_out, time_embedding.*
    denoiser_names |= {"lora_unet_" + path.replace(".", "_") for path in by_name}
    encoder_names = []
    for number, (encoder, layout) in enumerate(zip(text_encoders, targets.text_encoders), start=1):
        prefix = "lora_te" + (str(number) if len(text_encoders) > 1 else "")
        # LyCORIS adapts CLIP's attention and MLP, as networks.lora does; no T5 class is in its lists.
        is_clip = layout is not None and "CLIPMLP" in layout.container_classes
        encoder_names.append({layer.lora_name for layer in find_target_layers(encoder, layout, prefix, with_conv=True)}
                             if is_clip else set())
    return denoiser_names, encoder_names


def _text_encoder_arg(encoders: list[nn.Module]):
    return encoders[0] if len(encoders) == 1 else encoders


def _module_names(tensors: dict[str, torch.Tensor]) -> set[str]:
    return {key.split(".")[0] for key in tensors}


def _delta(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The weight change one module of a LyCORIS file describes, flattened to (out, in * kernel), computed from
    the tensors alone as a loader (ComfyUI) does: LoCon up @ down, LoHa (w1a @ w1b) * (w2a @ w2b), LoKr w1 (x) w2."""
    t = {key: value.float() for key, value in tensors.items()}

    def product(name: str) -> torch.Tensor:
        return t[name] if name in t else t[name + "_a"] @ t[name + "_b"].flatten(1)

    if "lora_up.weight" in t:
        return t["lora_up.weight"].flatten(1) @ t["lora_down.weight"].flatten(1)
    if "hada_w1_a" in t:
        return (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
    return torch.kron(product("lokr_w1"), product("lokr_w2").flatten(1))


@functools.cache
def _checkpoint_map(checkpoint: Path) -> LoRACheckpointMap:
    with safe_open(str(checkpoint), framework="pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    return map_checkpoint(shapes, str(checkpoint))


@functools.cache
def _expected_for_checkpoint(family: str, checkpoint: Path) -> tuple[set[str], list[set[str]]]:
    return expected_names(*FAMILIES[family].load(checkpoint))


def assert_file_loads_on_checkpoint(lora: dict[str, torch.Tensor], checkpoint: Path) -> None:
    """Every module names a checkpoint weight (the map ComfyUI-style loaders follow) and describes a change of
    exactly that weight's shape; a DoRA scale has one value per output channel."""
    lora_map = _checkpoint_map(checkpoint)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in lora.items():
        name, _, leaf = key.partition(".")
        modules.setdefault(name, {})[leaf] = value
    assert not lora_map.unmatched(modules)
    for name, tensors in modules.items():
        shape = lora_map.slots[name].shape
        assert tuple(_delta(tensors).shape) == (shape[0], math.prod(shape[1:])), (name, shape)
        if "dora_scale" in tensors:
            assert tensors["dora_scale"].shape[0] == shape[0], name


# ----------------------------------------------------------------------------- the views, family by family
def _denoiser_inputs(denoiser: nn.Module) -> tuple:
    generator = torch.Generator().manual_seed(0)
    config = denoiser.config
    x = torch.randn(1, config.in_channels, 8, 8, generator=generator)
    timesteps = torch.tensor([500.0])
    if isinstance(denoiser, MMDiT):
        return (x, timesteps, torch.randn(1, 5, config.context_in_dim, generator=generator),
                torch.randn(1, config.adm_in_channels, generator=generator))
    y = torch.randn(1, config.adm_in_channels, generator=generator) if config.adm_in_channels else None
    return x, timesteps, torch.randn(1, 5, config.context_dim, generator=generator), y


def _outputs(text_encoders: list[nn.Module | None], denoiser: nn.Module) -> list[torch.Tensor]:
    ids = torch.tensor([[0, 5, 7, 9, 2]])
    encoded = [encoder(input_ids=ids).last_hidden_state for encoder in text_encoders if encoder is not None]
    return [*encoded, denoiser(*_denoiser_inputs(denoiser))]


# One algorithm per family (the view does not depend on it; the end-to-end runs take every one on SD1, SDXL, SD3).
@pytest.mark.parametrize(("family", "algo"), [("sd1", "locon"), ("sd2", "loha"), ("sdxl", "lokr"), ("sd3", "dora")])
def test_lycoris_adapts_what_sd_scripts_models_give_and_our_layers_run_it(family, algo, request, tmp_path):
    checkpoint = _checkpoint(request, family)
    text_encoders, denoiser = FAMILIES[family].load(checkpoint)
    before = [output.detach() for output in _outputs(text_encoders, denoiser)]
    seen = network_models(lycoris_kohya, _text_encoder_arg(text_encoders), denoiser)
    kwargs = dict(argument.split("=") for argument in ALGOS[algo])
    network = lycoris_kohya.create_network(1.0, 4, 2, None, seen.text_encoder, seen.denoiser, **kwargs)
    network.apply_to(seen.text_encoder, seen.denoiser, True, True)

    # The views hold exactly our parameters, under the names sd-scripts' models give them.
    seen_encoders = seen.text_encoder if isinstance(seen.text_encoder, list) else [seen.text_encoder]
    for model, view in [(denoiser, seen.denoiser), *zip(text_encoders, seen_encoders)]:
        assert {id(param) for param in view.parameters()} == {id(param) for param in model.parameters()}
        assert sorted(name for name, _ in view.named_parameters()) == sorted(_sd_scripts_parameter_names(model))

    want_denoiser, want_encoders = expected_names(text_encoders, denoiser)
    assert {lora.lora_name for lora in network.unet_loras} == want_denoiser
    got_encoders = {lora.lora_name for lora in network.text_encoder_loras}
    assert got_encoders == set().union(*want_encoders)

    # Non-zero LyCORIS weights change every output, and every adapted layer is run by our models' forward.
    with torch.no_grad():
        for param in network.parameters():
            param.add_(0.05 * torch.randn_like(param))
    after = _outputs(text_encoders, denoiser)
    adapted = [bool(names) for names, encoder in zip(want_encoders, text_encoders) if encoder is not None] + [True]
    for old, new, changes in zip(before, after, adapted):
        assert torch.allclose(old, new) != changes  # T5 has no LyCORIS module
    sum(output.float().square().mean() for output in after).backward()
    idle = [lora.lora_name for lora in network.loras if all(p.grad is None for p in lora.parameters())]
    assert not idle

    network.save_weights(str(tmp_path / "lora.safetensors"), torch.float32, {})
    saved = load_file(str(tmp_path / "lora.safetensors"))
    assert _module_names(saved) == want_denoiser | got_encoders
    assert_file_loads_on_checkpoint(saved, checkpoint)


# ----------------------------------------------------------------------------- end to end through the scripts
def _argv(family: str, request, tmp_path: Path, out: Path, algo: str, *extra: str) -> list[str]:
    argv = base_argv(_checkpoint(request, family), request.getfixturevalue(FAMILIES[family].tokenizers),
                     make_dataset(tmp_path / "data"), out, "--network_module=lycoris.kohya", "--network_args",
                     *ALGOS[algo], *extra)
    return [arg for arg in argv if arg != "--network_module=networks.lora"]


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd3"])
def test_lycoris_trains_each_family_and_resumes(family, algo, request, tmp_path):
    script, out = FAMILIES[family].script, tmp_path / "out"
    resumes = algo == FAMILIES[family].resume_algo
    # One --text_encoder_lr value reaches LyCORIS as a number (sd-scripts' rule for networks without per-encoder rates).
    script.main(_argv(family, request, tmp_path, out, algo, "--save_every_n_steps=1", "--text_encoder_lr=5e-4",
                      *(["--save_state"] if resumes else [])))
    first, final = lora_tensors(out / "lora-step00000001.safetensors"), lora_tensors(out / "lora.safetensors")

    want_denoiser, want_encoders = _expected_for_checkpoint(family, _checkpoint(request, family))
    assert _module_names(final) == want_denoiser | set().union(*want_encoders)
    assert any(not torch.equal(first[key], final[key]) for key in final if key.startswith("lora_unet_"))
    assert any(not torch.equal(first[key], final[key]) for key in final if key.startswith("lora_te"))
    assert_file_loads_on_checkpoint(final, _checkpoint(request, family))

    if resumes:  # from the state saved after step 1 to the same weights as the uninterrupted run
        resumed = tmp_path / "resumed"
        script.main(_argv(family, request, tmp_path, resumed, algo, "--text_encoder_lr=5e-4",
                          f"--resume={out / 'lora-step00000001-state'}"))
        again = lora_tensors(resumed / "lora.safetensors")
        assert again.keys() == final.keys()
        assert all(torch.equal(again[key], final[key]) for key in final)


# ----------------------------------------------------------------------------- bad input
class _NotInstalled(importlib.abc.MetaPathFinder):
    """Finds no package `name`, as Python does when it is not installed."""

    def __init__(self, name: str):
        self.name = name

    def find_spec(self, fullname: str, path, target=None):
        if fullname == self.name:
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return None


def _error_line(script: ModuleType, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as info:
        script.main(argv)
    assert info.value.code not in (0, None)
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize(("module", "words"), [
    ("lycoris.kohya", "the LyCORIS package is not installed; pip install lycoris-lora"),
    ("networks.dylora", "algo=dylora"),
    ("networks.oft", "algo=diag-oft"),
    ("networks.lora_fa", "LoRA-FA"),
    ("networks.loha", "algo=loha"),
    ("networks.lokr", "algo=lokr"),
    ("networks.no_such_network", "cannot be imported"),
    ("json", "has no create_network()"),
])
def test_unusable_network_module_is_one_line_before_any_model_loads(module, words, monkeypatch, no_model_loading,
                                                                    tiny_sd1_checkpoint, tokenizer_cache_dir, tmp_path,
                                                                    capsys):
    if module.startswith("lycoris"):  # as if the package were not installed
        for name in [name for name in sys.modules if name == "lycoris" or name.startswith("lycoris.")]:
            monkeypatch.delitem(sys.modules, name)
        monkeypatch.setattr(sys, "meta_path", [_NotInstalled("lycoris"), *sys.meta_path])
    argv = base_argv(tiny_sd1_checkpoint, tokenizer_cache_dir, make_dataset(tmp_path), tmp_path / "out",
                     f"--network_module={module}")
    line = _error_line(train_network, [arg for arg in argv if arg != "--network_module=networks.lora"], capsys)
    assert f"--network_module {module}" in line and words in line


@pytest.mark.parametrize(("extra", "words"), [
    (["--network_args", "algo=full"], "--network_args algo=full: LyCORIS' full fine-tuning"),
    # LyCORIS would add its change into the fp8 weights (it fails at the first step without bypass_mode)
    (["--fp8_base", "--mixed_precision=bf16", "--network_args", "algo=loha"], "need --network_args bypass_mode=True"),
])
def test_lycoris_settings_that_cannot_train_are_refused_before_any_model_loads(extra, words, no_model_loading,
                                                                               tiny_sd1_checkpoint, tokenizer_cache_dir,
                                                                               tmp_path, capsys):
    argv = base_argv(tiny_sd1_checkpoint, tokenizer_cache_dir, make_dataset(tmp_path), tmp_path / "out",
                     "--network_module=lycoris.kohya", *extra)
    line = _error_line(train_network, [arg for arg in argv if arg != "--network_module=networks.lora"], capsys)
    assert words in line


def test_a_network_that_adapts_nothing_of_the_denoiser_is_an_error(request, tmp_path, capsys):
    # LyCORIS' conv-block preset targets ResNet blocks: an MMDiT has none.
    line = _error_line(sd3_train_network, _argv("sd3", request, tmp_path, tmp_path / "out", "locon",
                                                "preset=unet-convblock-only"), capsys)
    assert "adapted no layer of the denoiser" in line
    assert not (tmp_path / "out" / "lora.safetensors").exists()
