"""Flag values the LoRA tools share: precision names and devices, read the same way by every tool."""

from __future__ import annotations

import torch

# sd-scripts' spellings for --save_precision / --precision / --load_precision.
PRECISIONS = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_device(name: str | None, flag: str = "--device") -> str:
    """A device flag as given ("cpu" when left out), refused in one line when torch does not know it or lacks it."""
    if name is None:
        return "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"{flag} {name!r}: not a torch device ({error})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{flag} {name}: CUDA is not available here; leave {flag} out to use the CPU")
    return name
