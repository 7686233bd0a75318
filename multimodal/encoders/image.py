"""Image encoder: a timm ViT (any patch size / input size).

Tokens are `forward_features` output: `num_prefix` CLS/register tokens, then the row-major
(gh, gw) patch grid. Inputs are resized (bilinear, aspect ratio not kept) to the model's
input size; `original_sizes` lets overlays stretch the grid back onto the upload.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import timm
import torch
from PIL import Image
from timm.data import resolve_input_data_config
from timm.layers import HybridEmbed
from timm.models import (VisionTransformer, build_model_with_cfg, generate_default_cfgs, get_model_args, register_model,
                         save_for_hf)
from torch import Tensor, nn

from multimodal.encoders.registry import layer_subset, local_attention_mask, register_builtin, register_encoder
from multimodal.io import load_image
from multimodal.types import ImageGeometry, InputError, ModalityTokens


@contextmanager
def explicit_attention(blocks: Sequence[nn.Module]) -> Iterator[list[Tensor]]:
    """Collect each block's post-softmax weights `(B, heads, N, N)` during one forward.

    timm's fused path never calls `attn_drop`, so each block's `fused_attn` is switched off
    (instance attribute) and `attn_drop`'s input is hooked; both are restored on exit.
    """
    maps: list[Tensor] = []
    saved, handles = [], []
    try:
        for blk in blocks:
            attn = blk.attn
            saved.append((attn, attn.fused_attn))
            attn.fused_attn = False
            handles.append(attn.attn_drop.register_forward_hook(lambda mod, inp, out: maps.append(inp[0])))
        yield maps
    finally:
        for h in handles:
            h.remove()
        for attn, fused in saved:
            attn.fused_attn = fused


@register_encoder("image")
class ImageEncoder(nn.Module):
    """timm ViT -> `ModalityTokens` with the patch grid; self-attention per block on request."""

    modality = "image"

    def __init__(self, model: nn.Module, spec: str, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None):
        super().__init__()
        missing = [a for a in ("patch_embed", "blocks", "num_prefix_tokens", "forward_features")
                   if not hasattr(model, a)]
        if missing or not hasattr(model.patch_embed, "grid_size"):
            raise InputError(f"image encoder '{spec}' ({type(model).__name__}) is not a ViT-style timm model "
                             f"(missing {missing or ['patch_embed.grid_size']}); use a vit_* / deit_* / eva_* model")
        self.model = model
        self.spec = spec
        data = resolve_input_data_config(model)
        self.mean = tuple(float(v) for v in (mean if mean is not None else data["mean"]))
        self.std = tuple(float(v) for v in (std if std is not None else data["std"]))
        self.input_size = tuple(int(s) for s in model.patch_embed.img_size)  # (H, W)
        self.dim = int(getattr(model, "embed_dim", model.num_features))

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_directory(cls, path: str | os.PathLike, **overrides) -> "ImageEncoder":
        """A folder written by `save_pretrained` (timm's config.json + model.safetensors)."""
        model = timm.create_model(f"local-dir:{Path(path).resolve()}", pretrained=True, **overrides)
        return cls(model, str(path)).eval()

    @classmethod
    def from_hub(cls, name: str, **overrides) -> "ImageEncoder":
        """A timm registry name (pretrained weights) or a hub repo id (`timm/...`)."""
        full = f"hf-hub:{name}" if "/" in name and ":" not in name else name
        overrides.setdefault("num_classes", 0)  # tokens only: no classifier head
        return cls(timm.create_model(full, pretrained=True, **overrides), name).eval()

    @classmethod
    def from_config(cls, d: dict, tokenizer_dir: Any = None) -> "ImageEncoder":
        model = timm.create_model(d["model_name"], pretrained=False, **d["model_args"])
        return cls(model, d["spec"], d["mean"], d["std"]).eval()

    def config_dict(self) -> dict:
        cfg = self.model.pretrained_cfg
        name = cfg.get("architecture") or type(self.model).__name__
        if cfg.get("tag"):
            name = f"{name}.{cfg['tag']}"
        args = json.loads(json.dumps(get_model_args(self.model), default=list))
        return {"modality": "image", "spec": self.spec, "library": "timm", "model_name": name,
                "model_args": args, "mean": list(self.mean), "std": list(self.std)}

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """timm's Hugging Face layout: config.json + model.safetensors (never pickled)."""
        directory = Path(directory)
        save_for_hf(self.model, str(directory), safe_serialization=True,
                    data_config={"mean": self.mean, "std": self.std})
        return directory

    # -- running ------------------------------------------------------------------------

    def preprocess(self, images: Sequence[Any]) -> dict[str, Any]:
        """Anything `load_image` takes -> normalised pixels `(B, 3, H, W)` + original sizes (CPU)."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise InputError("no images given; pass a list with at least one image")
        loaded = [load_image(x) for x in images]
        h, w = self.input_size
        pixels = np.stack([np.asarray(img.resize((w, h), Image.BILINEAR), dtype=np.float32) for img in loaded])
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2) / 255.0  # (B, 3, H, W)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return {"pixel_values": (x - mean) / std, "original_sizes": [(img.height, img.width) for img in loaded]}

    def forward(self, batch: dict[str, Any], capture_attention: bool | Sequence[int] = False) -> ModalityTokens:
        """`capture_attention`: True for every block's self-attention, or a list of blocks for only those
        (`self_attention[i]` is the i-th of them in block order); the other blocks stay on the fused path."""
        p = next(self.model.parameters())
        x = batch["pixel_values"].to(p.device, p.dtype)  # (B, 3, H, W)
        attention = None
        blocks = list(self.model.blocks)
        layers = layer_subset(capture_attention, len(blocks))
        if capture_attention is True or layers:  # only the blocks asked for leave the fused path
            with explicit_attention(blocks if layers is None else [blocks[l] for l in layers]) as maps:
                tokens = self.model.forward_features(x)  # (B, P + gh*gw, D)
            attention = list(maps)  # per captured block, in block order (B, heads, N, N)
        else:
            tokens = self.model.forward_features(x)  # (B, P + gh*gw, D)
        pe = self.model.patch_embed
        grid = tuple(int(g) for g in pe.grid_size)
        # pixels per token: a hybrid (conv-stem) embed's own patch_size counts feature-map cells, not pixels
        geometry = ImageGeometry(grid=grid, image_size=self.input_size,
                                 patch_size=(self.input_size[0] // grid[0], self.input_size[1] // grid[1]),
                                 num_prefix=int(self.model.num_prefix_tokens),
                                 original_sizes=list(batch["original_sizes"]))
        B, N, _ = tokens.shape
        gh, gw = grid
        assert N == geometry.num_prefix + gh * gw, (N, geometry)
        mask = torch.ones(B, N, dtype=torch.bool, device=tokens.device)  # (B, N)
        special = torch.zeros_like(mask)
        special[:, :geometry.num_prefix] = True
        return ModalityTokens(tokens=tokens, mask=mask, modality="image", special=special,
                              geometry=geometry, self_attention=attention)

    def encode(self, images: Sequence[Any], capture_attention: bool | Sequence[int] = False) -> ModalityTokens:
        return self.forward(self.preprocess(images), capture_attention)


@register_builtin("image", "vit-tiny-scenes")
def vit_tiny_scenes(**overrides) -> ImageEncoder:
    """2-block, 128-wide ViT on 128x128 inputs with 16x16 patches, trained from scratch (no head)."""
    args = {"img_size": 128, "patch_size": 16, "embed_dim": 128, "depth": 2, "num_heads": 4,
            "num_classes": 0, **overrides}
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **args)
    return ImageEncoder(model, "vit-tiny-scenes").eval()


def conv_stem(in_chans: int = 3, widths: Sequence[int] = (24, 48, 96, 192), kernel: int = 3,
              strides: Sequence[int] | None = None) -> nn.Sequential:
    """Stride-2 conv (padding 1) + BatchNorm + ReLU per width (4 widths: 16x downsampling; the product
    of `strides` in general).

    `strides` (one per width, default all 2): a stride-1 layer is a 3x3 conv (padding 1), which keeps
    the grid and each token's centre and widens what a token sees by one cell either side.

    With `kernel=3` a token's receptive field is centred on its cell's top-left pixel (half a cell,
    7.5 px, up and left of the cell centre the maps are drawn at); `kernel=4` centres it exactly on
    the cell (each layer shifts the centre by half an input pixel: 0.5 * (1 + 2 + 4 + 8) = 7.5).

    After Xiao et al. 2021, "Early convolutions help transformers see better", who report that a
    few small convs in place of the 16x16 linear patch embedding make a ViT train faster and more
    stably. With no transformer blocks after it (`vit-local-scenes`) it is the embedded default's
    image encoder: its tokens stay local (assets/MODEL_CARD.md).
    """
    layers: list[nn.Module] = []
    for w, stride in zip(widths, strides or [2] * len(widths)):
        k = kernel if stride == 2 else 3
        layers += [nn.Conv2d(in_chans, w, k, stride=stride, padding=1, bias=False), nn.BatchNorm2d(w),
                   nn.ReLU(inplace=True)]
        in_chans = w
    return nn.Sequential(*layers)


# timm reads this module's `default_cfgs` when `register_model` runs: no pretrained weights, [-1, 1] inputs
default_cfgs = generate_default_cfgs({"vit_convstem_scenes": {
    "url": "", "num_classes": 0, "input_size": (3, 128, 128), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}})


def window_mask(grid: tuple[int, int], num_prefix: int, window: int, device=None) -> Tensor:
    """Neighbourhood self-attention `(1, 1, N, N)` bool (True: may attend), N = num_prefix + gh * gw:
    a patch attends to the patches within `window` cells of it (Chebyshev distance), the prefix tokens
    to everything (`local_attention_mask`)."""
    gh, gw = grid
    rows, cols = torch.meshgrid(torch.arange(gh, device=device), torch.arange(gw, device=device), indexing="ij")
    rows, cols = rows.reshape(-1), cols.reshape(-1)  # (gh*gw,)
    near = ((rows[:, None] - rows[None, :]).abs() <= window) & ((cols[:, None] - cols[None, :]).abs() <= window)
    return local_attention_mask(near, num_prefix)[None, None]  # (1, 1, N, N)


class WindowedVisionTransformer(VisionTransformer):
    """timm's VisionTransformer whose blocks attend within `window` patch cells (`window_mask`);
    `window = 0` is the plain model."""

    def __init__(self, *args, window: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.window = int(window)

    def forward_features(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is None and not is_causal and self.window > 0 and len(self.blocks):
            grid = tuple(int(g) for g in self.patch_embed.grid_size)
            attn_mask = window_mask(grid, int(self.num_prefix_tokens), self.window, x.device)
        return super().forward_features(x, attn_mask=attn_mask, is_causal=is_causal)


@register_model
def vit_convstem_scenes(pretrained: bool = False, stem_widths: Sequence[int] = (24, 48, 96, 192),
                        stem_kernel: int = 3, window: int = 0, stem_strides: Sequence[int] | None = None,
                        **kwargs) -> VisionTransformer:
    """timm's VisionTransformer whose patch embedding is timm's HybridEmbed over `conv_stem`:
    one token per prod(stem_strides) pixels square (2**len(stem_widths) with the default strides),
    projected 1x1 to `embed_dim`; `window > 0`:
    its blocks attend only within that many cells (`WindowedVisionTransformer`)."""
    stem = conv_stem(kwargs.get("in_chans", 3), stem_widths, stem_kernel, stem_strides)
    kwargs.setdefault("patch_size", 1)  # HybridEmbed's patch size is in feature-map cells
    cls, extra = (WindowedVisionTransformer, {"window": window}) if window else (VisionTransformer, {})
    return build_model_with_cfg(cls, "vit_convstem_scenes", pretrained,  # pretrained: a local-dir: folder
                                embed_layer=partial(HybridEmbed, backbone=stem), **extra, **kwargs)


@register_builtin("image", "vit-conv-scenes")
def vit_conv_scenes(**overrides) -> ImageEncoder:
    """2-block, 128-wide ViT on 128x128 inputs whose tokens come from a 4-conv stem (16 px per token)."""
    args = {"img_size": 128, "embed_dim": 128, "depth": 2, "num_heads": 4, "num_classes": 0, **overrides}
    model = timm.create_model("vit_convstem_scenes", pretrained=False, **args)
    return ImageEncoder(model, "vit-conv-scenes").eval()


@register_builtin("image", "vit-local-scenes")
def vit_local_scenes(**overrides) -> ImageEncoder:
    """Local tokens: the conv stem of `vit-conv-scenes` (4x4 kernels, so each token is centred on its
    16-px cell) with no transformer blocks after it. A token sees about 46 px around its cell and
    nothing else, so what a fusion query gathers is what is where it looks."""
    args = {"img_size": 128, "embed_dim": 128, "depth": 0, "num_heads": 4, "num_classes": 0, "stem_kernel": 4,
            **overrides}
    model = timm.create_model("vit_convstem_scenes", pretrained=False, **args)
    return ImageEncoder(model, "vit-local-scenes").eval()



@register_builtin("image", "vit-layerscale-scenes")
def vit_layerscale_scenes(**overrides) -> ImageEncoder:
    """`vit-local-scenes`' conv stem (each token centred on its 16-px cell) under 2 transformer blocks
    whose residual branches start at LayerScale 1e-4 (Touvron et al. 2021, "Going deeper with image
    transformers"): at initialisation every token is its own cell's, and the blocks mix in only what
    training makes them mix."""
    args = {"img_size": 128, "embed_dim": 128, "depth": 2, "num_heads": 4, "num_classes": 0, "stem_kernel": 4,
            "init_values": 1e-4, **overrides}
    model = timm.create_model("vit_convstem_scenes", pretrained=False, **args)
    return ImageEncoder(model, "vit-layerscale-scenes").eval()


@register_builtin("image", "vit-window-scenes")
def vit_window_scenes(**overrides) -> ImageEncoder:
    """`vit-layerscale-scenes` whose 2 blocks attend only within one cell (3x3 patches, `window_mask`):
    after both blocks a token has heard from at most 2 cells around its own, and the CLS token
    pools without being read back, so tokens stay about where they are."""
    args = {"img_size": 128, "embed_dim": 128, "depth": 2, "num_heads": 4, "num_classes": 0, "stem_kernel": 4,
            "init_values": 1e-4, "window": 1, **overrides}
    model = timm.create_model("vit_convstem_scenes", pretrained=False, **args)
    return ImageEncoder(model, "vit-window-scenes").eval()


@register_builtin("image", "vit-window-fine-scenes")
def vit_window_fine_scenes(**overrides) -> ImageEncoder:
    """`vit-window-scenes` on a grid twice as fine: a 3-conv stem, so one token per 8-px cell (16 x 16
    tokens on 128 x 128 inputs). On the scenes' small objects a map on 16-px cells can put its peak on the
    object at best 0.75 of the time (a map of each cell's share of the object, 300 test scenes), on 8-px
    cells 0.997: strict pointing needs this grid."""
    args = {"stem_widths": (32, 64, 128), **overrides}
    encoder = vit_window_scenes(**args)
    return ImageEncoder(encoder.model, "vit-window-fine-scenes").eval()


@register_builtin("image", "vit-window-fine-wide-scenes")
def vit_window_fine_wide_scenes(**overrides) -> ImageEncoder:
    """`vit-window-fine-scenes` with a fourth, stride-1 3x3 conv in its stem: still one token per 8-px
    cell (16 x 16), but each token sees about 38 px around its cell instead of 22, nearly a large
    object's whole outline (shape is what the 8-px cells learn last)."""
    args = {"stem_widths": (32, 64, 128, 128), "stem_strides": (2, 2, 2, 1), **overrides}
    encoder = vit_window_scenes(**args)
    return ImageEncoder(encoder.model, "vit-window-fine-wide-scenes").eval()
