"""`--network_module=networks.lora_sd3`, the module name sd-scripts' SD3 guides use.

Our one `networks.lora` already serves SD3 (the MMDiT and T5 layouts live in
`networks/lora_targets.py`, the SD3 --network_args in `networks/lora_config.py`), so this name only
points there: the same functions, hence the same files and metadata.
"""

from networks.lora import (
    LoRAModule,
    LoRANetwork,
    create_network,
    create_network_from_weights,
)

__all__ = ["LoRAModule", "LoRANetwork", "create_network", "create_network_from_weights"]
