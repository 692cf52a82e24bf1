"""Caption operations, each alone, with seeded generators (expected values follow sd-scripts' rules)."""

import random

import pytest

from library.dataset.captions import CaptionOptions, process_caption

TAGS = "a, b, c, d, e, f, g, h, i"


def run(caption, opts, *, seed=0, epoch=1, step=0, max_train_steps=100):
    return process_caption(caption, opts, epoch=epoch, step=step, max_train_steps=max_train_steps, rng=random.Random(seed))


def test_defaults_leave_a_caption_untouched():
    assert run("a cat,  sitting on a mat ", CaptionOptions()) == "a cat,  sitting on a mat "
    assert not CaptionOptions().changes_per_step


def test_prefix_and_suffix_are_joined_with_spaces():
    opts = CaptionOptions(caption_prefix="photo of", caption_suffix="high quality")
    assert run("sks dog", opts) == "photo of sks dog high quality"


def test_multiline_caption_uses_first_line_without_wildcards():
    assert run("first line\nsecond line", CaptionOptions()) == "first line"


def test_shuffle_permutes_only_tags_after_keep_tokens():
    opts = CaptionOptions(shuffle_caption=True, keep_tokens=2)
    outputs = {run(TAGS, opts, seed=seed) for seed in range(30)}
    for out in outputs:
        tags = out.split(", ")
        assert tags[:2] == ["a", "b"]
        assert sorted(tags[2:]) == list("cdefghi")
    assert len(outputs) > 20  # really shuffled, not a fixed reordering


def test_shuffle_is_deterministic_for_a_seed_and_matches_random_shuffle():
    opts = CaptionOptions(shuffle_caption=True, keep_tokens=1)
    expected_rest = list("bcdefghi")
    random.Random(7).shuffle(expected_rest)
    assert run(TAGS, opts, seed=7) == ", ".join(["a"] + expected_rest)
    assert run(TAGS, opts, seed=7) == run(TAGS, opts, seed=7)


def test_caption_dropout_extremes_and_rate():
    assert all(run(TAGS, CaptionOptions(caption_dropout_rate=1.0), seed=s) == "" for s in range(20))
    assert all(run(TAGS, CaptionOptions(caption_dropout_rate=0.0), seed=s) == TAGS for s in range(20))
    rng = random.Random(1)
    opts = CaptionOptions(caption_dropout_rate=0.3)
    dropped = sum(process_caption(TAGS, opts, epoch=1, step=0, max_train_steps=1, rng=rng) == "" for _ in range(4000))
    assert 0.27 < dropped / 4000 < 0.33  # binomial sd is 0.007


def test_caption_dropout_every_n_epochs_drops_whole_epochs():
    opts = CaptionOptions(caption_dropout_every_n_epochs=3)
    dropped_epochs = [epoch for epoch in range(1, 10) if run(TAGS, opts, epoch=epoch) == ""]
    assert dropped_epochs == [3, 6, 9]


def test_tag_dropout_extremes_and_rate_keep_fixed_tags():
    assert run(TAGS, CaptionOptions(caption_tag_dropout_rate=1.0, keep_tokens=2)) == "a, b"
    assert run(TAGS, CaptionOptions(caption_tag_dropout_rate=0.0, keep_tokens=2)) == TAGS
    rng = random.Random(3)
    opts = CaptionOptions(caption_tag_dropout_rate=0.25, keep_tokens=1)
    kept = 0
    for _ in range(1000):
        tags = process_caption(TAGS, opts, epoch=1, step=0, max_train_steps=1, rng=rng).split(", ")
        assert tags[0] == "a"
        kept += len(tags) - 1
    assert 0.72 < kept / 8000 < 0.78  # 75% of the 8 droppable tags survive


def test_wildcards_choose_each_alternative_and_unescape_braces():
    opts = CaptionOptions(enable_wildcard=True)
    seen = {run("{simple|white|dark} background", opts, seed=s) for s in range(60)}
    assert seen == {"simple background", "white background", "dark background"}
    assert run("miku, {{retro style}}", opts) == "miku, {retro style}"
    assert run("{a|b}", CaptionOptions()) == "{a|b}"  # off: left verbatim


def test_wildcard_mode_picks_one_line_of_a_multiline_caption():
    opts = CaptionOptions(enable_wildcard=True)
    seen = {run("one\ntwo\nthree", opts, seed=s) for s in range(40)}
    assert seen == {"one", "two", "three"}


def test_keep_tokens_separator_fixes_head_and_tail():
    opts = CaptionOptions(shuffle_caption=True, keep_tokens_separator="|||")
    caption = "1girl, miku ||| stage, mic, shirt, smile ||| best quality, general"
    outputs = {run(caption, opts, seed=s) for s in range(30)}
    for out in outputs:
        tags = out.split(", ")
        assert tags[:2] == ["1girl", "miku"] and tags[-2:] == ["best quality", "general"]
        assert sorted(tags[2:-2]) == ["mic", "shirt", "smile", "stage"]
    assert len(outputs) > 10


def test_keep_tokens_separator_is_removed_even_without_shuffle():
    opts = CaptionOptions(keep_tokens_separator="|||")
    assert run("a, b ||| c, d", opts) == "a, b, c, d"


def test_secondary_separator_keeps_group_together_then_becomes_caption_separator():
    opts = CaptionOptions(shuffle_caption=True, secondary_separator=";;;")
    for seed in range(20):
        tags = run("x, sky;;;cloud;;;day, y, z", opts, seed=seed).split(", ")
        assert sorted(tags) == ["sky,cloud,day", "x", "y", "z"]
    assert run("sky;;;cloud", CaptionOptions(secondary_separator=";;;")) == "sky,cloud"


def test_custom_caption_separator_splits_tags():
    opts = CaptionOptions(shuffle_caption=True, caption_separator=";", keep_tokens=1)
    tags = run("a; b; c; d", opts, seed=2).split(", ")  # sd-scripts always joins with ", "
    assert tags[0] == "a" and sorted(tags[1:]) == ["b", "c", "d"]


@pytest.mark.parametrize(
    "warmup_step,step,expected_count",
    [
        (10, 0, 1),  # step 0: token_warmup_min tags
        (10, 5, 1 + (5 * 8) // 10),  # linear growth from 1 to 9 over 10 steps
        (10, 10, 9),  # warm-up over: all tags
        (0.5, 25, 1 + (25 * 8) // 50),  # a fraction of max_train_steps=100 -> 50 steps
        (0.5, 60, 9),
    ],
)
def test_token_warmup_limits_flexible_tags(warmup_step, step, expected_count):
    opts = CaptionOptions(token_warmup_step=warmup_step)
    assert run(TAGS, opts, step=step, max_train_steps=100) == ", ".join(TAGS.split(", ")[:expected_count])


def test_token_warmup_min_and_keep_tokens():
    opts = CaptionOptions(token_warmup_step=10, token_warmup_min=3, keep_tokens=1)
    assert run(TAGS, opts, step=0) == "a, b, c, d"  # 1 fixed + 3 warm-up tags


@pytest.mark.parametrize(
    "field,value",
    [
        ("shuffle_caption", True),
        ("caption_dropout_rate", 0.1),
        ("caption_dropout_every_n_epochs", 2),
        ("caption_tag_dropout_rate", 0.1),
        ("enable_wildcard", True),
        ("token_warmup_step", 5),
    ],
)
def test_changes_per_step_flags_every_varying_option(field, value):
    assert CaptionOptions(**{field: value}).changes_per_step
    assert not CaptionOptions(keep_tokens=2, caption_prefix="p", secondary_separator=";;;").changes_per_step


@pytest.mark.parametrize(
    "field,value", [("caption_dropout_rate", 1.5), ("caption_tag_dropout_rate", -0.1), ("keep_tokens", -1)]
)
def test_invalid_options_name_the_key(field, value):
    with pytest.raises(ValueError, match=field):
        CaptionOptions(**{field: value})
