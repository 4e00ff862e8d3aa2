"""The scheduler table: every scheduler a request may name, its diffusers class and options, and the
AUTOMATIC1111 sampler titles that mean it. Importable without torch (the schemas need it).

Why one table: the native schema, the A1111 surface (`/sdapi/v1/samplers`, `sampler_name`) and the
engine all read it, so a scheduler is added or fixed in one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Scheduler:
    name: str  # what a native request sends: A1111's first title, lower case, spaces as underscores
    diffusers_class: str
    options: dict[str, Any] = field(default_factory=dict)
    a1111_titles: tuple[str, ...] = ()  # the first is the one /sdapi/v1/samplers lists; the rest are aliases
    min_steps: int = 1  # fewer fail inside diffusers (PNDM's warm-up needs 4)


SCHEDULERS: dict[str, Scheduler] = {
    s.name: s
    for s in (
        Scheduler("euler", "EulerDiscreteScheduler", {}, ("Euler",)),
        Scheduler("euler_a", "EulerAncestralDiscreteScheduler", {}, ("Euler a",)),
        Scheduler("dpm++_2m", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}, ("DPM++ 2M",)),
        Scheduler(
            "dpm++_2m_karras",
            "DPMSolverMultistepScheduler",
            {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True},
            ("DPM++ 2M Karras",),
        ),
        Scheduler("ddim", "DDIMScheduler", {}, ("DDIM",)),
        Scheduler("pndm", "PNDMScheduler", {}, ("PNDM", "PLMS"), min_steps=4),
        Scheduler("lms", "LMSDiscreteScheduler", {}, ("LMS",)),  # needs SciPy (in requirements.txt)
        Scheduler("heun", "HeunDiscreteScheduler", {}, ("Heun",)),
        Scheduler("unipc", "UniPCMultistepScheduler", {}, ("UniPC",)),
    )
}
DEFAULT_SCHEDULER = "default"  # the scheduler the model was saved with
SCHEDULER_NAMES = (DEFAULT_SCHEDULER, *SCHEDULERS)

# A1111 sampler titles, lower-cased, -> our scheduler names.
A1111_SAMPLERS = {title.lower(): s.name for s in SCHEDULERS.values() for title in s.a1111_titles}
A1111_SAMPLER_TITLES = [s.a1111_titles[0] for s in SCHEDULERS.values()]
