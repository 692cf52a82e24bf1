"""Model flags that name a Hugging Face hub repo or a file in one, turned into local paths before anything
reads them.

sd-scripts hands a ``--pretrained_model_name_or_path`` (and a ``--vae``) that is not a local file to diffusers'
``from_pretrained``, which takes a local folder or the id of a hub repo holding a diffusers pipeline
(``stabilityai/stable-diffusion-xl-base-1.0``). We take the same ids, and for every model flag also one file
inside a repo, named after the repo id (``stabilityai/stable-diffusion-3.5-medium/sd3.5_medium.safetensors``).
The copy comes from the hub cache, downloaded first when online; with ``HF_HUB_OFFLINE=1`` only the cache is
read. Everything after this module sees local paths, so the loaders and the early file checks are the same
for a hub model as for one on disk.

A repo is not downloaded whole: pipeline repos also hold multi-gigabyte single files and fp16 / non-EMA
copies. Only its small files (configs, tokenizer files) and, per diffusers component the loaders read, the one
weights file they would pick come down.
"""

from __future__ import annotations

import argparse
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from library.models.loading_common import DIFFUSERS_WEIGHT_FILES

logger = logging.getLogger(__name__)

MODEL_FLAGS = ("pretrained_model_name_or_path", "vae", "clip_l", "clip_g", "t5xxl")
# Flags whose loaders read a diffusers folder, with the components they read. Alternatives are tried in order;
# the first whose first component has a config.json in the repo is fetched (those of its components present).
FOLDER_COMPONENTS: dict[str, tuple[tuple[str, ...], ...]] = {
    "pretrained_model_name_or_path": (("unet", "vae", "text_encoder", "text_encoder_2"),),
    "vae": (("vae",), ("",)),  # a pipeline repo's vae/, else a VAE repo's root (stabilityai/sd-vae-ft-mse)
}
SMALL_FILES = ("*.json", "*.txt")
MODEL_FILE_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")
# owner/name[/path/in/repo]: no leading '/', '.', '~', no drive letters or backslashes, so paths written as
# local ones never reach the hub.
_HUB_SHAPED = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)+")


class HubModelError(OSError):
    """A model flag's hub id that cannot be resolved to a local copy; the message names the flag and the id."""


@dataclass(frozen=True)
class HubReference:
    """A repo (a diffusers folder) or, with ``filename``, one file in it."""

    repo_id: str
    filename: str | None = None

    def __str__(self) -> str:
        return f"{self.repo_id}/{self.filename}" if self.filename else self.repo_id


def hub_reference(value: str) -> HubReference | None:
    """What a model flag's value names on the hub, or None when it is a local path (present or not).

    ``owner/name`` is a repo; ``owner/name/path/file.safetensors`` (any model-file suffix) a file in one. A
    two-part value with a model-file suffix is a missing local file, not a repo (``models/x.safetensors``).
    """
    if not value or Path(value).exists() or not _HUB_SHAPED.fullmatch(value) or ".." in value.split("/"):
        return None
    parts = value.split("/")
    is_file = parts[-1].lower().endswith(MODEL_FILE_SUFFIXES)
    if len(parts) == 2:
        return None if is_file else HubReference(value)
    return HubReference("/".join(parts[:2]), "/".join(parts[2:])) if is_file else None


def resolve_hub_models(args: argparse.Namespace,
                       folder_flags: tuple[str, ...] = tuple(FOLDER_COMPONENTS)) -> argparse.Namespace:
    """A copy of ``args`` whose model flags naming hub repos or files hold local paths instead.

    ``folder_flags`` are the flags whose loader reads diffusers folders (a script reading single files only, such
    as SD3's, passes none, and a repo id there is an error). The ids given are kept in ``hub_model_ids``
    ({flag: id}): the LoRA's metadata names the model by them, as sd-scripts does.
    """
    resolved = argparse.Namespace(**vars(args))
    ids = dict(getattr(args, "hub_model_ids", None) or {})
    for flag in MODEL_FLAGS:
        value = getattr(args, flag, None)
        reference = hub_reference(str(value)) if value else None
        if reference is None:
            continue
        local = _local_copy(f"--{flag}", reference, FOLDER_COMPONENTS[flag] if flag in folder_flags else None)
        logger.info("--%s %s: %s", flag, reference, local)
        setattr(resolved, flag, str(local))
        ids[flag] = str(reference)
    resolved.hub_model_ids = ids
    return resolved


def _local_copy(flag: str, reference: HubReference, components: tuple[tuple[str, ...], ...] | None) -> Path:
    from huggingface_hub import constants

    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        if reference.filename is not None:
            return Path(_download(reference.repo_id, reference.filename, offline))
        if components is None:
            raise HubModelError(f"{flag} {reference}: this flag takes a single file; name one in the repo, "
                                 f"e.g. {reference}/<file>.safetensors")
        return _diffusers_folder(flag, reference, components, offline)
    except HubModelError:
        raise
    except Exception as error:
        if not _from_hub(error):
            raise
        problem = _hub_problem(error, reference, offline)
        raise HubModelError(f"{flag} {reference}: no such local file or folder; as a Hugging Face id: {problem}") from error


def _download(repo_id: str, filename: str, offline: bool) -> str:
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id, filename, local_files_only=offline)


def _diffusers_folder(flag: str, reference: HubReference, components: tuple[tuple[str, ...], ...], offline: bool) -> Path:
    """The repo's small files, then one weights file per component the flag's loader reads."""
    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download(reference.repo_id, allow_patterns=list(SMALL_FILES), local_files_only=offline))
    chosen = next((parts for parts in components if (folder / parts[0] / "config.json").is_file()), None)
    if chosen is None:
        if not (folder / "model_index.json").is_file():
            raise HubModelError(f"{flag} {reference}: the repo holds no diffusers model (no model_index.json or "
                                f"config.json); name a file in it instead, e.g. {reference}/<file>.safetensors")
        return folder  # another family's pipeline: the loader's family check says which script takes it
    for component in chosen:
        if (folder / component / "config.json").is_file():
            _first_weights_file(reference.repo_id, component, offline)
    return folder


def _first_weights_file(repo_id: str, component: str, offline: bool) -> str | None:
    """Fetch the weights file the loaders would pick in ``component``; None when the repo (or, offline, the
    cache) has none, which the loader then reports with the folder."""
    for name in DIFFUSERS_WEIGHT_FILES:
        try:
            return _download(repo_id, f"{component}/{name}" if component else name, offline)
        except Exception as error:
            if not _is_missing_entry(error):
                raise
    return None


def _from_hub(error: BaseException) -> bool:
    """An error of the hub client or of the connection to it (not a bug of ours)."""
    return isinstance(error, OSError) or any(cls.__module__.startswith("huggingface_hub") for cls in type(error).__mro__)


def _error_names(error: BaseException) -> set[str]:
    # By class name: the hub's error classes moved between modules and parents across huggingface_hub releases.
    return {cls.__name__ for cls in type(error).__mro__}


def _is_missing_entry(error: BaseException) -> bool:
    return "EntryNotFoundError" in _error_names(error) and "IncompleteSnapshotError" not in _error_names(error)


def _hub_problem(error: BaseException, reference: HubReference, offline: bool) -> str:
    """Why the hub gave no copy, in words a user can act on."""
    names = _error_names(error)
    if "GatedRepoError" in names:
        return f"the hub repo {reference.repo_id} is gated: accept its terms on huggingface.co and log in (hf auth login)"
    if "RepositoryNotFoundError" in names:
        return (f"there is no model repo {reference.repo_id} on the Hugging Face hub "
                "(a private repo needs a login: hf auth login)")
    if "IncompleteSnapshotError" in names:
        return f"the hub cache holds an incomplete copy of {reference.repo_id}; run once online to complete it"
    if "LocalEntryNotFoundError" in names:
        from huggingface_hub import constants

        where = f"the hub cache ({constants.HF_HUB_CACHE})"
        if offline:
            return f"not in {where}, and HF_HUB_OFFLINE=1 allows no download"
        return f"the hub could not be reached, and it is not in {where}"
    if "EntryNotFoundError" in names:
        return f"the hub repo {reference.repo_id} has no file {reference.filename}"
    if "HFValidationError" in names:
        return f"{reference.repo_id} is not a valid hub repo id"
    return f"the hub answered: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
