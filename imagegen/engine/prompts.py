"""Prompts into the text encoders' embeddings, where a request asks for more than the pipelines do
by themselves: clip skip (the hidden state some layers before a CLIP encoder's last).

Why our own for SD 1.x/2.x: diffusers' `clip_skip=` reads `text_encoder.text_model`, which the
pinned transformers' `CLIPTextModel` no longer has (its final layer norm is its own attribute), so
the pipeline's own path raises; SDXL's pipeline indexes the hidden states itself and works.
"""

from __future__ import annotations

from typing import Any

import torch


def clip_embeddings(pipe: Any, prompts: list[str], clip_skip: int) -> torch.Tensor:
    """The prompts as SD's pipelines encode them (padded to the tokenizer's window, cut beyond it),
    from the hidden state `clip_skip` layers from the end (1: the last), through the final norm."""
    tokens = pipe.tokenizer(
        prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    encoder = pipe.text_encoder
    hidden = encoder(tokens.input_ids.to(encoder.device), output_hidden_states=True).hidden_states[-clip_skip]
    norm = getattr(encoder, "final_layer_norm", None) or encoder.text_model.final_layer_norm
    return norm(hidden)


def skip_layers(pipe: Any, how: str, arguments: dict[str, Any], clip_skip: int) -> None:
    """Makes the call's arguments skip the last `clip_skip - 1` layers: the pipeline's own argument
    (A1111 counts the last layer as 1, diffusers as 0), or embeddings in place of the prompts."""
    if how == "argument":
        arguments["clip_skip"] = clip_skip - 1
        return
    if how != "embeddings":  # the generation service refuses clip skip for such a model first
        raise ValueError("this model has no CLIP text encoder whose layers could be skipped")
    arguments["prompt_embeds"] = clip_embeddings(pipe, arguments.pop("prompt"), clip_skip)
    if "negative_prompt" in arguments:
        arguments["negative_prompt_embeds"] = clip_embeddings(pipe, arguments.pop("negative_prompt"), clip_skip)
