"""Peak GPU memory of a LoRA training step, estimated from model sizes and flags: arithmetic only, no GPU.

    peak allocated = frozen weights on the GPU + LoRA weights + their gradients + optimizer states
                     + max(activations, VAE encoding) + workspace

which is what ``torch.cuda.max_memory_allocated`` reports; the GPU (nvidia-smi) shows that plus the CUDA context
and the caching allocator's reserve, printed separately. Each term:

- frozen weights: parameters x bytes of the dtype they are kept in (the --mixed_precision dtype; with --fp8_base
  the weights it stores in fp8 at 1 byte: the joint blocks' Linear weights on SD3, every U-Net Linear and Conv2d
  weight on SD1/SD2/SDXL, the text encoders' Linear weights). With --blocks_to_swap the swapped blocks leave the GPU
  and two slots of the largest swapped block stream them back (library/offload.py). The VAE stays on the GPU
  unless latents are cached (previews and --highvram keep it); text encoders unless their outputs are cached
  (T5-XXL where --t5xxl_device puts it).
- LoRA weights, gradients: trainable parameters x 4 bytes (2 with --full_fp16/--full_bf16), plus autocast's
  half-precision copies of fp32 LoRA weights during the forward pass.
- optimizer states: bytes per trainable parameter of each optimizer (`OPTIMIZER_STATE_PARAMS`: AdamW keeps two
  states in the parameter dtype, AdamW8bit two bytes, Lion one state, Prodigy four, Adafactor factored rows and
  columns ...).
- activations: an analytic model of what autograd keeps, per architecture: for every layer, tokens x channels x
  the number of tensors that layer saves (`*_UNITS`), x bytes per element (2 under fp16/bf16, 4 in fp32), x batch.
  Without gradient checkpointing every block's tensors are alive at the end of the forward pass; with it only the
  block inputs and outputs are (in CPU memory with --cpu_offload_checkpointing) plus the largest block being
  recomputed, times `BACKWARD_WORKING_SET` for the gradients alive while it runs backward.
- workspace: cuBLAS/cuDNN workspaces, the batch and the loss (`WORKSPACE_BYTES`).

The unit counts come from counting saved tensors per layer type, then checked against peaks measured on an H100
(bench/RESULTS.md: SD1.5 512² bf16 with and without checkpointing at batch 1 and 16, SD2.1 768² batch 4) and
sd-scripts' figures for SD3.5 Large/Medium and SDXL at 1024²; tests/test_memory_estimate.py states the errors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from library.models.mmdit import MMDiTConfig
from library.models.sd_unet import SdUNetConfig
from library.offload import swapped_block_indices

GIB = 1024**3
LATENT_DOWNSCALE = 8

# Tensors saved per token and channel (in elements of the compute dtype; fp32 norm outputs under autocast count twice).
RES_IN_UNITS = 5  # ResBlock, on its input channels: GroupNorm (fp32 out), SiLU, the cast for conv1
RES_OUT_UNITS = 7  # ResBlock, on its output channels: conv1 out + time embedding, GroupNorm, SiLU, cast, conv2, sum
UNET_TRANSFORMER_UNITS = 39  # three LayerNorms, self- and cross-attention (q, k, v, out), GEGLU feed-forward (8x, 4x, 4x)
MMDIT_BLOCK_UNITS = 28  # per stream token: adaLN LayerNorms + modulation, qkv, qk-norm, attention, proj, MLP 4x twice, gates
MMDIT_ATTN2_UNITS = 8  # SD3.5 Medium's extra self-attention of the image stream
TEXT_ENCODER_UNITS = 30  # one CLIP/T5 layer: norms, q/k/v/out, MLP
BACKWARD_WORKING_SET = 1.25  # a recomputed block's activations plus the gradients alive while it runs backward
VAE_ENCODE_UNITS = 3  # no-grad VAE encoding peaks at about three 128-channel full-resolution tensors
WORKSPACE_BYTES = int(0.06 * GIB)
CUDA_CONTEXT_BYTES = int(0.5 * GIB)
ALLOCATOR_RESERVE = 0.10  # the caching allocator holds about this share more than it hands out (fragmentation)

# Optimizer states, in parameters-worth of the trainable dtype ("param") or in bytes per parameter ("byte").
OPTIMIZER_STATE_PARAMS: dict[str, tuple[float, str]] = {
    "adamw": (2, "param"), "pagedadamw": (2, "fp32"), "pagedadamw32bit": (2, "fp32"),
    "adamw8bit": (2, "byte"), "pagedadamw8bit": (2, "byte"),
    "lion": (1, "param"), "lion8bit": (1, "byte"), "pagedlion8bit": (1, "byte"),
    "sgdnesterov": (1, "param"), "sgdnesterov8bit": (1, "byte"),
    "prodigy": (4, "param"),
    "dadaptation": (3, "param"), "dadaptadampreprint": (3, "param"), "dadaptadam": (3, "param"),
    "dadaptadagrad": (3, "param"), "dadaptlion": (2, "param"), "dadaptsgd": (2, "param"),
    "dadaptadan": (5, "param"), "dadaptadanip": (5, "param"),
    "adamwschedulefree": (2, "param"), "radamschedulefree": (2, "param"), "sgdschedulefree": (1, "param"),
}


@dataclass(frozen=True)
class TextEncoderLoad:
    """One text encoder as the run uses it."""

    name: str
    params: int
    linear_params: int
    bytes_per_param: int  # the dtype it is kept in
    on_gpu: bool
    fp8: bool = False
    trained: bool = False
    lora_params: int = 0
    tokens: int = 77
    width: int = 0
    layers: int = 0


@dataclass(frozen=True)
class MemoryInputs:
    """Everything the estimate depends on; built by the dry run from the checkpoint header and the flags."""

    denoiser_config: SdUNetConfig | MMDiTConfig
    denoiser_params: int
    denoiser_lora_params: int
    batch_size: int
    resolution: tuple[int, int]  # (width, height) of the largest bucket
    mixed_precision: str = "bf16"
    full_precision_lora: bool = False  # --full_fp16 / --full_bf16
    optimizer: str = "AdamW"
    rank: int = 4
    gradient_checkpointing: bool = False
    cpu_offload_checkpointing: bool = False
    blocks_to_swap: int = 0
    block_params: tuple[int, ...] = ()
    block_linear_params: tuple[int, ...] = ()
    fp8_denoiser: bool = False
    denoiser_fp8_params: int = 0  # with fp8_denoiser: the parameters stored in fp8 (0: the blocks' Linear weights)
    context_tokens: int = 77  # MMDiT: CLIP + T5 tokens in the joint attention
    vae_params: int = 0
    vae_on_gpu: bool = False
    vae_bytes_per_param: int = 2
    latents_cached: bool = True
    text_encoders: tuple[TextEncoderLoad, ...] = ()


@dataclass(frozen=True)
class MemoryTerm:
    name: str
    bytes: int
    note: str = ""


@dataclass(frozen=True)
class MemoryEstimate:
    terms: tuple[MemoryTerm, ...]  # what adds up to the peak allocated
    peak_allocated: int
    cuda_context: int
    allocator_reserve: int

    @property
    def on_gpu(self) -> int:
        """About what nvidia-smi shows for the process."""
        return self.peak_allocated + self.cuda_context + self.allocator_reserve

    def term(self, name: str) -> int:
        return next(term.bytes for term in self.terms if term.name == name)


def element_bytes(mixed_precision: str) -> int:
    return 4 if mixed_precision == "no" else 2


def estimate_memory(inputs: MemoryInputs) -> MemoryEstimate:
    weight_bytes = element_bytes(inputs.mixed_precision)
    lora_bytes = weight_bytes if inputs.full_precision_lora else 4
    trainable = inputs.denoiser_lora_params + sum(te.lora_params for te in inputs.text_encoders if te.trained)
    denoiser, swap_note = _denoiser_weights(inputs, weight_bytes)
    texts = [te for te in inputs.text_encoders if te.on_gpu]
    text_weights = sum(_text_weights(te) for te in texts)
    vae = inputs.vae_params * inputs.vae_bytes_per_param if inputs.vae_on_gpu else 0
    autocast_copies = trainable * 2 if lora_bytes == 4 and inputs.mixed_precision != "no" else 0
    states, state_note = _optimizer_states(inputs.optimizer, trainable, lora_bytes, inputs.rank)
    activations, activation_note = denoiser_activations(inputs)
    text_activations = sum(_text_activations(te, inputs) for te in inputs.text_encoders if te.trained)
    encode = vae_encoding_bytes(inputs) if not inputs.latents_cached else 0
    terms = (
        MemoryTerm("denoiser weights", denoiser, swap_note),
        MemoryTerm("text encoder weights", text_weights, ", ".join(te.name for te in texts) or "outputs cached: off the GPU"),
        MemoryTerm("VAE weights", vae, "" if inputs.vae_on_gpu else "latents cached: off the GPU"),
        MemoryTerm("LoRA weights", trainable * lora_bytes + autocast_copies, f"{trainable:,} parameters"),
        MemoryTerm("LoRA gradients", trainable * lora_bytes),
        MemoryTerm("optimizer states", states, state_note),
        MemoryTerm("activations", activations + text_activations, activation_note),
        MemoryTerm("VAE encoding", encode, "per step, before the denoiser runs; only the larger of this and activations counts"
                   if encode else "latents cached"),
        MemoryTerm("workspace", WORKSPACE_BYTES, "cuBLAS/cuDNN workspaces, the batch, the loss"),
    )
    static = sum(term.bytes for term in terms if term.name not in ("activations", "VAE encoding"))
    peak = static + max(activations + text_activations, encode)
    return MemoryEstimate(terms, peak, CUDA_CONTEXT_BYTES, int(peak * ALLOCATOR_RESERVE))


def _denoiser_weights(inputs: MemoryInputs, weight_bytes: int) -> tuple[int, str]:
    blocks = inputs.block_params
    linear = inputs.block_linear_params or (0,) * len(blocks)
    fp8_saving = [lin * (weight_bytes - 1) if inputs.fp8_denoiser else 0 for lin in linear]
    block_bytes = [params * weight_bytes - saving for params, saving in zip(blocks, fp8_saving)]
    fp8_params = (inputs.denoiser_fp8_params or sum(linear)) if inputs.fp8_denoiser else 0
    total = inputs.denoiser_params * weight_bytes - fp8_params * (weight_bytes - 1)
    notes = [f"{fp8_params:,} weights in fp8"] if inputs.fp8_denoiser else []
    if inputs.blocks_to_swap and blocks:
        swapped = swapped_block_indices(len(blocks), inputs.blocks_to_swap)
        slots = 2 * max(block_bytes[index] for index in swapped)
        total -= sum(block_bytes[index] for index in swapped) - slots
        notes.append(f"{len(swapped)} of {len(blocks)} blocks in CPU memory, 2 streaming slots")
    return total, "; ".join(notes)


def _text_weights(te: TextEncoderLoad) -> int:
    saving = te.linear_params * (te.bytes_per_param - 1) if te.fp8 else 0
    return te.params * te.bytes_per_param - saving


def _optimizer_states(optimizer: str, trainable: int, lora_bytes: int, rank: int) -> tuple[int, str]:
    name = (optimizer or "AdamW").split(".")[-1].lower()
    if name == "adafactor":  # second moments factored into a row and a column vector per matrix
        return int(trainable * lora_bytes / max(rank, 1)), "factored second moments (rows + columns)"
    count, unit = OPTIMIZER_STATE_PARAMS.get(name, (2, "param"))
    per_param = {"param": lora_bytes, "fp32": 4, "byte": 1}[unit]
    note = f"{count:g} x {per_param} bytes per parameter"
    if name not in OPTIMIZER_STATE_PARAMS:
        note += f" (assumed AdamW-like for {optimizer})"
    return int(trainable * count * per_param), note


# ------------------------------------------------------------------------------------------ activations
@dataclass(frozen=True)
class Segment:
    """One checkpointed block: elements kept at its boundary, and element-units saved inside it."""

    kept: int
    inside: int


def denoiser_activations(inputs: MemoryInputs) -> tuple[int, str]:
    width, height = inputs.resolution
    latent_h, latent_w = math.ceil(height / LATENT_DOWNSCALE), math.ceil(width / LATENT_DOWNSCALE)
    config = inputs.denoiser_config
    if isinstance(config, MMDiTConfig):
        segments = mmdit_segments(config, latent_h, latent_w, inputs.context_tokens)
    else:
        segments = unet_segments(config, latent_h, latent_w)
    per_element = element_bytes(inputs.mixed_precision) * inputs.batch_size
    if not inputs.gradient_checkpointing:
        return sum(s.inside for s in segments) * per_element, "every block's activations kept for backward"
    kept = 0 if inputs.cpu_offload_checkpointing else sum(s.kept for s in segments)
    recompute = max(s.inside for s in segments) * BACKWARD_WORKING_SET
    where = "in CPU memory" if inputs.cpu_offload_checkpointing else "on the GPU"
    return int((kept + recompute) * per_element), f"checkpointing: block boundaries {where} + one block recomputed"


def unet_segments(config: SdUNetConfig, latent_h: int, latent_w: int) -> list[Segment]:
    """The input, middle and output blocks of an SD/SDXL U-Net at a latent size, as SdUNet builds them."""
    sizes = [(latent_h, latent_w)]
    for _ in config.channel_mult[1:]:
        h, w = sizes[-1]
        sizes.append((math.ceil(h / 2), math.ceil(w / 2)))
    tokens = [h * w for h, w in sizes]
    channels = [config.model_channels * mult for mult in config.channel_mult]
    depth = config.transformer_depth

    def block(level: int, c_in: int, c_out: int, transformers: int) -> Segment:
        n = tokens[level]
        inside = n * (RES_IN_UNITS * c_in + RES_OUT_UNITS * c_out + transformers * UNET_TRANSFORMER_UNITS * c_out)
        return Segment(kept=n * c_out, inside=inside)

    segments = [Segment(kept=tokens[0] * config.model_channels, inside=tokens[0] * config.model_channels)]
    skips, ch = [config.model_channels], config.model_channels
    last = len(channels) - 1
    for level, c in enumerate(channels):
        for _ in range(config.num_res_blocks):
            segments.append(block(level, ch, c, depth[level]))
            ch = c
            skips.append(ch)
        if level != last:
            segments.append(Segment(kept=tokens[level + 1] * ch, inside=tokens[level] * ch))
            skips.append(ch)
    middle = block(last, ch, ch, config.middle_transformer_depth)
    segments.append(Segment(middle.kept, middle.inside + tokens[last] * (RES_IN_UNITS + RES_OUT_UNITS) * ch))
    for level in reversed(range(len(channels))):
        c = channels[level]
        for index in range(config.num_res_blocks + 1):
            segment = block(level, ch + skips.pop(), c, depth[level])
            ch = c
            if level and index == config.num_res_blocks:  # the upsampling conv runs at the next level's size
                segment = Segment(tokens[level - 1] * c, segment.inside + tokens[level - 1] * c)
            segments.append(segment)
    return segments


def mmdit_segments(config: MMDiTConfig, latent_h: int, latent_w: int, context_tokens: int) -> list[Segment]:
    """The joint blocks of an MMDiT: image tokens (latent / patch) and context tokens, each at the hidden width."""
    image = math.ceil(latent_h / config.patch_size) * math.ceil(latent_w / config.patch_size)
    width = config.hidden_size
    segments = []
    for index in range(config.depth):
        inside = (image + context_tokens) * width * MMDIT_BLOCK_UNITS
        if index in config.x_block_self_attn_layers:
            inside += image * width * MMDIT_ATTN2_UNITS
        segments.append(Segment(kept=(image + context_tokens) * width, inside=inside))
    return segments


def _text_activations(te: TextEncoderLoad, inputs: MemoryInputs) -> int:
    per_layer = te.tokens * te.width * inputs.batch_size * element_bytes(inputs.mixed_precision)
    if inputs.gradient_checkpointing:
        return int(per_layer * (te.layers + TEXT_ENCODER_UNITS * BACKWARD_WORKING_SET))
    return per_layer * te.layers * TEXT_ENCODER_UNITS


def vae_encoding_bytes(inputs: MemoryInputs) -> int:
    """No-grad VAE encoding of a batch at the largest bucket (its first level works on 128 channels at full size)."""
    width, height = inputs.resolution
    return width * height * 128 * VAE_ENCODE_UNITS * inputs.vae_bytes_per_param * inputs.batch_size
