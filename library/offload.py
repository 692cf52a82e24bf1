"""Block swapping (--blocks_to_swap N): N of a model's blocks keep their frozen weights in CPU memory.

A model whose blocks sit in an ``nn.ModuleList`` (MMDiT's ``joint_blocks``; later SDXL's) runs through
them in order in the forward pass and in reverse in the backward pass. N of those blocks are *swapped*:
their frozen weights live in one pinned host buffer per block, and a small pool of device buffers
("slots") holds copies of the swapped blocks about to be used. When block i starts, the copy of the next
swapped block is issued on a side CUDA stream, so it overlaps the compute of block i (and of any
resident blocks in between). Frozen weights are only ever copied host -> device: the pinned copy is the
master and a device copy is simply dropped when its slot is needed again. Trainable parameters (LoRA
inside a block, if any) and buffers stay on the device; our LoRA modules live outside the blocks anyway.
Device memory holds the resident blocks plus `prefetch + 1` slots; each swapped block is copied about
twice per training step (forward, and backward recomputation), less the ones a slot keeps over the
forward/backward turnaround.

The module has two halves:
- pure scheduling: which blocks are swapped (`swapped_block_indices`), the order blocks are used in
  (`block_uses`), which swapped blocks should have a device copy at each use (`wanted_on_device`),
  and the copies/evictions that follow (`swap_schedule`). Tested on the CPU without any tensors.
- mechanics: `BlockSwapper` builds the buffers, moves parameters by pointing ``param.data`` at host or
  slot memory, and follows the schedule from forward pre-hooks and an autograd identity on each
  block's outputs (whose backward runs right before the block's own backward).

Why training needs gradient checkpointing: autograd keeps, for the backward, views of the weights a
block used in its forward. A slot is refilled with another block's weights long before that backward,
so those views would read the wrong weights. With per-block checkpointing the block is recomputed
inside its backward, from the weights the schedule has just brought back, and nothing from the forward
is kept. `check_block_swap_flags` requires it; `BlockSwapper` also raises if a swapped block's backward
runs without a recomputation.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor, nn

# Offsets of tensors inside the host and slot buffers: 256 bytes keeps every tensor aligned for any
# dtype and for the vectorised kernels (cuBLAS wants 16).
ALIGNMENT = 256


class BlockSwapError(ValueError):
    """--blocks_to_swap cannot work with the given flags or model."""


def check_block_swap_flags(blocks_to_swap: int | None, num_blocks: int, *, gradient_checkpointing: bool,
                           cpu_offload_checkpointing: bool, cuda_available: bool, torch_compile: bool = False) -> None:
    """Reject --blocks_to_swap settings that cannot work, naming the flag to change."""
    if not blocks_to_swap:
        if blocks_to_swap is not None and blocks_to_swap < 0:
            raise BlockSwapError(f"--blocks_to_swap must be 0 or more, got {blocks_to_swap}")
        return
    _check_count(blocks_to_swap, num_blocks)
    if cpu_offload_checkpointing:
        raise BlockSwapError("--blocks_to_swap cannot be combined with --cpu_offload_checkpointing; use one of them")
    if torch_compile:
        raise BlockSwapError("--blocks_to_swap cannot be combined with --torch_compile yet (a swapped block's weights "
                             "move between devices every step, which compiled blocks do not expect); use one of them")
    if not cuda_available:
        raise BlockSwapError("--blocks_to_swap needs a CUDA GPU (it copies blocks between CPU and GPU); "
                             "none is available, so remove the flag")
    if not gradient_checkpointing:
        raise BlockSwapError("--blocks_to_swap needs --gradient_checkpointing: swapped blocks must be recomputed "
                             "in the backward pass from the weights copied back for it")


def _check_count(blocks_to_swap: int, num_blocks: int) -> None:
    if blocks_to_swap < 0:
        raise BlockSwapError(f"--blocks_to_swap must be 0 or more, got {blocks_to_swap}")
    if blocks_to_swap >= num_blocks:
        raise BlockSwapError(f"--blocks_to_swap {blocks_to_swap}: the model has {num_blocks} blocks and at least one "
                             f"must stay on the GPU; use at most {num_blocks - 1}")


# ---------------------------------------------------------------------------------------------- schedule


class Phase(Enum):
    FORWARD = "forward"
    BACKWARD = "backward"


class Use(NamedTuple):
    """One block being run: its forward, or its backward (which, with checkpointing, recomputes it)."""

    phase: Phase
    block: int


@dataclass(frozen=True)
class SwapStep:
    """What happens when `use` starts: device copies dropped (`evict`), copies issued (`fetch`, in the
    order they are needed), and the swapped blocks with a device copy afterwards (`on_device`)."""

    use: Use
    evict: tuple[int, ...]
    fetch: tuple[int, ...]
    on_device: frozenset[int]


def swapped_block_indices(num_blocks: int, blocks_to_swap: int) -> tuple[int, ...]:
    """The blocks whose frozen weights live on the CPU, spread evenly over the list.

    Spreading (rather than swapping the last N, as sd-scripts does) puts resident blocks between
    swapped ones, so each copy can overlap the compute of more than one block.
    """
    _check_count(blocks_to_swap, num_blocks)
    return tuple((2 * i + 1) * num_blocks // (2 * blocks_to_swap) for i in range(blocks_to_swap))


def block_uses(num_blocks: int, *, backward: bool) -> tuple[Use, ...]:
    """The uses of one training step (forward 0..n-1, then backward n-1..0) or of one inference pass.

    Steps repeat, so the sequence is read cyclically: after the last use comes the next step's first.
    """
    forward = tuple(Use(Phase.FORWARD, i) for i in range(num_blocks))
    if not backward:
        return forward
    return forward + tuple(Use(Phase.BACKWARD, i) for i in reversed(range(num_blocks)))


def wanted_on_device(uses: Sequence[Use], position: int, swapped: Iterable[int], slots: int) -> tuple[int, ...]:
    """The swapped blocks that should have a device copy while `uses[position]` runs, in need order:
    the first `slots` distinct swapped blocks met from that use on (cyclically). The block in use comes
    first when it is swapped; the rest are the prefetches."""
    swapped = set(swapped)
    wanted: list[int] = []
    for offset in range(len(uses)):
        block = uses[(position + offset) % len(uses)].block
        if block in swapped and block not in wanted:
            wanted.append(block)
            if len(wanted) == slots:
                break
    return tuple(wanted)


def transition(on_device: Iterable[int], wanted: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(evict, fetch) that turn the device copies `on_device` into `wanted`."""
    on_device = set(on_device)
    evict = tuple(sorted(on_device - set(wanted)))
    fetch = tuple(block for block in wanted if block not in on_device)
    return evict, fetch


def swap_schedule(num_blocks: int, blocks_to_swap: int, *, backward: bool = True, slots: int = 2) -> tuple[SwapStep, ...]:
    """One step's (or inference pass's) swaps in steady state: it starts from the copies the previous
    one left, which for a training step are also those `BlockSwapper.prepare` makes."""
    swapped = swapped_block_indices(num_blocks, blocks_to_swap)
    uses = block_uses(num_blocks, backward=backward)
    on_device = frozenset(wanted_on_device(uses, len(uses) - 1, swapped, slots))
    steps = []
    for position, use in enumerate(uses):
        wanted = wanted_on_device(uses, position, swapped, slots)
        evict, fetch = transition(on_device, wanted)
        on_device = frozenset(wanted)
        steps.append(SwapStep(use, evict, fetch, on_device))
    return tuple(steps)


class _Windows:
    """`wanted_on_device` for every use of a training step and of an inference pass, computed once."""

    def __init__(self, num_blocks: int, swapped: Sequence[int], slots: int):
        self._wanted: dict[tuple[bool, Use], tuple[int, ...]] = {}
        for training in (True, False):
            uses = block_uses(num_blocks, backward=training)
            for position, use in enumerate(uses):
                self._wanted[training, use] = wanted_on_device(uses, position, swapped, slots)

    def wanted(self, use: Use, training: bool) -> tuple[int, ...]:
        return self._wanted[training or use.phase is Phase.BACKWARD, use]


# ---------------------------------------------------------------------------------------------- mechanics


@dataclass
class _HostBlock:
    """A swapped block's frozen parameters, packed into one host buffer (pinned for CUDA) so that one
    copy moves the whole block; `layout` is each parameter's (byte offset, dtype, shape)."""

    params: list[nn.Parameter]
    layout: list[tuple[int, torch.dtype, torch.Size]]
    buffer: Tensor
    views: list[Tensor]

    @classmethod
    def pack(cls, block: nn.Module, pin: bool) -> _HostBlock:
        params = [p for p in block.parameters() if not p.requires_grad]
        layout, size = [], 0
        for p in params:
            layout.append((size, p.dtype, p.shape))
            size += _aligned(p.numel() * p.element_size())
        buffer = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
        views = _views(buffer, layout)
        with torch.no_grad():
            for p, view in zip(params, views):
                view.copy_(p.detach())
                p.data = view
        return cls(params, layout, buffer, views)

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    def point_at(self, views: Sequence[Tensor]) -> None:
        for p, view in zip(self.params, views):
            p.data = view


def _aligned(nbytes: int) -> int:
    return (nbytes + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def _views(buffer: Tensor, layout: Sequence[tuple[int, torch.dtype, torch.Size]]) -> list[Tensor]:
    views = []
    for offset, dtype, shape in layout:
        nbytes = shape.numel() * dtype.itemsize
        views.append(buffer[offset:offset + nbytes].view(dtype).view(shape))
    return views


@dataclass
class _Slot:
    """A device buffer holding one swapped block's weights. `ready` marks the end of the copy into it;
    `free` the end of the last compute that read it, before which it must not be refilled."""

    buffer: Tensor
    ready: Any = None
    free: Any = None
    block: int | None = None


class _Copies(Protocol):
    def new_slot(self, nbytes: int) -> _Slot: ...
    def fill(self, slot: _Slot, host: _HostBlock) -> None: ...
    def before_use(self, slot: _Slot) -> None: ...
    def release(self, slot: _Slot) -> None: ...


class _CudaCopies:
    """Copies on a side stream, ordered against the compute stream by events (the CPU never waits)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def new_slot(self, nbytes: int) -> _Slot:
        return _Slot(torch.empty(nbytes, dtype=torch.uint8, device=self.device), torch.cuda.Event(), torch.cuda.Event())

    def fill(self, slot: _Slot, host: _HostBlock) -> None:
        self.stream.wait_event(slot.free)  # an event never recorded is no wait
        with torch.cuda.stream(self.stream):
            slot.buffer[:host.nbytes].copy_(host.buffer, non_blocking=True)
        slot.ready.record(self.stream)

    def before_use(self, slot: _Slot) -> None:
        torch.cuda.current_stream(self.device).wait_event(slot.ready)

    def release(self, slot: _Slot) -> None:
        # Everything that reads this slot has been queued on the compute stream by now.
        slot.free.record(torch.cuda.current_stream(self.device))


class _ImmediateCopies:
    """The CPU standing in for the device (tests): plain synchronous copies, nothing to order."""

    def new_slot(self, nbytes: int) -> _Slot:
        return _Slot(torch.empty(nbytes, dtype=torch.uint8))

    def fill(self, slot: _Slot, host: _HostBlock) -> None:
        slot.buffer[:host.nbytes].copy_(host.buffer)

    def before_use(self, slot: _Slot) -> None:
        pass

    def release(self, slot: _Slot) -> None:
        pass


class _BackwardSignal(torch.autograd.Function):
    """Identity on a block's outputs; its backward runs once all their gradients have arrived, which
    is right before the block's own backward (and, with checkpointing, its recomputation)."""

    @staticmethod
    def forward(ctx, callback, *tensors: Tensor) -> tuple[Tensor, ...]:
        ctx.callback = callback
        return tensors

    @staticmethod
    def backward(ctx, *grads: Tensor) -> tuple[Any, ...]:
        ctx.callback()
        return (None, *grads)


class BlockSwapper:
    """Keeps `blocks_to_swap` of `blocks` in CPU memory and streams them to `device` as they are used.

    Use: build the model on the CPU, apply fp8 storage and LoRA, move everything except the blocks
    with `move_except_blocks`, then `prepare()` and `install()`. Frozen weights of swapped blocks are
    read-only from then on (a write to a device copy is lost when it is dropped).
    `prefetch` swapped blocks are copied ahead of use; device memory holds the resident blocks plus
    `prefetch + 1` slots of the largest swapped block. `device` may be the CPU, for tests.
    """

    def __init__(self, blocks: nn.ModuleList, blocks_to_swap: int, device: torch.device | str, *,
                 backward: bool = True, prefetch: int = 1):
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BlockSwapError("--blocks_to_swap needs a CUDA GPU and none is available; remove the flag")
        if self.device.type not in ("cuda", "cpu"):
            raise BlockSwapError(f"block swapping runs on CUDA devices (or the CPU for tests), not {self.device}")
        if prefetch < 0:
            raise ValueError(f"BlockSwapper: prefetch must be 0 or more, got {prefetch}")
        self.blocks = blocks
        self.backward = backward
        self.swapped = swapped_block_indices(len(blocks), blocks_to_swap)
        self.slots = prefetch + 1
        self._windows = _Windows(len(blocks), self.swapped, self.slots)
        self._copies: _Copies = _CudaCopies(self.device) if self.device.type == "cuda" else _ImmediateCopies()
        self._host: dict[int, _HostBlock] = {}
        self._slots: list[_Slot] = []
        self._slot_of: dict[int, _Slot] = {}
        self._slot_views: dict[tuple[int, int], list[Tensor]] = {}
        self._prepared = False
        self._last: Use | None = None
        self._awaiting_recompute: set[int] = set()
        self._handles: list[Any] = []

    # ------------------------------------------------------------------ setup
    def prepare(self) -> None:
        """Resident blocks to the device; swapped blocks' frozen weights into host buffers (their
        trainable parameters and buffers to the device); slots allocated and the first blocks copied."""
        if self._prepared:
            return
        for index, block in enumerate(self.blocks):
            if index in self.swapped:
                self._host[index] = _HostBlock.pack(block, pin=self.device.type == "cuda")
                _move_trainable_and_buffers(block, self.device)
            else:
                block.to(self.device)
        if self._host:
            size = max(host.nbytes for host in self._host.values())
            self._slots = [self._copies.new_slot(size) for _ in range(self.slots)]
        self._move_to(Use(Phase.FORWARD, 0), training=self.backward)
        self._prepared = True

    def install(self) -> None:
        """Follow the schedule from hooks on each block, so the model's own loop needs no changes."""
        self.prepare()
        if self._handles:
            return
        for index, block in enumerate(self.blocks):
            self._handles.append(block.register_forward_pre_hook(lambda module, args, i=index: self.before_forward(i)))
            self._handles.append(block.register_forward_hook(lambda module, args, out, i=index: self._after_forward(i, out)))

    def remove(self) -> None:
        """Take the hooks off (the weights stay where they are)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # ------------------------------------------------------------------ events
    def before_forward(self, index: int) -> None:
        """Block `index` is about to run forward: make it resident and start the next copies."""
        use = Use(Phase.FORWARD, index)
        training = self.backward and torch.is_grad_enabled()
        if self._last == Use(Phase.BACKWARD, index):
            # Checkpointing recomputes the block inside its own backward (or a new step starts right
            # after block 0's backward): either way the backward's window is the right one.
            use = self._last
            self._awaiting_recompute.discard(index)
        elif training and index in self._host:
            self._awaiting_recompute.add(index)
        self._move_to(use, training)

    def before_backward(self, index: int) -> None:
        """Gradients for block `index`'s outputs have arrived: its backward is next."""
        previous = self._last
        if previous is not None and previous.phase is Phase.BACKWARD and previous.block in self._awaiting_recompute:
            raise BlockSwapError(
                f"block {previous.block} ran its backward without recomputing its forward: block swapping while "
                "training needs per-block gradient checkpointing (--gradient_checkpointing)")
        self._move_to(Use(Phase.BACKWARD, index), training=True)

    def _after_forward(self, index: int, output: Any) -> Any:
        tensors, rebuild = _grad_tensors(output)
        if not tensors:
            return output
        if not self.backward:
            raise BlockSwapError(f"block {index} produced outputs that need gradients, but this BlockSwapper "
                                 "was made with backward=False; make it with backward=True to train")
        return rebuild(_BackwardSignal.apply(lambda: self.before_backward(index), *tensors))

    # ------------------------------------------------------------------ moves
    def _move_to(self, use: Use, training: bool) -> None:
        evict, fetch = transition(self._slot_of, self._windows.wanted(use, training))
        for block in evict:
            self._evict(block)
        for block in fetch:
            self._fetch(block)
        if use.block in self._slot_of:
            self._copies.before_use(self._slot_of[use.block])
        self._last = use

    def _evict(self, block: int) -> None:
        slot = self._slot_of.pop(block)
        self._copies.release(slot)
        host = self._host[block]
        host.point_at(host.views)
        slot.block = None

    def _fetch(self, block: int) -> None:
        index, slot = next((i, s) for i, s in enumerate(self._slots) if s.block is None)
        host = self._host[block]
        self._copies.fill(slot, host)
        key = (index, block)
        if key not in self._slot_views:
            self._slot_views[key] = _views(slot.buffer, host.layout)
        host.point_at(self._slot_views[key])
        slot.block = block
        self._slot_of[block] = slot

    # ------------------------------------------------------------------ inspection
    def blocks_on_device(self) -> frozenset[int]:
        """Swapped blocks that have a device copy now (resident blocks always do)."""
        return frozenset(self._slot_of)

    @property
    def device_buffers(self) -> tuple[Tensor, ...]:
        return tuple(slot.buffer for slot in self._slots)

    @property
    def host_buffers(self) -> dict[int, Tensor]:
        return {index: host.buffer for index, host in self._host.items()}


def _move_trainable_and_buffers(block: nn.Module, device: torch.device) -> None:
    for p in block.parameters():
        if p.requires_grad:
            p.data = p.data.to(device)
    for module in block.modules():
        for name, buffer in module.named_buffers(recurse=False):
            setattr(module, name, buffer.to(device))


def _grad_tensors(output: Any) -> tuple[list[Tensor], Any]:
    """The tensors of a block output (a tensor, or a tuple/list of tensors and None) that need
    gradients, and a function that puts replacements for them back into the same structure."""
    if isinstance(output, Tensor):
        if not output.requires_grad:
            return [], None
        return [output], lambda new: new[0]
    if isinstance(output, (tuple, list)):
        picked = [i for i, item in enumerate(output) if isinstance(item, Tensor) and item.requires_grad]
        if not picked:
            return [], None

        def rebuild(new: Sequence[Tensor]) -> Any:
            items = list(output)
            for i, tensor in zip(picked, new):
                items[i] = tensor
            return type(output)(items)

        return [output[i] for i in picked], rebuild
    return [], None


def move_except_blocks(model: nn.Module, blocks: nn.Module, device: torch.device | str) -> None:
    """Move every parameter and buffer of `model` that is not inside `blocks` to `device`, so that
    the swapped blocks never pass through device memory on their way to `BlockSwapper.prepare`."""
    if model is blocks:
        return
    if not any(module is blocks for module in model.modules()):
        model.to(device)
        return
    for p in model.parameters(recurse=False):
        p.data = p.data.to(device)
    for name, buffer in model.named_buffers(recurse=False):
        setattr(model, name, buffer.to(device))
    for child in model.children():
        move_except_blocks(child, blocks, device)
