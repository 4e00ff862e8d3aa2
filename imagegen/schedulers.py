"""The scheduler table: every sampler a request may name, its diffusers class and options, the
AUTOMATIC1111 titles that mean it, and the noise schedules (A1111's separate `scheduler` field:
Karras, exponential, ...) it runs with. Importable without torch (the schemas need it).

Why one table: the native schema, the A1111 surface (`/sdapi/v1/samplers`, `sampler_name`,
`scheduler`) and the engine all read it, so a sampler is added or fixed in one line. A1111's names
map to diffusers as diffusers' own scheduler overview maps them (PLMS is PNDM without its
Runge-Kutta warm-up, so it runs at any step count).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Schedule:
    """A noise schedule: which sigmas (or timesteps) the sampler steps through."""

    name: str  # what a native request sends (`noise_schedule`), A1111's own name
    label: str  # A1111's title, which its requests may send too
    options: dict[str, Any]  # the scheduler config options that make it
    sigmas: bool = True  # a sigma schedule: only for the samplers diffusers offers it for


SCHEDULES: dict[str, Schedule] = {
    s.name: s
    for s in (
        Schedule("automatic", "Automatic", {}, sigmas=False),  # the sampler's own
        Schedule("karras", "Karras", {"use_karras_sigmas": True}),
        Schedule("exponential", "Exponential", {"use_exponential_sigmas": True}),
        Schedule("beta", "Beta", {"use_beta_sigmas": True}),
        Schedule("sgm_uniform", "SGM Uniform", {"timestep_spacing": "trailing"}, sigmas=False),
    )
}
AUTOMATIC = "automatic"


@dataclass(frozen=True)
class Scheduler:
    name: str  # what a native request sends: A1111's title, lower case, spaces as underscores
    diffusers_class: str
    options: dict[str, Any] = field(default_factory=dict)
    a1111_titles: tuple[str, ...] = ()  # the first is the one /sdapi/v1/samplers lists; the rest are aliases
    sigmas: bool = True  # diffusers offers Karras, exponential and beta sigmas for it

    @property
    def schedules(self) -> tuple[str, ...]:
        return tuple(s.name for s in SCHEDULES.values() if self.sigmas or not s.sigmas)


_DPMPP = "DPMSolverMultistepScheduler"
_SDE = {"algorithm_type": "sde-dpmsolver++"}
SCHEDULERS: dict[str, Scheduler] = {
    s.name: s
    for s in (
        Scheduler("dpm++_2m", _DPMPP, {"algorithm_type": "dpmsolver++"}, ("DPM++ 2M",)),
        Scheduler("dpm++_2m_sde", _DPMPP, _SDE, ("DPM++ 2M SDE",)),
        Scheduler("dpm++_2m_sde_heun", _DPMPP, {**_SDE, "solver_type": "heun"}, ("DPM++ 2M SDE Heun",)),
        Scheduler("dpm++_3m_sde", _DPMPP, {**_SDE, "solver_order": 3}, ("DPM++ 3M SDE",)),
        Scheduler("dpm++_sde", "DPMSolverSDEScheduler", {}, ("DPM++ SDE",)),  # needs torchsde (requirements.txt)
        Scheduler("euler_a", "EulerAncestralDiscreteScheduler", {}, ("Euler a",), sigmas=False),
        Scheduler("euler", "EulerDiscreteScheduler", {}, ("Euler",)),
        Scheduler("lms", "LMSDiscreteScheduler", {}, ("LMS",)),  # needs SciPy (in requirements.txt)
        Scheduler("heun", "HeunDiscreteScheduler", {}, ("Heun",)),
        Scheduler("dpm2", "KDPM2DiscreteScheduler", {}, ("DPM2",)),
        Scheduler("dpm2_a", "KDPM2AncestralDiscreteScheduler", {}, ("DPM2 a",)),
        Scheduler("ddim", "DDIMScheduler", {}, ("DDIM",), sigmas=False),
        Scheduler("plms", "PNDMScheduler", {"skip_prk_steps": True}, ("PLMS", "PNDM"), sigmas=False),
        Scheduler("unipc", "UniPCMultistepScheduler", {}, ("UniPC",)),
        Scheduler("lcm", "LCMScheduler", {}, ("LCM",), sigmas=False),
    )
}
DEFAULT_SCHEDULER = "default"  # the scheduler the model was saved with
ETA_SCHEDULER = "ddim"  # the one whose step takes an eta (the pipelines pass `eta` to it alone)
# Names of earlier versions, still taken: each a sampler and its noise schedule.
ALIASES = {"pndm": ("plms", AUTOMATIC), "dpm++_2m_karras": ("dpm++_2m", "karras")}
SCHEDULER_NAMES = (DEFAULT_SCHEDULER, *SCHEDULERS, *ALIASES)

# A1111 sampler titles, lower-cased, -> our scheduler names; its schedules by name and by label.
A1111_SAMPLERS = {title.lower(): s.name for s in SCHEDULERS.values() for title in s.a1111_titles}
A1111_SCHEDULES = {key.lower(): s.name for s in SCHEDULES.values() for key in (s.name, s.label)}


def resolve(scheduler: str, schedule: str | None) -> tuple[str, str]:
    """A requested sampler and noise schedule as the table's names (an alias gives both)."""
    if scheduler in ALIASES:
        aliased, aliased_schedule = ALIASES[scheduler]
        return aliased, schedule if schedule not in (None, AUTOMATIC) else aliased_schedule
    return scheduler, schedule or AUTOMATIC


def a1111(sampler: str | None, schedule: str | None) -> tuple[str, str | None] | None:
    """An A1111 sampler title (`DPM++ 2M`, or the older combined `DPM++ 2M Karras`; none: the
    model's own, DEFAULT_SCHEDULER) and scheduler (`Karras` or `karras`) as our names; None for a
    sampler the table lacks, a None schedule for one it does not know (both for the caller to name)."""
    named = A1111_SCHEDULES.get((schedule or AUTOMATIC).strip().lower())
    if not sampler:
        return DEFAULT_SCHEDULER, named
    key = sampler.strip().lower()
    if key not in A1111_SAMPLERS:  # "DPM++ 2M Karras": the old title of a sampler and its schedule
        for label, name in A1111_SCHEDULES.items():
            if key.endswith(f" {label}") and key.removesuffix(f" {label}") in A1111_SAMPLERS:
                key, named = key.removesuffix(f" {label}"), name if named == AUTOMATIC else named
    if key not in A1111_SAMPLERS:
        return None
    return A1111_SAMPLERS[key], named


def options(scheduler: str, schedule: str) -> tuple[str, dict[str, Any]]:
    """The diffusers class and config options of a sampler with a noise schedule."""
    chosen = SCHEDULERS[scheduler]
    return chosen.diffusers_class, {**chosen.options, **SCHEDULES[schedule].options}
