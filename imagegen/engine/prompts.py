"""Prompts into the CLIP text encoders' embeddings (SD 1.x/2.x, SDXL) as AUTOMATIC1111 encodes
them: A1111's weights and `BREAK` (prompt_syntax.py), prompts longer than one window, clip skip.

Why our own and not the pipelines': diffusers cuts a prompt at one window (77 tokens; 16 for the
demo model) and reads weights as text, and its `clip_skip=` for SD reads
`text_encoder.text_model`, which the pinned transformers' `CLIPTextModel` no longer has; compel
(the library diffusers points to) reads its own grammar, not A1111's, and weighs down by blending
rather than A1111's scaling. The method is A1111's: the prompt's tokens in windows of the
tokenizer's length less its two special tokens (`BREAK` ends one early), each window encoded
alone, its vectors scaled by their tokens' weights and brought back to the window's mean (where it
has one: MEAN_FLOOR), the windows concatenated; a prompt and its negative are padded with empty
windows to the same count. A plain prompt within one window gives the very token ids and layer
the pipeline would use, so its image does not change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from imagegen.families import Family
from imagegen.jobs import GenerationParams
from imagegen.prompt_syntax import BREAK, parse

Window = tuple[list[int], list[float]]  # token ids (no special tokens) and their weights
# A window's mean is brought back after weighting only where it is this far from 0 (relative to
# the vectors' size): SD's CLIP has one well away from 0, a norm without bias (the tiny and demo
# models') has one of rounding noise, whose ratio would scale the window by anything.
MEAN_FLOOR = 0.01


def windows(tokenizer: Any, text: str, syntax: str, convert: Any = None) -> list[Window]:
    """The text's tokens in windows of the tokenizer's length less BOS and EOS; `convert` (the
    pipeline's `maybe_convert_prompt`) spells a multi-vector embedding's name as its tokens."""
    size = tokenizer.model_max_length - 2
    found: list[Window] = []
    tokens: list[int] = []
    weights: list[float] = []
    for fragment, weight in parse(text) if syntax == "a1111" else [(text, 1.0)]:
        if fragment == BREAK and weight == -1:
            found.append((tokens, weights))
            tokens, weights = [], []
            continue
        spelled = convert(fragment, tokenizer) if convert else fragment
        for token in tokenizer(spelled, add_special_tokens=False, truncation=False, verbose=False).input_ids:
            if len(tokens) == size:
                found.append((tokens, weights))
                tokens, weights = [], []
            tokens.append(token)
            weights.append(weight)
    return [*found, (tokens, weights)]


def encode_window(tokenizer: Any, encoder: Any, window: Window, layer: int, norm: bool) -> tuple[Any, Any]:
    """One window through the encoder: its hidden state `layer` from the end (through the final norm
    for SD), weighted; and the encoder's pooled output (SDXL's second encoder has one)."""
    tokens, weights = window
    length = tokenizer.model_max_length
    ids = [tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id]
    real = len(ids)
    ids += [tokenizer.pad_token_id] * (length - real)
    mask = None
    if getattr(encoder.config, "use_attention_mask", False):
        mask = torch.tensor([[1] * real + [0] * (length - real)], device=encoder.device)
    output = encoder(torch.tensor([ids], device=encoder.device), attention_mask=mask, output_hidden_states=True)
    if norm and layer == 1:
        states = output[0]  # last_hidden_state: the last layer through the final norm
    else:
        states = output.hidden_states[-layer]
        if norm:
            final = getattr(encoder, "final_layer_norm", None) or encoder.text_model.final_layer_norm
            states = final(states)
    scale = torch.tensor([1.0, *weights] + [1.0] * (length - len(weights) - 1), dtype=states.dtype)
    if (scale != 1).any():
        mean = states.mean()
        states = states * scale.to(states.device)[None, :, None]
        if abs(mean) > MEAN_FLOOR * states.abs().mean():  # a mean near 0 (a final norm without bias) says nothing
            states = states * (mean / states.mean())
    pooled = output[0] if output[0].ndim == 2 else None
    return states, pooled


def needs_encoding(pipe: Any, params: GenerationParams) -> bool:
    """Whether a job's prompts need more than the pipeline reads by itself: A1111's syntax (weights,
    BREAK, even escaped brackets: the pipeline would read the backslashes), a prompt past one
    window, clip skip."""
    texts = [text for text in (params.prompt, params.negative_prompt, params.prompt_2) if text]
    if params.clip_skip > 1 or (params.prompt_syntax == "a1111" and any(parse(t) != [(t, 1.0)] for t in texts)):
        return True
    tokenizers = [tokenizer for tokenizer in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if tokenizer]
    return any(len(windows(tokenizer, text, "none")) > 1 for tokenizer in tokenizers for text in texts)


@dataclass(frozen=True)
class Encoded:
    """A job's prompts as the pipeline's embedding arguments, and their length in windows (jobs of
    one length share a pipeline call)."""

    tensors: dict[str, Any]
    length: int


def encode(pipe: Any, kind: str, params: GenerationParams) -> Encoded:
    """A job's prompt and negative prompt (and SDXL's `prompt_2`, for its second encoder) as
    embeddings: one CLIP encoder through its final norm (`single`), or two from the penultimate
    layer with the second's pooled output (`pair`); clip skip counts back from there."""
    encoders = [(pipe.tokenizer, pipe.text_encoder)]
    if kind == "pair":
        encoders.append((pipe.tokenizer_2, pipe.text_encoder_2))
    texts = {
        "prompt": [params.prompt, params.prompt_2 or params.prompt],
        "negative_prompt": [params.negative_prompt] * 2,
    }
    split = {
        side: [
            windows(tokenizer, text, params.prompt_syntax, getattr(pipe, "maybe_convert_prompt", None))
            for (tokenizer, _), text in zip(encoders, pair[: len(encoders)], strict=True)
        ]
        for side, pair in texts.items()
    }
    count = max(len(found) for per_encoder in split.values() for found in per_encoder)
    layer = params.clip_skip if kind == "single" else params.clip_skip + 1
    tensors = {}
    for side, per_encoder in split.items():
        parts, pooled = [], None
        for (tokenizer, encoder), found in zip(encoders, per_encoder, strict=True):
            padded = found + [([], [])] * (count - len(found))
            encoded = [encode_window(tokenizer, encoder, window, layer, kind == "single") for window in padded]
            parts.append(torch.cat([states for states, _ in encoded], dim=1))
            pooled = encoded[0][1]
        tensors[f"{side}_embeds"] = torch.cat(parts, dim=-1)
        if kind == "pair":
            tensors[f"{side.replace('prompt', 'pooled_prompt')}_embeds"] = pooled
    return Encoded(tensors, count)


def stacked(encoded: list[Encoded]) -> dict[str, Any]:
    """The embeddings of a call's images (one Encoded each, of one length), batched."""
    return {name: torch.cat([e.tensors[name] for e in encoded]) for name in encoded[0].tensors}


def cut(pipe: Any, family: Family, params: GenerationParams) -> list[str]:
    """What a family with a fixed prompt length (T5, Gemma, Qwen: `max_sequence_length`) cuts of a
    job's prompts, as warnings the job shows with its result: the pipeline cuts them with a log line
    alone, and its user would never learn that the end of a prompt was not read."""
    if not family.max_sequence_length:
        return []
    attribute, field = family.sequence_input
    tokenizer = getattr(pipe, attribute)
    texts = {field: getattr(params, field)} if getattr(params, field) else {"prompt": params.prompt}
    if family.negative_prompt != "none":
        texts["negative_prompt"] = params.negative_prompt
    found = []
    for name, text in texts.items():
        count = len(tokenizer(text, truncation=False, verbose=False).input_ids)
        if count > family.max_sequence_length:
            found.append(
                f"`{name}` is {count} tokens long; {family.title} reads {family.max_sequence_length}, "
                "so the rest was cut"
            )
    return found
