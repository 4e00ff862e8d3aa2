"""torch.compile at load, its caches kept where a restart or a second worker finds them.

Why at load, and in the warm-up: a compiled module compiles on its first call, which would
otherwise be a request's; the model counts as ready only after the warm-up step has paid for it,
and /models shows what it cost. Why `regional` first: diffusers' `compile_repeated_blocks`
compiles one of each block the denoiser repeats (its transformer blocks) and reuses it for the
others, in a fraction of a whole model's compile time for most of its speed.

Why the caches under DATA_DIR: inductor keeps its compiled graphs and kernels in a folder (by
default in /tmp, gone with a container); in DATA_DIR, next to the job records, they outlive a
restart, and a worker with the same folder (a shared volume) reuses them: a warm cache turns
minutes of compiling into seconds. (Inductor's own TORCHINDUCTOR_CACHE_DIR is set here: torch
writes that variable itself when it first compiles, so an operator's value could not be told from
its own.)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from imagegen.quantization import denoiser

CACHE_FOLDER = "torch-compile"  # under DATA_DIR


def compile_denoiser(pipe: Any, how: str, cache: Path) -> None:
    """Marks the pipeline's denoiser (UNet or transformer) for compiling, `regional`ly or in `full`
    (nothing at "none"); the compile itself happens on its first call."""
    if how == "none":
        return
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)  # read by inductor whenever it compiles
    model = getattr(pipe, denoiser(pipe.components))
    if how == "regional":
        model.compile_repeated_blocks()
    else:
        model.compile()
