"""Build a pipeline of one model family with seeded random weights.

Why: no model hub is reachable where imagegen is built and tested, yet every family the server
serves must be proven to load, batch, reproduce seeds and report progress, and its real compute
and memory measured. A tiny build (seconds, a few hundred KB) has the family's real pipeline and
component classes (so detection, the per-family call and the size rules are the real ones) with
layers a few channels wide. A full build has the published architecture (SD 1.5's 860M-parameter
UNet, SDXL's 2.6B, FLUX.1's 12B transformer with T5-XXL), so it costs what the real model costs;
`--device meta` builds it without memory, to count it. Images of both are noise. Every text
encoder shares one word-level tokenizer built here, so nothing is downloaded.

    python -m tools.make_model --family flux-dev --size tiny --out /tmp/flux-dev
    python -m tools.make_model --family sd15 --size full --out /tmp/sd15      # 4 GB in fp32
    python -m tools.make_model --family flux-schnell --out /tmp/flux --gguf Q4_0   # and its transformer as GGUF
    python -m tools.make_model --family sd15 --out /tmp/sd15 --controlnet /tmp/controlnets/tiny   # and a ControlNet

A ControlNet (SD, SDXL) is built from its model's UNet as diffusers builds a new one
(`ControlNetModel.from_unet`), but with its zero convolutions random, so that it steers at once;
an IP-Adapter (`--ip-adapter DIR`) in h94/IP-Adapter's layout, with a tiny CLIP image encoder; a
T2I-Adapter (`--t2i-adapter DIR`) with a level per level of the UNet's encoder. The depth and
pose preprocessors' networks (`--preprocessors DIR`: DIR/depth, a Depth Anything; DIR/pose, a
ViTPose) are tiny transformers models with their image processors, for any family.
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    AutoencoderTiny,
    ControlNetModel,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxControlNetModel,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
    SD3ControlNetModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    T2IAdapter,
    UNet2DConditionModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from safetensors.torch import save_file
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    DepthAnythingConfig,
    DepthAnythingForDepthEstimation,
    Dinov2Config,
    DPTImageProcessorPil,
    Gemma2Config,
    Gemma2Model,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3Model,
    T5Config,
    T5EncoderModel,
    VitPoseBackboneConfig,
    VitPoseConfig,
    VitPoseForPoseEstimation,
    VitPoseImageProcessorPil,
)

from tools.train_demo_model import build_tokenizer

# Chat template of the Qwen tokenizers, as much of it as Z-Image's prompt encoding uses.
CHAT_TEMPLATE = (
    "{% for message in messages %}<bos>{{ message['role'] }} {{ message['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<bos>assistant{% endif %}"
)


def tokenizer(max_length: int = 77) -> PreTrainedTokenizerFast:
    """The demo model's word-level tokenizer, with room for the family's sequence length."""
    built = build_tokenizer()
    built.model_max_length = max_length
    return built


def vae(latent_channels: int = 4, full: bool = False, **options: Any) -> AutoencoderKL:
    """An 8x-downscaling autoencoder (four levels), as every KL-VAE family's real one: SD's widths
    when `full`, a few channels otherwise."""
    size: dict[str, Any] = (
        {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2}
        if full
        else {"block_out_channels": (4, 4, 4, 4), "layers_per_block": 1, "norm_num_groups": 1, "sample_size": 64}
    )
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=latent_channels,
        **{**size, **options},
    )


def clip(words: PreTrainedTokenizerFast, width: int = 32, projection: bool = False) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(words),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=width,
        pad_token_id=words.pad_token_id,
        bos_token_id=words.bos_token_id,
        eos_token_id=words.eos_token_id,
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def t5(words: PreTrainedTokenizerFast, width: int = 32) -> T5EncoderModel:
    return T5EncoderModel(
        T5Config(
            vocab_size=len(words),
            d_model=width,
            d_kv=8,
            d_ff=2 * width,
            num_layers=1,
            num_heads=2,
            pad_token_id=words.pad_token_id,
            eos_token_id=words.eos_token_id,
            decoder_start_token_id=words.pad_token_id,
        )
    )


# Schedulers keep their tables on the CPU, also while a full model is built on the meta device.
def flow_match(**options: Any) -> FlowMatchEulerDiscreteScheduler:
    with torch.device("cpu"):
        return FlowMatchEulerDiscreteScheduler(**options)


def sd_scheduler() -> DPMSolverMultistepScheduler:
    """SD's noise schedule (scaled-linear betas), sampled by DPM-Solver++."""
    with torch.device("cpu"):
        return DPMSolverMultistepScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1
        )


# ----- the published architectures (their configs on the hub, written out here) -----

CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}
CLIP_BIG_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20}
T5_XXL = {"d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64}
CLIP_VOCAB, T5_VOCAB = 49408, 32128


def full_clip(size: dict[str, int], projection: bool = False, act: str = "quick_gelu") -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB, max_position_embeddings=77, hidden_act=act, projection_dim=size["hidden_size"], **size
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def sd_pipeline(autoencoder: Any, encoder: Any, words: Any, unet: Any) -> StableDiffusionPipeline:
    """SD 1.x's parts with its noise schedule and no safety checker."""
    return StableDiffusionPipeline(
        vae=autoencoder,
        text_encoder=encoder,
        tokenizer=words,
        unet=unet,
        scheduler=sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def sd_inpaint() -> StableDiffusionInpaintPipeline:
    """A dedicated inpainting model: SD's parts with a UNet of 9 input channels (the latents, the
    mask and the masked image's latents), as SD 1.5 inpainting's."""
    pipe = sd15()
    unet = UNet2DConditionModel.from_config(pipe.unet.config, in_channels=9)
    return StableDiffusionInpaintPipeline(**{**pipe.components, "unet": unet})


def sd15(full: bool = False) -> StableDiffusionPipeline:
    words = tokenizer()
    if full:  # SD 1.5's UNet: 860M parameters
        unet = UNet2DConditionModel(
            sample_size=64,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            cross_attention_dim=768,
            attention_head_dim=8,
        )
        return sd_pipeline(vae(full=True, sample_size=512), full_clip(CLIP_L), words, unet)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    return sd_pipeline(vae(), clip(words), words, unet)


def sdxl(full: bool = False) -> StableDiffusionXLPipeline:
    words = tokenizer()
    if full:  # SDXL's UNet (2.6B parameters), CLIP-L and OpenCLIP bigG
        unet = UNet2DConditionModel(
            sample_size=128,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        encoders = full_clip(CLIP_L), full_clip(CLIP_BIG_G, projection=True, act="gelu")
        autoencoder = vae(full=True, sample_size=1024, scaling_factor=0.13025)
    else:
        unet = UNet2DConditionModel(
            sample_size=8,
            block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            layers_per_block=1,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 1),
            projection_class_embeddings_input_dim=8 * 6 + 32,  # six size/crop numbers, the pooled text
            cross_attention_dim=64,  # both encoders' widths side by side
            norm_num_groups=4,
        )
        encoders, autoencoder = (clip(words), clip(words, projection=True)), vae()
    return StableDiffusionXLPipeline(
        vae=autoencoder,
        text_encoder=encoders[0],
        text_encoder_2=encoders[1],
        tokenizer=words,
        tokenizer_2=words,
        unet=unet,
        scheduler=sd_scheduler(),
    )


def sd3() -> StableDiffusion3Pipeline:
    words = tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,  # SD3's last block reads no text, and takes no ControlNet residual: one before it does
        attention_head_dim=8,
        num_attention_heads=2,
        caption_projection_dim=16,
        joint_attention_dim=64,  # the T5 width, which the CLIP embeddings are padded to
        pooled_projection_dim=64,  # both CLIP projections side by side
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=flow_match(shift=3.0),
        vae=vae(16, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=clip(words, projection=True),
        tokenizer=words,
        text_encoder_2=clip(words, projection=True),
        tokenizer_2=words,
        text_encoder_3=t5(words, 64),
        tokenizer_3=tokenizer(256),
    )


def flux(guidance_embeds: bool, full: bool = False) -> FluxPipeline:
    """Flux.1: schnell (timestep-distilled) and dev (guidance-distilled) differ in `guidance_embeds`."""
    words = tokenizer()
    if full:  # the 12B transformer and T5-XXL's encoder
        size: dict[str, Any] = {
            "num_layers": 19,
            "num_single_layers": 38,
            "attention_head_dim": 128,
            "num_attention_heads": 24,
            "joint_attention_dim": 4096,
            "pooled_projection_dim": 768,
            "axes_dims_rope": (16, 56, 56),
        }
        gated = {"feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new", "is_gated_act": True}
        encoders = full_clip(CLIP_L), T5EncoderModel(T5Config(vocab_size=T5_VOCAB, **gated, **T5_XXL))
    else:
        size = {
            "num_layers": 1,
            "num_single_layers": 1,
            "attention_head_dim": 16,
            "num_attention_heads": 2,
            "joint_attention_dim": 32,
            "pooled_projection_dim": 32,
            "axes_dims_rope": (4, 4, 8),
        }
        encoders = clip(words), t5(words, 32)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, guidance_embeds=guidance_embeds, **size
    )  # 16 latent channels, packed 2x2
    flux_vae = {"use_quant_conv": False, "use_post_quant_conv": False, "shift_factor": 0.1159, "scaling_factor": 0.3611}
    return FluxPipeline(
        transformer=transformer,
        scheduler=flow_match(shift=3.0, use_dynamic_shifting=True),
        vae=vae(16, full=full, **flux_vae),
        text_encoder=encoders[0],
        tokenizer=words,
        text_encoder_2=encoders[1],
        tokenizer_2=tokenizer(512 if full else 256),
    )


def pixart_sigma() -> PixArtSigmaPipeline:
    words = tokenizer(300)
    transformer = PixArtTransformer2DModel(
        sample_size=8,
        num_layers=1,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_channels=32,
        in_channels=4,
        cross_attention_dim=16,
        out_channels=8,  # noise and variance
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    return PixArtSigmaPipeline(
        tokenizer=words, text_encoder=t5(words, 32), vae=vae(), transformer=transformer, scheduler=DDIMScheduler()
    )


def sana() -> SanaPipeline:
    words = tokenizer(300)
    autoencoder = AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=2,
        encoder_block_types=("ResBlock", "ResBlock", "ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "ResBlock", "ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(4, 4, 4, 4, 4, 8),
        decoder_block_out_channels=(4, 4, 4, 4, 4, 8),
        encoder_qkv_multiscales=((), (), (), (), (), (5,)),
        decoder_qkv_multiscales=((), (), (), (), (), (5,)),
        encoder_layers_per_block=(1, 1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1, 1),
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    )  # 32x downscaling, as Sana's deep-compression autoencoder
    transformer = SanaTransformer2DModel(
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        num_attention_heads=2,
        attention_head_dim=4,
        num_cross_attention_heads=2,
        cross_attention_head_dim=4,
        cross_attention_dim=8,
        caption_channels=8,
        sample_size=2,
    )
    encoder = Gemma2Model(
        Gemma2Config(
            head_dim=4,
            hidden_size=8,
            intermediate_size=16,
            num_attention_heads=2,
            num_hidden_layers=1,
            num_key_value_heads=2,
            vocab_size=len(words),
            max_position_embeddings=512,
            pad_token_id=words.pad_token_id,
            attn_implementation="eager",
        )
    )
    return SanaPipeline(
        tokenizer=words, text_encoder=encoder, vae=autoencoder, transformer=transformer, scheduler=flow_match(shift=3.0)
    )


def z_image() -> ZImagePipeline:
    words = tokenizer(512)
    words.chat_template = CHAT_TEMPLATE
    encoder = Qwen3Model(
        Qwen3Config(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=8,
            vocab_size=len(words),
            max_position_embeddings=1024,
            pad_token_id=words.pad_token_id,
        )
    )
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=32,
        n_layers=1,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=16,
        axes_dims=[4, 6, 6],
        axes_lens=[1024, 64, 64],
    )
    return ZImagePipeline(
        scheduler=flow_match(shift=3.0),
        vae=vae(16, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=encoder,
        tokenizer=words,
        transformer=transformer,
    )


FULL: dict[str, Callable[[], Any]] = {
    "sd15": lambda: sd15(full=True),
    "sdxl": lambda: sdxl(full=True),
    "flux-schnell": lambda: flux(guidance_embeds=False, full=True),
    "flux-dev": lambda: flux(guidance_embeds=True, full=True),
}

BUILDERS: dict[str, Callable[[], Any]] = {
    "sd15": sd15,
    "sd-inpaint": sd_inpaint,
    "sdxl": sdxl,
    "sd3": sd3,
    "flux-schnell": lambda: flux(guidance_embeds=False),
    "flux-dev": lambda: flux(guidance_embeds=True),
    "pixart-sigma": pixart_sigma,
    "sana": sana,
    "z-image": z_image,
}


def build(family: str, seed: int = 0, size: str = "tiny", device: str = "cpu") -> Any:
    """The family's pipeline at that size, the same weights for the same seed; on the `meta`
    device its parameters have shapes and no storage (to count a model larger than this RAM)."""
    builders = FULL if size == "full" else BUILDERS
    if family not in builders:
        raise SystemExit(f"no {size} build of {family}; there are: {', '.join(builders)}")
    torch.manual_seed(seed)
    with torch.device(device):
        return builders[family]()


def with_safety_checker(pipe: StableDiffusionPipeline, flags: bool, seed: int = 0) -> StableDiffusionPipeline:
    """The SD pipeline with a tiny random safety checker (StableDiffusionSafetyChecker, a CLIP vision
    tower, and its image processor) that flags every image (`flags`) or none: its concepts' thresholds
    set beyond what a cosine similarity reaches, one way or the other."""
    torch.manual_seed(seed)
    vision = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 4},
        vision_config={**vision, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    checker = StableDiffusionSafetyChecker(config)
    with torch.no_grad():
        threshold = -2.0 if flags else 2.0  # a score is similarity - threshold: always above 0, or never
        checker.concept_embeds_weights.fill_(threshold)
        checker.special_care_embeds_weights.fill_(threshold)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return StableDiffusionPipeline(
        **{**pipe.components, "safety_checker": checker, "feature_extractor": processor},
        requires_safety_checker=True,
    )


# A transformer family's ControlNet class, built from its transformer's config with one block of each kind.
TRANSFORMER_CONTROLNETS: dict[str, tuple[Any, dict[str, int]]] = {
    "SD3Transformer2DModel": (SD3ControlNetModel, {"num_layers": 1}),
    "FluxTransformer2DModel": (FluxControlNetModel, {"num_layers": 1, "num_single_layers": 0}),
}


def controlnet(pipe: Any, seed: int = 0) -> torch.nn.Module:
    """A ControlNet for a model's pipeline. For a UNet (SD, SDXL) its encoder, conditioned through as
    many levels as the VAE downscales (8x: four), with the map's embedding strong enough that two
    maps make two images; for a transformer (SD3, FLUX.1) one of its blocks. The layers a new one
    starts at zero are drawn at random instead, as a trained one's are not zero."""
    torch.manual_seed(seed)
    if hasattr(pipe, "unet"):
        widths = (16, 32, 96, 256) if pipe.unet.config.block_out_channels[0] >= 320 else (4, 8, 16, 16)
        net = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=widths)
        for layer in net.controlnet_cond_embedding.modules():
            if isinstance(layer, torch.nn.Conv2d):
                torch.nn.init.normal_(layer.weight, std=0.5)
    else:  # from_transformer loses a tiny transformer's head sizes: built from its config instead
        kind, sizes = TRANSFORMER_CONTROLNETS[type(pipe.transformer).__name__]
        accepted = inspect.signature(kind.__init__).parameters
        config = {key: value for key, value in pipe.transformer.config.items() if key in accepted}
        net = kind(**{**config, **sizes})
    for parameter in net.parameters():
        if parameter.ndim > 1 and not parameter.any():
            torch.nn.init.normal_(parameter, std=0.1)
    return net


def t2i_adapter(pipe: Any, seed: int = 0) -> T2IAdapter:
    """A T2I-Adapter for a UNet model (SD, SDXL): one level of features per level of its UNet's
    encoder, from the image unshuffled to the latents' size (SDXL's kind for SDXL)."""
    torch.manual_seed(seed)
    xl = pipe.unet.config.addition_embed_type == "text_time"
    return T2IAdapter(
        channels=list(pipe.unet.config.block_out_channels),
        num_res_blocks=1,
        downscale_factor=16 if xl else 8,
        adapter_type="full_adapter_xl" if xl else "full_adapter",
    )


def ip_adapter(pipe: Any, folder: Path, seed: int = 0) -> None:
    """An IP-Adapter for a model in h94/IP-Adapter's layout, written to `folder`: a tiny CLIP vision
    encoder in `image_encoder/`, and `ip_adapter.safetensors` with the image projection (four
    tokens of the text embeddings' width) and a key and a value projection for each
    cross-attention of a UNet (SD, SDXL), numbered as the original code numbers them (1, 3, 5, ...),
    or, with biases, for each double-stream block of FLUX.1's transformer (0, 1, 2, ...)."""
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=32,
    )
    CLIPVisionModelWithProjection(vision).save_pretrained(folder / "image_encoder", safe_serialization=True)
    unet = getattr(pipe, "unet", None)
    width = unet.config.cross_attention_dim if unet else pipe.transformer.config.joint_attention_dim
    tensors = {
        "image_proj.proj.weight": torch.randn(4 * width, vision.projection_dim) * 0.5,
        "image_proj.proj.bias": torch.zeros(4 * width),
        "image_proj.norm.weight": torch.ones(width),
        "image_proj.norm.bias": torch.zeros(width),
    }
    if unet is None:  # FLUX.1: every double-stream block, at the transformer's inner width
        inner = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim
        for index in range(len(pipe.transformer.transformer_blocks)):
            for projection in ("to_k_ip", "to_v_ip"):
                tensors[f"ip_adapter.{index}.{projection}.weight"] = torch.randn(inner, width) * 0.5
                tensors[f"ip_adapter.{index}.{projection}.bias"] = torch.zeros(inner)
    channels = unet.config.block_out_channels if unet else ()
    crossed = [name for name in unet.attn_processors if not name.endswith("attn1.processor")] if unet else []
    for index, name in enumerate(crossed):
        block = int(name.split(".")[1]) if not name.startswith("mid_block") else 0
        hidden = (
            channels[-1]
            if name.startswith("mid_block")
            else (list(reversed(channels)) if name.startswith("up_blocks") else list(channels))[block]
        )
        for projection in ("to_k_ip", "to_v_ip"):
            tensors[f"ip_adapter.{2 * index + 1}.{projection}.weight"] = torch.randn(hidden, width) * 0.5
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(folder / "ip_adapter.safetensors"))


def preview_vae(pipe: Any, seed: int = 0) -> AutoencoderTiny:
    """A tiny autoencoder (TAESD's kind) for a model's latents, a catalogue entry's `preview_vae`:
    it decodes them to 4x their size (TAESD's own decode to 8x: three levels, here two)."""
    torch.manual_seed(seed)
    return AutoencoderTiny(
        latent_channels=pipe.vae.config.latent_channels,
        encoder_block_out_channels=(8, 8, 8),
        decoder_block_out_channels=(8, 8, 8),
        num_encoder_blocks=(1, 1, 1),
        num_decoder_blocks=(1, 1, 1),
    )


def preprocessor_networks(folder: Path, seed: int = 0) -> None:
    """Tiny networks for the depth and pose preprocessors, in PREPROCESSOR_DIR's layout under
    `folder`: `depth/` a Depth Anything (a DINOv2 backbone), `pose/` a ViTPose with COCO's 17
    keypoints, each with the image processor its published model has (at a small size)."""
    torch.manual_seed(seed)
    backbone = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=28,
        patch_size=14,
        out_features=["stage1", "stage2", "stage3", "stage4"],
        reshape_hidden_states=False,
    )
    depth = DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=32,
        patch_size=14,
        neck_hidden_sizes=[16, 16, 16, 16],
        fusion_hidden_size=16,
        head_hidden_size=8,
    )
    DepthAnythingForDepthEstimation(depth).save_pretrained(folder / "depth")
    DPTImageProcessorPil(
        size={"height": 56, "width": 56},
        keep_aspect_ratio=True,
        ensure_multiple_of=14,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(folder / "depth")
    vit = VitPoseBackboneConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=[64, 48],
        patch_size=[16, 16],
        out_indices=[2],
    )
    VitPoseForPoseEstimation(VitPoseConfig(backbone_config=vit, num_labels=17)).save_pretrained(folder / "pose")
    VitPoseImageProcessorPil(size={"height": 64, "width": 48}).save_pretrained(folder / "pose")


def parameters(pipe: Any) -> dict[str, int]:
    """Each model component's parameter count."""
    return {
        name: sum(p.numel() for p in part.parameters())
        for name, part in pipe.components.items()
        if isinstance(part, torch.nn.Module)
    }


# GGUF's blocks hold 32 weights: a matrix whose rows are not a multiple of that stays in F32 (as
# the tools that make GGUF files for ComfyUI keep small tensors unquantized).
GGUF_BLOCK = 32


def write_gguf(model: torch.nn.Module, path: Path, kind: str = "Q4_0") -> int:
    """The model's weights as a GGUF file, its matrices in `kind` (Q4_0, Q8_0, ...), under the
    names of its own state dict (diffusers reads those as they are); the number quantized."""
    import gguf

    qtype = gguf.GGMLQuantizationType[kind]
    writer = gguf.GGUFWriter(str(path), arch="imagegen")
    quantized = 0
    for name, tensor in model.state_dict().items():
        values = tensor.float().numpy()
        if values.ndim == 2 and values.shape[-1] % GGUF_BLOCK == 0:
            writer.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
            quantized += 1
        else:
            writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return quantized


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=sorted(BUILDERS), required=True)
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--out", type=Path, help="where to save it (leave out with --device meta: counts only)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, or meta (count the parameters, build nothing)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gguf", metavar="KIND", help="also write OUT/transformer.gguf in KIND (Q4_0, Q8_0)")
    parser.add_argument("--controlnet", type=Path, metavar="DIR", help="also write a ControlNet for it (SD, SDXL)")
    parser.add_argument("--ip-adapter", type=Path, metavar="DIR", help="also write an IP-Adapter (SD, SDXL, FLUX.1)")
    parser.add_argument("--t2i-adapter", type=Path, metavar="DIR", help="also write a T2I-Adapter for it (SD, SDXL)")
    parser.add_argument("--preprocessors", type=Path, metavar="DIR", help="also write DIR/depth and DIR/pose networks")
    parser.add_argument(
        "--safety-checker",
        choices=["flags", "passes"],
        help="sd15: with a tiny safety checker that flags every image, or none",
    )
    args = parser.parse_args()
    pipe = build(args.family, args.seed, args.size, args.device)
    if args.safety_checker:
        if args.family != "sd15":
            raise SystemExit("--safety-checker: sd15 only")
        pipe = with_safety_checker(pipe, args.safety_checker == "flags", args.seed)
    for name, count in parameters(pipe).items():
        print(f"{name}: {count / 1e6:,.1f}M parameters")
    if args.out and args.device != "meta":
        pipe.to(getattr(torch, args.dtype)).save_pretrained(args.out, safe_serialization=True)
        print(f"saved a {args.size} {args.family} pipeline to {args.out}")
        if args.gguf:
            count = write_gguf(pipe.transformer, args.out / "transformer.gguf", args.gguf)
            print(f"wrote its transformer to {args.out / 'transformer.gguf'} ({count} matrices in {args.gguf})")
    if args.controlnet and args.device != "meta":
        net = controlnet(pipe, args.seed).to(getattr(torch, args.dtype))
        net.save_pretrained(args.controlnet, safe_serialization=True)
        print(
            f"saved a ControlNet for it to {args.controlnet} ({sum(p.numel() for p in net.parameters()) / 1e6:,.1f}M)"
        )
    if args.ip_adapter and args.device != "meta":
        ip_adapter(pipe, args.ip_adapter, args.seed)
        print(f"saved an IP-Adapter for it to {args.ip_adapter}")
    if args.t2i_adapter and args.device != "meta":
        t2i_adapter(pipe, args.seed).save_pretrained(args.t2i_adapter, safe_serialization=True)
        print(f"saved a T2I-Adapter for it to {args.t2i_adapter}")
    if args.preprocessors and args.device != "meta":
        preprocessor_networks(args.preprocessors, args.seed)
        print(f"saved depth and pose networks to {args.preprocessors}")


if __name__ == "__main__":
    main()
