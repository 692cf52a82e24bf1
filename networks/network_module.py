"""`--network_module`: which modules train here, checked before any model loads, and the calls of sd-scripts'
contract that depend on the module.

Ours is `networks.lora` (`networks.lora_sd3` is the name sd-scripts' SD3 guides use for it). Any other importable
module that follows sd-scripts' plug-in contract (a `create_network(multiplier, network_dim, network_alpha, vae,
text_encoder, unet, **kwargs)`; LyCORIS's `lycoris.kohya` above all) trains on views of our models shaped like
sd-scripts' (networks/plugin_view.py). sd-scripts' other network modules are not shipped, and a few plug-in
settings cannot train here: naming one is an error that says why and what to use instead.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from networks.lora import LoRANetwork

DEFAULT_NETWORK_MODULE = "networks.lora"

_LYCORIS = "pip install lycoris-lora, then --network_module lycoris.kohya"
NOT_SHIPPED: dict[str, str] = {
    "networks.dylora": f"DyLoRA is not implemented here; LyCORIS trains it: {_LYCORIS} --network_args algo=dylora",
    "networks.oft": "sd-scripts' OFT is not implemented here; LyCORIS' diagonal OFT is the nearest (its own file "
                    f"format): {_LYCORIS} --network_args algo=diag-oft",
    "networks.lora_fa": "LoRA-FA (a frozen random down projection) is not implemented here and LyCORIS has no "
                        "counterpart; train a plain LoRA with networks.lora",
    "networks.loha": f"LoHa is trained here through LyCORIS: {_LYCORIS} --network_args algo=loha",
    "networks.lokr": f"LoKr is trained here through LyCORIS: {_LYCORIS} --network_args algo=lokr",
}


# (module, --network_args key, value) -> why that setting cannot train here.
REFUSED_SETTINGS: dict[tuple[str, str, str], str] = {
    ("lycoris.kohya", "algo", "full"): "LyCORIS' full fine-tuning removes each adapted layer's own weight, and our "
                                       "U-Net and MMDiT read their compute dtype from such a layer; use algo=locon, "
                                       "loha, lokr or ia3",
}


class NetworkModuleError(ValueError):
    """A --network_module that cannot train here."""


def load_network_module(name: str | None) -> ModuleType:
    """The module `--network_module name` names (networks.lora when unset), or a one-line error saying why not."""
    name = name or DEFAULT_NETWORK_MODULE
    if name in NOT_SHIPPED:
        raise NetworkModuleError(f"--network_module {name}: {NOT_SHIPPED[name]}")
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name == "lycoris":
            raise NetworkModuleError(f"--network_module {name}: the LyCORIS package is not installed; "
                                     "pip install lycoris-lora") from None
        raise NetworkModuleError(f"--network_module {name}: cannot be imported ({error})") from None
    except Exception as error:  # the plug-in's own import failed: show its reason, on one line
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise NetworkModuleError(
            f"--network_module {name}: importing it failed ({type(error).__name__}: {reason})") from None
    if not callable(getattr(module, "create_network", None)):
        raise NetworkModuleError(f"--network_module {name} has no create_network(); a network module defines "
                                 "create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, "
                                 "**kwargs)")
    return module


def check_network_args(name: str | None, network_args: dict[str, str], *, fp8_base: bool) -> None:
    """A --network_args setting of a plug-in that is known not to train here: a one-line error, before models load."""
    for key, value in network_args.items():
        reason = REFUSED_SETTINGS.get((name or DEFAULT_NETWORK_MODULE, key, value.lower()))
        if reason:
            raise NetworkModuleError(f"--network_module {name} --network_args {key}={value}: {reason}")
    bypass = network_args.get("bypass_mode", "false").lower() != "false"  # LyCORIS reads any other value as on
    if fp8_base and name == "lycoris.kohya" and not bypass:
        # Without it LyCORIS adds its change into the stored fp8 weight, which fp8 arithmetic cannot do.
        raise NetworkModuleError("--fp8_base / --fp8_base_unet with --network_module lycoris.kohya need "
                                 "--network_args bypass_mode=True")


def check_adapted(network: Any, name: str | None, *, train_denoiser: bool, train_text_encoder: bool) -> None:
    """A part that is to be trained but holds no module of the network would silently not train: an error.
    Reads sd-scripts' `unet_loras` / `text_encoder_loras` lists (a network without them is not checked)."""
    name = name or DEFAULT_NETWORK_MODULE
    denoiser_modules = getattr(network, "unet_loras", None)
    if train_denoiser and denoiser_modules is not None and not denoiser_modules:
        raise NetworkModuleError(f"--network_module {name} adapted no layer of the denoiser (U-Net/MMDiT); check "
                                 "--network_args (a LyCORIS preset that targets nothing of this model?)")
    encoder_modules = getattr(network, "text_encoder_loras", None)
    if train_text_encoder and encoder_modules is not None and not encoder_modules:
        raise NetworkModuleError(f"--network_module {name} adapted no layer of the text encoder(s), which train in "
                                 "this run; add --network_train_unet_only to train the denoiser alone")


def optimizer_params(network: Any, text_encoder_lr: float | Sequence[float] | None, unet_lr: float | None,
                     learning_rate: float | None) -> tuple[list, list[str]]:
    """`network.prepare_optimizer_params(...)` as sd-scripts calls it: a network without per-encoder rates
    (`prepare_optimizer_params_with_multiple_te_lrs`; LyCORIS) gets the first --text_encoder_lr value, ours the
    whole list (a config file may give one number). Returns the parameter groups and a name per group for the
    learning-rate logs."""
    if isinstance(text_encoder_lr, (int, float)):
        text_encoder_lr = [text_encoder_lr]
    rates = list(text_encoder_lr) if text_encoder_lr else None
    if hasattr(network, "prepare_optimizer_params_with_multiple_te_lrs"):
        result = network.prepare_optimizer_params_with_multiple_te_lrs(rates, unet_lr, learning_rate)
    elif isinstance(network, LoRANetwork):
        result = network.prepare_optimizer_params(rates, unet_lr, learning_rate)
    else:
        result = network.prepare_optimizer_params(rates[0] if rates else None, unet_lr, learning_rate)
    params, names = result if isinstance(result, tuple) else (result, None)
    return params, list(names) if names else [f"group{index}" for index in range(len(params))]
