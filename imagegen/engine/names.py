"""Scheduler names a request may use, importable without torch (the schemas need them).

Each maps to a diffusers scheduler class name and its options; the names are A1111's sampler
names in lower case with underscores, so the compatibility surfaces can reuse them.
"""

from typing import Any

SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "dpm++_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpm++_2m_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
DEFAULT_SCHEDULER = "default"
SCHEDULER_NAMES = (DEFAULT_SCHEDULER, *SCHEDULERS)
