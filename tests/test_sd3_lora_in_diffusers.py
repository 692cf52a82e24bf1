"""What docs/using_loras.md says of diffusers and SD3 LoRA files, pinned: diffusers' SD3 loader finds no
transformer keys in a file in sd-scripts' format and leaves the model unchanged (so SD3 users merge instead).
If diffusers learns the format, this test fails and the guide must change."""

from __future__ import annotations

import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
from test_mmdit import TINY_SD35_MEDIUM, diffusers_config, make_inputs, prefixed, randomize_

from library.models.mmdit import MMDiT
from networks.lora import create_network


def test_diffusers_reads_no_key_of_an_sd_scripts_sd3_lora(tmp_path):
    config = TINY_SD35_MEDIUM
    ours = MMDiT(config)
    randomize_(ours, seed=1)
    theirs = SD3Transformer2DModel(**diffusers_config(config)).eval()
    theirs.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers(prefixed(ours.state_dict())), strict=True)
    network = create_network(1.0, 4, 4.0, None, None, ours)
    randomize_(network, seed=2)  # a LoRA that changes every layer it targets
    path = tmp_path / "sd3_lora.safetensors"
    network.save_weights(str(path), torch.float32, {})

    inputs = make_inputs(config, seed=3)

    def run() -> torch.Tensor:
        with torch.no_grad():
            return theirs(hidden_states=inputs["x"], encoder_hidden_states=inputs["context"],
                          pooled_projections=inputs["y"], timestep=inputs["timesteps"]).sample

    before = run()
    state_dict = StableDiffusion3Pipeline.lora_state_dict(str(path))
    StableDiffusion3Pipeline.load_lora_into_transformer(state_dict, transformer=theirs)
    assert all(key.startswith("lora_unet_") for key in state_dict)  # passed on unconverted
    assert not getattr(theirs, "peft_config", None)  # no adapter was made
    assert torch.equal(run(), before)  # the base model, unchanged
