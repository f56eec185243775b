"""Write a diffusers SD 1.5 pipeline as one original-layout (LDM) checkpoint file, for the single-file tests.

The key mapping is the inverse of the one diffusers applies when it reads such a file
(`diffusers.loaders.single_file_utils.convert_ldm_*`); `test_single_file_keys_round_trip` checks it
against that code. Text-encoder keys get the real-world `cond_stage_model.transformer.text_model.`
prefix: transformers 5 state dicts lack `text_model.`, and diffusers detects CLIP by it (docs/local-diffusers.md §3.5).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
          "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(rest: str, table: dict[str, str]) -> str:
    for new, old in table.items():
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def unet_key(key: str, layers: int, attention_blocks: set[int]) -> str:
    """One diffusers UNet key → its LDM name (`layers` resnets per block; up blocks hold one more)."""
    for new, old in UNET_FIXED.items():
        if key.startswith(new + "."):
            return old + key[len(new):]
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = 1 + block * (layers + 1) + j
        if kind == "resnets":
            return f"input_blocks.{index}.0.{_rename(rest, RESNET)}"
        return f"input_blocks.{index}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(int(m[1]) + 1) * (layers + 1)}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key):
        if m[1] == "attentions":
            return f"middle_block.1.{m[3]}"
        return f"middle_block.{2 * int(m[2])}.{_rename(m[3], RESNET)}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = block * (layers + 1) + j
        if kind == "resnets":
            return f"output_blocks.{index}.0.{_rename(rest, RESNET)}"
        return f"output_blocks.{index}.1.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        block = int(m[1])
        slot = 2 if block in attention_blocks else 1
        return f"output_blocks.{block * (layers + 1) + layers}.{slot}.conv.{m[2]}"
    raise KeyError(key)


def vae_key(key: str, blocks: int) -> str:
    """One diffusers AutoencoderKL key → its LDM name (decoder up blocks are numbered in reverse)."""
    part, rest = key.split(".", 1)
    if part in ("quant_conv", "post_quant_conv"):
        return key
    if m := re.match(r"(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)", rest):
        side, block, kind, j, tail = m[1], int(m[2]), m[3], m[4], m[5]
        block = block if side == "down" else blocks - 1 - block
        if kind == "resnets":
            return f"{part}.{side}.{block}.block.{j}.{tail.replace('conv_shortcut', 'nin_shortcut')}"
        return f"{part}.{side}.{block}.{side}sample.{tail}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", rest):
        return f"{part}.mid.block_{int(m[1]) + 1}.{m[2].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", rest):
        return f"{part}.mid.attn_1.{_rename(m[1], VAE_ATTENTION)}"
    return f"{part}.{rest.replace('conv_norm_out', 'norm_out')}"


def ldm_state_dict(pipe: Any) -> dict[str, torch.Tensor]:
    unet_config, vae_config = pipe.unet.config, pipe.vae.config
    # An up block's upsampler follows its attention layer, if it has one: when its type is a cross-attention one.
    attention_blocks = {i for i, kind in enumerate(unet_config.up_block_types) if "CrossAttn" in kind}
    out: dict[str, torch.Tensor] = {}
    for key, value in pipe.unet.state_dict().items():
        out["model.diffusion_model." + unet_key(key, unet_config.layers_per_block, attention_blocks)] = value
    for key, value in pipe.vae.state_dict().items():
        name = vae_key(key, len(vae_config.up_block_types))
        # The LDM VAE's mid attention is 1×1 convolutions, not linears.
        if ".mid.attn_1." in name and name.endswith("weight") and value.dim() == 2:
            value = value[:, :, None, None]
        out["first_stage_model." + name] = value
    for key, value in pipe.text_encoder.state_dict().items():
        key = key if key.startswith("text_model.") else "text_model." + key
        out["cond_stage_model.transformer." + key] = value
    return {k: v.contiguous() for k, v in out.items()}


def save_single_file(pipe: Any, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file(ldm_state_dict(pipe), str(path))
    return path
