import json

import pytest

from library.sample_prompts import SamplePrompt, load_sample_prompts, parse_prompt_line


def test_txt_line_options():
    p = parse_prompt_line("a dog, running --n blurry, low quality --w 640 --h 384 --d 7 --l 5.5 --s 20 --ss euler_a")
    assert p == SamplePrompt("a dog, running", "blurry, low quality", 640, 384, 7, 5.5, 20, "euler_a")


def test_txt_defaults_and_comments(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# comment\n\nsimple prompt\n")
    assert load_sample_prompts(f) == [SamplePrompt("simple prompt")]


def test_bad_number_names_line(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("x --w wide\n")
    with pytest.raises(ValueError, match=r"p.txt:1: --w needs a int"):
        load_sample_prompts(f)


def test_toml_and_json(tmp_path):
    t = tmp_path / "p.toml"
    t.write_text('[[prompt]]\nprompt = "cat"\nwidth = 256\nscale = 3.0\nsample_steps = 5\nseed = 3\n')
    j = tmp_path / "p.json"
    j.write_text(json.dumps([{"prompt": "cat", "width": 256, "scale": 3.0, "sample_steps": 5, "seed": 3}]))
    expected = [SamplePrompt("cat", width=256, cfg_scale=3.0, steps=5, seed=3)]
    assert load_sample_prompts(t) == expected == load_sample_prompts(j)


def test_unknown_table_key(tmp_path):
    j = tmp_path / "p.json"
    j.write_text(json.dumps([{"prompt": "cat", "widht": 3}]))
    with pytest.raises(ValueError, match="widht"):
        load_sample_prompts(j)
