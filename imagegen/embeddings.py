"""Textual-inversion embeddings: the files in EMBEDDINGS_DIR (a folder, or object storage), what
their headers say, and which models they fit.

Why from headers alone, as for LoRA adapters: the API finds the embeddings a prompt names and
refuses one made for another family before a job is queued, with no torch. A prompt uses an
embedding by its name, the file's name without `.safetensors`. Read: A1111's files (`emb_params`),
diffusers' (one tensor under the token), and SDXL's (`clip_l` and `clip_g`, one per encoder).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from fsspec import AbstractFileSystem

from imagegen.loras import AdapterRejected, AdapterStore, made_for, tensor_shapes

if TYPE_CHECKING:
    from config import Settings

# The families a text encoder's width tells: CLIP ViT-L (SD 1.x), OpenCLIP ViT-H (SD 2.x), and
# SDXL's pair. Other widths (the tiny test models') tell none: the load decides.
FAMILY_OF_WIDTHS = {(768,): "sd", (1024,): "sd", (768, 1280): "sdxl"}
SDXL_KEYS = ("clip_l", "clip_g")
WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class Embedding:
    """One embedding file, as its header describes it."""

    name: str
    family: str | None  # a family lineage (sd, sdxl); None when its widths do not tell
    vectors: int  # the tokens it stands for
    widths: tuple[int, ...]  # one per text encoder it is for
    bytes: int
    version: str = ""  # changes when the file is replaced under its name (not shown)

    def fits(self, family: str | None) -> bool:
        return made_for(self.family, family)

    def view(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if key != "version"}


def read_embedding(fs: AbstractFileSystem, path: str, size: int, name: str, version: str = "") -> Embedding:
    """The embedding a file holds, from its header; AdapterRejected for one this server does not read."""
    shapes, _metadata = tensor_shapes(fs, path, name)
    if all(key in shapes for key in SDXL_KEYS):
        parts = [shapes[key] for key in SDXL_KEYS]
    elif "emb_params" in shapes:
        parts = [shapes["emb_params"]]
    elif len(shapes) == 1:
        parts = list(shapes.values())
    else:
        raise AdapterRejected(f"{name} is no textual-inversion embedding (`emb_params`, one tensor, or clip_l/clip_g)")
    if not all(isinstance(shape, list) and 1 <= len(shape) <= 2 and all(shape) for shape in parts):
        raise AdapterRejected(f"{name}: an embedding's tensor is one vector or a row of them")
    widths = tuple(shape[-1] for shape in parts)
    vectors = parts[0][0] if len(parts[0]) == 2 else 1
    return Embedding(name, FAMILY_OF_WIDTHS.get(widths), vectors, widths, size, version)


def embedding_store(settings: Settings) -> AdapterStore:
    """EMBEDDINGS_DIR's embeddings, listed, checked, uploaded and copied as LoRA adapters are."""
    return AdapterStore(
        settings.embeddings_dir,
        settings.data_dir / "embedding-cache",
        settings.s3_endpoint_url,
        read=read_embedding,
        what="embedding",
        where="EMBEDDINGS_DIR",
        listed="GET /embeddings",
    )


def named(store: AdapterStore, texts: list[str]) -> list[Embedding]:
    """The embeddings these prompts name, each once (a word equal to an embedding's name)."""
    words = {word for text in texts for word in WORD.findall(text)}
    return [item for item in store.listing() if item.name in words]
