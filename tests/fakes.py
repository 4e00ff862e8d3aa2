"""A fake diffusers pipeline for fast tests of the engine and the queues.

It keeps the call contract the engine relies on, as diffusers' text-to-image pipelines define it:
a prompt or a list of prompts, one generator per image, the scheduler's own timesteps,
`callback_on_step_end(pipe, step, timestep, tensors)` after each step, `_interrupt` to skip the
remaining steps, and an output whose `images` are PIL images of the asked size. Each image's
colour comes from its generator, so a seed gives the same image alone or in a batch.

A test can make it fail (`failures`, raised one per call), hang (`hold`, until `let_go`) or be
slow (`step_seconds`), and reads what it was asked (`calls`) and who asked (`threads`).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from diffusers import EulerDiscreteScheduler
from PIL import Image
from transformers import AutoTokenizer

# The tiny model's tokenizer: the engine counts a prompt's tokens with the pipeline's own.
TOKENIZER = AutoTokenizer.from_pretrained("models/tiny-random/tokenizer")


@dataclass
class Hold:
    at_step: int
    released: threading.Event = field(default_factory=threading.Event)
    taken: bool = False


@dataclass
class Call:
    prompts: list[str]
    negative_prompts: list[str]
    width: int
    height: int
    steps: int
    guidance_scale: float
    thread: int
    steps_run: int = 0
    interrupted: bool = False


class FakePipeline:
    """Stands in for a loaded text-to-image pipeline (see the module's docstring)."""

    def __init__(self) -> None:
        self.scheduler = EulerDiscreteScheduler()
        self.tokenizer = TOKENIZER
        self.calls: list[Call] = []
        self.failures: list[BaseException] = []
        self.step_seconds = 0.0
        self.waiting = threading.Event()  # set when a call reaches its hold
        self._holds: list[Hold] = []
        self._inside = 0
        self.max_inside = 0
        self._lock = threading.Lock()
        self._interrupt = False

    # ----- what a test controls -----
    def hold(self, at_step: int = 0) -> None:
        """The next call that starts waits at step `at_step` (0: before any) until `let_go`."""
        self.waiting.clear()
        self._holds.append(Hold(at_step))

    def let_go(self) -> None:
        """Releases the oldest hold not yet released."""
        next(hold for hold in self._holds if not hold.released.is_set()).released.set()

    @property
    def threads(self) -> set[int]:
        return {call.thread for call in self.calls}

    # ----- the diffusers contract -----
    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @property
    def components(self) -> dict[str, Any]:
        """No model components: it holds no weights."""
        return {}

    def to(self, *args: Any, **kwargs: Any) -> FakePipeline:
        return self

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        pass

    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        width: int = 64,
        height: int = 64,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        generator: torch.Generator | list[torch.Generator] | None = None,
        callback_on_step_end: Any = None,
        **kwargs: Any,
    ) -> SimpleNamespace:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = negative_prompt if isinstance(negative_prompt, list) else [negative_prompt or ""] * len(prompts)
        generators = generator if isinstance(generator, list) else [generator] * len(prompts)
        assert len(generators) == len(prompts) == len(negatives), "one generator and one negative per prompt"
        call = Call(prompts, negatives, width, height, num_inference_steps, guidance_scale, threading.get_ident())
        self.calls.append(call)
        with self._lock:
            self._inside += 1
            self.max_inside = max(self.max_inside, self._inside)
        try:
            return self._run(call, generators, callback_on_step_end)
        finally:
            with self._lock:
                self._inside -= 1

    def _run(self, call: Call, generators: list[Any], callback: Any) -> SimpleNamespace:
        if self.failures:
            raise self.failures.pop(0)
        self._interrupt = False
        hold = next((hold for hold in self._holds if not hold.taken), None)
        if hold:
            hold.taken = True
        self.scheduler.set_timesteps(call.steps)
        for step, timestep in enumerate(self.scheduler.timesteps):
            if hold and step == hold.at_step:
                self.waiting.set()
                hold.released.wait(30)
            if self.interrupt:  # as diffusers does: the remaining steps are skipped
                call.interrupted = True
                continue
            time.sleep(self.step_seconds)
            call.steps_run += 1
            if callback is not None:
                callback(self, step, timestep, {})
        colours = [torch.randint(0, 256, (3,), generator=g).tolist() for g in generators]
        return SimpleNamespace(images=[Image.new("RGB", (call.width, call.height), tuple(c)) for c in colours])
