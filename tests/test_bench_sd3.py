"""bench/sd3_lora_step.py on its tiny CPU model: the result it reports, block swap's loss equality, and its errors.

The full-size numbers need the GPU machine (bench/RESULTS.md); these tests keep the script itself working.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench import sd3_lora_step as sd3_bench
from bench import sd_lora_step as sd_bench
from library.offload import BlockSwapError

TINY = ["--model", "tiny", "--device", "cpu", "--warmup", "0", "--matmul_size", "0"]
RANK = 16


def _tiny_lora_params() -> int:
    """sd-scripts' SD3 LoRA: every Linear of the joint blocks, rank r, so r * (in + out) each; nothing outside them."""
    from library.models.mmdit import MMDiT

    mmdit = MMDiT(sd3_bench.MODELS["tiny"].config)
    return sum(RANK * (m.in_features + m.out_features) for m in mmdit.joint_blocks.modules() if isinstance(m, torch.nn.Linear))


def test_tiny_cpu_run_reports_a_complete_result_and_skips_the_swap_comparison(tmp_path):
    lines: list[str] = []
    json_out = tmp_path / "results.jsonl"
    results = sd3_bench.run(sd3_bench.parse_args([*TINY, "--steps", "1", "--compare_swap", "--blocks_to_swap", "2",
                                                  "--json_out", str(json_out)]), report=lines.append)

    assert len(results) == 1, "without CUDA only the no-swap configuration can be measured"
    result = results[0]
    assert result["swap_comparison"]["skipped"].startswith("--compare_swap skipped")
    assert "CUDA" in result["swap_comparison"]["skipped"] and "cpu" in result["swap_comparison"]["skipped"]
    assert (result["model"], result["resolution"], result["batch_size"], result["blocks_to_swap"]) == ("tiny", 128, 1, 0)
    assert result["text_tokens"] == 77 + 8 and result["depth"] == 4 and result["swapped_weights_gib"] == 0
    assert result["lora_params"] == _tiny_lora_params()
    assert result["steps_timed"] == 1
    assert 0 < result["s_per_step_min"] == result["s_per_step_median"] == result["s_per_step_max"]
    # The flop-counted step, then the timed one (no memory step on the CPU); flow-matching losses are positive.
    assert len(result["losses"]) == 2 and all(math.isfinite(x) and x > 0 for x in result["losses"])
    assert result["tflop_per_step"] * 1e12 == pytest.approx(sum(result["flops_by_op"].values()), rel=1e-12)
    assert result["model_tflop_per_step"] * 1e12 == pytest.approx(sd3_bench.meta_flops(sd3_bench.parse_args(TINY), recompute=False),
                                                                  rel=1e-12)
    assert "mfu" not in result and "peak_allocated_gib" not in result, "GPU-only fields stay out of a CPU result"

    printed = [json.loads(line.removeprefix("RESULT ")) for line in lines if line.startswith("RESULT ")]
    assert printed == [result]
    assert [json.loads(line) for line in json_out.read_text().splitlines()] == [result]
    assert "skipped" in lines[0]


def test_block_swap_gives_the_same_losses_as_no_swap_for_the_same_seed():
    """The CPU stands in for the device (BlockSwapper copies synchronously there): same weights, same losses."""
    options = sd3_bench.parse_args(TINY)
    no_swap, swap = sd3_bench.build(options, 0), sd3_bench.build(options, 2)
    for bench in (no_swap, swap):
        for _ in range(3):
            sd3_bench.train_step(bench)
    comparison = sd3_bench.compare_swap({"blocks_to_swap": 0, "losses": no_swap.losses, "s_per_step_median": 1.0},
                                        {"blocks_to_swap": 2, "losses": swap.losses, "s_per_step_median": 1.0})

    assert comparison["losses_equal"] and comparison["first_loss_equal"] and comparison["max_abs_loss_diff"] == 0
    assert comparison["steps_compared"] == 3
    assert len(set(no_swap.losses)) == 3, "each step draws its own noise and timesteps"
    assert all(block._forward_pre_hooks for block in swap.models.denoiser.joint_blocks), "the swapper is installed"
    assert not any(block._forward_pre_hooks for block in no_swap.models.denoiser.joint_blocks)
    # Swapped blocks 1 and 3 of 4 (spread evenly): their frozen weights in bf16, 2 bytes each.
    mmdit = sd3_bench.random_mmdit(sd3_bench.MODELS["tiny"].config, torch.device("cpu"), seed=0)
    assert swap.swapped_weight_bytes == sum(p.numel() * 2 for i in (1, 3) for p in mmdit.joint_blocks[i].parameters())


def test_fp8_build_stores_only_joint_block_linears_in_fp8_and_trains():
    bench = sd3_bench.build(sd3_bench.parse_args([*TINY, "--fp8_base"]), 0)
    mmdit = bench.models.denoiser
    assert mmdit.joint_blocks[0].x_block.attn.qkv.weight.dtype == torch.float8_e4m3fn
    assert mmdit.joint_blocks[3].context_block.adaLN_modulation[1].weight.dtype == torch.float8_e4m3fn
    assert mmdit.context_embedder.weight.dtype == torch.bfloat16, "only the joint blocks go to fp8"
    assert math.isfinite(sd3_bench.train_step(bench))


def test_same_seed_gives_the_same_random_model():
    config = sd3_bench.MODELS["tiny"].config
    first, second = (sd3_bench.random_mmdit(config, torch.device("cpu"), seed=3) for _ in range(2))
    other = sd3_bench.random_mmdit(config, torch.device("cpu"), seed=4)
    weights = [m.state_dict()["joint_blocks.2.x_block.mlp.fc1.weight"] for m in (first, second, other)]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])
    assert weights[0].dtype == torch.bfloat16 and weights[0].abs().max() <= 1 / math.sqrt(64)  # Linear's default bound


def test_checkpoint_recompute_adds_exactly_one_forward_of_the_joint_blocks_to_the_flop_count():
    options = sd3_bench.parse_args(TINY)
    mmdit, inputs = sd3_bench.meta_model(options)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        mmdit(*inputs)
    per_module = counter.get_flop_counts()
    blocks = [sum(per_module[f"MMDiT.joint_blocks.{i}"].values()) for i in range(4)]
    assert all(count > 0 for count in blocks)

    plain, recomputed = sd3_bench.meta_flops(options, recompute=False), sd3_bench.meta_flops(options, recompute=True)
    assert recomputed - plain == sum(blocks)
    # A frozen base: backward needs input gradients (one matmul per forward matmul) plus attention's extra
    # products and the small LoRA weight gradients, so forward + backward is a little over twice the forward.
    assert 2 * counter.get_total_flops() < plain < 2.5 * counter.get_total_flops()


def test_compare_swap_reports_differences_time_and_memory():
    no_swap = {"blocks_to_swap": 0, "losses": [1.0, 0.5, 0.25], "s_per_step_median": 2.0, "peak_allocated_gib": 20.0}
    swap = {"blocks_to_swap": 19, "losses": [1.0, 0.5, 0.375], "s_per_step_median": 2.2, "peak_allocated_gib": 12.5}
    comparison = sd3_bench.compare_swap(no_swap, swap)
    assert comparison == {"against_blocks_to_swap": 0, "steps_compared": 3, "losses_equal": False, "first_loss_equal": True,
                          "max_abs_loss_diff": 0.125, "time_ratio": pytest.approx(1.1), "peak_saved_gib": 7.5}
    assert "DIFFER" in sd3_bench.summary_comparison(comparison)


def test_bad_swap_flags_get_one_line_errors():
    with pytest.raises(BlockSwapError, match="--blocks_to_swap needs a CUDA GPU"):
        sd3_bench.run(sd3_bench.parse_args([*TINY, "--blocks_to_swap", "2"]), report=lambda _: None)
    with pytest.raises(ValueError, match=r"--compare_swap .* --blocks_to_swap N.*at most 3"):
        sd3_bench.run(sd3_bench.parse_args([*TINY, "--compare_swap"]), report=lambda _: None)
    with pytest.raises(BlockSwapError, match="--blocks_to_swap 4: the model has 4 blocks .* at most 3"):
        sd3_bench.run(sd3_bench.parse_args([*TINY, "--compare_swap", "--blocks_to_swap", "4"]), report=lambda _: None)
    with pytest.raises(ValueError, match="--resolution 120 is not a multiple of 16"):
        sd3_bench.run(sd3_bench.parse_args([*TINY, "--resolution", "120"]), report=lambda _: None)


def test_sd1_bench_still_runs_on_the_shared_helpers():
    result = sd_bench.run(sd_bench.parse_args(["--model", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0"]),
                          report=lambda _: None)
    assert result["steps_timed"] == 1 and result["s_per_step_median"] > 0
    assert result["tflop_per_step"] * 1e12 == pytest.approx(sum(result["flops_by_op"].values()), rel=1e-12)
    # Checkpointing (on by default) runs the forward twice, so a step executes more than the model's FLOPs.
    assert result["tflop_per_step"] > result["model_tflop_per_step"] > 0


def test_launch_count_splits_the_step_into_phases_and_sees_the_checkpoint_recompute():
    """--count_launches attributes ops to forward, backward (autograd's graph task) and the optimizer; turning
    checkpointing on leaves the forward alone and moves one more forward of the blocks into backward."""
    def count(*extra: str) -> dict:
        return sd3_bench.run(sd3_bench.parse_args(["--model", "tiny", "--count_launches", *extra]), report=lambda _: None)[0]

    config = sd3_bench.MODELS["tiny"].config
    attentions = config.depth + len(config.x_block_self_attn_layers)  # joint attentions + MMDiT-X's attn2
    checkpointed, plain = count(), count("--no_gradient_checkpointing")
    for result in (checkpointed, plain):
        assert result["launches_per_step"] == sum(result["launches_by_phase"].values())
        assert set(result["launches_by_phase"]) == {"forward", "backward", "optimizer"}
        assert result["launches_by_kind"]["forward"]["attention"] == attentions
    assert plain["launches_by_kind"]["backward"]["attention"] == attentions  # one backward kernel each
    assert checkpointed["launches_by_phase"]["forward"] == plain["launches_by_phase"]["forward"]
    recompute = checkpointed["launches_by_phase"]["backward"] - plain["launches_by_phase"]["backward"]
    assert 0.5 * plain["launches_by_phase"]["forward"] < recompute < plain["launches_by_phase"]["forward"]
    assert checkpointed["launches_by_kind"]["backward"]["attention"] == 2 * attentions  # recompute + backward
