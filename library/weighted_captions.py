"""What ``--weighted_captions`` checks before any model loads: every caption and preview prompt reads as
weighted text, and no caption is cut apart by the tag operations.

Caption shuffling, tag dropout and token warm-up split a caption at its separator and rearrange the pieces.
sd-scripts does the same to weighted captions and only warns in its documentation: ``(red, blue:1.2), cat``
shuffled to ``cat, blue:1.2), (red`` leaves ``(red`` weighted 1.1 to the end and ``:1.2)`` as text. Such a
caption is refused here, with the way to write it so that it survives.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from library.dataset.captions import CaptionOptions
from library.prompt_weights import parse_prompt_weights, separator_inside_brackets
from library.sample_prompts import load_sample_prompts

if TYPE_CHECKING:  # the dataset module pulls in image loading; only its items are read here
    from library.dataset.dataset import TrainDataset


def check_weighted_captions(datasets: Iterable[TrainDataset | None], sample_prompts: str | Path | None) -> None:
    """Raise ValueError (one line, naming the image or prompt file) for the first caption or prompt that
    ``--weighted_captions`` cannot use as intended."""
    split_captions = []
    for dataset in datasets:
        for item in dataset.items if dataset is not None else ():
            options = item.subset.caption
            caption = _with_prefix_and_suffix(item.caption, options)
            _parse(caption, f"the caption of {item.path}")
            if _splits_tags(options) and separator_inside_brackets(caption, options.caption_separator):
                split_captions.append(item)
    if split_captions:
        item = split_captions[0]
        options, separator = item.subset.caption, item.subset.caption.caption_separator
        raise ValueError(
            f"--weighted_captions: {len(split_captions)} caption(s) put '{separator}' inside weighting brackets, "
            f"first {item.path}, and subset '{item.subset.label}' splits captions there ({_tag_operations(options)}), "
            f"which would cut the weighted span apart; close the brackets before each '{separator}' (write "
            f"'(red:1.2){separator} (blue:1.2)' for '(red{separator} blue:1.2)') or turn those options off"
        )
    if sample_prompts:
        for number, prompt in enumerate(load_sample_prompts(Path(sample_prompts)), 1):
            for text in (prompt.prompt, prompt.negative_prompt):
                _parse(text, f"sample prompt {number} of {sample_prompts}")


def _with_prefix_and_suffix(caption: str, options: CaptionOptions) -> str:
    parts = [options.caption_prefix, caption, options.caption_suffix]
    return " ".join(part for part in parts if part)


def _splits_tags(options: CaptionOptions) -> bool:
    """Whether the subset rearranges a caption's tags (joining them back in order changes nothing)."""
    return options.shuffle_caption or options.caption_tag_dropout_rate > 0 or options.token_warmup_step > 0


def _tag_operations(options: CaptionOptions) -> str:
    named = [("shuffle_caption", options.shuffle_caption),
             ("caption_tag_dropout_rate", options.caption_tag_dropout_rate > 0),
             ("token_warmup_step", options.token_warmup_step > 0)]
    return ", ".join(name for name, active in named if active)


def _parse(text: str, where: str) -> None:
    try:
        parse_prompt_weights(text)
    except ValueError as error:
        raise ValueError(f"--weighted_captions: {where}: {error}") from None
