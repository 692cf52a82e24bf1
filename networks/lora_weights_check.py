"""Whether a LoRA file fits the network it is loaded into, said in one line when it does not.

A file of another model family matches none of the network's modules (or matches by name with other shapes,
as SD1 and SD2 do); a file of another rank matches every name with a different first (down) or second (up)
dimension. Loading either would fail deep inside `load_state_dict`, or worse, load nothing and train from
scratch. The checks read shapes only, so they run on meta-device networks too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from networks.lora_family import lora_families_differ, lora_file_family

# Module-name prefix -> the part of the model it adapts.
_PARTS = (("lora_unet_", "denoiser"), ("lora_te", "text-encoder"))
_RANK_AXIS = {"lora_down.weight": 0, "lora_up.weight": 1}


def check_weights_file(flag: str, path: str | Path) -> None:
    """Cheap checks of a weights file a flag names, before any model loads: not empty, and (.safetensors) a header
    that parses. Other formats can only be judged by loading them (`networks.lora.load_lora_state_dict`)."""
    path = Path(path)
    if not path.is_file():
        return  # a missing file is the existence check's to report
    if path.stat().st_size == 0:
        raise ValueError(f"{flag} {path}: the file is empty (0 bytes); was it saved or downloaded completely?")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt"):
                pass
        except SafetensorError as error:
            raise ValueError(f"{flag} {path}: not a readable safetensors file ({str(error).splitlines()[0]})") from None


def read_lora_metadata(file: str | Path | None) -> dict[str, str]:
    """A .safetensors LoRA's metadata ({} for other formats or no file)."""
    if file is None or Path(file).suffix != ".safetensors" or not Path(file).is_file():
        return {}
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        return handle.metadata() or {}


def check_weights_fit(source: str, file_shapes: Mapping[str, Sequence[int]], network_shapes: Mapping[str, Sequence[int]],
                      model_family: str | None, metadata: Mapping[str, str], model_layers: Iterable[str] | None = None) -> None:
    """Raise ValueError when the file's tensors (key -> shape) cannot load into the network's: no module of a part
    both have in common matches (another family), or a shared key has another shape (another rank, or another
    model). `model_family` is the family of the model the network is built on ("SDXL", as `lora_family` labels it);
    `model_layers` the LoRA names of every layer it could adapt (default: the network's modules)."""
    file_modules = {key.partition(".")[0] for key in file_shapes}
    own_modules = set(model_layers) if model_layers is not None else {key.partition(".")[0] for key in network_shapes}
    matched = file_modules & own_modules
    for prefix, part in _PARTS:
        theirs = sorted(name for name in file_modules if name.startswith(prefix))
        if theirs and any(name.startswith(prefix) for name in own_modules) and not matched.intersection(theirs):
            raise ValueError(_no_match_message(source, file_modules, metadata, model_family, f"{len(theirs)} {part}",
                                               theirs[0]))
    if file_modules and not matched and not any(name.startswith(prefix) for name in file_modules for prefix, _ in _PARTS):
        first = sorted(file_shapes)[0]
        raise ValueError(f"{source}: none of its {len(file_shapes)} tensors is a LoRA module of sd-scripts' layout "
                         f"(first: {first}); is it a LoRA file in sd-scripts' format?")
    _check_shapes(source, file_shapes, network_shapes, metadata)


def _no_match_message(source: str, file_modules: set[str], metadata: Mapping[str, str], model_family: str | None,
                      modules: str, first: str) -> str:
    found = lora_file_family(metadata, file_modules)
    if found is not None and lora_families_differ(found[0], model_family):
        family, evidence = found
        return (f"{source} is a LoRA for {family} (per {evidence}), but this run trains {model_family}: none of its "
                f"{modules} modules match (first: {first})")
    return f"{source}: none of its {modules} modules match a layer of this model (first: {first})"


def _check_shapes(source: str, file_shapes: Mapping[str, Sequence[int]], network_shapes: Mapping[str, Sequence[int]],
                  metadata: Mapping[str, str]) -> None:
    ranks: list[tuple[str, int, int]] = []  # (module, file rank, network rank)
    for key in sorted(file_shapes.keys() & network_shapes.keys()):
        theirs, ours = tuple(file_shapes[key]), tuple(network_shapes[key])
        if theirs == ours:
            continue
        module, _, leaf = key.partition(".")
        axis = _RANK_AXIS.get(leaf)
        if axis is not None and len(theirs) == len(ours) and all(
                a == b for i, (a, b) in enumerate(zip(theirs, ours)) if i != axis):
            ranks.append((module, theirs[axis], ours[axis]))
            continue
        found = lora_file_family(metadata, ())  # the names matched this model, so only the metadata can tell
        said = f"for {found[0]} (per {found[1]})" if found else "for another model with the same module names"
        raise ValueError(f"{source}: {key} has shape {list(theirs)} in the file, but this model's layer needs "
                         f"{list(ours)}; the file is {said}")
    if ranks:
        module, file_rank, network_rank = ranks[0]
        others = len({name for name, _, _ in ranks}) - 1
        more = f" (and {others} more modules)" if others else ""
        raise ValueError(f"{source}: module {module} has rank {file_rank} in the file but rank {network_rank} in the "
                         f"network{more}; add --dim_from_weights to take each module's rank from the file")
