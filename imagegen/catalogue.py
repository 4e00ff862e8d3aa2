"""The model catalogue: every model the server offers, with its family and the defaults and limits
a request gets, worked out once at start-up from static files (no torch: a cluster API reads it).

Why at start-up: a bad entry, or a model of a family we do not serve, should stop the server with
one line, not fail the first request. Precedence for a request's values: the request, then the
entry, then the family (and what the model's configs say, such as its trained size), then the
environment's globals; MAX_WIDTH and friends cap what no entry caps.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, get_args

from config import ROOT, ModelEntry, Settings, StepCache
from imagegen.families import FAMILIES, Facts, Family, UnservedModel, checkpoint_family, facts, folder_reader
from imagegen.quantization import Quantization, Unrunnable, check_backend, denoiser


@dataclass(frozen=True)
class ModelSpec:
    """One catalogue entry, resolved."""

    id: str
    source: str  # a local folder or file (absolute), or a hub id
    entry: ModelEntry
    family: Family | None  # None: a hub model this machine cannot read now (told when it loads)
    size_multiple: int
    default_width: int
    default_height: int
    default_steps: int
    default_guidance: float
    max_width: int
    max_height: int
    max_steps: int
    quantization: Quantization
    preview_vae: str | None = None  # a local AutoencoderTiny folder its previews are decoded with
    step_cache: str = "none"  # its requests' default step cache (families.Family.step_cache: how)
    # Its own safety checker (SAFETY_CHECKER): `on` (it ships one, which runs), `off` (it ships one,
    # never loaded), `none` (it ships none), None (a hub model unread: known when it loads).
    safety_checker: str | None = None

    def view(self) -> dict[str, Any]:
        """What /models says about it: enough for a client (or the playground) to build a request."""
        return {
            "family": self.family.name if self.family else None,
            "fields": self.family.fields if self.family else None,
            "schedulers": ["default", *self.family.schedulers] if self.family else None,
            "modes": list(self.family.modes) if self.family else None,  # txt2img and the edits it does
            "adapters": list(self.family.adapters) if self.family else None,
            "size_multiple": self.size_multiple,
            "defaults": {
                "width": self.default_width,
                "height": self.default_height,
                "steps": self.default_steps,
                "guidance_scale": self.default_guidance,
                "step_cache": self.step_cache,
            },
            "limits": {"max_width": self.max_width, "max_height": self.max_height, "max_steps": self.max_steps},
            "quantization": self.quantization.view(),
            "step_cache": list(get_args(StepCache)) if self.family and self.family.step_cache else ["none"],
            "compile": self.entry.compile or "none",
            "safety_checker": self.safety_checker,
        }


def hub_id(source: str) -> bool:
    """Whether a source that is no file or folder here can be a hub id (`owner/name`); one whose
    owner is a folder of the project (`models/nope`), or that starts like a path, meant a path
    (and the hub would only be asked, in vain, at each load)."""
    owner, slash, name = source.partition("/")
    return bool(
        slash
        and re.fullmatch(r"[\w.-]+", owner)
        and re.fullmatch(r"[\w.-]+", name)
        and not owner.startswith(".")
        and not (ROOT / owner).is_dir()
    )


def _hub_reader(repo: str) -> Callable[[str], dict[str, Any] | None]:
    """Reads a hub model's JSON files (cached by huggingface_hub; None when offline or absent)."""

    def read(path: str) -> dict[str, Any] | None:
        from huggingface_hub import hf_hub_download

        try:
            return json.loads(Path(hf_hub_download(repo, path)).read_text(encoding="utf-8"))
        except Exception:  # offline, no such repo or file, not a repo id at all: not known now
            return None

    return cache(read)  # model_index.json is asked for twice: to tell "not readable now" first


def _facts(model: str, source: str, entry: ModelEntry, components: bool) -> Facts | None:
    """The model's family, size multiple and trained size (and with `components` its quantizable
    parts), or None when they cannot be read now."""
    path = Path(source)
    if path.is_file():
        if path.suffix != ".safetensors":
            return None  # refused when it loads, with the reason (only safetensors)
        family = FAMILIES[entry.family] if entry.family else checkpoint_family(path)
        return Facts(family, family.size_multiple, family.default_size)
    read = folder_reader(path) if path.is_dir() else _hub_reader(source)
    if not path.is_dir() and read("model_index.json") is None:
        return None
    found = facts(read, model, components)
    if entry.family and entry.family != found.family.name:
        return Facts(FAMILIES[entry.family], found.size_multiple, found.default_size, found.components)
    return found


# The guidance of a model whose family is not known yet (a hub model unread) and whose entry sets none.
DEFAULT_GUIDANCE = 5.0


def _fit(value: int, cap: int, multiple: int) -> int:
    """A default no larger than the cap, on the size multiple."""
    return max(multiple, min(value, cap) // multiple * multiple)


def _scheme(settings: Settings, entry: ModelEntry) -> str:
    """The entry's quantization scheme, else the one QUANTIZATION gives every model."""
    return entry.quantization or settings.quantization


def _quantization(settings: Settings, model: str, entry: ModelEntry, source: str, found: Facts | None) -> Quantization:
    """The entry's quantized weights (or the settings' scheme), checked against what the files say;
    UnservedModel names the model and the key."""
    scheme = _scheme(settings, entry)
    backend = entry.quantization_backend or settings.quantization_backend
    transformer = settings.resolve_source(entry.transformer) if entry.transformer else None
    components = entry.quantize
    if components is None and scheme != "none" and found and found.components:
        components = (denoiser(found.components),)  # shown as what it is; unread hub models get it at load
    quantization = Quantization(scheme, backend, components, transformer)

    def refuse(key: str, why: str) -> UnservedModel:
        return UnservedModel(f"model {model}, key {key}: {why}")

    try:
        check_backend(scheme, backend)
    except Unrunnable as exc:
        raise refuse("quantization_backend", str(exc)) from None
    if quantization.active and Path(source).is_file():
        key = "quantization" if scheme != "none" else "transformer"
        raise refuse(key, "needs a diffusers folder or hub id as the source, not a single file")
    if entry.quantize and scheme == "none":
        raise refuse("quantize", "names components, but the model's quantization is none")
    if entry.quantize and found and found.components:
        unknown = [name for name in entry.quantize if name not in found.components]
        if unknown:
            has = ", ".join(found.components)
            raise refuse("quantize", f"{', '.join(unknown)} is not a component of the model (it has {has})")
    if transformer is None:
        return quantization
    if not (transformer.endswith(".gguf") and Path(transformer).is_file()):
        raise refuse("transformer", f"{entry.transformer} is not a .gguf file")
    if found and not found.family.gguf:
        raise refuse("transformer", f"diffusers reads no GGUF transformer for family {found.family.name}")
    if scheme != "none" and (entry.quantize is None or "transformer" in entry.quantize):
        raise refuse("quantize", "the transformer is the GGUF file's, already quantized: name the others")
    return quantization


def resolve(settings: Settings, model: str, entry: ModelEntry) -> ModelSpec:
    """One entry with its family's and the environment's values filled in; UnservedModel (or a
    ValueError naming the key) when it cannot be served."""
    if entry.family is not None and entry.family not in FAMILIES:
        raise UnservedModel(
            f"MODELS file model {model}, key family: {entry.family!r} is not one of {', '.join(FAMILIES)}"
        )
    source = settings.resolve_source(entry.source)
    if not Path(source).exists() and not hub_id(source):
        raise UnservedModel(f"no such folder or known model: {entry.source}")
    quantized = _scheme(settings, entry) != "none" or entry.quantize is not None
    found = _facts(model, source, entry, components=quantized)
    family = found.family if found else None
    multiple = found.size_multiple if found else 8
    max_width, max_height = entry.max_width or settings.max_width, entry.max_height or settings.max_height
    max_steps = entry.max_steps or settings.max_steps
    for key in ("default_width", "default_height", "max_width", "max_height"):
        value = getattr(entry, key)
        if value is not None and value % multiple:
            raise UnservedModel(f"MODELS file model {model}, key {key}: must be a multiple of {multiple}, got {value}")
    for key, cap in (("default_width", max_width), ("default_height", max_height), ("default_steps", max_steps)):
        value = getattr(entry, key)
        if value is not None and value > cap:
            raise UnservedModel(f"MODELS file model {model}, key {key}: {value} is over its limit {cap}")
    if entry.compile == "regional" and family is not None and not family.repeated_blocks:
        why = f"{family.title} names no repeated blocks; use full"
        raise UnservedModel(f"MODELS file model {model}, key compile: {why}")
    trained = found.default_size if found else None
    guidance = family.default_guidance if family else None
    return ModelSpec(
        id=model,
        source=source,
        entry=entry,
        family=family,
        size_multiple=multiple,
        default_width=entry.default_width or _fit(trained or settings.default_width, max_width, multiple),
        default_height=entry.default_height or _fit(trained or settings.default_height, max_height, multiple),
        default_steps=min(
            entry.default_steps or (family and family.default_steps) or settings.default_steps, max_steps
        ),
        default_guidance=next(v for v in (entry.default_guidance, guidance, DEFAULT_GUIDANCE) if v is not None),
        max_width=max_width,
        max_height=max_height,
        max_steps=max_steps,
        quantization=_quantization(settings, model, entry, source, found),
        preview_vae=_preview_vae(settings, model, entry),
        step_cache=entry.step_cache or "none",
        safety_checker=_safety_checker(settings, model, source),
    )


def _safety_checker(settings: Settings, model: str, source: str) -> str | None:
    """Whether the model's own safety checker runs (ModelSpec.safety_checker), from its
    model_index.json; SAFETY_CHECKER=on refuses a model that ships none."""
    path = Path(source)
    if path.is_file():
        ships: bool | None = False  # a checkpoint file holds the denoiser, encoders and VAE only
    else:
        index = (folder_reader(path) if path.is_dir() else _hub_reader(source))("model_index.json")
        ships = None if index is None else bool((index.get("safety_checker") or [None])[-1])
    if ships is None:
        return None
    if not ships:
        if settings.safety_checker == "on":
            raise UnservedModel(
                f"model {model} ships no safety checker, and SAFETY_CHECKER=on runs one for every model"
            )
        return "none"
    return "off" if settings.safety_checker == "off" else "on"


def _preview_vae(settings: Settings, model: str, entry: ModelEntry) -> str | None:
    """The entry's preview decoder, a diffusers AutoencoderTiny folder on this machine."""
    if entry.preview_vae is None:
        return None
    folder = settings.resolve_source(entry.preview_vae)
    if not (Path(folder) / "config.json").is_file():
        raise UnservedModel(f"MODELS file model {model}, key preview_vae: {entry.preview_vae} is no diffusers folder")
    return folder


def build_catalogue(settings: Settings) -> dict[str, ModelSpec]:
    """Every offered model, MODEL_ID first; SystemExit with one line for one that cannot be served."""
    try:
        entries = settings.model_entries()
        catalogue = {model: resolve(settings, model, entries[model]) for model in settings.allowed_models}
    except UnservedModel as exc:
        raise SystemExit(f"cannot serve: {exc}") from None
    return catalogue
