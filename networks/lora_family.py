"""Which model family a LoRA file is for, from its metadata or, failing that, its module names.

sd-scripts' files say it in `modelspec.architecture` ("stable-diffusion-xl-v1-base/lora") and
`ss_base_model_version` ("sdxl_base_v1-0"); files without metadata still name their modules after the model
they adapt (`lora_unet_input_blocks_*` is an SGM U-Net, that is SDXL). The labels are the ones the LoRA tools and
trainers print ("SDXL", "SD1.x/SD2.x", ...).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

SDXL_OR_SD3 = "SDXL or SD3"

# Module-name prefixes -> family, first match wins: the denoiser's names decide before the text encoders'.
_NAME_FAMILIES = (
    (("lora_unet_joint_blocks_", "lora_te3_"), "SD3/SD3.5"),
    (("lora_unet_double_blocks_", "lora_unet_single_blocks_"), "FLUX.1"),
    (("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"), "SDXL"),
    (("lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_", "lora_te_"), "SD1.x/SD2.x"),
    (("lora_te1_", "lora_te2_"), SDXL_OR_SD3),
)

# Metadata value prefixes -> family, for modelspec.architecture and ss_base_model_version.
_ARCHITECTURE_FAMILIES = (
    ("stable-diffusion-xl", "SDXL"), ("stable-diffusion-v1", "SD1.x"), ("stable-diffusion-v2", "SD2.x"),
    ("stable-diffusion-3", "SD3/SD3.5"), ("flux-1", "FLUX.1"),
)
_BASE_VERSION_FAMILIES = (
    ("sdxl", "SDXL"), ("sd_v1", "SD1.x"), ("sd_v2", "SD2.x"), ("medium", "SD3/SD3.5"), ("5-", "SD3/SD3.5"),
    ("flux", "FLUX.1"),
)


def guess_lora_family(names: Iterable[str]) -> str | None:
    """The family a LoRA's module names suggest ("SDXL", "SD1.x/SD2.x", ...), or None for foreign names."""
    names = list(names)
    for prefixes, family in _NAME_FAMILIES:
        if any(name.startswith(prefixes) for name in names):
            return family
    return None


def lora_families_differ(first: str | None, second: str | None) -> bool:
    """Whether two family labels rule each other out. "SDXL or SD3" (text-encoder modules only) agrees with
    either, "SD1.x/SD2.x" (the names are the same) with SD1.x and SD2.x; an unknown label (None) rules out nothing."""
    if first is None or second is None:
        return False
    open_guesses = {SDXL_OR_SD3: {"SDXL", "SD3/SD3.5"}, "SD1.x/SD2.x": {"SD1.x", "SD2.x"}}
    return not open_guesses.get(first, {first}) & open_guesses.get(second, {second})


def lora_file_family(metadata: Mapping[str, str], names: Iterable[str]) -> tuple[str, str] | None:
    """(family, what says so) for a LoRA file: its modelspec.architecture (an unknown one as it is spelt), its
    ss_base_model_version, or its module names; None when none of them tells."""
    architecture = metadata.get("modelspec.architecture", "")
    if architecture:
        family = next((family for prefix, family in _ARCHITECTURE_FAMILIES if architecture.startswith(prefix)), None)
        return family or architecture.removesuffix("/lora"), f"modelspec.architecture {architecture}"
    version = metadata.get("ss_base_model_version", "")
    family = next((family for prefix, family in _BASE_VERSION_FAMILIES if version.startswith(prefix)), None) if version else None
    if family is not None:
        return family, f"ss_base_model_version {version}"
    family = guess_lora_family(names)
    return (family, "its module names") if family is not None else None
