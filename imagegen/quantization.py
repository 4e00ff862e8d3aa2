"""Quantized weights: which backend runs which scheme on which device, the diffusers configuration
that asks for it, and the bytes a model's weights take.

Why a table: int8, fp8, 4-bit and NF4 come from three libraries (torchao, optimum-quanto,
bitsandbytes), each of which runs some schemes on some devices only. A catalogue entry names a
scheme, and may name a backend; otherwise the first backend of the table that runs the scheme on
this device and is installed is chosen. A scheme that nothing here can run stops start-up with one
line that says why, never the first request.

The catalogue (no torch) reads the table; only `load_arguments` and the byte counts need torch,
and the engine alone calls them.
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from config import Scheme

# The components quantized when an entry's `quantize` names none: the denoiser, where nearly all
# the weights and all the per-step compute are. Big text encoders (T5, Gemma, Qwen) are opt-in.
DENOISERS = ("transformer", "unet")


@dataclass(frozen=True)
class Backend:
    name: str
    package: str  # what must be importable
    runs: dict[str, tuple[str, ...]]  # scheme -> the device types it runs on
    hints: dict[str, str] = field(default_factory=dict)  # scheme -> what to do where it does not run
    installed_by: str = "requirements.txt"
    # (scheme, device type) -> a program it runs: quanto builds its CPU int4 kernel with the C++
    # compiler on first use (make builds it at install; an image without a compiler cannot).
    programs: dict[tuple[str, str], str] = field(default_factory=dict)


# In the order a backend is chosen. torchao's int4 on a CPU needs `mslk`, which PyPI does not
# offer, so int4 on a CPU goes to quanto; bitsandbytes' diffusers quantizer refuses to run without
# a GPU. quanto is deprecated in diffusers but is the one backend with CPU int4 and Apple's MPS.
BACKENDS: dict[str, Backend] = {
    backend.name: backend
    for backend in (
        Backend(
            "torchao",
            "torchao",
            {"int8": ("cpu", "cuda"), "int8-dynamic": ("cpu", "cuda"), "fp8": ("cpu", "cuda"), "int4": ("cuda",)},
            {"int4": "torchao's int4 on a CPU needs the mslk package; quanto runs int4 on a CPU"},
        ),
        Backend(
            "quanto",
            "optimum.quanto",
            {s: ("cpu", "cuda", "mps") for s in ("int8", "int4", "fp8")},
            programs={("int4", "cpu"): "c++"},
        ),
        Backend(
            "bitsandbytes",
            "bitsandbytes",
            {"int8": ("cuda",), "nf4": ("cuda",)},
            installed_by="requirements-gpu.txt: `make install GPU=1`, or the image built with `--build-arg GPU=1`",
        ),
    )
}


class Unrunnable(ValueError):
    """A scheme that this device or the installed backends cannot run."""


@dataclass(frozen=True)
class Quantization:
    """What a catalogue entry asks for; `backend` is None until `for_device` picks one."""

    scheme: Scheme = "none"
    backend: str | None = None
    components: tuple[str, ...] | None = None  # None: the denoiser
    transformer: str | None = None  # a GGUF file (absolute path) loaded as the transformer

    @property
    def active(self) -> bool:
        return self.scheme != "none" or self.transformer is not None

    def view(self) -> dict[str, Any]:
        """What /models and /status show: the scheme, its backend and components, and the GGUF
        file's name (not its path: a path names the server's folders)."""
        return {
            "scheme": self.scheme,
            "backend": self.backend,
            "components": list(self.components) if self.components else None,
            "transformer": Path(self.transformer).name if self.transformer else None,
        }


def check_backend(scheme: str, backend: str | None) -> None:
    """The catalogue's check, before any device is known: a backend named for a scheme it lacks."""
    if backend is not None and scheme != "none" and scheme not in BACKENDS[backend].runs:
        does = ", ".join(BACKENDS[backend].runs)
        raise Unrunnable(f"quantization {scheme} is not a scheme of {backend} (it does {does})")


def installed(backend: Backend) -> bool:
    try:
        return importlib.util.find_spec(backend.package) is not None
    except ModuleNotFoundError:  # a dotted name whose parent is missing
        return False


def for_device(quantization: Quantization, device: str) -> Quantization:
    """The entry with its backend chosen for this device; Unrunnable says why none can run it."""
    scheme = quantization.scheme
    if scheme == "none":
        return quantization
    kind = device.split(":")[0]
    named = [BACKENDS[quantization.backend]] if quantization.backend else list(BACKENDS.values())
    offered = [backend for backend in named if kind in backend.runs.get(scheme, ())]
    if not offered:
        where = "; ".join(f"{b.name} on {', '.join(b.runs[scheme])}" for b in named if scheme in b.runs)
        hints = "; ".join(b.hints[scheme] for b in named if scheme in b.hints)
        raise Unrunnable(
            f"quantization {scheme} runs {where or 'nowhere'}, not on this worker's device {device}"
            + (f" ({hints})" if hints else "")
        )
    missing = []
    for backend in offered:
        program = backend.programs.get((scheme, kind))
        if not installed(backend):
            missing.append(f"{backend.package} ({backend.installed_by}), which is not installed")
        elif program and shutil.which(program) is None:
            missing.append(f"{backend.name} with a C++ compiler ({program}) to build its kernel, and there is none")
        else:
            return replace(quantization, backend=backend.name)
    raise Unrunnable(f"quantization {scheme} on {device} needs {' or '.join(missing)}")


def denoiser(index: Iterable[str]) -> str:
    """The component that denoises (a DiT's transformer or a UNet), from the model's components."""
    return next((name for name in DENOISERS if name in index), "unet")


def _configs(scheme: str, backend: str, dtype: Any) -> tuple[Any, Any]:
    """The diffusers and the transformers configuration of one scheme through one backend."""
    import diffusers
    import transformers

    if backend == "torchao":
        from torchao import quantization as ao

        made = {
            "int8": ao.Int8WeightOnlyConfig,
            "int8-dynamic": ao.Int8DynamicActivationInt8WeightConfig,
            "fp8": ao.Float8WeightOnlyConfig,
            "int4": ao.Int4WeightOnlyConfig,
        }[scheme]()
        return diffusers.TorchAoConfig(made), transformers.TorchAoConfig(made)
    if backend == "quanto":
        weights = {"int8": "int8", "int4": "int4", "fp8": "float8"}[scheme]
        return diffusers.QuantoConfig(weights_dtype=weights), transformers.QuantoConfig(weights=weights)
    options: dict[str, Any] = {"load_in_8bit": True}
    if scheme == "nf4":
        options = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": dtype}
    return diffusers.BitsAndBytesConfig(**options), transformers.BitsAndBytesConfig(**options)


def _pipeline_config(quantization: Quantization, index: dict[str, Any], dtype: Any) -> Any:
    """diffusers' PipelineQuantizationConfig for `from_pretrained`, or None: each component named
    (default: the denoiser, unless a GGUF file is the transformer) gets its library's config,
    read from the folder's model_index.json (`index`)."""
    if quantization.scheme == "none" or quantization.backend is None:
        return None
    from diffusers import PipelineQuantizationConfig

    for_diffusers, for_transformers = _configs(quantization.scheme, quantization.backend, dtype)
    names = quantization.components or (denoiser(index),)
    unknown = [name for name in names if not isinstance(index.get(name), list)]
    if unknown:  # a hub model the catalogue could not read at start-up
        raise ValueError(f"quantize: {', '.join(unknown)} is not a component of the model")
    mapping = {
        name: for_diffusers if index[name][0] == "diffusers" else for_transformers
        for name in names
        if not (name == "transformer" and quantization.transformer)
    }
    return PipelineQuantizationConfig(quant_mapping=mapping) if mapping else None


def _gguf_transformer(quantization: Quantization, source: str, index: dict[str, Any], dtype: Any) -> Any:
    """The model's transformer from its GGUF file, with the transformer config of `source` (a local
    folder, or a hub id where there is network); its blocks stay quantized and are dequantized
    layer by layer as they compute, in `dtype`."""
    import diffusers

    model = getattr(diffusers, index["transformer"][1])
    return model.from_single_file(
        quantization.transformer,
        quantization_config=diffusers.GGUFQuantizationConfig(compute_dtype=dtype),
        config=source,
        subfolder="transformer",
        dtype=dtype,
    )


def load_arguments(quantization: Quantization, source: str, dtype: Any) -> dict[str, Any]:
    """What `DiffusionPipeline.from_pretrained(source)` is given for the quantized weights asked
    for: the quantization config, and the GGUF transformer; nothing when none is asked for."""
    if not quantization.active:
        return {}
    from diffusers import DiffusionPipeline

    index = DiffusionPipeline.load_config(source)
    arguments: dict[str, Any] = {"quantization_config": _pipeline_config(quantization, index, dtype)}
    if quantization.transformer:
        arguments["transformer"] = _gguf_transformer(quantization, source, index, dtype)
    return arguments


def tensor_bytes(tensor: Any) -> int:
    """The bytes a tensor holds: a quantized one (torchao, quanto) is a wrapper around plain
    tensors (the packed data, scales, zero points), counted through them."""
    if hasattr(tensor, "__tensor_flatten__"):
        inner, _context = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in inner)
    return tensor.numel() * tensor.element_size()


def weight_bytes(module: Any) -> int:
    """A module's weights in bytes, from its state dict (`get_memory_footprint` reports fp32's
    bytes for int8 weights, so it is not used)."""
    return sum(tensor_bytes(tensor) for tensor in module.state_dict().values())


def pipeline_bytes(pipe: Any) -> dict[str, int]:
    """Each model component's weight bytes, and their "total"."""
    import torch

    parts = {name: weight_bytes(part) for name, part in pipe.components.items() if isinstance(part, torch.nn.Module)}
    return {**parts, "total": sum(parts.values())}


def needs_kernel(quantization: Quantization, device: str) -> bool:
    """Whether loading with this quantization on this device first builds a kernel (quanto's CPU int4)."""
    backend = BACKENDS.get(quantization.backend or "")
    return bool(backend and backend.programs.get((quantization.scheme, device.split(":")[0])))


def build_kernels() -> None:
    """Builds quanto's CPU int4 kernel (C++, about 40 s on two idle cores, once per installation:
    torch caches it), before the first model that needs it loads, or ahead with `make kernels`;
    not at install, as the defaults never use it. Without a compiler it builds nothing, and
    `for_device` refuses CPU int4."""
    quanto = BACKENDS["quanto"]
    if installed(quanto) and shutil.which(quanto.programs[("int4", "cpu")]):
        from optimum.quanto.library.extensions import get_extension

        get_extension("quanto_cpp").lib  # noqa: B018 (built and loaded on first access)


if __name__ == "__main__":
    build_kernels()
