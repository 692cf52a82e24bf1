"""networks/resize_lora.py on real LoRA files of the tiny SD1 models (Linear, 1x1 and 3x3 conv modules)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.saving import model_hashes
from lora_files import randomize, set_spectrum, tiny_sd1_network, write_lora
from networks.lora_svd import choose_rank
from networks.resize_lora import ResizeConfig, main, resize_file

REPO = Path(__file__).resolve().parent.parent
METADATA = {
    "ss_network_module": "networks.lora", "ss_network_dim": "8", "ss_network_alpha": "4.0",
    "ss_network_args": json.dumps({"conv_dim": "4", "conv_alpha": "2"}), "ss_training_comment": "my first lora",
    "ss_output_name": "cats", "modelspec.architecture": "stable-diffusion-v1/lora", "sshs_model_hash": "stale",
}


@pytest.fixture(scope="module")
def trained():
    """A LoRA with rank 8 / alpha 4 on Linear and 1x1 conv layers and rank 4 / alpha 2 on 3x3 convs."""
    return randomize(tiny_sd1_network(dim=8, alpha=4.0, conv_dim="4", conv_alpha="2"))


@pytest.fixture(scope="module")
def lora_file(trained, tmp_path_factory) -> Path:
    return write_lora(tmp_path_factory.mktemp("lora") / "in.safetensors", trained, METADATA)


def _original_deltas(network) -> dict[str, torch.Tensor]:
    return {lora.lora_name: lora.delta_weight() for lora in network._all_loras()}


def _file_modules(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """name -> {down, up, alpha}, read with plain safetensors (independent of the tools' reader)."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(path)).items():
        name, _, leaf = key.partition(".")
        modules.setdefault(name, {})[leaf] = tensor
    return modules


def _delta(module: dict[str, torch.Tensor]) -> torch.Tensor:
    down, up = module["lora_down.weight"].float(), module["lora_up.weight"].float()
    rank = down.shape[0]
    alpha = float(module["alpha"]) if "alpha" in module else rank
    return (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)).reshape(up.shape[0], *down.shape[1:]) * alpha / rank


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as file:
        return file.metadata()


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_resizing_to_the_full_rank_is_lossless(trained, lora_file, tmp_path):
    out = tmp_path / "same.safetensors"
    resized = resize_file(lora_file, out, ResizeConfig(new_rank=8, new_conv_rank=4))
    assert [m.retained_fro for m in resized.modules] == pytest.approx([1.0] * len(resized.modules), abs=1e-6)
    modules, originals = _file_modules(out), _original_deltas(trained)
    assert modules.keys() == originals.keys()
    for name, module in modules.items():
        assert module["lora_down.weight"].shape[0] == getattr(trained, name).lora_dim
        assert _relative_error(_delta(module), originals[name]) < 1e-5, name


def test_a_larger_rank_never_raises_a_module_above_its_own(trained, lora_file, tmp_path):
    out = tmp_path / "bigger.safetensors"
    resized = resize_file(lora_file, out, ResizeConfig(new_rank=32, new_conv_rank=32))
    assert all(m.new_rank == m.old_rank for m in resized.modules)
    assert _metadata(out)["ss_network_dim"] == "8"


def test_lower_rank_keeps_the_best_approximation_and_reports_its_norm(trained, lora_file, tmp_path):
    out = tmp_path / "small.safetensors"
    resized = resize_file(lora_file, out, ResizeConfig(new_rank=3, new_conv_rank=2))
    report = {m.name: m for m in resized.modules}
    kinds = {m.kind for m in resized.modules}
    assert {"linear", "conv 1x1", "conv 3x3"} <= kinds
    for name, module in _file_modules(out).items():
        lora = getattr(trained, name)
        spatial = lora.lora_down.weight.dim() == 4 and lora.lora_down.weight.shape[-1] > 1
        rank = 2 if spatial else 3
        assert module["lora_down.weight"].shape == (rank, *lora.lora_down.weight.shape[1:]), name
        assert module["lora_up.weight"].shape == (lora.lora_up.weight.shape[0], rank, *lora.lora_up.weight.shape[2:])
        assert float(module["alpha"]) == pytest.approx(float(lora.alpha) / lora.lora_dim * rank)  # alpha/rank kept
        # an independent dense SVD of the original change gives the expected truncation and norm share
        original = lora.delta_weight()
        u, s, vh = torch.linalg.svd(original.reshape(original.shape[0], -1).double(), full_matrices=False)
        best = ((u[:, :rank] * s[:rank]) @ vh[:rank]).reshape(original.shape).float()
        assert _relative_error(_delta(module), best) < 1e-4, name
        share = math.sqrt(float(s[:rank].square().sum() / s.square().sum()))
        assert report[name].retained_fro == pytest.approx(share, rel=1e-5)
        assert float(_delta(module).norm() / original.norm()) == pytest.approx(share, rel=1e-4)
    assert resized.mean_retained == pytest.approx(sum(report[n].retained_fro for n in report) / len(report))
    assert resized.least_retained.retained_fro == min(m.retained_fro for m in report.values())


def test_metadata_is_updated_as_sd_scripts_writes_it(lora_file, tmp_path):
    out = tmp_path / "small.safetensors"
    resize_file(lora_file, out, ResizeConfig(new_rank=3, new_conv_rank=2))
    metadata = _metadata(out)
    assert metadata["ss_network_dim"] == "3"
    assert metadata["ss_network_alpha"] == "1.5"  # 4 / 8 * 3
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0"}
    assert metadata["ss_training_comment"] == "dimension is resized from 8 to 3 (conv: 2); my first lora"
    assert metadata["ss_output_name"] == "cats" and metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    tensors = load_file(str(out))
    assert (metadata["sshs_model_hash"], metadata["sshs_legacy_hash"]) == model_hashes(tensors, metadata)
    same_ranks = tmp_path / "same_ranks.safetensors"
    resize_file(lora_file, same_ranks, ResizeConfig(new_rank=3, new_conv_rank=3))
    assert _metadata(same_ranks)["ss_training_comment"] == "dimension is resized from 8 to 3; my first lora"


@pytest.mark.parametrize("network_args", [None, {"dropout": "0.1"}])
def test_conv_ranks_are_recorded_even_when_the_input_metadata_lacked_them(trained, network_args, tmp_path):
    """The rank metadata follows the modules written (as merge and extract write it); other network args stay."""
    metadata = {"ss_network_dim": "8", "ss_network_alpha": "4.0"}
    if network_args is not None:
        metadata["ss_network_args"] = json.dumps(network_args)
    lora = write_lora(tmp_path / "bare.safetensors", trained, metadata)
    out = tmp_path / "out.safetensors"
    resize_file(lora, out, ResizeConfig(new_rank=3, new_conv_rank=2))
    assert json.loads(_metadata(out)["ss_network_args"]) == {**(network_args or {}), "conv_dim": "2",
                                                              "conv_alpha": "1.0"}
    assert _metadata(out)["ss_network_dim"] == "3"


def test_per_block_ranks_are_reported_as_dynamic(tmp_path):
    dims = ",".join(str(4 + i % 2 * 4) for i in range(25))
    network = randomize(tiny_sd1_network(dim=8, alpha=8.0, block_dims=dims, block_alphas=",".join(["8"] * 25)))
    lora = write_lora(tmp_path / "blocks.safetensors", network, {"ss_network_dim": "8"})
    out = tmp_path / "out.safetensors"
    resized = resize_file(lora, out, ResizeConfig(new_rank=6))
    assert {m.new_rank for m in resized.modules} == {4, 6}
    assert _metadata(out)["ss_network_dim"] == "Dynamic" and _metadata(out)["ss_network_alpha"] == "Dynamic"


@pytest.mark.parametrize("method, param", [("sv_fro", 0.95), ("sv_ratio", 5.0), ("sv_cumulative", 0.8)])
def test_dynamic_methods_choose_each_module_rank_from_its_spectrum(method, param, tmp_path, capsys):
    network = randomize(tiny_sd1_network(dim=8, alpha=4.0, conv_dim="4", conv_alpha="2"))
    spectra = {
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": [9.0, 6.0, 0.4, 0.3, 0.2, 0.1, 0.05, 0.01],
        "lora_unet_down_blocks_0_attentions_0_proj_in": [5.0, 4.0, 3.0, 2.0, 1.1, 0.3, 0.2, 0.1],
        "lora_unet_down_blocks_0_resnets_0_conv1": [3.0, 2.0, 0.5, 0.1],
    }
    for seed, (name, s) in enumerate(spectra.items()):
        set_spectrum(network, name, s, seed)
    lora = write_lora(tmp_path / "in.safetensors", network, dict(METADATA))
    out = tmp_path / "out.safetensors"
    main(["--model", str(lora), "--save_to", str(out), "--new_rank", "6", "--dynamic_method", method,
          "--dynamic_param", str(param), "--verbose"])
    modules = _file_modules(out)
    for name, s in spectra.items():
        expected = choose_rank(torch.tensor(s), 6, method, param)
        assert 1 < expected < len(s)  # the spectra make each rule cut somewhere in the middle
        assert modules[name]["lora_down.weight"].shape[0] == expected, name
        old_scale = float(getattr(network, name).alpha) / len(s)
        assert float(modules[name]["alpha"]) == pytest.approx(old_scale * expected)
    metadata = _metadata(out)
    assert metadata["ss_network_dim"] == "Dynamic" and metadata["ss_network_alpha"] == "Dynamic"
    assert metadata["ss_training_comment"] == f"Dynamic resize with {method}: {param} from 8; my first lora"
    printed = capsys.readouterr().out
    assert all(name in printed for name in spectra)  # --verbose lists every module
    assert "Frobenius norm retained: mean" in printed


def test_precision_follows_the_input_or_save_precision(trained, tmp_path):
    half = write_lora(tmp_path / "half.safetensors", trained, METADATA, dtype=torch.float16)
    for flags, dtype in (([], torch.float16), (["--save_precision", "bf16"], torch.bfloat16),
                         (["--save_precision", "float"], torch.float32)):
        out = tmp_path / f"out_{dtype}.safetensors"
        main(["--model", str(half), "--save_to", str(out), "--new_rank", "4", *flags])
        assert {t.dtype for t in load_file(str(out)).values()} == {dtype}
    # an fp16 file resized to its own rank keeps its change to fp16 precision
    same = tmp_path / "same.safetensors"
    main(["--model", str(half), "--save_to", str(same), "--new_rank", "8"])
    halves, resized = _file_modules(half), _file_modules(same)
    for name in list(halves)[:20]:
        assert _relative_error(_delta(resized[name]), _delta(halves[name])) < 3e-3


def test_modules_without_alpha_mean_alpha_equals_rank(trained, lora_file, tmp_path):
    no_alpha = tmp_path / "no_alpha.safetensors"
    save_file({k: v for k, v in load_file(str(lora_file)).items() if not k.endswith(".alpha")}, str(no_alpha))
    out = tmp_path / "out.safetensors"
    resize_file(no_alpha, out, ResizeConfig(new_rank=8, new_conv_rank=4))
    before, after = _file_modules(no_alpha), _file_modules(out)
    for name, module in after.items():
        assert float(module["alpha"]) == module["lora_down.weight"].shape[0]
        assert _relative_error(_delta(module), _delta(before[name])) < 1e-5


def test_an_untrained_lora_resizes_to_zero_factors(tmp_path):
    fresh = write_lora(tmp_path / "fresh.safetensors", tiny_sd1_network(dim=8, alpha=1.0, conv_dim="4"))
    out = tmp_path / "out.safetensors"
    resized = resize_file(fresh, out, ResizeConfig(new_rank=4, dynamic_method="sv_fro", dynamic_param=0.9))
    assert {m.new_rank for m in resized.modules} == {1} and {m.retained_fro for m in resized.modules} == {1.0}
    tensors = load_file(str(out))
    assert all(torch.isfinite(t).all() for t in tensors.values())
    assert not any(t.any() for k, t in tensors.items() if k.endswith("lora_up.weight"))


def test_other_tensors_are_copied_and_pickle_output_works(lora_file, tmp_path):
    extra = tmp_path / "extra.safetensors"
    tensors = load_file(str(lora_file))
    tensors["bundle_emb.sks.string_to_param.*"] = torch.randn(2, 32)
    save_file(tensors, str(extra), METADATA)
    out = tmp_path / "out.pt"
    resize_file(extra, out, ResizeConfig(new_rank=2))
    saved = torch.load(out, weights_only=True)
    assert torch.equal(saved["bundle_emb.sks.string_to_param.*"], tensors["bundle_emb.sks.string_to_param.*"])
    assert saved[next(k for k in saved if k.endswith("lora_down.weight"))].shape[0] == 2


def _error_of(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code != 0
    return capsys.readouterr().err


def test_bad_inputs_give_one_line_errors(lora_file, tiny_sd1_checkpoint, tmp_path, capsys):
    out = str(tmp_path / "out.safetensors")
    assert "not a LoRA file" in _error_of(["--model", str(tiny_sd1_checkpoint), "--save_to", out], capsys)
    assert "--model" in _error_of(["--model", str(tmp_path / "nope.safetensors"), "--save_to", out], capsys)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a tensor file at all")
    assert "not a readable safetensors file" in _error_of(["--model", str(garbage), "--save_to", out], capsys)
    broken = tmp_path / "broken.safetensors"
    tensors = load_file(str(lora_file))
    dropped = next(k for k in tensors if k.endswith("lora_up.weight"))
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(broken))
    message = _error_of(["--model", str(broken), "--save_to", out], capsys)
    assert f"module {dropped.split('.')[0]} has" in message and "no lora_up.weight" in message
    for flags, expected in (
        (["--dynamic_method", "sv_fro", "--dynamic_param", "2"], "--dynamic_param 2.0"),
        (["--dynamic_method", "sv_ratio"], "needs --dynamic_param"),
        (["--dynamic_param", "0.5"], "does nothing without --dynamic_method"),
        (["--new_rank", "0"], "--new_rank 0"),
        (["--device", "nonsense"], "--device 'nonsense'"),
    ):
        message = _error_of(["--model", str(lora_file), "--save_to", out, *flags], capsys)
        assert expected in message and message.count("\n") == 1, message
    bad_output = tmp_path / "out.bin"
    assert (f"--save_to {bad_output}: must end in .safetensors, .ckpt or .pt"
            in _error_of(["--model", str(lora_file), "--save_to", str(bad_output)], capsys))
    assert not Path(out).exists()


def test_runs_as_a_script_like_sd_scripts(lora_file, tmp_path):
    out = tmp_path / "out.safetensors"
    result = subprocess.run([sys.executable, "networks/resize_lora.py", "--model", str(lora_file), "--save_to", str(out),
                             "--new_rank", "2"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "resized 127 modules to rank 2" in result.stdout
    assert _metadata(out)["ss_network_dim"] == "2"
