"""Caption operations applied each time an image is drawn: prefix/suffix, dropout, wildcards, fixed tokens,
token warm-up, shuffling, tag dropout and the secondary separator.

The order and the arithmetic follow sd-scripts' ``BaseDataset.process_caption`` so a caption file produces
the same training text here as there. All randomness comes from the ``random.Random`` passed in, and the
draws happen in sd-scripts' order, so a seeded generator gives a reproducible caption.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

# sd-scripts joins the processed tags with this, whatever the caption separator is.
TAG_JOINER = ", "

_WILDCARD = re.compile(r"\{([^}]+)\}")


@dataclass(frozen=True)
class CaptionOptions:
    """Per-subset caption settings, named as the dataset TOML keys / sd-scripts flags."""

    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0

    def __post_init__(self) -> None:
        for name in ("caption_dropout_rate", "caption_tag_dropout_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {value}")
        for name in ("keep_tokens", "caption_dropout_every_n_epochs", "token_warmup_min"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.token_warmup_step < 0:
            raise ValueError(f"token_warmup_step must not be negative, got {self.token_warmup_step}")
        if not self.caption_separator:
            raise ValueError("caption_separator must not be empty")

    @property
    def changes_per_step(self) -> bool:
        """True when the same caption file can yield different text between steps or epochs.

        Text-encoder outputs cached once would then be wrong, so caching them must be refused.
        """
        return bool(
            self.shuffle_caption
            or self.caption_dropout_rate > 0
            or self.caption_dropout_every_n_epochs > 0
            or self.caption_tag_dropout_rate > 0
            or self.enable_wildcard
            or self.token_warmup_step > 0
        )


def process_caption(
    caption: str, opts: CaptionOptions, *, epoch: int, step: int, max_train_steps: int, rng: random.Random
) -> str:
    """The training text for one draw of ``caption``.

    ``epoch`` is 1-based as in sd-scripts (``caption_dropout_every_n_epochs = n`` drops captions in epochs
    n, 2n, ...); ``step`` is the global optimisation step, used by token warm-up.
    """
    if opts.caption_prefix:
        caption = opts.caption_prefix + " " + caption
    if opts.caption_suffix:
        caption = caption + " " + opts.caption_suffix

    if _drops_caption(opts, epoch, rng):
        return ""

    caption = _pick_line(caption, opts, rng)
    if opts.enable_wildcard:
        caption = expand_wildcards(caption, rng)

    restructures = opts.shuffle_caption or opts.token_warmup_step > 0 or opts.caption_tag_dropout_rate > 0
    has_fixed_marker = bool(opts.keep_tokens_separator) and opts.keep_tokens_separator in caption
    if restructures or has_fixed_marker:
        # sd-scripts only splits on the marker when it also shuffles/drops, leaving a literal "|||" in
        # the text otherwise; we always remove it, which is what the marker is documented to mean.
        caption = _rearrange_tags(caption, opts, step=step, max_train_steps=max_train_steps, rng=rng)

    if opts.secondary_separator:
        caption = caption.replace(opts.secondary_separator, opts.caption_separator)
    return caption


def _drops_caption(opts: CaptionOptions, epoch: int, rng: random.Random) -> bool:
    # The random draw only happens when the rate is set, so enabling other options keeps the draw order.
    dropped = opts.caption_dropout_rate > 0 and rng.random() < opts.caption_dropout_rate
    every_n = opts.caption_dropout_every_n_epochs
    return dropped or (every_n > 0 and epoch % every_n == 0)


def _pick_line(caption: str, opts: CaptionOptions, rng: random.Random) -> str:
    """Multi-line captions are alternatives with wildcards enabled, otherwise only the first line counts."""
    if "\n" not in caption:
        return caption
    if opts.enable_wildcard:
        return rng.choice(caption.split("\n"))
    return caption.split("\n")[0]


def expand_wildcards(caption: str, rng: random.Random) -> str:
    """Replace each ``{a|b|c}`` with one alternative; ``{{`` and ``}}`` stand for literal braces."""
    open_mark, close_mark = "⦅", "⦆"
    while open_mark in caption or close_mark in caption:
        open_mark += "⦅"
        close_mark += "⦆"
    caption = caption.replace("{{", open_mark).replace("}}", close_mark)
    caption = _WILDCARD.sub(lambda match: rng.choice(match.group(1).split("|")), caption)
    return caption.replace(open_mark, "{").replace(close_mark, "}")


def _split_tags(text: str, separator: str) -> list[str]:
    return [tag.strip() for tag in text.split(separator) if tag.strip()]


def split_fixed_and_flexible(caption: str, opts: CaptionOptions) -> tuple[list[str], list[str], list[str]]:
    """(fixed head, shufflable middle, fixed tail) tags of a caption.

    With ``keep_tokens_separator`` in the caption, the text before its first occurrence is the head and
    the text after a second occurrence is the tail. Otherwise the first ``keep_tokens`` tags are the head.
    """
    separator = opts.caption_separator
    marker = opts.keep_tokens_separator
    if marker and marker in caption:
        head, middle = caption.split(marker, 1)
        tail: list[str] = []
        if marker in middle:
            middle, tail_text = middle.split(marker, 1)
            tail = _split_tags(tail_text, separator)
        return _split_tags(head, separator), _split_tags(middle, separator), tail
    # sd-scripts keeps empty tags here (unlike the marker path); so do we, for identical output.
    tags = [tag.strip() for tag in caption.strip().split(separator)]
    return tags[: opts.keep_tokens], tags[opts.keep_tokens :], []


def warmup_tag_count(opts: CaptionOptions, *, num_tags: int, step: int, max_train_steps: int) -> int | None:
    """How many shufflable tags token warm-up allows at ``step``; None when warm-up is over or off.

    ``token_warmup_step`` below 1 is a fraction of ``max_train_steps``. The count grows linearly from
    ``token_warmup_min`` at step 0 towards all tags at the warm-up step.
    """
    warmup_steps = opts.token_warmup_step
    if warmup_steps < 1:
        warmup_steps = math.floor(warmup_steps * max_train_steps)
    if not warmup_steps or step >= warmup_steps:
        return None
    return math.floor(step * ((num_tags - opts.token_warmup_min) / warmup_steps)) + opts.token_warmup_min


def _rearrange_tags(caption: str, opts: CaptionOptions, *, step: int, max_train_steps: int, rng: random.Random) -> str:
    head, middle, tail = split_fixed_and_flexible(caption, opts)
    allowed = warmup_tag_count(opts, num_tags=len(middle), step=step, max_train_steps=max_train_steps)
    if allowed is not None:
        middle = middle[:allowed]
    if opts.shuffle_caption:
        rng.shuffle(middle)
    if opts.caption_tag_dropout_rate > 0:
        middle = [tag for tag in middle if rng.random() >= opts.caption_tag_dropout_rate]
    return TAG_JOINER.join(head + middle + tail)
