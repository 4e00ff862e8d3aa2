"""ModelManager: loads diffusers pipelines, keeps the recently used ones, and unloads them.

Why it is called only from the worker thread: a diffusers pipeline is not safe to share between
threads, so loading, swapping schedulers and unloading all happen on the one thread that runs
generations. Other threads read `describe()`, a snapshot kept under a lock.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import inspect
import json
import logging
import re
import sys
import tempfile
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import psutil
import safetensors.torch
import torch
import transformers
from diffusers import (
    AutoencoderTiny,
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    AutoPipelineForText2Image,
    ControlNetModel,
    DiffusionPipeline,
    T2IAdapter,
)
from PIL import Image

from config import Settings
from imagegen.catalogue import ModelSpec
from imagegen.controlnets import IMAGE_ENCODER, IP_ADAPTER_WEIGHTS, controlnet_store, ip_adapter_store
from imagegen.cpu import torch_threads
from imagegen.edits import MASKED
from imagegen.embeddings import SDXL_KEYS, embedding_store
from imagegen.engine.annotators import Annotator
from imagegen.engine.annotators import load as load_annotator
from imagegen.engine.compiling import CACHE_FOLDER, compile_denoiser
from imagegen.engine.previews import Previewer, previewer
from imagegen.engine.upscaling import load as load_upscaler
from imagegen.families import BY_PIPELINE, FAMILIES, Family, UnservedModel, served
from imagegen.loras import AdapterFailed, AdapterRejected, AdapterStore
from imagegen.preprocessors import network_store
from imagegen.quantization import (
    Unrunnable,
    build_kernels,
    for_device,
    load_arguments,
    needs_kernel,
    pipeline_bytes,
)
from imagegen.schedulers import AUTOMATIC, DEFAULT_SCHEDULER, options, resolve
from imagegen.states import ModelState, backoff
from imagegen.upscalers import Upscaler, find, upscaler_store

log = logging.getLogger(__name__)


# A failed load is tried again after this, doubled after each failure, up to MAX_RETRY_SECONDS.
LOAD_RETRY_SECONDS = 5.0
MAX_RETRY_SECONDS = 600

# diffusers' low-memory loading patches torch's parameter registration process-wide while it runs,
# so two loads at once (two apps in one process, as in tests) corrupt each other: one at a time.
_LOAD_LOCK = threading.Lock()


@dataclass
class ModelInfo:
    """What operators see about one model."""

    id: str
    state: ModelState = ModelState.UNLOADED
    family: str | None = None
    device: str | None = None
    dtype: str | None = None
    load_seconds: float | None = None
    last_used: float | None = None
    error: str | None = None
    failures: int = 0  # failed loads in a row
    loads: int = 0  # loads since this process started (an adapter switch is none)
    switches: int = 0  # of those, loads that first unloaded another model to make room (MAX_LOADED_MODELS)
    compile_seconds: float | None = None  # its warm-up step, which compiled it (catalogue key `compile`)
    # From its process's start (the interpreter's, imports included) to its last load's readiness:
    # for a model loaded at start, how long a restart keeps it from serving.
    ready_after_start_seconds: float | None = None
    retry_at: float | None = None  # when a failed load is tried again (epoch seconds)
    quantization: dict[str, Any] | None = None  # the scheme loaded, with the backend chosen for the device
    weight_bytes: dict[str, int] | None = None  # per component, and "total", from the state dicts
    loras: list[str] = field(default_factory=list)  # the LoRA adapters loaded into it, least recently used first
    controlnets: list[str] = field(default_factory=list)  # the ControlNets loaded beside it, the same way
    safety_checker: str | None = None  # its own checker once loaded: on (runs), off (SAFETY_CHECKER), none
    filtered: int = 0  # images its safety checker flagged since this process started


@dataclass(frozen=True)
class SafetyChecker:
    """A model's own safety checker (SD's StableDiffusionSafetyChecker) and its image processor,
    taken off the pipeline, which would otherwise black out a flagged image and say nothing: the
    engine runs it on the decoded images itself and acts as SAFETY_ACTION says."""

    model: torch.nn.Module
    processor: Any

    @classmethod
    def detach(cls, pipe: DiffusionPipeline) -> SafetyChecker | None:
        """The pipeline's checker, taken off it (None where it has none)."""
        model, processor = getattr(pipe, "safety_checker", None), getattr(pipe, "feature_extractor", None)
        if model is None or processor is None:
            return None
        pipe.safety_checker = None
        return cls(model, processor)

    def flagged(self, images: list[Image.Image]) -> list[bool]:
        """Which images the checker flags."""
        parameter = next(self.model.parameters())
        pixels = self.processor(images, return_tensors="pt").pixel_values.to(parameter.device, parameter.dtype)
        with torch.no_grad():
            _, flags = self.model(clip_input=pixels, images=[np.asarray(image) for image in images])
        return [bool(flag) for flag in flags]


def resolve_device(setting: str) -> str:
    """DEVICE=auto picks CUDA, then Apple's MPS, then the CPU."""
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(setting: str, device: str) -> torch.dtype:
    """TORCH_DTYPE=auto: half precision on CUDA, full precision where fp16 is slow or unsupported."""
    if setting == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return getattr(torch, setting)


# glibc's mallopt parameter for the most heap arenas it makes (M_ARENA_MAX).
M_ARENA_MAX = -8


def _glibc() -> Any:
    return ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None


def limit_heap_arenas(arenas: int = 2) -> None:
    """At most `arenas` glibc heaps for the whole process. By default glibc makes up to 8 per core,
    one per thread that meets contention (server threads, torch's workers), and an unloaded
    model's pages stay scattered over them: measured on SD 1.5 at full size, RSS after an unload
    was 547 MB against 423 MB before loading with the default, 488 MB with two, at the same speed."""
    with contextlib.suppress(OSError, AttributeError):
        if libc := _glibc():
            libc.mallopt(M_ARENA_MAX, arenas)


def release_freed_ram() -> None:
    """Hands freed heap pages back to the OS; glibc keeps them otherwise, so RSS would not drop."""
    with contextlib.suppress(OSError, AttributeError):
        if libc := _glibc():
            libc.malloc_trim(0)


def memory_snapshot(device: str) -> str:
    """Process RSS, and allocated VRAM on CUDA, for load/unload log lines."""
    rss = psutil.Process().memory_info().rss / 2**20
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"rss={rss:.0f}MB vram={torch.cuda.memory_allocated(device) / 2**20:.0f}MB"
    return f"rss={rss:.0f}MB"


def load_pipeline(spec: ModelSpec, dtype: torch.dtype, device: str | None) -> DiffusionPipeline:
    """A pipeline from a diffusers folder or hub id, or from one checkpoint file: safetensors weights
    only, since a pickled checkpoint (.ckpt, .bin) can run code when it is loaded. A folder's
    weights are memory-mapped and, given a `device` (an accelerator it is not offloaded from),
    placed straight on it (`device_map`): no copy of the whole model passes through RAM on the way.
    A single file is loaded by its family's pipeline, with the configs and tokenizers of the
    entry's `config` folder (without network, nothing else has them)."""
    source = Path(spec.source)
    if not source.is_file():
        quantized = load_arguments(spec.quantization, spec.source, dtype)
        placed = {"device_map": device} if device else {}
        unchecked = {"safety_checker": None, "requires_safety_checker": False} if spec.safety_checker == "off" else {}
        return DiffusionPipeline.from_pretrained(
            spec.source, dtype=dtype, use_safetensors=True, **placed, **quantized, **unchecked
        )
    if source.suffix != ".safetensors" or spec.family is None:
        raise ValueError(f"only .safetensors checkpoints are loaded, not {source.name}")
    config = Settings.resolve_source(spec.entry.config) if spec.entry.config else None
    pipeline = getattr(diffusers, spec.family.pipeline)
    try:
        return pipeline.from_single_file(spec.source, config=config, dtype=dtype)
    except OSError as exc:
        if config is None:
            raise ValueError(
                f"{source.name}: its configs and tokenizers are not at hand (no network?); give model "
                f"{spec.id} a `config` folder in the MODELS file (a diffusers folder of its family)"
            ) from exc
        raise


def single_file_controlnet(path: Path, unet: Any, dtype: torch.dtype) -> ControlNetModel:
    """A ControlNet from one safetensors file, lllyasviel's layout or diffusers' names, read by
    diffusers' converter with the config of the UNet it steers (the file has none, and the hub's
    are out of reach) and its hint encoder's widths, read from the file."""
    with safetensors.safe_open(str(path), framework="pt") as tensors:
        shapes = {key.removeprefix("control_model."): tensors.get_slice(key).get_shape() for key in tensors.keys()}  # noqa: SIM118
    if "controlnet_cond_embedding.conv_in.weight" in shapes:  # conv_in, then every other block widens
        hint = ["controlnet_cond_embedding.conv_in.weight"]
        hint += [f"controlnet_cond_embedding.blocks.{i}.weight" for i in range(1, 64, 2)]
    else:  # lllyasviel's: a convolution every other layer, one in two widening; the last one is out
        layers = sorted(int(key.split(".")[1]) for key in shapes if re.fullmatch(r"input_hint_block\.\d+\.weight", key))
        hint = [f"input_hint_block.{i}.weight" for i in layers[:-1] if i % 4 == 0]
    widths = tuple(shapes[key][0] for key in hint if key in shapes)
    with torch.device("meta"):  # the config alone: no weights are made
        shaped = ControlNetModel.from_unet(
            unet, conditioning_embedding_out_channels=widths, load_weights_from_unet=False
        )
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps(dict(shaped.config)))
        return ControlNetModel.from_single_file(str(path), config=folder, torch_dtype=dtype)


def family_of(pipe: DiffusionPipeline, spec: ModelSpec) -> Family:
    """The family the catalogue read, or, for a model it could not read, the loaded pipeline's."""
    if spec.family is not None:
        return spec.family
    name = type(pipe).__name__
    if name == "FluxPipeline":
        return FAMILIES["flux-dev" if pipe.transformer.config.guidance_embeds else "flux-schnell"]
    if name not in BY_PIPELINE:
        raise UnservedModel(f"model {spec.id} is a {name}, a family this server does not serve; served: {served()}")
    return BY_PIPELINE[name]


Loader = Callable[[ModelSpec, torch.dtype, str | None], DiffusionPipeline]

# An adapter's name inside the model (PEFT keeps them in module dicts: no dots).
ADAPTER_KEY = re.compile(r"\W")

# The pipeline class an edit runs, made from the loaded one with `from_pipe`: the same modules,
# so an edit holds no second copy of the weights.
EDIT_PIPELINES: dict[str, Any] = {
    "img2img": AutoPipelineForImage2Image,
    "variation": AutoPipelineForImage2Image,
    "inpaint": AutoPipelineForInpainting,
    "outpaint": AutoPipelineForInpainting,
}
# With ControlNets, each mode's pipeline is its ControlNet variant, made the same way (diffusers'
# auto pipelines pick the class that takes `controlnet` for the loaded one's family).
CONTROL_PIPELINES: dict[str, Any] = {"txt2img": AutoPipelineForText2Image, **EDIT_PIPELINES}


class ModelManager:
    """An LRU cache of loaded pipelines, at most MAX_LOADED_MODELS at a time.

    `load` makes a pipeline from a catalogue entry; tests give one that returns a fake pipeline.
    """

    def __init__(
        self,
        settings: Settings,
        catalogue: dict[str, ModelSpec],
        adapters: AdapterStore,
        load: Loader = load_pipeline,
        embeddings: AdapterStore | None = None,
    ) -> None:
        limit_heap_arenas()  # before the threads that generate and serve allocate
        self.settings = settings
        self._load_pipeline = load
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.torch_dtype, self.device)
        self.threads = torch_threads(settings.torch_threads)
        self.compile_cache = settings.data_dir / CACHE_FOLDER
        torch.set_num_threads(self.threads)  # for the whole process: its engine is its only torch user
        self.catalogue = {model: self._runnable(spec) for model, spec in catalogue.items()}
        self._pipes: OrderedDict[str, DiffusionPipeline] = OrderedDict()
        self._edit_pipes: dict[tuple[str, Any], DiffusionPipeline] = {}  # (model, EDIT_PIPELINES class)
        self.adapters = adapters
        self.embeddings = embeddings or embedding_store(settings)
        self._embeddings: dict[str, dict[str, str]] = {}  # per model, its loaded embeddings' versions
        self.upscalers = upscaler_store(settings)
        # Loaded upscaler networks by name, with their file's version, least recently used first.
        self._upscalers: OrderedDict[str, tuple[str, Upscaler, torch.nn.Module]] = OrderedDict()
        self.controlnets = controlnet_store(settings)
        # Loaded ControlNets by (model, name), with their weights' version, least recently used first.
        self._controlnets: OrderedDict[tuple[str, str], tuple[str, torch.nn.Module]] = OrderedDict()
        self.ip_adapters = ip_adapter_store(settings)
        self.networks = network_store(settings)
        # Per model, how its previews are made (None: it has no way), settled at its first preview.
        self._previewers: dict[str, Previewer | None] = {}
        # The network preprocessors loaded (two at most: depth and pose), by name, with their version.
        self._annotators: dict[str, tuple[str, Annotator]] = {}
        # Per model, the IP-Adapters loaded into its attention (diffusers holds one set), with their versions.
        self._references: dict[str, tuple[tuple[str, str], ...]] = {}
        # Per model, its loaded adapters (PEFT adapter name -> LoRA name), least recently used first.
        self._adapters: dict[str, OrderedDict[str, str]] = {}
        self._families: dict[str, Family] = {}
        self._default_schedulers: dict[str, Any] = {}
        self._checkers: dict[str, SafetyChecker] = {}  # per model, its own safety checker where it runs
        self._schedulers: dict[tuple[str, str, str], Any] = {}
        # With MODEL_PRELOAD the worker loads the default model first, so it is "loading" from the start.
        first_state = ModelState.LOADING if settings.model_preload else ModelState.UNLOADED
        self._info: dict[str, ModelInfo] = {settings.model_id: ModelInfo(settings.model_id, first_state)}
        self._lock = threading.Lock()
        # Progress bars on stderr are noise in a server's logs.
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()

    def _runnable(self, spec: ModelSpec) -> ModelSpec:
        """The entry with its quantization backend chosen for this device; a scheme nothing here can
        run stops start-up with one line, as a bad catalogue entry does."""
        try:
            return replace(spec, quantization=for_device(spec.quantization, self.device))
        except Unrunnable as exc:
            raise SystemExit(f"cannot serve: model {spec.id}: {exc}") from None

    def _set(self, model_id: str, **changes: Any) -> None:
        with self._lock:
            info = self._info.setdefault(model_id, ModelInfo(model_id))
            for key, value in changes.items():
                setattr(info, key, value)

    def describe(self) -> list[dict[str, Any]]:
        """A thread-safe snapshot of every known model's state."""
        with self._lock:
            return [asdict(info) for info in self._info.values()]

    def state(self, model_id: str) -> ModelInfo:
        with self._lock:
            return ModelInfo(**asdict(self._info.get(model_id, ModelInfo(model_id))))

    def family(self, model_id: str) -> Family:
        """The family of a loaded model."""
        return self._families[model_id]

    def _checking(self, spec: ModelSpec, checker: SafetyChecker | None) -> str:
        """Its checker's state once loaded (ModelSpec.safety_checker's words): with SAFETY_CHECKER=off
        the one it ships was never loaded."""
        if self.settings.safety_checker == "off" and (checker is not None or spec.safety_checker == "off"):
            return "off"
        return "none" if checker is None else "on"

    def flagged(self, model_id: str, images: list[Image.Image]) -> list[bool]:
        """Which of a loaded model's images its safety checker flags (none, where none runs)."""
        checker = self._checkers.get(model_id)
        if checker is None or not images:
            return [False] * len(images)
        flags = checker.flagged(images)
        self._set(model_id, filtered=self.state(model_id).filtered + sum(flags))
        return flags

    def _load(self, model_id: str) -> DiffusionPipeline:
        spec = self.catalogue[model_id]
        dtype = resolve_dtype(spec.entry.dtype, self.device) if spec.entry.dtype else self.dtype
        self._set(model_id, state=ModelState.LOADING, error=None)
        log.info("loading model %s on %s (%s); before: %s", model_id, self.device, dtype, memory_snapshot(self.device))
        started = time.perf_counter()
        try:
            with _LOAD_LOCK:
                if needs_kernel(spec.quantization, self.device):
                    log.info("building quanto's CPU int4 kernel if not built yet (C++, once per installation)")
                    build_kernels()
                pipe = self._load_pipeline(spec, dtype, self._placed(spec))
            pipe.set_progress_bar_config(disable=True)  # before the warm-up's step: no tqdm bar in the log
            family = family_of(pipe, spec)
            self._apply_memory_options(pipe, spec)
            how = spec.entry.compile or "none"
            compile_denoiser(pipe, how, self.compile_cache)
            warming = time.perf_counter()
            self._warm_up(pipe, family, spec)
            compiled = round(time.perf_counter() - warming, 3) if how != "none" else None
            checker = SafetyChecker.detach(pipe)
            if checker is None and self.settings.safety_checker == "on":
                raise UnservedModel(f"model {model_id} ships no safety checker, and SAFETY_CHECKER=on runs one")
        except Exception as exc:
            failures = self.state(model_id).failures + 1
            wait = backoff(LOAD_RETRY_SECONDS, failures, MAX_RETRY_SECONDS)
            error = f"{type(exc).__name__}: {exc}"
            self._set(model_id, state=ModelState.FAILED, error=error, failures=failures, retry_at=time.time() + wait)
            log.error("model %s failed to load (%d in a row; next try in %.0fs): %s", model_id, failures, wait, exc)
            raise
        seconds = time.perf_counter() - started
        self._default_schedulers[model_id] = pipe.scheduler
        self._families[model_id] = family
        if checker is not None and self.settings.safety_checker != "off":
            self._checkers[model_id] = checker
        else:
            self._checkers.pop(model_id, None)
        self._set(
            model_id,
            state=ModelState.READY,
            family=family.name,
            device=self.device,
            dtype=str(dtype).removeprefix("torch."),
            load_seconds=round(seconds, 3),
            failures=0,
            retry_at=None,
            loads=self.state(model_id).loads + 1,
            quantization=spec.quantization.view(),
            weight_bytes=pipeline_bytes(pipe),
            compile_seconds=compiled,
            ready_after_start_seconds=round(time.time() - psutil.Process().create_time(), 3),
            safety_checker=self._checking(spec, checker),
        )
        log.info("loaded model %s in %.2fs; after: %s", model_id, seconds, memory_snapshot(self.device))
        return pipe

    def _warm_up(self, pipe: DiffusionPipeline, family: Family, spec: ModelSpec) -> None:
        """One step at the default size before the model counts as ready: the first call pays for lazy
        set-up (kernels, allocator pools), and otherwise the first request would. A model that only
        inpaints warms up inpainting a blank image."""
        size = (spec.default_width, spec.default_height)
        arguments = family.arguments([""], [""], [""], *size, 1, spec.default_guidance)
        if not family.text_to_image:
            arguments.update(image=Image.new("RGB", size, "gray"), mask_image=Image.new("L", size, 255))
        with torch.no_grad():  # not inference_mode: see Engine._generate
            pipe(**arguments, generator=torch.Generator("cpu").manual_seed(0))

    def _placed(self, spec: ModelSpec) -> str | None:
        """The device a model is loaded straight onto: an accelerator diffusers places whole models
        on (`cuda`; not one CPU offload keeps the weights off), else None (the CPU, or moved after)."""
        if self.device != "cuda" or self._chosen(spec, "cpu_offload"):
            return None
        return self.device

    def _chosen(self, spec: ModelSpec, name: str) -> Any:
        """A memory option: the entry's, else the setting's (or its preset's)."""
        value = getattr(spec.entry, name)
        return getattr(self.settings, name) if value is None else value

    def _apply_memory_options(self, pipe: DiffusionPipeline, spec: ModelSpec) -> None:
        """The entry's (else the preset's) memory trade-offs; CPU offload only means something on an
        accelerator. A model already placed on its device stays (`to` moves nothing there)."""
        if self._chosen(spec, "attention_slicing"):
            pipe.enable_attention_slicing()
        if self._chosen(spec, "vae_tiling") and hasattr(pipe, "vae"):
            pipe.vae.enable_tiling()
        if self._chosen(spec, "cpu_offload") and self.device.startswith("cuda"):
            pipe.enable_model_cpu_offload(device=self.device)
        else:
            pipe.to(self.device)

    def get(
        self,
        model_id: str,
        scheduler: str = DEFAULT_SCHEDULER,
        mode: str = "txt2img",
        loras: tuple[tuple[str, float], ...] = (),
        schedule: str = AUTOMATIC,
        embeddings: tuple[str, ...] = (),
        controls: tuple[str, ...] = (),
        references: tuple[str, ...] = (),
    ) -> DiffusionPipeline:
        """The pipeline for model_id's mode (families.Family.modes) with the requested scheduler (and
        its noise schedule) and LoRA adapters active, the named embeddings and IP-Adapters loaded and
        the named ControlNets beside it, loading (and evicting) as needed."""
        pipe = self._pipes.get(model_id)
        if pipe is None:
            switched = len(self._pipes) >= self.settings.max_loaded_models
            while len(self._pipes) >= self.settings.max_loaded_models:
                self.unload(next(iter(self._pipes)))
            pipe = self._pipes[model_id] = self._load(model_id)
            if switched:
                self._set(model_id, switches=self.state(model_id).switches + 1)
        self._pipes.move_to_end(model_id)
        self._set(model_id, last_used=time.time())
        self._activate(model_id, pipe, loras)
        self._embed(model_id, pipe, embeddings)
        self._show(model_id, pipe, references)
        if controls or references:  # a pipeline of a few milliseconds, made per batch from the loaded modules
            nets = [self.controlnet(model_id, pipe, name) for name in controls]
            steering = nets if len(nets) > 1 else nets[0] if nets else None
            if nets and isinstance(nets[0], T2IAdapter):  # the service lets them steer only alone, in text-to-image
                pipe = getattr(diffusers, self._families[model_id].t2i_pipeline).from_pipe(pipe, adapter=steering)
            else:
                pipe = CONTROL_PIPELINES[mode].from_pipe(pipe, **({"controlnet": steering} if nets else {}))
            pipe.set_progress_bar_config(disable=True)
        elif mode in EDIT_PIPELINES and not (mode in MASKED and not self._families[model_id].text_to_image):
            key = (model_id, EDIT_PIPELINES[mode])
            if key not in self._edit_pipes:
                self._edit_pipes[key] = EDIT_PIPELINES[mode].from_pipe(pipe)
                self._edit_pipes[key].set_progress_bar_config(disable=True)
            pipe = self._edit_pipes[key]
        pipe.scheduler = self._scheduler(model_id, *resolve(scheduler, schedule))
        return pipe

    def upscaler(self, name: str) -> tuple[torch.nn.Module | None, int]:
        """A neural upscaler's network (loaded once per version of its file, the MAX_LOADED_MODELS
        most recent kept) and its scale; (None, 1) for a built-in one."""
        try:
            described = find(self.upscalers, name)
            if described is None:
                return None, 1
            path, version = self.upscalers.local_file(name)
        except (AdapterRejected, FileNotFoundError):
            raise AdapterFailed(f"upscaler `{name}` is no longer in UPSCALER_DIR") from None
        if name not in self._upscalers or self._upscalers[name][0] != version:
            try:
                network = load_upscaler(described, str(path)).to(self.device)
            except (RuntimeError, ValueError) as exc:  # weights that do not match their header's sizes
                raise AdapterFailed(f"upscaler `{name}` could not be loaded", str(exc)) from exc
            self._upscalers[name] = (version, described, network)
            while len(self._upscalers) > self.settings.max_loaded_models:
                self._upscalers.popitem(last=False)
        self._upscalers.move_to_end(name)
        _version, described, network = self._upscalers[name]
        return network, described.scale

    def previewer(self, model_id: str, pipe: DiffusionPipeline, family: Family) -> Previewer | None:
        """How the model's latents become a preview (engine/previews.py), with the catalogue's
        `preview_vae` loaded once beside it, in its dtype."""
        if model_id not in self._previewers:
            folder = self.catalogue[model_id].preview_vae
            tiny = AutoencoderTiny.from_pretrained(folder, dtype=pipe.dtype).to(self.device) if folder else None
            self._previewers[model_id] = previewer(pipe, family.latent_space, tiny)
            how = "none" if self._previewers[model_id] is None else "preview_vae" if tiny else "its VAE or factors"
            log.info("previews of model %s: %s", model_id, how)
        return self._previewers[model_id]

    def annotator(self, name: str) -> Annotator:
        """A network preprocessor (depth, pose), loaded once per version of its folder in the
        engine's dtype and on its device."""
        try:
            path, version = self.networks.local_file(name)
        except (AdapterRejected, FileNotFoundError):
            raise AdapterFailed(f"preprocessor `{name}` is no longer in PREPROCESSOR_DIR") from None
        if name not in self._annotators or self._annotators[name][0] != version:
            try:
                self._annotators[name] = (version, load_annotator(name, path, self.device, self.dtype))
            except (OSError, RuntimeError, ValueError) as exc:  # weights that do not match their config
                raise AdapterFailed(f"preprocessor `{name}` could not be loaded", str(exc)) from exc
            log.info("loaded the %s preprocessor's network", name)
        return self._annotators[name][1]

    def controlnet(self, model_id: str, pipe: DiffusionPipeline, name: str) -> torch.nn.Module:
        """A ControlNet for that model, loaded once per version of its weights in the model's dtype
        and on its device, the MAX_LOADED_CONTROLNETS most recent kept."""
        key = (model_id, name)
        try:
            path, version = self.controlnets.local_file(name)
            loaded = key in self._controlnets and self._controlnets[key][0] == version
            architecture = None if loaded else self.controlnets.find(name).architecture  # read only to load
        except (AdapterRejected, FileNotFoundError):
            raise AdapterFailed(f"ControlNet `{name}` is no longer in CONTROLNET_DIR") from None
        if not loaded:
            try:
                if path.is_file():
                    network = single_file_controlnet(path, pipe.unet, pipe.dtype)
                else:
                    network = getattr(diffusers, architecture).from_pretrained(path, dtype=pipe.dtype)
            except (OSError, RuntimeError, ValueError) as exc:  # weights that do not match their config
                raise AdapterFailed(f"ControlNet `{name}` could not be loaded", str(exc)) from exc
            self._controlnets[key] = (version, network.to(self.device))
            changed = {model_id}
            while len(self._controlnets) > self.settings.max_loaded_controlnets:
                changed.add(self._controlnets.popitem(last=False)[0][0])
            for model in changed:
                self._set(model, controlnets=[each for owner, each in self._controlnets if owner == model])
            log.info("loaded ControlNet %s for model %s (%d loaded)", name, model_id, len(self._controlnets))
        self._controlnets.move_to_end(key)
        return self._controlnets[key][1]

    def _show(self, model_id: str, pipe: DiffusionPipeline, names: tuple[str, ...]) -> None:
        """Makes exactly these IP-Adapters loaded into the model's attention (its UNet's or its
        transformer's), with the first one's image encoder: diffusers holds one set at a time, so
        another set is loaded in its place (none restores the model's own attention)."""
        wanted = []
        for name in names:
            try:
                wanted.append((name, *self.ip_adapters.local_file(name)))
            except FileNotFoundError:
                raise AdapterFailed(f"IP-Adapter `{name}` is no longer in IPADAPTER_DIR") from None
        loaded = tuple((name, version) for name, _path, version in wanted)
        if self._references.get(model_id, ()) == loaded:
            return
        if self._references.pop(model_id, ()):
            pipe.unload_ip_adapter()
        if not wanted:
            return
        folders = [str(path) for _name, path, _version in wanted]
        weights = [IP_ADAPTER_WEIGHTS] * len(folders)
        try:
            if "image_encoder_folder" in inspect.signature(pipe.load_ip_adapter).parameters:  # the UNets'
                pipe.load_ip_adapter(
                    folders, subfolder=[""] * len(folders), weight_name=weights, image_encoder_folder=IMAGE_ENCODER
                )
            else:  # FLUX.1's: the encoder by its path, in the model's dtype (its default is float16)
                encoder = f"{folders[0]}/{IMAGE_ENCODER}"
                pipe.load_ip_adapter(
                    folders,
                    weight_name=weights,
                    image_encoder_pretrained_model_name_or_path=encoder,
                    image_encoder_dtype=pipe.dtype,
                )
        except Exception as exc:
            with contextlib.suppress(Exception):  # what half-loaded goes with it
                pipe.unload_ip_adapter()
            raise AdapterFailed(f"IP-Adapter {', '.join(names)} does not fit model {model_id}", str(exc)) from exc
        self._references[model_id] = loaded
        log.info("loaded IP-Adapters %s into model %s", ", ".join(names), model_id)

    def _scheduler(self, model_id: str, scheduler: str, schedule: str) -> Any:
        """The model's scheduler of that name and schedule, made once from the model's own config (so
        one schedule's options never linger into another's) and shared by its pipelines, which the
        one engine thread calls one at a time."""
        default = self._default_schedulers[model_id]
        if scheduler == DEFAULT_SCHEDULER:
            return default
        key = (model_id, scheduler, schedule)
        if key not in self._schedulers:
            class_name, wanted = options(scheduler, schedule)
            self._schedulers[key] = getattr(diffusers, class_name).from_config(default.config, **wanted)
        return self._schedulers[key]

    def _embed(self, model_id: str, pipe: DiffusionPipeline, names: tuple[str, ...]) -> None:
        """Loads the named embeddings into the model's tokenizers and text encoders, each once per
        version of its file (a replaced file's tokens are unloaded first); the editing pipelines
        share them. SDXL's files hold one part per encoder."""
        loaded = self._embeddings.setdefault(model_id, {})
        for name in names:
            try:
                path, version = self.embeddings.local_file(name)
            except FileNotFoundError:
                raise AdapterFailed(f"embedding `{name}` is no longer in EMBEDDINGS_DIR") from None
            if loaded.get(name) == version:
                continue
            tensors = safetensors.torch.load_file(str(path))
            parts = [tensors[key] for key in SDXL_KEYS] if all(key in tensors for key in SDXL_KEYS) else None
            parts = parts or [tensors.get("emb_params", next(iter(tensors.values())))]
            encoders = [(pipe.tokenizer, pipe.text_encoder)]
            if len(parts) == 2:
                encoders.append((pipe.tokenizer_2, pipe.text_encoder_2))
            for vectors, (tokenizer, encoder) in zip(parts, encoders, strict=True):
                vectors = vectors[0] if vectors.ndim == 2 and vectors.shape[0] == 1 else vectors
                tokens = [name] + [f"{name}_{i}" for i in range(1, len(vectors) if vectors.ndim == 2 else 1)]
                if name in loaded:
                    pipe.unload_textual_inversion(tokens, tokenizer=tokenizer, text_encoder=encoder)
                try:
                    pipe.load_textual_inversion(vectors, token=name, tokenizer=tokenizer, text_encoder=encoder)
                except (ValueError, RuntimeError) as exc:
                    raise AdapterFailed(f"embedding `{name}` does not fit model {model_id}", str(exc)) from exc
            loaded[name] = version

    def _activate(self, model_id: str, pipe: DiffusionPipeline, loras: tuple[tuple[str, float], ...]) -> None:
        """Makes exactly these adapters active, at their weights: each is loaded into the model once
        (PEFT) and kept among MAX_LOADED_LORAS, so a switch between batches only sets weights. The
        editing pipelines share the model's modules, so they see the same adapters."""
        loaded = self._adapters.setdefault(model_id, OrderedDict())
        active = []
        for name, _weight in loras:
            try:
                path, version = self.adapters.local_file(name)
            except FileNotFoundError:
                raise AdapterFailed(f"adapter `{name}` is no longer in LORA_DIR") from None
            key = ADAPTER_KEY.sub("_", f"{name}_{version}")  # a replaced file is another adapter
            if key not in loaded:
                while len(loaded) >= self.settings.max_loaded_loras:
                    pipe.delete_adapters(loaded.popitem(last=False)[0])
                try:
                    with warnings.catch_warnings():  # several adapters in one model is the point
                        warnings.filterwarnings("ignore", "Already found a `peft_config`", UserWarning)
                        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=key)
                except Exception as exc:
                    with contextlib.suppress(Exception):  # what half-loaded goes with it
                        pipe.delete_adapters(key)
                    raise AdapterFailed(f"adapter `{name}` does not fit the model", f"{model_id}: {exc}") from exc
                loaded[key] = name
                log.info("loaded adapter %s into model %s (%d loaded)", name, model_id, len(loaded))
            loaded.move_to_end(key)
            active.append(key)
        self._set(model_id, loras=list(loaded.values()))
        if active:
            pipe.enable_lora()
            pipe.set_adapters(active, adapter_weights=[weight for _name, weight in loras])
        elif loaded:
            pipe.disable_lora()

    def loaded(self) -> list[str]:
        """The models in memory, least recently used first (generation thread only)."""
        return list(self._pipes)

    def pipeline(self, model_id: str) -> DiffusionPipeline | None:
        """The loaded text-to-image pipeline of a model, None when it is not loaded (generation
        thread only, like every pipeline call)."""
        return self._pipes.get(model_id)

    def adapter_keys(self, model_id: str) -> list[str]:
        """The names PEFT knows a model's loaded adapters by (its `adapter_names`), least recently
        used first."""
        return list(self._adapters.get(model_id, {}))

    def retry_due(self) -> tuple[list[str], float | None]:
        """Failed models whose next try is due, and the seconds until the next one that is not (or None)."""
        now = time.time()
        with self._lock:
            waits = {m: info.retry_at - now for m, info in self._info.items() if info.state == ModelState.FAILED}
        due = [model for model, wait in waits.items() if wait <= 0]
        later = [wait for wait in waits.values() if wait > 0]
        return due, min(later, default=None)

    def idle(self, seconds: float) -> list[str]:
        """Loaded models unused for at least `seconds` (safe to ask from any thread)."""
        cutoff = time.time() - seconds
        with self._lock:
            return [
                m for m, info in self._info.items() if info.state == ModelState.READY and (info.last_used or 0) < cutoff
            ]

    def unload_many(self, model_ids: list[str]) -> list[str]:
        """Worker thread only: unloads each of the given models still loaded."""
        return [unloaded for model_id in model_ids for unloaded in self.unload(model_id)]

    def unload(self, model_id: str | None = None) -> list[str]:
        """Drops one model (or all) and returns the memory to the system."""
        targets = [model_id] if model_id else list(self._pipes)
        before = memory_snapshot(self.device)
        unloaded = [target for target in targets if self._pipes.pop(target, None) is not None]
        for target in unloaded:
            for key in [key for key in self._edit_pipes if key[0] == target]:
                del self._edit_pipes[key]
            self._adapters.pop(target, None)  # they lived in the model's modules
            self._embeddings.pop(target, None)  # and these in its tokenizers and text encoders
            self._default_schedulers.pop(target, None)
            for key in [key for key in self._schedulers if key[0] == target]:
                del self._schedulers[key]
            self._families.pop(target, None)
            self._checkers.pop(target, None)
            for key in [key for key in self._controlnets if key[0] == target]:
                del self._controlnets[key]
            self._references.pop(target, None)
            self._previewers.pop(target, None)
            self._set(target, state=ModelState.UNLOADED, loras=[], controlnets=[])
        if unloaded:
            gc.collect()
            release_freed_ram()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            log.info("unloaded %s; before: %s; after: %s", ", ".join(unloaded), before, memory_snapshot(self.device))
        return unloaded
