"""LoRA adapters: the files in LORA_DIR (a folder, or object storage), what their headers say, and
which models they fit.

Why from headers alone: the API must refuse an unknown adapter, or one made for another family,
before a job is queued, and a cluster's API has no torch. A safetensors header names every tensor
(kohya / A1111 / ComfyUI names such as `lora_unet_..._lora_down`, or diffusers / PEFT names such
as `unet....lora_A`), which tells the family and the rank; its metadata may carry trigger words.
Requests name adapters, never paths: a name is a file name without `.safetensors` in LORA_DIR.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem
from safetensors import safe_open

from imagegen.families import FAMILIES, UnservedModel, safetensors_header
from imagegen.refusals import Refusal
from imagegen.storage import filesystem, modified

if TYPE_CHECKING:
    from config import Settings

Item = TypeVar("Item")  # what a store's files are read as: a Lora, an embeddings.Embedding
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
SUFFIX = ".safetensors"
# A diffusers folder's weights (beside its config.json): the file a ControlNet's folder is versioned by.
WEIGHTS = "diffusion_pytorch_model.safetensors"

# Tensor-name marks of each family lineage (`families.Family.lineage`), checked in order (SDXL's
# UNet has blocks of several transformer layers and a second text encoder; Flux has single-stream
# blocks; SD3 joint ones).
MARKS = (
    ("flux", ("single_transformer_blocks", "single_blocks", "double_blocks")),
    ("sd3", ("transformer_blocks.0.attn.add_k_proj", "joint_blocks")),
    ("sdxl", ("text_encoder_2", "lora_te2_", "transformer_blocks.1.", "transformer_blocks_1_")),
    ("sd", ("down_blocks", "up_blocks", "input_blocks", "output_blocks", "lora_unet_", "lora_te_")),
)
DOWN = ("lora_A.weight", "lora_down.weight", "lora.down.weight")


# Files of weights that are pickles: loading one can run code, so only safetensors are read.
PICKLES = (".pth", ".pt", ".ckpt", ".bin")


def pickle_refusal(file: str) -> str:
    """What to tell whoever offers a pickle: that it is refused, and the command that converts it."""
    stem = file.rsplit(".", 1)[0]
    return (
        f"{file} is a pickle, which this server does not load (loading one can run code); convert it with "
        f'`python -c "import torch, safetensors.torch as s; '
        f"s.save_file(torch.load('{file}', weights_only=True), '{stem}.safetensors')\"`"
    )


def made_for(lineage: str | None, family: str | None) -> bool:
    """Whether a file made for a family lineage fits a model of that family, or of its base (an
    inpainting model takes its base's); unknown either way: let the load tell."""
    return lineage is None or family is None or FAMILIES[family].lineage == lineage


class AdapterRejected(Refusal):
    """A file that is not a LoRA this server reads, or a name that is not one's."""


class AdapterFailed(RuntimeError):
    """An adapter the worker could not load into the model (a misfit its header did not show):
    the message says so in general words, `detail` why (for the log, and development's answers)."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.message, self.detail = message, detail


@dataclass(frozen=True)
class Lora:
    """One adapter file, as its header describes it."""

    name: str
    family: str | None  # a family lineage: sd, sdxl, sd3, flux; None when its tensor names do not tell
    rank: int | None
    bytes: int
    trigger_words: list[str]
    version: str = ""  # changes when the file is replaced under its name (not shown)

    def fits(self, family: str | None) -> bool:
        return made_for(self.family, family)

    def view(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if key != "version"}


def _trigger_words(metadata: dict[str, str]) -> list[str]:
    """A kohya file's most frequent training tags, or a modelspec trigger phrase."""
    for key in ("modelspec.trigger_phrase", "trigger_words"):
        if metadata.get(key):
            return [word.strip() for word in metadata[key].split(",") if word.strip()]
    try:
        tags = json.loads(metadata.get("ss_tag_frequency") or "{}")
    except ValueError:
        return []
    counts: Counter[str] = Counter()
    for folder in tags.values() if isinstance(tags, dict) else ():
        counts.update({tag: int(n) for tag, n in folder.items() if isinstance(n, int | float)})
    return [tag for tag, _n in counts.most_common(5)]


def tensor_shapes(fs: AbstractFileSystem, path: str, name: str) -> tuple[dict[str, list[int]], dict[str, str]]:
    """A safetensors file's tensors with their shapes, and its metadata, from its header alone;
    AdapterRejected for a file that is not one (`name` is what the messages call it). What
    adapters, embeddings and upscalers are told apart by."""
    try:
        header = safetensors_header(path, fs)
    except (UnservedModel, OSError) as exc:
        raise AdapterRejected(f"{name} is not a safetensors file") from exc
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in [*metadata, *metadata.values()]):
        raise AdapterRejected(f"{name}: its `__metadata__` must map text to text")
    if not all(isinstance(tensor, dict) and isinstance(tensor.get("shape"), list) for tensor in header.values()):
        raise AdapterRejected(f"{name}: every tensor of its header needs a dtype, a shape and offsets")
    return {key: tensor["shape"] for key, tensor in header.items()}, metadata


def read_lora(fs: AbstractFileSystem, path: str, size: int, name: str, version: str = "") -> Lora:
    """The adapter a file holds, from its header; AdapterRejected for a file that is not a
    safetensors LoRA (`name` is what the messages call it)."""
    shapes, metadata = tensor_shapes(fs, path, name)
    downs = [shape for key, shape in shapes.items() if key.endswith(DOWN)]
    if not downs:
        raise AdapterRejected(f"{name} has no LoRA weights (no lora_A / lora_down tensors)")
    family = next((fam for fam, marks in MARKS if any(mark in key for key in shapes for mark in marks)), None)
    shape = downs[0] or [None]
    return Lora(name, family, shape[0], size, _trigger_words(metadata), version)


def check_file(path: Path, name: str) -> None:
    """AdapterRejected unless the safetensors library reads the whole file as it is: every
    tensor's dtype known, its shape and offsets within the file and agreeing with each other
    (a header may claim shapes of 2^40 with offsets past the end)."""
    try:
        with safe_open(str(path), framework="numpy") as tensors:
            for key in tensors.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                tensors.get_slice(key).get_shape()
    except Exception as exc:  # SafetensorError, and what a hostile header makes of the parser
        raise AdapterRejected(f"{name} is not a safetensors file the library reads: {exc}") from None


@contextlib.contextmanager
def temporary_file(folder: Path | None) -> Iterator[Path]:
    """A new empty file in `folder` (the system's temporary folder for None), removed at the end
    unless it was renamed away: what a rename publishes whole."""
    handle, name = tempfile.mkstemp(dir=folder, suffix=".partial")
    os.close(handle)
    try:
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)


def _stamp(info: dict[str, Any]) -> str:
    """What changes when a file is replaced: an object's ETag, else its or a file's last change."""
    return str(info.get("ETag") or modified(info))


def _name(path: str) -> str:
    """The adapter name of a file's (or a folder's) path in the store."""
    return path.rsplit("/", 1)[-1].removesuffix(SUFFIX)


class AdapterStore(Generic[Item]):
    """The adapters of LORA_DIR: object storage every machine of a cluster shares, or (a
    folder): listed, checked and described from their headers, added and removed by admins, and
    handed to a worker as a file on its own disk.

    Why one interface for both: the API and the workers may be different machines, and only
    storage they share makes an upload through one API usable by every worker. A worker loads
    weights from a local file, so an object is copied into `cache_dir` once per version. With
    `folders` (a file name), an item may also be a folder holding a file of that name (a diffusers
    folder's WEIGHTS beside its config.json, as ControlNets come), versioned by it and copied whole.
    """

    def __init__(
        self,
        url: str,
        cache_dir: Path,
        endpoint_url: str = "",
        *,
        read: Callable[..., Item] = read_lora,  # type: ignore[assignment]
        what: str = "adapter",
        where: str = "LORA_DIR",
        listed: str = "GET /loras",
        folders: str = "",
    ) -> None:
        """`read` describes a file (or a folder) from its header (a LoRA's by default; embeddings.py's
        too), and `what`, `where` and `listed` are how messages name an item, the setting and the
        listing."""
        self.fs, self.root, self.remote = filesystem(url, endpoint_url)
        self.cache_dir = cache_dir
        self.read, self.what, self.where, self.listed = read, what, where, listed
        self.folders = folders
        self._described = lru_cache(maxsize=256)(self._describe)

    @classmethod
    def from_settings(cls, settings: Settings) -> AdapterStore:
        return cls(settings.lora_dir, settings.data_dir / "lora-cache", settings.s3_endpoint_url)

    def path_of(self, name: str) -> str:
        """The file of an adapter name; AdapterRejected for a name that could leave the folder."""
        if not NAME.fullmatch(name) or name.endswith(SUFFIX):
            raise AdapterRejected(f"`{name}` is not an {self.what} name (letters, digits, `_`, `.` and `-`)")
        return f"{self.root}/{name}{SUFFIX}"

    def _describe(self, path: str, stamp: str, size: int) -> Item:
        return self.read(self.fs, path, size, _name(path), stamp)

    def _info(self, path: str) -> dict[str, Any] | None:
        try:
            info = self.fs.info(path)
        except FileNotFoundError:
            return None
        return info if info.get("type") == "file" else None

    def _located(self, name: str) -> tuple[str, dict[str, Any]] | None:
        """The path of an item (its file, else with `folders` its folder) and the info of the file
        it is versioned by; None when there is none. AdapterRejected for a name that is not one."""
        path = self.path_of(name)
        if (info := self._info(path)) is not None:
            return path, info
        folder = path.removesuffix(SUFFIX)
        if self.folders and (info := self._info(f"{folder}/{self.folders}")) is not None:
            return folder, info
        return None

    def exists(self, name: str) -> bool:
        """Whether a file of that adapter name is there (a LoRA or not); AdapterRejected for a name
        that is not one."""
        return self._located(name) is not None

    def listing(self) -> list[Item]:
        """Every adapter, by name; files that are not LoRAs are left out."""
        try:
            found = self.fs.find(self.root, maxdepth=2 if self.folders else 1, detail=True)
        except FileNotFoundError:
            return []
        adapters = []
        for path, info in sorted(found.items()):
            relative = path.removeprefix(self.root.rstrip("/") + "/")
            file = relative.endswith(SUFFIX) and "/" not in relative
            folder = self.folders and relative.count("/") == 1 and relative.endswith(f"/{self.folders}")
            item = path.removesuffix(f"/{self.folders}") if folder else path  # a folder item is named by its folder
            if (file or folder) and NAME.fullmatch(_name(item)):
                with contextlib.suppress(AdapterRejected):
                    adapters.append(self._described(item, _stamp(info), int(info["size"])))
        return adapters

    def find(self, name: str) -> Item:
        """The adapter of that name (cached until its file changes); AdapterRejected when there is none."""
        located = self._located(name)
        if located is None:
            raise AdapterRejected(f"no {self.what} `{name}` in {self.where} ({self.listed} lists them)")
        path, info = located
        return self._described(path, _stamp(info), int(info["size"]))

    def staging(self) -> contextlib.AbstractContextManager[Path]:
        """A temporary file to receive an upload, in the folder `publish` renames it into (so a
        reader never sees half a file), or anywhere for object storage."""
        if self.remote:
            return temporary_file(None)
        Path(self.root).mkdir(parents=True, exist_ok=True)
        return temporary_file(Path(self.root))

    def publish(self, name: str, staged: Path) -> Item:
        """Offers a staged file under `name` once its header reads as a LoRA: a rename in a folder,
        one upload to object storage, so no reader sees a partial adapter."""
        target = self.path_of(name)
        check_file(staged, name)
        lora = self.read(LocalFileSystem(), str(staged), staged.stat().st_size, name)
        if self.remote:
            self.fs.makedirs(self.root, exist_ok=True)  # the bucket, on the first upload
            self.fs.put_file(str(staged), target)
        else:
            os.replace(staged, target)  # its owner's alone, as every file the server writes
        return lora

    def delete(self, name: str) -> bool:
        """Removes an adapter (a folder item whole); False when there is none of that name."""
        located = self._located(name)
        if located is None:
            return False
        self.fs.rm(located[0], recursive=not located[0].endswith(SUFFIX))
        return True

    def local_file(self, name: str) -> tuple[Path, str]:
        """The adapter as a file (or a folder) on this machine's disk, and its version (which
        changes when the file is replaced); FileNotFoundError when it is gone. An object is copied
        into the cache once per version, and the versions it replaces are removed."""
        located = self._located(name)
        if located is None:
            raise FileNotFoundError(self.path_of(name))
        path, info = located
        stamp = _stamp(info)
        if not self.remote:
            return Path(path), stamp
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        version = hashlib.sha256(stamp.encode()).hexdigest()[:16]
        suffix = SUFFIX if path.endswith(SUFFIX) else ""
        cached = self.cache_dir / f"{name}-{version}{suffix}"
        if not cached.exists():  # workers sharing the folder each write their own copy, then rename
            self._copy(path, cached)
            versions = re.compile(rf"{re.escape(name)}-[0-9a-f]{{16}}{re.escape(suffix)}")
            for old in self.cache_dir.iterdir():
                if old != cached and versions.fullmatch(old.name):
                    shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
        return cached, stamp

    def _copy(self, path: str, cached: Path) -> None:
        """An object (or a folder's objects) copied to `cached` whole: written aside, then renamed."""
        if path.endswith(SUFFIX):
            with temporary_file(self.cache_dir) as partial:
                self.fs.get_file(path, str(partial))
                os.replace(partial, cached)
            return
        staged = Path(tempfile.mkdtemp(dir=self.cache_dir, suffix=".partial"))
        try:
            self.fs.get(f"{path}/", str(staged), recursive=True)
            with contextlib.suppress(OSError):  # another worker's folder came first
                os.replace(staged, cached)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
