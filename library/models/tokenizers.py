"""CLIP and T5 tokenizers, read from sd-scripts' ``--tokenizer_cache_dir`` folders or the Hugging Face hub.

Checkpoints carry no tokenizer, so every family names the hub repository its tokenizer comes from. A cache
folder holds each tokenizer as a ``save_pretrained`` folder named after the hub id with "/" replaced by "_"
(``DIR/openai_clip-vit-large-patch14``), which lets training run offline after one online start.

sd-scripts has no other flag for local tokenizers, so ``--tokenizer_cache_dir`` also takes a model folder in
the diffusers layout (``tokenizer/``, ``tokenizer_2/``, ``tokenizer_3/``, e.g. a downloaded
stabilityai/stable-diffusion-3.5-medium) for loaders that name the subfolder their tokenizer has there. Such a
folder is only read: a hub-id folder wins when both exist, and nothing is saved into the model folder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transformers import CLIPTokenizer, PreTrainedTokenizerBase, T5TokenizerFast

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


@dataclass(frozen=True)
class _Kind:
    """What tells one tokenizer type's usable folder from an empty one."""

    cls: type[PreTrainedTokenizerBase]
    name: str
    files: str  # the files a usable folder holds, for error messages
    has_vocabulary: Callable[[PreTrainedTokenizerBase], bool]


def _has_clip_vocabulary(tokenizer: CLIPTokenizer) -> bool:
    """Recent transformers return a two-token placeholder instead of raising when no vocabulary files are found
    (offline, or an empty folder); a byte-level CLIP vocabulary has at least the 256 bytes and their end-of-word
    forms."""
    return len(tokenizer) >= 512


def _has_t5_vocabulary(tokenizer: T5TokenizerFast) -> bool:
    """Recent transformers build a placeholder T5 tokenizer (<pad>, </s>, <unk>, the word boundary and the
    <extra_id_N> sentinels) when no vocabulary was found; a real one has pieces besides those."""
    special = set(tokenizer.all_special_tokens)
    pieces = [token for token in tokenizer.get_vocab() if token not in special and not token.startswith("<extra_id_")]
    return len(pieces) > 1


_CLIP = _Kind(CLIPTokenizer, "CLIP", "vocab.json + merges.txt or tokenizer.json", _has_clip_vocabulary)
_T5 = _Kind(T5TokenizerFast, "T5", "tokenizer.json or spiece.model", _has_t5_vocabulary)


def load_clip_tokenizer(hub_id: str, cache_dir: str | Path | None, subfolder: str | None = None, *,
                        diffusers_folder: str | None = None) -> CLIPTokenizer:
    """Load the tokenizer of ``hub_id``: its cache folder, else ``cache_dir/diffusers_folder`` (a diffusers model
    folder's ``tokenizer``/``tokenizer_2``), else the hub (``subfolder`` there), whose download fills the cache."""
    return _load(_CLIP, hub_id, cache_dir, subfolder, diffusers_folder)


def load_t5_tokenizer(hub_id: str, cache_dir: str | Path | None, *, diffusers_folder: str | None = None) -> T5TokenizerFast:
    """Load the T5 tokenizer of ``hub_id`` the way ``load_clip_tokenizer`` loads CLIP's."""
    return _load(_T5, hub_id, cache_dir, None, diffusers_folder)


def _load(kind: _Kind, hub_id: str, cache_dir: str | Path | None, subfolder: str | None,
          diffusers_folder: str | None) -> PreTrainedTokenizerBase:
    cached = tokenizer_cache_folder(cache_dir, hub_id) if cache_dir else None
    if cached is not None and cached.exists():
        return _load_local(kind, cached, f"tokenizer cache folder {cached}", "delete it so it is fetched again")
    if cache_dir and diffusers_folder and (Path(cache_dir) / diffusers_folder).is_dir():
        folder = Path(cache_dir) / diffusers_folder
        return _load_local(kind, folder, f"tokenizer folder {folder}",
                           f"put the {hub_id} tokenizer there, or in {cached}")
    tokenizer = _load_from_hub(kind, hub_id, subfolder, cached, diffusers_folder)
    if cached is not None:
        tokenizer.save_pretrained(cached)
    return tokenizer


def _load_from_hub(kind: _Kind, hub_id: str, subfolder: str | None, cached: Path | None,
                   diffusers_folder: str | None) -> PreTrainedTokenizerBase:
    if cached is None:
        advice = f"pass --tokenizer_cache_dir DIR with the tokenizer saved in DIR/{hub_id.replace('/', '_')}"
    else:
        advice = f"--tokenizer_cache_dir has no {cached} folder; save the tokenizer there or run once online"
    if diffusers_folder:
        advice += f" (a diffusers model folder with {diffusers_folder}/ also works as DIR)"
    unavailable = TokenizerUnavailable(f"cannot load the {hub_id} tokenizer from the hub (offline?): {advice}")
    try:
        tokenizer = kind.cls.from_pretrained(hub_id, subfolder=subfolder)
    except (OSError, ValueError) as error:
        raise unavailable from error
    if not kind.has_vocabulary(tokenizer):
        raise unavailable
    return tokenizer


def _load_local(kind: _Kind, folder: Path, label: str, remedy: str) -> PreTrainedTokenizerBase:
    unusable = TokenizerUnavailable(f"{label} holds no {kind.name} tokenizer ({kind.files}); {remedy}")
    try:
        tokenizer = kind.cls.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as error:
        raise unusable from error
    if not kind.has_vocabulary(tokenizer):
        raise unusable
    return tokenizer
