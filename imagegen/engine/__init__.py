"""The generation engine: the only code that imports torch and diffusers at module level.

`build_engine` is the one way to make one, for the local queue, a cluster worker, the tests and
the benchmarks: a ModelManager over the catalogue and the adapter store it is given (a process's
own, so the API and its engine never hold two), and the Engine that runs batches on it.
"""

from __future__ import annotations

import os

# Before torch loads OpenMP, which reads it once: threads waiting for work sleep instead of spinning,
# as spinning takes the cores that other threads (and other processes) need.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from config import Settings
from imagegen.catalogue import ModelSpec, build_catalogue
from imagegen.endings import Endings
from imagegen.engine.models import Loader, ModelManager, load_pipeline
from imagegen.engine.runner import Engine
from imagegen.loras import AdapterStore
from imagegen.monitoring import Monitor
from imagegen.storage import ImageStore


def build_engine(
    settings: Settings,
    images: ImageStore,
    endings: Endings,
    monitor: Monitor,
    name: str,
    *,
    catalogue: dict[str, ModelSpec] | None = None,
    adapters: AdapterStore | None = None,
    embeddings: AdapterStore | None = None,
    load: Loader | None = None,
    exclusive: bool = False,
) -> Engine:
    """An engine named `name` on a new ModelManager; the catalogue and the adapter and embedding
    stores default to the settings' own, `load` to loading real pipelines. `exclusive`: the only
    engine on its jobs (local mode), which takes over any unfinished job."""
    models = ModelManager(
        settings,
        build_catalogue(settings) if catalogue is None else catalogue,
        adapters or AdapterStore.from_settings(settings),
        load or load_pipeline,
        embeddings,
    )
    return Engine(settings, models, images, endings, monitor, name, exclusive)
