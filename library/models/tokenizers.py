"""CLIP and T5 tokenizers, read from sd-scripts' ``--tokenizer_cache_dir`` folders or the Hugging Face hub.

Checkpoints carry no tokenizer, so every family names the hub repository its tokenizer comes from. A cache
folder holds each tokenizer as a ``save_pretrained`` folder named after the hub id with "/" replaced by "_"
(``DIR/openai_clip-vit-large-patch14``), which lets training run offline after one online start.
"""

from __future__ import annotations

from pathlib import Path

from transformers import CLIPTokenizer, T5TokenizerFast

SD1_TOKENIZER_ID = "openai/clip-vit-large-patch14"
# SD2 ships its own tokenizer (the OpenCLIP-H settings: same BPE vocabulary, pads with "!"); v2.0 and v2.1 share it.
SD2_TOKENIZER_ID = "stabilityai/stable-diffusion-2"
SD2_TOKENIZER_SUBFOLDER = "tokenizer"
# SD3's three tokenizers, as sd-scripts names them; CLIP-L shares SD1's cache folder.
CLIP_L_TOKENIZER_ID = SD1_TOKENIZER_ID
CLIP_G_TOKENIZER_ID = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"
T5_XXL_TOKENIZER_ID = "google/t5-v1_1-xxl"


class TokenizerUnavailable(RuntimeError):
    """No tokenizer in the cache folder and none could be fetched from the hub."""


def tokenizer_cache_folder(cache_dir: str | Path, hub_id: str) -> Path:
    """Where sd-scripts keeps the tokenizer of ``hub_id`` inside ``--tokenizer_cache_dir``."""
    return Path(cache_dir) / hub_id.replace("/", "_")


def load_clip_tokenizer(hub_id: str, cache_dir: str | Path | None, subfolder: str | None = None) -> CLIPTokenizer:
    """Load the tokenizer of ``hub_id``, preferring its cache folder; fill the cache after a hub download."""
    cached = tokenizer_cache_folder(cache_dir, hub_id) if cache_dir else None
    if cached is not None and cached.exists():
        return _load_cached(cached)
    tokenizer = _load_from_hub(hub_id, subfolder, cached)
    if cached is not None:
        tokenizer.save_pretrained(cached)
    return tokenizer


def _load_from_hub(hub_id: str, subfolder: str | None, cached: Path | None) -> CLIPTokenizer:
    if cached is None:
        advice = f"pass --tokenizer_cache_dir DIR with the tokenizer saved in DIR/{hub_id.replace('/', '_')}"
    else:
        advice = f"--tokenizer_cache_dir has no {cached} folder; save the tokenizer there or run once online"
    unavailable = TokenizerUnavailable(f"cannot load the {hub_id} tokenizer from the hub (offline?): {advice}")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(hub_id, subfolder=subfolder)
    except OSError as error:
        raise unavailable from error
    if not _has_clip_vocabulary(tokenizer):
        raise unavailable
    return tokenizer


def _load_cached(folder: Path) -> CLIPTokenizer:
    unusable = TokenizerUnavailable(
        f"tokenizer cache folder {folder} holds no CLIP tokenizer (vocab.json + merges.txt or tokenizer.json); "
        "delete it so it is fetched again"
    )
    try:
        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as error:
        raise unusable from error
    if not _has_clip_vocabulary(tokenizer):
        raise unusable
    return tokenizer


def _has_clip_vocabulary(tokenizer: CLIPTokenizer) -> bool:
    """Recent transformers return a two-token placeholder instead of raising when no vocabulary files are found
    (offline, or an empty folder); a byte-level CLIP vocabulary has at least the 256 bytes and their end-of-word
    forms."""
    return len(tokenizer) >= 512


def load_t5_tokenizer(hub_id: str, cache_dir: str | Path | None) -> T5TokenizerFast:
    """Load the T5 tokenizer of ``hub_id`` the way ``load_clip_tokenizer`` loads CLIP's: cache folder first, then
    the hub, whose download is saved into the cache folder."""
    cached = tokenizer_cache_folder(cache_dir, hub_id) if cache_dir else None
    if cached is not None and cached.exists():
        return _load_cached_t5(cached)
    tokenizer = _load_t5_from_hub(hub_id, cached)
    if cached is not None:
        tokenizer.save_pretrained(cached)
    return tokenizer


def _load_t5_from_hub(hub_id: str, cached: Path | None) -> T5TokenizerFast:
    if cached is None:
        advice = f"pass --tokenizer_cache_dir DIR with the tokenizer saved in DIR/{hub_id.replace('/', '_')}"
    else:
        advice = f"--tokenizer_cache_dir has no {cached} folder; save the tokenizer there or run once online"
    unavailable = TokenizerUnavailable(f"cannot load the {hub_id} tokenizer from the hub (offline?): {advice}")
    try:
        tokenizer = T5TokenizerFast.from_pretrained(hub_id)
    except (OSError, ValueError) as error:
        raise unavailable from error
    if not _has_t5_vocabulary(tokenizer):
        raise unavailable
    return tokenizer


def _load_cached_t5(folder: Path) -> T5TokenizerFast:
    unusable = TokenizerUnavailable(
        f"tokenizer cache folder {folder} holds no T5 tokenizer (tokenizer.json or spiece.model); "
        "delete it so it is fetched again"
    )
    try:
        tokenizer = T5TokenizerFast.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as error:
        raise unusable from error
    if not _has_t5_vocabulary(tokenizer):
        raise unusable
    return tokenizer


def _has_t5_vocabulary(tokenizer: T5TokenizerFast) -> bool:
    """Recent transformers build a placeholder T5 tokenizer (<pad>, </s>, <unk>, the word boundary and the
    <extra_id_N> sentinels) when no vocabulary was found; a real one has pieces besides those."""
    special = set(tokenizer.all_special_tokens)
    pieces = [token for token in tokenizer.get_vocab() if token not in special and not token.startswith("<extra_id_")]
    return len(pieces) > 1
