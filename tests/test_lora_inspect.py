"""networks/check_lora_weights.py and tools/show_metadata.py on real LoRA files of the tiny SD1 models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.metadata import lora_training_metadata, modelspec_metadata
from lora_files import randomize, tiny_sd1_network, write_lora
from networks import check_lora_weights
from networks.check_lora_weights import check_lora_file, summary
from tools import show_metadata


@pytest.fixture(scope="module")
def trained():
    return randomize(tiny_sd1_network(dim=8, alpha=4.0, conv_dim="4", conv_alpha="2"))


@pytest.fixture(scope="module")
def training_metadata() -> dict[str, str]:
    metadata = lora_training_metadata(
        network_module="networks.lora", network_dim=8, network_alpha=4.0, network_args={"conv_dim": "4", "conv_alpha": "2"},
        tag_frequency={"img/5_cat": {"cat": 12, "sks": 3}}, bucket_info={"buckets": {"0": {"resolution": [64, 64], "count": 3}}},
        datasets=[{"is_dreambooth": True, "batch_size_per_device": 1}], training_comment="hello", num_train_images=3)
    metadata.update(modelspec_metadata(architecture="stable-diffusion-v1/lora", implementation="diffusers", title="cats",
                                       resolution=512, prediction_type="epsilon", timestamp=1_700_000_000.0,
                                       thumbnail="data:image/png;base64," + "A" * 5000))
    return metadata


@pytest.fixture(scope="module")
def lora_file(trained, training_metadata, tmp_path_factory) -> Path:
    return write_lora(tmp_path_factory.mktemp("lora") / "cats.safetensors", trained, training_metadata)


# ----------------------------------------------------------------------------- check_lora_weights
def test_rows_match_the_network_that_wrote_the_file(trained, lora_file):
    rows, others = check_lora_file(lora_file)
    assert not others
    loras = {lora.lora_name: lora for lora in trained._all_loras()}
    assert sorted(row.name for row in rows) == sorted(loras)
    for row in rows:
        lora = loras[row.name]
        down, up = lora.lora_down.weight.detach(), lora.lora_up.weight.detach()
        assert (row.rank, row.alpha) == (lora.lora_dim, float(lora.alpha))
        assert (row.down_shape, row.up_shape) == (tuple(down.shape), tuple(up.shape))
        expected_kind = "linear" if down.dim() == 2 else f"conv {down.shape[2]}x{down.shape[3]}"
        assert row.kind == expected_kind
        assert row.down_norm == pytest.approx(float(down.norm()), rel=1e-6)
        assert row.up_norm == pytest.approx(float(up.norm()), rel=1e-6)
        assert row.delta_norm == pytest.approx(float(lora.delta_weight().norm()), rel=1e-5)
        assert row.problem is None
        assert row.prefix == ("lora_te" if row.name.startswith("lora_te_") else "lora_unet")
    assert {row.kind for row in rows} == {"linear", "conv 1x1", "conv 3x3"}


def test_summary_counts_prefixes_and_ranks(trained, lora_file):
    rows, _ = check_lora_file(lora_file)
    text = summary(rows)
    assert f"lora_te {len(trained.text_encoder_loras)}" in text and f"lora_unet {len(trained.unet_loras)}" in text
    assert text.startswith(f"{len(trained.text_encoder_loras) + len(trained.unet_loras)} modules")
    assert "conv 1x1: 8; conv 3x3: 4; linear: 8" in text and text.endswith("0 flagged")


def test_broken_and_empty_modules_are_flagged(lora_file, tmp_path, capsys):
    tensors = load_file(str(lora_file))
    names = list(dict.fromkeys(key.split(".")[0] for key in tensors))
    tensors[f"{names[0]}.lora_down.weight"][0, 0] = float("nan")
    tensors[f"{names[1]}.alpha"] = torch.tensor(float("inf"))
    tensors[f"{names[2]}.lora_up.weight"].zero_()
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken))
    problems = {row.name: row.problem for row in check_lora_file(broken)[0] if row.problem}
    assert problems == {names[0]: "NaN in lora_down", names[1]: "inf in alpha",
                        names[2]: "lora_up all zero (no effect)"}
    assert check_lora_weights.main([str(broken)]) == 1
    out = capsys.readouterr().out
    assert "!! NaN in lora_down" in out and out.rstrip().endswith("3 flagged")


def test_an_untrained_lora_is_flagged_but_not_an_error(tmp_path, capsys):
    fresh = write_lora(tmp_path / "fresh.safetensors", tiny_sd1_network(dim=4, alpha=1.0), dtype=torch.float16)
    rows, _ = check_lora_file(fresh)
    assert all(row.problem == "lora_up all zero (no effect)" and row.delta_norm == 0.0 for row in rows)
    assert check_lora_weights.main([str(fresh)]) == 0


def test_main_lists_every_module_and_show_all_adds_the_rest(trained, lora_file, tmp_path, capsys):
    assert check_lora_weights.main([str(lora_file)]) == 0
    out = capsys.readouterr().out
    assert all(lora.lora_name in out for lora in trained._all_loras())
    extra = tmp_path / "extra.safetensors"
    tensors = load_file(str(lora_file))
    del tensors[next(k for k in tensors if k.endswith(".alpha"))]
    save_file({**tensors, "emb_params": torch.ones(3, 4)}, str(extra))
    check_lora_weights.main([str(extra)])
    assert "1 tensors belong to no LoRA module" in capsys.readouterr().out
    for flag in ("--show_all", "-s", "--show_all_keys"):
        check_lora_weights.main([str(extra), flag])
        out = capsys.readouterr().out
        assert "emb_params  (not in a LoRA module)  3x4" in out
        assert "alpha      -" in out  # the module whose alpha was removed


def test_check_names_a_file_that_is_no_lora(tiny_sd1_checkpoint, capsys):
    with pytest.raises(SystemExit):
        check_lora_weights.main([str(tiny_sd1_checkpoint)])
    assert "not a LoRA file" in capsys.readouterr().err


# ----------------------------------------------------------------------------- show_metadata
def test_show_metadata_prints_every_key_readably(trained, lora_file, training_metadata, capsys):
    show_metadata.main([str(lora_file)])
    out = capsys.readouterr().out
    parameters = sum(t.numel() for t in trained.state_dict().values())
    assert out.splitlines()[0] == (f"cats.safetensors: {len(trained.state_dict())} tensors, {parameters:,} parameters "
                                   f"(F32 x{len(trained.state_dict())})")
    for key in (*training_metadata, "sshs_model_hash", "sshs_legacy_hash"):
        assert f"  {key}:" in out, key
    assert out.index("training:") < out.index("modelspec:") < out.index("hashes:")
    assert '    "conv_dim": "4",' in out  # JSON values indented
    assert '      "cat": 12,' in out
    assert "modelspec.title: cats" in out
    assert "modelspec.thumbnail: data:image/png;base64,AAA" in out and "(5,022 characters)" in out


def test_show_metadata_json_dumps_the_raw_metadata(lora_file, training_metadata, capsys):
    show_metadata.main([str(lora_file), "--json"])
    dumped = json.loads(capsys.readouterr().out)
    assert {k: v for k, v in dumped.items() if not k.startswith("sshs_")} == training_metadata
    show_metadata.main(["--model", str(lora_file), "--json"])  # sd-scripts' spelling
    assert json.loads(capsys.readouterr().out) == dumped


def test_show_metadata_errors(tmp_path, capsys):
    bare = tmp_path / "bare.safetensors"
    save_file({"x": torch.zeros(2, 3)}, str(bare))
    with pytest.raises(SystemExit):
        show_metadata.main([str(bare)])
    err = capsys.readouterr().err
    assert "bare.safetensors: no metadata" in err and "1 tensors, 6 parameters" in err
    pickle = tmp_path / "lora.pt"
    torch.save({"x": torch.zeros(2)}, pickle)
    with pytest.raises(SystemExit):
        show_metadata.main([str(pickle)])
    assert "lora.pt: not a safetensors file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        show_metadata.main([str(tmp_path / "missing.safetensors")])
    assert "missing.safetensors: no such file" in capsys.readouterr().err
