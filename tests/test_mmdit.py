"""MMDiT (SD3 / SD3.5): numerics against diffusers for all three variants, checkpointing, config inference."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
from torch import nn

from library.models.mmdit import (
    SD3_MEDIUM,
    SD35_LARGE,
    SD35_MEDIUM,
    MMDiT,
    MMDiTConfig,
    crop_pos_embed,
    infer_mmdit_config,
)

PREFIX = "model.diffusion_model."

# Tiny versions of the released variants. SD3 Medium has no qk norm, so its checkpoints do not record the
# head width and inference assumes the released 64; the qk-norm variants use 32-wide heads, read from ln_q.
# Odd position grids and non-square latents exercise the centre crop's rounding.
TINY_SD3_MEDIUM = MMDiTConfig(
    depth=3, hidden_size=128, num_heads=2, adm_in_channels=24, context_in_dim=40, pos_embed_max_size=9
)
TINY_SD35_LARGE = MMDiTConfig(
    depth=2, hidden_size=96, num_heads=3, adm_in_channels=24, context_in_dim=40, pos_embed_max_size=8, qk_norm="rms"
)
TINY_SD35_MEDIUM = MMDiTConfig(
    depth=3,
    hidden_size=64,
    num_heads=2,
    adm_in_channels=24,
    context_in_dim=40,
    pos_embed_max_size=11,
    qk_norm="rms",
    x_block_self_attn_layers=(0, 1),
)
TINY_CONFIGS = {"sd3_medium": TINY_SD3_MEDIUM, "sd35_large": TINY_SD35_LARGE, "sd35_medium": TINY_SD35_MEDIUM}


def diffusers_config(config: MMDiTConfig) -> dict:
    """The SD3Transformer2DModel arguments that describe the same network as ``config``."""
    return {
        "sample_size": 16,  # only seeds diffusers' initial position table, which the checkpoint overwrites
        "patch_size": config.patch_size,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "num_layers": config.depth,
        "attention_head_dim": config.head_dim,
        "num_attention_heads": config.num_heads,
        "joint_attention_dim": config.context_in_dim,
        "caption_projection_dim": config.hidden_size,
        "pooled_projection_dim": config.adm_in_channels,
        "pos_embed_max_size": config.pos_embed_max_size,
        "dual_attention_layers": config.x_block_self_attn_layers,
        "qk_norm": "rms_norm" if config.qk_norm == "rms" else None,
    }


def randomize_(module: nn.Module, seed: int) -> None:
    """Seeded random weights and position table: the reference zero-initialises adaLN and output layers,
    which would hide wiring bugs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            noise = torch.randn(tensor.shape, generator=generator)
            if name == "pos_embed":
                tensor.copy_(noise)
            elif tensor.ndim > 1:
                tensor.copy_(noise / math.sqrt(tensor[0].numel()))
            else:
                tensor.copy_(noise * 0.1 + (1.0 if name.endswith("weight") else 0.0))


def prefixed(sd: dict) -> dict:
    return {PREFIX + key: value for key, value in sd.items()}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def make_inputs(config: MMDiTConfig, seed: int, height: int = 12, width: int = 8, batch: int = 2) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(batch, config.in_channels, height, width, generator=generator),
        "timesteps": torch.tensor([3.7, 870.2, 500.0])[:batch],  # sigma * 1000
        "context": torch.randn(batch, 7, config.context_in_dim, generator=generator),
        "y": torch.randn(batch, config.adm_in_channels, generator=generator),
    }


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def tiny_pair(request):
    """(config, our MMDiT, diffusers' SD3Transformer2DModel) holding the same random weights."""
    config = TINY_CONFIGS[request.param]
    ours = MMDiT(config).eval()
    randomize_(ours, seed=1)
    theirs = SD3Transformer2DModel(**diffusers_config(config)).eval()
    converted = convert_sd3_transformer_checkpoint_to_diffusers(prefixed(ours.state_dict()))
    theirs.load_state_dict(converted, strict=True)
    return config, ours, theirs


def test_forward_matches_diffusers(tiny_pair):
    config, ours, theirs = tiny_pair
    inputs = make_inputs(config, seed=2)
    with torch.no_grad():
        expected = theirs(
            hidden_states=inputs["x"],
            encoder_hidden_states=inputs["context"],
            pooled_projections=inputs["y"],
            timestep=inputs["timesteps"],
        ).sample
        actual = ours(**inputs)
    assert expected.std() > 0.1  # random weights everywhere: far from a trivial output
    assert relative_error(actual, expected) < 1e-4


def test_square_latent_at_full_grid_matches_diffusers(tiny_pair):
    """A latent as large as the position grid uses the whole table (no crop)."""
    config, ours, theirs = tiny_pair
    side = config.pos_embed_max_size * config.patch_size
    inputs = make_inputs(config, seed=3, height=side, width=side, batch=1)
    with torch.no_grad():
        expected = theirs(inputs["x"], inputs["context"], inputs["y"], inputs["timesteps"]).sample
        actual = ours(**inputs)
    assert relative_error(actual, expected) < 1e-4


def test_every_input_matters(tiny_pair):
    """Each conditioning input reaches the output (a dropped one would still match at one setting)."""
    config, ours, _ = tiny_pair
    inputs = make_inputs(config, seed=4)
    with torch.no_grad():
        base = ours(**inputs)
        for name in ("timesteps", "context", "y"):
            changed = dict(inputs, **{name: inputs[name] + 1.0})
            assert relative_error(ours(**changed), base) > 1e-3, name


def test_pos_embed_offset_selects_the_window():
    config = TINY_SD35_LARGE
    model = MMDiT(config).eval()
    randomize_(model, seed=5)
    inputs = make_inputs(config, seed=6, height=8, width=8, batch=1)  # 4x4 patches in an 8x8 grid
    with torch.no_grad():
        centred = model(**inputs)
        assert torch.equal(model(**inputs, pos_embed_offset=(2, 2)), centred)
        assert relative_error(model(**inputs, pos_embed_offset=(0, 4)), centred) > 1e-3
    with pytest.raises(ValueError, match="does not fit"):
        model(**inputs, pos_embed_offset=(5, 0))


def test_crop_pos_embed_is_the_reference_window():
    max_size, dim = 7, 3
    table = torch.arange(max_size * max_size * dim, dtype=torch.float32).view(1, max_size * max_size, dim)
    crop = crop_pos_embed(table, max_size, height=2, width=5)
    # Centred with the reference's floor: top = (7-2)//2 = 2, left = (7-5)//2 = 1; row-major positions.
    expected = [table[0, row * max_size + col] for row in (2, 3) for col in range(1, 6)]
    assert torch.equal(crop[0], torch.stack(expected))
    corner = crop_pos_embed(table, max_size, height=1, width=1, top=6, left=6)
    assert torch.equal(corner[0, 0], table[0, -1])


def test_bad_latent_sizes_are_rejected():
    model = MMDiT(TINY_SD35_LARGE)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(**make_inputs(TINY_SD35_LARGE, seed=0, height=9, width=8))
    with pytest.raises(ValueError, match="exceeds this model's position grid"):
        model(**make_inputs(TINY_SD35_LARGE, seed=0, height=18, width=8))


def test_dtype_follows_weights_and_input():
    model = MMDiT(TINY_SD35_MEDIUM).eval()
    randomize_(model, seed=7)
    inputs = make_inputs(TINY_SD35_MEDIUM, seed=8)
    with torch.no_grad():
        expected = model(**inputs)
        model.to(torch.bfloat16)
        assert model.pos_embed.dtype == torch.bfloat16
        actual = model(**inputs)
    assert actual.dtype == torch.float32
    assert relative_error(actual, expected) < 0.05


def _grads(model: MMDiT, inputs: dict) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(**inputs).square().mean().backward()
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}


@pytest.mark.parametrize("cpu_offload", [False, True], ids=["plain", "cpu_offload"])
def test_gradient_checkpointing_gives_identical_grads(cpu_offload):
    config = TINY_SD35_MEDIUM
    model = MMDiT(config).train()
    randomize_(model, seed=9)
    inputs = make_inputs(config, seed=10)
    expected = _grads(model, inputs)
    calls = []
    handles = [block.register_forward_pre_hook(lambda *_: calls.append(1)) for block in model.joint_blocks]
    model.set_gradient_checkpointing(True, cpu_offload=cpu_offload)
    actual = _grads(model, inputs)
    for handle in handles:
        handle.remove()
    assert len(calls) == 2 * config.depth  # every block ran again in backward: checkpointing was on
    # Only the last context block's query norm gets no gradient: its queries' outputs are never used.
    unused = {name for name, _ in model.named_parameters()} - expected.keys()
    assert unused == {f"joint_blocks.{config.depth - 1}.context_block.attn.ln_q.weight"}
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name
    assert all(grad.abs().sum() > 0 for grad in actual.values())


def test_checkpointing_is_off_outside_training():
    model = MMDiT(TINY_SD3_MEDIUM)
    model.set_gradient_checkpointing(True)
    calls = []
    model.joint_blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    inputs = make_inputs(TINY_SD3_MEDIUM, seed=11)
    model.eval()
    model(**inputs).sum().backward()
    model.train()
    with torch.no_grad():
        model(**inputs)
    assert len(calls) == 2  # once per forward, never recomputed


def test_cpu_offload_saves_each_block_input_through_save_on_cpu(monkeypatch):
    """With cpu_offload, exactly the checkpointed inputs of every block (x, context, c) pass through
    save_on_cpu's hooks; the saved tensors inside the blocks are not stored at all."""
    packed_shapes = []
    real_save_on_cpu = torch.autograd.graph.save_on_cpu

    class RecordingSaveOnCpu(real_save_on_cpu):
        def __init__(self, pin_memory: bool = False):
            super().__init__(pin_memory=pin_memory)
            pack = self.pack_hook

            def recording_pack(tensor):
                if tensor.numel():  # some torch versions also save an empty placeholder per checkpoint
                    packed_shapes.append(tuple(tensor.shape))
                return pack(tensor)

            self.pack_hook = recording_pack

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", RecordingSaveOnCpu)
    config = TINY_SD3_MEDIUM
    model = MMDiT(config).train()
    model.set_gradient_checkpointing(True, cpu_offload=True)
    inputs = make_inputs(config, seed=12)
    model(**inputs).sum().backward()
    batch, tokens, width = 2, (12 // 2) * (8 // 2), config.hidden_size
    per_block = sorted([(batch, tokens, width), (batch, 7, width), (batch, width)])
    assert sorted(packed_shapes) == sorted(per_block * config.depth)
    model.set_gradient_checkpointing(True, cpu_offload=False)
    packed_shapes.clear()
    model(**inputs).sum().backward()
    assert packed_shapes == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_offload_keeps_checkpointed_inputs_off_the_gpu():
    config = MMDiTConfig(depth=8, hidden_size=512, num_heads=8, pos_embed_max_size=64)
    model = MMDiT(config).cuda().train()
    inputs = {k: v.cuda() for k, v in make_inputs(config, seed=13, height=128, width=128).items()}
    held = {}
    for cpu_offload in (False, True):
        model.set_gradient_checkpointing(True, cpu_offload=cpu_offload)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        out = model(**inputs)
        held[cpu_offload] = torch.cuda.memory_allocated() - before
        out.sum().backward()
        del out
    # Each block input holds B x N x D floats of image tokens (N = 64 * 64 patches).
    image_tokens_bytes = 2 * 64 * 64 * config.hidden_size * 4
    assert held[False] - held[True] > 0.9 * (config.depth - 1) * image_tokens_bytes


@pytest.mark.parametrize(
    "config",
    [SD3_MEDIUM, SD35_LARGE, SD35_MEDIUM, *TINY_CONFIGS.values()],
    ids=["sd3m", "sd35l", "sd35m", *TINY_CONFIGS],
)
def test_infer_config_round_trip(config):
    with torch.device("meta"):
        sd = MMDiT(config).state_dict()
    assert infer_mmdit_config(sd) == config


def test_released_variants_facts():
    """The inferred facts the brief fixes for each released model, read off meta state dicts."""
    facts = {}
    for name, config in {"sd3m": SD3_MEDIUM, "sd35l": SD35_LARGE, "sd35m": SD35_MEDIUM}.items():
        with torch.device("meta"):
            sd = MMDiT(config).state_dict()
        inferred = infer_mmdit_config(sd)
        facts[name] = (inferred.depth, inferred.hidden_size, inferred.qk_norm, inferred.x_block_self_attn_layers)
        assert sd["pos_embed"].shape == (1, inferred.pos_embed_max_size**2, inferred.hidden_size)
    assert facts == {
        "sd3m": (24, 1536, None, ()),
        "sd35l": (38, 2432, "rms", ()),
        "sd35m": (24, 1536, "rms", tuple(range(13))),
    }
    assert (SD3_MEDIUM.pos_embed_max_size, SD35_LARGE.pos_embed_max_size, SD35_MEDIUM.pos_embed_max_size) == (
        192,
        192,
        384,
    )


@pytest.mark.parametrize("config", [SD3_MEDIUM, SD35_LARGE, SD35_MEDIUM], ids=["sd3m", "sd35l", "sd35m"])
def test_full_size_layout_matches_diffusers(config):
    """Every checkpoint key of the released sizes converts to exactly diffusers' parameters and shapes."""
    with torch.device("meta"):
        ours = MMDiT(config).state_dict()
        theirs = SD3Transformer2DModel(**diffusers_config(config)).state_dict()
    converted = convert_sd3_transformer_checkpoint_to_diffusers(prefixed(ours))
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


def test_layout_of_special_blocks():
    with torch.device("meta"):
        sd = MMDiT(TINY_SD35_MEDIUM).state_dict()
    dim, last = TINY_SD35_MEDIUM.hidden_size, TINY_SD35_MEDIUM.depth - 1
    assert sd[f"joint_blocks.{last}.context_block.adaLN_modulation.1.weight"].shape == (2 * dim, dim)
    assert not any(k.startswith(f"joint_blocks.{last}.context_block.mlp.") for k in sd)
    assert f"joint_blocks.{last}.context_block.attn.proj.weight" not in sd
    assert sd["joint_blocks.0.x_block.adaLN_modulation.1.weight"].shape == (9 * dim, dim)
    assert sd[f"joint_blocks.{last}.x_block.adaLN_modulation.1.weight"].shape == (6 * dim, dim)
    assert sd["joint_blocks.1.x_block.attn2.ln_q.weight"].shape == (TINY_SD35_MEDIUM.head_dim,)
    assert f"joint_blocks.{last}.x_block.attn2.qkv.weight" not in sd


def test_infer_config_rejects_other_state_dicts():
    with torch.device("meta"):
        sd = MMDiT(TINY_SD3_MEDIUM).state_dict()
    with pytest.raises(ValueError, match="model.diffusion_model."):
        infer_mmdit_config(prefixed(sd))
    gap = {k: v for k, v in sd.items() if not k.startswith("joint_blocks.1.")}
    with pytest.raises(ValueError, match="not 0..N-1"):
        infer_mmdit_config(gap)
    with pytest.raises(ValueError, match="not a square grid"):
        infer_mmdit_config(dict(sd, pos_embed=torch.empty(1, 80, 128, device="meta")))


def test_config_validation():
    with pytest.raises(ValueError, match="heads"):
        MMDiTConfig(hidden_size=100, num_heads=3)
    with pytest.raises(ValueError, match="qk_norm"):
        MMDiTConfig(qk_norm="ln")
    with pytest.raises(ValueError, match="outside"):
        dataclasses.replace(TINY_SD35_MEDIUM, x_block_self_attn_layers=(3,))
