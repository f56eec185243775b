"""Tiny random pipelines of every family, built from configs in code (no Hub, no committed weights).

Tokenizers are made in memory (transformers 5 takes a vocab directly), models from small configs
with real latent channel counts (4 for SD, 16 for Flux/Qwen) so the preview code meets the real
shapes. `save_pretrained` then writes a diffusers directory that the backend loads back through
its own loading code. See docs/local-diffusers.md §3.1–3.5.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

CLIP_WIDTH = 32


def _byte_chars() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for the bytes 0–255 (the GPT-2 scheme)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def clip_tokenizer() -> Any:
    from transformers import CLIPTokenizer

    # Every character is a token (no merges): 2 specials + 256 bytes + 256 end-of-word bytes.
    chars = _byte_chars()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({c: i + 2 for i, c in enumerate(chars)})
    vocab.update({c + "</w>": i + 258 for i, c in enumerate(chars)})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_tokenizer() -> Any:
    from transformers import T5Tokenizer

    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    pieces += [(c, -2.0) for c in letters] + [("▁" + c, -1.5) for c in letters]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def qwen_tokenizer() -> Any:
    from transformers import Qwen2Tokenizer

    vocab = {"<|endoftext|>": 0}
    vocab.update({c: i + 1 for i, c in enumerate(_byte_chars())})
    specials = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
    vocab.update({s: 257 + i for i, s in enumerate(specials)})
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=1024)
    tok.add_special_tokens({"additional_special_tokens": specials})
    return tok


def clip_text_encoder(with_projection: bool = False) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(hidden_size=CLIP_WIDTH, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                            vocab_size=1000, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1, projection_dim=CLIP_WIDTH, hidden_act="gelu")
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def sd_vae(latent_channels: int = 4, **extra: Any) -> Any:
    from diffusers import AutoencoderKL

    # Two blocks: 2× down-scaling, so a 64² image has 32² latents.
    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=4, sample_size=32, **extra)


def build_sd15() -> Any:
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=CLIP_WIDTH,
                                norm_num_groups=4, attention_head_dim=2)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=sd_vae(), text_encoder=clip_text_encoder(), tokenizer=clip_tokenizer(),
                                   unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def build_sdxl() -> Any:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                cross_attention_dim=2 * CLIP_WIDTH, addition_embed_type="text_time",
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=CLIP_WIDTH + 6 * 8,
                                use_linear_projection=True, norm_num_groups=4)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=sd_vae(force_upcast=True), text_encoder=clip_text_encoder(),
                                     text_encoder_2=clip_text_encoder(with_projection=True),
                                     tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), unet=unet,
                                     scheduler=scheduler, add_watermarker=False)


def build_flux() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=CLIP_WIDTH, axes_dims_rope=(4, 4, 8))
    t5 = T5EncoderModel(T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                 decoder_start_token_id=0)).eval()  # type: ignore[call-arg]
    vae = sd_vae(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                 scaling_factor=1.5035)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip_text_encoder(),
                        tokenizer=clip_tokenizer(), text_encoder_2=t5, tokenizer_2=t5_tokenizer(),
                        transformer=transformer)


def build_qwen() -> Any:
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=1,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                              axes_dims_rope=(8, 4, 4))
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2], num_res_blocks=1,
                                 temperal_downsample=[False], latents_mean=[0.1 * i for i in range(-8, 8)],
                                 latents_std=[1.0 + 0.05 * i for i in range(16)])
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "vocab_size": 512, "rope_theta": 1000000.0, "bos_token_id": 0,
                     "eos_token_id": 0,
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}},
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        vocab_size=512, bos_token_id=0, eos_token_id=0)  # type: ignore[call-arg]
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                             tokenizer=qwen_tokenizer(), transformer=transformer)


BUILDERS = {"sd15": build_sd15, "sdxl": build_sdxl, "flux": build_flux, "qwen-image": build_qwen}


def save_family(family: str, directory: Path) -> Path:
    BUILDERS[family]().save_pretrained(directory)
    return directory


def config_only_copy(directory: Path, target: Path) -> Path:
    """A diffusers directory without its weights: what `from_single_file(config=...)` needs offline."""
    shutil.copytree(directory, target, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return target


def save_sd15_lora(pipe: Any, target: Path) -> Path:
    """A random rank-4 LoRA on the SD 1.5 UNet's attention projections (non-zero, so it changes the output)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(1)
    unet = pipe.unet
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    StableDiffusionPipeline.save_lora_weights(str(target), unet_lora_layers=get_peft_model_state_dict(unet))
    return target
