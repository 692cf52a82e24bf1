"""Block swapping: the pure schedule, the mechanics on a CPU stand-in device, the flag errors, and
(on a GPU) loss/gradient equality and the memory it saves."""

from __future__ import annotations

import copy
import gc
import itertools
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from library.fp8 import store_linear_weights_in_fp8
from library.models.mmdit import MMDiT, MMDiTConfig
from library.offload import (BlockSwapError, BlockSwapper, Phase, Use, block_uses, check_block_swap_flags,
                             move_except_blocks, swap_schedule, swapped_block_indices, transition, wanted_on_device)
from networks.lora import LoRAModule

F_, B_ = Phase.FORWARD, Phase.BACKWARD

# ---------------------------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("n, k, expected", [(6, 3, (1, 3, 5)), (4, 3, (0, 2, 3)), (24, 1, (12,)), (5, 0, ()),
                                            (38, 19, tuple(range(1, 38, 2))), (10, 4, (1, 3, 6, 8))])
def test_swapped_blocks_are_spread_evenly(n, k, expected):
    assert swapped_block_indices(n, k) == expected


def test_swapped_blocks_for_every_size_are_distinct_and_evenly_spaced():
    for n in range(1, 41):
        for k in range(1, n):
            swapped = swapped_block_indices(n, k)
            assert len(set(swapped)) == k and list(swapped) == sorted(swapped) and 0 <= swapped[0] and swapped[-1] < n
            gaps = [b - a for a, b in itertools.pairwise(swapped)]
            assert not gaps or max(gaps) - min(gaps) <= 1, (n, k, swapped)


def test_uses_run_forward_in_order_then_backward_in_reverse():
    assert block_uses(3, backward=True) == (Use(F_, 0), Use(F_, 1), Use(F_, 2), Use(B_, 2), Use(B_, 1), Use(B_, 0))
    assert block_uses(3, backward=False) == (Use(F_, 0), Use(F_, 1), Use(F_, 2))


def test_wanted_blocks_are_the_next_swapped_ones_in_need_order_across_the_turnaround():
    uses = block_uses(6, backward=True)
    swapped = (1, 3, 5)
    assert wanted_on_device(uses, uses.index(Use(F_, 1)), swapped, 2) == (1, 3)
    assert wanted_on_device(uses, uses.index(Use(F_, 4)), swapped, 2) == (5, 3)  # 5 twice in a row, then 3
    assert wanted_on_device(uses, uses.index(Use(B_, 2)), swapped, 2) == (1, 3)  # wraps to the next step
    assert wanted_on_device(uses, uses.index(Use(F_, 2)), swapped, 3) == (3, 5, 1)
    assert wanted_on_device(uses, 0, (), 2) == ()


def test_transition_drops_what_is_not_wanted_and_fetches_in_need_order():
    assert transition({1, 3}, (3, 5)) == ((1,), (5,))
    assert transition({5, 3}, (1, 7)) == ((3, 5), (1, 7))
    assert transition({2}, (2,)) == ((), ())


def test_schedule_of_a_small_model_step_by_step():
    # Worked by hand: 6 blocks, 3 swapped (1, 3, 5), 2 slots. Block 3 stays on the device over the
    # forward/backward turnaround; only 5 (forward) and 1 (backward) are copied each step.
    steps = swap_schedule(6, 3, slots=2)
    table = [(s.use, s.evict, s.fetch, s.on_device) for s in steps]
    expected = [
        (Use(F_, 0), (), (), {1, 3}), (Use(F_, 1), (), (), {1, 3}), (Use(F_, 2), (1,), (5,), {3, 5}),
        (Use(F_, 3), (), (), {3, 5}), (Use(F_, 4), (), (), {3, 5}), (Use(F_, 5), (), (), {3, 5}),
        (Use(B_, 5), (), (), {3, 5}), (Use(B_, 4), (5,), (1,), {1, 3}), (Use(B_, 3), (), (), {1, 3}),
        (Use(B_, 2), (), (), {1, 3}), (Use(B_, 1), (), (), {1, 3}), (Use(B_, 0), (), (), {1, 3}),
    ]
    assert table == expected


@pytest.mark.parametrize("backward", [True, False])
def test_schedule_invariants_for_many_sizes(backward):
    for n in (2, 3, 7, 24, 38):
        for k in sorted({1, n // 2, n - 1}):
            for slots in (1, 2, 3):
                steps = swap_schedule(n, k, backward=backward, slots=slots)
                swapped = set(swapped_block_indices(n, k))
                swapped_uses = [i for i, s in enumerate(steps) if s.use.block in swapped]
                for i, step in enumerate(steps):
                    assert len(step.on_device) <= slots
                    assert not set(step.evict) & set(step.fetch)
                    if step.use.block in swapped:
                        assert step.use.block in step.on_device and step.use.block not in step.evict
                previous = steps[-1].on_device  # a step ends where the next begins
                for step in steps:
                    assert step.on_device == (previous - set(step.evict)) | set(step.fetch)
                    previous = step.on_device
                if slots >= 2:  # prefetch: at each swapped use the next swapped use's block is already there
                    for a, b in zip(swapped_uses, swapped_uses[1:] + swapped_uses[:1]):
                        assert steps[b].use.block in steps[a].on_device, (n, k, slots, steps[a].use)


def test_each_swapped_block_is_copied_at_most_twice_per_training_step():
    for n, k in ((24, 12), (38, 19), (38, 36)):
        steps = swap_schedule(n, k, slots=2)
        fetched = [b for s in steps for b in s.fetch]
        assert all(fetched.count(b) <= 2 for b in set(fetched))
        assert len(fetched) >= 2 * k - 2 * 2  # only blocks held over the turnarounds escape a copy


# ---------------------------------------------------------------------------------------------- errors


def test_flag_conflicts_name_the_flag():
    ok = {"gradient_checkpointing": True, "cpu_offload_checkpointing": False, "cuda_available": True}
    check_block_swap_flags(None, 24, **ok)
    check_block_swap_flags(0, 24, **{**ok, "cuda_available": False})
    check_block_swap_flags(23, 24, **ok)
    cases = [
        ((24, 24), ok, "--blocks_to_swap 24: .*24 blocks.*at most 23"),
        ((-1, 24), ok, "--blocks_to_swap must be 0 or more"),
        ((8, 24), {**ok, "cpu_offload_checkpointing": True}, "--cpu_offload_checkpointing"),
        ((8, 24), {**ok, "cuda_available": False}, "--blocks_to_swap needs a CUDA GPU"),
        ((8, 24), {**ok, "gradient_checkpointing": False}, "--blocks_to_swap needs --gradient_checkpointing"),
        ((8, 24), {**ok, "torch_compile": True}, "--blocks_to_swap cannot be combined with --torch_compile"),
    ]
    for (count, blocks), flags, message in cases:
        with pytest.raises(BlockSwapError, match=message):
            check_block_swap_flags(count, blocks, **flags)


def test_swapper_refuses_too_many_blocks_and_a_missing_gpu():
    blocks = nn.ModuleList(nn.Linear(2, 2) for _ in range(3))
    with pytest.raises(BlockSwapError, match="--blocks_to_swap 3: the model has 3 blocks"):
        BlockSwapper(blocks, 3, "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(BlockSwapError, match="needs a CUDA GPU"):
            BlockSwapper(blocks, 1, "cuda")
    with pytest.raises(BlockSwapError, match="not meta"):
        BlockSwapper(blocks, 1, "meta")


def test_move_except_blocks_leaves_the_blocks_alone():
    model = _tiny_mmdit()
    move_except_blocks(model, model.joint_blocks, "meta")
    assert model.x_embedder.proj.weight.is_meta and model.pos_embed.is_meta and model.final_layer.linear.weight.is_meta
    assert not any(p.is_meta for p in model.joint_blocks.parameters())


# ---------------------------------------------------------------------------------------------- mechanics (CPU)

TINY = MMDiTConfig(depth=6, hidden_size=64, num_heads=2, adm_in_channels=24, context_in_dim=40, pos_embed_max_size=8,
                   in_channels=4, out_channels=4, qk_norm="rms", x_block_self_attn_layers=(0, 1))


def _tiny_mmdit(config: MMDiTConfig = TINY, seed: int = 0) -> MMDiT:
    torch.manual_seed(seed)
    model = MMDiT(config)
    with torch.no_grad():
        model.pos_embed.normal_(std=0.1)
    model.requires_grad_(False)
    return model


def _add_lora(model: MMDiT, rank: int = 2, seed: int = 1) -> list[LoRAModule]:
    """A LoRA on every Linear of the joint blocks, with non-zero up weights so every LoRA weight gets a gradient."""
    torch.manual_seed(seed)
    loras = []
    for name, module in model.joint_blocks.named_modules():
        if isinstance(module, nn.Linear):
            lora = LoRAModule("lora_" + name.replace(".", "_"), module, lora_dim=rank)
            nn.init.normal_(lora.lora_up.weight, std=0.1)
            lora.apply_to()
            loras.append(lora)
    return loras


def _inputs(config: MMDiTConfig, seed: int = 2, size: int = 8, tokens: int = 5) -> tuple:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, config.in_channels, size, size, generator=g)
    t = torch.rand(2, generator=g) * 1000
    context = torch.randn(2, tokens, config.context_in_dim, generator=g)
    y = torch.randn(2, config.adm_in_channels, generator=g)
    return x, t, context, y


def _trainable(model: MMDiT, loras: list[LoRAModule]) -> list[nn.Parameter]:
    return [p for lora in loras for p in lora.parameters()] + [p for p in model.parameters() if p.requires_grad]


def _train_steps(model: MMDiT, loras: list[LoRAModule], steps: int = 2) -> list[torch.Tensor]:
    """Training steps with an SGD update between them and a no-grad (sampling) pass in the middle;
    returns every loss, output and gradient along the way."""
    params = _trainable(model, loras)
    record = []
    for step in range(steps):
        inputs = _inputs(model.config, seed=step)
        out = model(*inputs)
        loss = out.square().mean()
        loss.backward()
        record += [loss.detach(), out.detach()] + [p.grad.clone() for p in params]
        with torch.no_grad():
            for p in params:
                p -= 0.1 * p.grad
                p.grad = None
            record.append(model(*_inputs(model.config, seed=10 + step)))
    return record


def _twin_models(trainable_ln_q: bool = True):
    reference = _tiny_mmdit()
    if trainable_ln_q:  # a trainable parameter inside a swapped block (block 1 is swapped for 3 of 6)
        reference.joint_blocks[1].x_block.attn.ln_q.weight.requires_grad_(True)
    swapped = copy.deepcopy(reference)
    ref_loras, swap_loras = _add_lora(reference), _add_lora(swapped)
    for model in (reference, swapped):
        model.set_gradient_checkpointing(True)
        model.train()
    return reference, ref_loras, swapped, swap_loras


def _pointer_in(tensor: torch.Tensor, buffers) -> bool:
    start = tensor.data_ptr()
    return any(b.data_ptr() <= start < b.data_ptr() + b.numel() for b in buffers)


@pytest.mark.parametrize("blocks_to_swap, prefetch", [(3, 1), (5, 0), (2, 2)])
def test_swapped_training_equals_unswapped_training(blocks_to_swap, prefetch):
    reference, ref_loras, model, loras = _twin_models()
    swapper = BlockSwapper(model.joint_blocks, blocks_to_swap, "cpu", prefetch=prefetch)
    swapper.prepare()
    swapper.install()
    expected = _train_steps(reference, ref_loras)
    got = _train_steps(model, loras)
    assert len(got) == len(expected)
    for ours, theirs in zip(got, expected):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_blocks_are_on_the_device_when_used_and_follow_the_schedule():
    _, _, model, loras = _twin_models()
    swapper = BlockSwapper(model.joint_blocks, 3, "cpu")
    swapper.prepare()
    swapper.install()
    trainable = {id(p): p.data_ptr() for p in _trainable(model, loras)}
    host_before = {i: b.clone() for i, b in swapper.host_buffers.items()}
    seen = []

    def probe(index: int) -> None:
        frozen = [p for p in model.joint_blocks[index].parameters() if not p.requires_grad]
        where = "device" if all(_pointer_in(p, swapper.device_buffers) for p in frozen) else \
            "host" if all(_pointer_in(p, swapper.host_buffers.values()) for p in frozen) else "own"
        on_device = swapper.blocks_on_device()
        for other in set(swapper.swapped) - on_device:  # dropped copies point back at their host master
            assert all(_pointer_in(p, [swapper.host_buffers[other]]) for p in model.joint_blocks[other].parameters()
                       if not p.requires_grad)
        seen.append((index, on_device, where))

    for i, block in enumerate(model.joint_blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: probe(i))  # runs after the swapper's own hook
    _train_steps(model, loras, steps=1)

    # The forward, then the checkpoint recomputations inside the backward (blocks 5..0), then a no-grad pass.
    uses = block_uses(6, backward=True)
    assert [index for index, _, _ in seen] == [use.block for use in uses] + list(range(6))
    schedule = {step.use: step.on_device for step in swap_schedule(6, 3, slots=2)}
    for use, (_, on_device, where) in zip(uses, seen):
        assert on_device == schedule[use], use
        assert where == ("device" if use.block in swapper.swapped else "own"), use
    assert [where for _, _, where in seen[12:]] == ["device" if i in swapper.swapped else "own" for i in range(6)]
    # Trainable parameters never moved; the pinned-memory masters were never written.
    assert {id(p): p.data_ptr() for p in _trainable(model, loras)} == trainable
    for i, buffer in swapper.host_buffers.items():
        assert torch.equal(buffer, host_before[i])


def test_frozen_weights_leave_the_host_copy_only_through_slots():
    reference = _tiny_mmdit()
    model = copy.deepcopy(reference)
    swapper = BlockSwapper(model.joint_blocks, 3, "cpu")
    swapper.prepare()
    for i in swapper.swapped:
        if i not in swapper.blocks_on_device():
            for (name, p), q in zip(model.joint_blocks[i].named_parameters(), reference.joint_blocks[i].parameters()):
                assert _pointer_in(p, [swapper.host_buffers[i]]) and torch.equal(p, q), name
    # the slot pool holds the largest swapped block (block 1 has the extra attn2), once per slot
    block_bytes = max(sum(p.numel() * p.element_size() for p in model.joint_blocks[i].parameters()) for i in swapper.swapped)
    assert all(block_bytes <= b.numel() <= block_bytes * 1.2 for b in swapper.device_buffers)
    assert len(swapper.device_buffers) == 2


def test_training_without_checkpointing_is_stopped_in_the_backward():
    model = _twin_models()[2]
    model.set_gradient_checkpointing(False)
    BlockSwapper(model.joint_blocks, 3, "cpu").install()
    loss = model(*_inputs(model.config)).square().mean()
    with pytest.raises(BlockSwapError, match="without recomputing.*--gradient_checkpointing"):
        loss.backward()


def test_inference_only_swapper_runs_no_grad_and_refuses_training():
    reference, _, model, _ = _twin_models(trainable_ln_q=False)
    swapper = BlockSwapper(model.joint_blocks, 3, "cpu", backward=False)
    swapper.install()
    inputs = _inputs(model.config)
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(model(*inputs), reference(*inputs), rtol=0, atol=0)
    with pytest.raises(BlockSwapError, match="backward=False"):
        model(*inputs)


class _Residual(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(x)))


def test_reentrant_checkpointing_and_fp8_weights_also_give_identical_gradients():
    torch.manual_seed(5)
    reference = nn.ModuleList(_Residual(16) for _ in range(5)).requires_grad_(False)
    store_linear_weights_in_fp8(reference)
    blocks = copy.deepcopy(reference)
    grads = []
    for stack, swap in ((reference, False), (blocks, True)):
        torch.manual_seed(6)
        loras = [LoRAModule(f"l{i}", m, lora_dim=2) for i, m in enumerate(stack.modules()) if isinstance(m, nn.Linear)]
        for lora in loras:
            nn.init.normal_(lora.lora_up.weight)
            lora.apply_to()
        if swap:
            BlockSwapper(stack, 3, "cpu").install()
        x = torch.randn(3, 16, generator=torch.Generator().manual_seed(7), requires_grad=True)
        h = x
        for block in stack:
            h = checkpoint(block, h, use_reentrant=True)
        h.square().sum().backward()
        grads.append([x.grad] + [p.grad for lora in loras for p in lora.parameters()])
    for ours, theirs in zip(grads[1], grads[0]):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- GPU

GPU_CONFIG = MMDiTConfig(depth=8, hidden_size=1536, num_heads=24, adm_in_channels=256, context_in_dim=256,
                         pos_embed_max_size=64, qk_norm="rms", x_block_self_attn_layers=(0, 1, 2))


def _gpu_run(state: dict, blocks_to_swap: int, steps: int, fp8: bool = False) -> dict:
    """Train a bf16 MMDiT with fp32 LoRA under bf16 autocast; loss, LoRA gradients, peak memory, time per step."""
    gc.collect()  # LoRA and swapper hooks make reference cycles: free the previous run's GPU memory first
    torch.cuda.empty_cache()
    leftover = torch.cuda.memory_allocated()
    with torch.device("meta"):
        model = MMDiT(GPU_CONFIG)
    model.load_state_dict(state, assign=True)
    model.requires_grad_(False).to(torch.bfloat16)
    if fp8:
        store_linear_weights_in_fp8(model.joint_blocks)
    loras = _add_lora(model, rank=16)
    for lora in loras:
        lora.cuda()
    model.set_gradient_checkpointing(True)
    model.train()
    if blocks_to_swap:
        move_except_blocks(model, model.joint_blocks, "cuda")
        swapper = BlockSwapper(model.joint_blocks, blocks_to_swap, "cuda")
        swapper.prepare()
        swapper.install()
    else:
        model.cuda()
    inputs = [t.cuda() for t in _inputs(GPU_CONFIG, size=64, tokens=77)]
    params = [p for lora in loras for p in lora.parameters()]
    result = {}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for step in range(steps):
        if step == 1:
            torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(*inputs).float().square().mean()
        loss.backward()
        if step == 0:
            result["loss"] = loss.detach().cpu()
            result["grads"] = [p.grad.detach().cpu().clone() for p in params]
        for p in params:
            p.grad = None
    torch.cuda.synchronize()
    result["seconds_per_step"] = (time.perf_counter() - start) / (steps - 1)
    result["peak"] = torch.cuda.max_memory_allocated() - leftover
    result["swapped_bytes"] = 0
    if blocks_to_swap:
        sizes = {i: sum(p.numel() * p.element_size() for p in model.joint_blocks[i].parameters() if not p.requires_grad)
                 for i in swapper.swapped}
        result["swapped_bytes"] = sum(sizes.values()) - sum(b.numel() for b in swapper.device_buffers)
    return result


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_swap_gives_the_same_loss_and_gradients_with_less_memory():
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cuda.flash_sdp_enabled(),
             torch.backends.cuda.mem_efficient_sdp_enabled())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cuda.enable_flash_sdp(False)  # deterministic attention, so runs can be compared bit for bit
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    try:
        _compare_gpu_runs()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = flags[0]
        torch.backends.cuda.enable_flash_sdp(flags[1])
        torch.backends.cuda.enable_mem_efficient_sdp(flags[2])


def _compare_gpu_runs() -> None:
    torch.manual_seed(0)
    with torch.device("cuda"):
        state = {k: v.cpu() for k, v in MMDiT(GPU_CONFIG).state_dict().items()}
    failures = []
    for fp8 in (False, True):
        base = _gpu_run(state, 0, steps=4, fp8=fp8)
        for blocks_to_swap in (4, 7):
            run = _gpu_run(state, blocks_to_swap, steps=4, fp8=fp8)
            drop, expected = base["peak"] - run["peak"], run["swapped_bytes"]
            grad_diff = max((a - b).abs().max().item() for a, b in zip(run["grads"], base["grads"]))
            line = (f"fp8={fp8} swap={blocks_to_swap}/{GPU_CONFIG.depth}: loss {run['loss'].item():.6f} vs "
                    f"{base['loss'].item():.6f}, max grad diff {grad_diff:.3g}, peak {run['peak'] / 2**20:.0f} vs "
                    f"{base['peak'] / 2**20:.0f} MiB (drop {drop / 2**20:.0f}, expected {expected / 2**20:.0f}), "
                    f"{run['seconds_per_step'] * 1e3:.1f} vs {base['seconds_per_step'] * 1e3:.1f} ms/step")
            print(line)
            # Loss bit for bit; LoRA gradients to fp32 rounding (matmul kernels may pick another split for
            # weights at other addresses); memory down by at least the swapped weights less the slots.
            same_grads = all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(run["grads"], base["grads"]))
            if not torch.equal(run["loss"], base["loss"]) or not same_grads or drop < 0.95 * expected - 8 * 2**20:
                failures.append(line)
    assert not failures, failures
