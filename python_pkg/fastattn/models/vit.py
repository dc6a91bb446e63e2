"""A vision transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words") on fastattn.

    images (B, C, H, W) -> patches (B, h * w, C * p * p) -> linear embedding -> [CLS] +
    patch tokens (row-major) -> pre-norm blocks (models.model.Block: every attention call is
    fastattn.attention) -> LayerNorm -> pool ([CLS] state or mean of the patch states) ->
    linear classifier

Positions: "learned" (one vector per token, as in ViT), "sincos2d" (fixed 2D sine-cosine
vectors added to the patch embeddings, as in MAE and Beyer et al. 2022, "Better plain ViT
baselines": every patch's row and column are linear in the low frequencies from step 0,
which a 64 x 64 grid of learned vectors takes thousands of steps to learn) or "rope2d"
(2D rotary: half of each head's rotary frequencies turn with the patch row, the other half
with its column; the [CLS] token sits at (0, 0) without rotation). Attention patterns per layer, cycled:
"dense", "neighborhood[:k]" (fastattn.sparse.neighborhood_2d, k x k patches, NATTEN-style
shifted at the borders) and "axial" (own row and column); the [CLS] token, when present, is
global in both sparse patterns (it sees and is seen by every patch).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import Block

VIT_PATTERNS = ("dense", "neighborhood", "axial")


def parse_vit_pattern(spec: str) -> tuple[str, list[int]]:
    name, *args = spec.split(":")
    if name not in VIT_PATTERNS:
        raise ValueError(f"unknown ViT attention pattern {spec!r}; expected one of "
                         f"{VIT_PATTERNS} (e.g. 'neighborhood:7' or 'dense')")
    try:
        return name, [int(a) for a in args]
    except ValueError:
        raise ValueError(f"pattern arguments must be ints, got {spec!r}") from None


@dataclass
class ViTConfig:
    kind: str = "vit"
    image_size: int = 64  # square images, image_size x image_size pixels
    patch: int = 4  # patch side in pixels; the grid is (image_size // patch)^2 patches
    channels: int = 3
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 0
    n_embd: int = 128
    dropout: float = 0.0
    attn_dropout: float = 0.0
    bias: bool = False
    pos: str = "learned"  # "learned" | "sincos2d" | "rope2d"
    rope_base: float = 100.0
    pool: str = "cls"  # "cls" | "mean"
    backend: str = "auto"
    patterns: tuple = ("dense",)  # per layer, cycled: dense, neighborhood[:k], axial
    kernel: int = 7  # default neighbourhood kernel (patches per side, odd)
    sparse_block: int = 64  # block size of the block-sparse masks
    n_classes: int = 10

    def __post_init__(self):
        if self.kind != "vit":
            raise ValueError(f"ViTConfig.kind must be 'vit', got {self.kind!r}")
        if self.patch < 1 or self.image_size % self.patch:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch "
                             f"({self.patch}); pass e.g. patch={self.patch} with image_size="
                             f"{max(1, self.image_size // max(self.patch, 1)) * max(self.patch, 1)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.pos not in ("learned", "sincos2d", "rope2d"):
            raise ValueError(f"pos must be 'learned', 'sincos2d' or 'rope2d', got {self.pos!r}")
        if self.pos == "sincos2d" and self.n_embd % 4:
            raise ValueError(f"pos='sincos2d' needs n_embd divisible by 4, got {self.n_embd}")
        if self.pos == "rope2d" and (self.n_embd // self.n_head) % 4:
            raise ValueError(f"pos='rope2d' needs a head dim divisible by 4, got "
                             f"{self.n_embd // self.n_head}")
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {self.pool!r}")
        if self.n_classes < 1:
            raise ValueError(f"n_classes must be >= 1, got {self.n_classes}")
        if isinstance(self.patterns, str):
            self.patterns = tuple(p for p in self.patterns.split(",") if p)
        self.patterns = tuple(self.patterns)
        for p in self.patterns:
            parse_vit_pattern(p)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch

    @property
    def n_prefix(self) -> int:
        return 1 if self.pool == "cls" else 0

    @property
    def n_tokens(self) -> int:
        return self.n_prefix + self.grid ** 2

    def pattern(self, layer: int) -> str:
        return self.patterns[layer % len(self.patterns)]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patterns"] = list(self.patterns)
        return d


class Rotary2D(nn.Module):
    """2D rotary embedding over a grid x grid patch layout (+ prefix tokens at (0, 0)):
    the first half of the hd/2 frequencies rotate with the row, the second with the column
    (the axial RoPE of Heo et al. 2024, "Rotary Position Embedding for Vision Transformer").
    Same half-split layout and forward(x, pos) as models.model.Rotary."""

    def __init__(self, head_dim: int, grid: int, n_prefix: int, base: float):
        super().__init__()
        nf = head_dim // 4  # frequencies per axis
        inv = 1.0 / base ** (torch.arange(nf, dtype=torch.float32) / nf)
        t = torch.arange(grid * grid)
        r = torch.cat([torch.zeros(n_prefix), (t // grid).float()])
        c = torch.cat([torch.zeros(n_prefix), (t % grid).float()])
        ang = torch.cat([torch.outer(r, inv), torch.outer(c, inv)], dim=1)  # (T, hd/2)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def forward(self, x, pos):
        cos, sin = self.cos[pos], self.sin[pos]
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def sincos_2d(grid: int, dim: int, n_prefix: int, base: float = 10000.0) -> torch.Tensor:
    """Fixed 2D sine-cosine positions (1, n_prefix + grid * grid, dim): the first dim/2
    channels encode the patch row (sin | cos of row * w_i), the rest its column, with
    w_i = base^(-i / (dim/4)), i < dim/4; prefix tokens ([CLS]) get zeros."""
    nf = dim // 4
    w = 1.0 / base ** (torch.arange(nf, dtype=torch.float64) / nf)
    t = torch.arange(grid * grid)
    rc = [torch.outer((t // grid).double(), w), torch.outer((t % grid).double(), w)]
    pe = torch.cat([f(a) for a in rc for f in (torch.sin, torch.cos)], dim=1)  # (g*g, dim)
    return torch.cat([torch.zeros(n_prefix, dim, dtype=pe.dtype), pe]).float().unsqueeze(0)


def vit_pattern_kwargs(spec: str, cfg: ViTConfig, device) -> dict:
    """fastattn.attention keyword arguments for one ViT layer pattern."""
    name, args = parse_vit_pattern(spec)
    if name == "dense":
        return {}
    import fastattn.sparse as fs

    g, bs = cfg.grid, (cfg.sparse_block, cfg.sparse_block)
    if name == "neighborhood":
        k = args[0] if args else cfg.kernel
        bm = fs.neighborhood_2d(g, g, min(k, g - (1 - g % 2)), prefix_tokens=cfg.n_prefix,
                                block_size=bs, device=device)
    else:
        bm = fs.axial_2d(g, g, prefix_tokens=cfg.n_prefix, block_size=bs, device=device)
    return {"block_mask": bm}


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        C, P = cfg.n_embd, cfg.patch
        self.patch_embed = nn.Linear(cfg.channels * P * P, C)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C)) if cfg.pool == "cls" else None
        self.wpe = nn.Parameter(torch.zeros(1, cfg.n_tokens, C)) if cfg.pos == "learned" else None
        if cfg.pos == "sincos2d":  # a buffer, not a parameter: fixed, and in the checkpoint
            self.register_buffer("pos_fixed", sincos_2d(cfg.grid, C, cfg.n_prefix))
        else:
            self.pos_fixed = None
        self.rope = (Rotary2D(C // cfg.n_head, cfg.grid, cfg.n_prefix, cfg.rope_base)
                     if cfg.pos == "rope2d" else None)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln = nn.LayerNorm(C, bias=cfg.bias)
        self.classifier = nn.Linear(C, cfg.n_classes)
        self.apply(self._init)
        for p in (self.cls_token, self.wpe):
            if p is not None:
                nn.init.normal_(p, std=0.02)
        # LeCun-normal patch embedding (as the JAX/timm ViTs' conv stem): a patch's embedding
        # starts at the scale of the positions (sincos2d: unit entries), not 0.02 x pixels,
        # which left the image content ~4% of the residual stream at step 0
        nn.init.normal_(self.patch_embed.weight, std=self.patch_embed.in_features ** -0.5)
        self._mask_cache: dict = {}

    def _init(self, m):
        if isinstance(m, nn.Linear):
            std = 0.02 / math.sqrt(2 * self.cfg.n_layer) if getattr(m, "residual", False) else 0.02
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def masks(self, device) -> list[dict]:
        key = str(device)
        if key not in self._mask_cache:
            by_spec = {}
            for i in range(self.cfg.n_layer):
                spec = self.cfg.pattern(i)
                if spec not in by_spec:
                    by_spec[spec] = vit_pattern_kwargs(spec, self.cfg, device)
            self._mask_cache[key] = [by_spec[self.cfg.pattern(i)] for i in range(self.cfg.n_layer)]
        return self._mask_cache[key]

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, h * w, C * p * p), patches row-major."""
        cfg = self.cfg
        if images.ndim != 4 or tuple(images.shape[1:]) != (cfg.channels, cfg.image_size,
                                                             cfg.image_size):
            raise ValueError(f"images must be (B, {cfg.channels}, {cfg.image_size}, "
                             f"{cfg.image_size}) for this model, got {tuple(images.shape)}")
        B, P, g = images.shape[0], cfg.patch, cfg.grid
        x = images.reshape(B, cfg.channels, g, P, g, P).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(B, g * g, cfg.channels * P * P)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The pooled final state (B, C)."""
        x = self.patch_embed(self.patchify(images.to(self.patch_embed.weight.dtype)))
        B = x.shape[0]
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(B, -1, -1).to(x.dtype), x], dim=1)
        if self.wpe is not None:
            x = x + self.wpe
        if self.pos_fixed is not None:
            x = x + self.pos_fixed.to(x.dtype)
        x = self.drop(x)
        pos = torch.arange(x.shape[1], device=x.device)
        for blk, kw in zip(self.blocks, self.masks(x.device), strict=True):
            x = blk(x, kw, self.rope, pos)
        x = self.ln(x)
        return x[:, 0] if self.cfg.pool == "cls" else x.mean(1)

    def forward(self, images=None, labels=None):
        """-> ({"cls": logits (B, n_classes)}, loss or None)."""
        logits = self.classifier(self.drop(self.features(images)))
        loss = None if labels is None else F.cross_entropy(logits.float(), labels)
        return {"cls": logits}, loss

    # -- fine-tuning (same interface as models.model.Transformer)
    def backbone_parameters(self):
        head = set(map(id, self.classifier.parameters()))
        return [p for p in self.parameters() if id(p) not in head]

    def freeze_backbone(self, frozen: bool = True):
        for p in self.backbone_parameters():
            p.requires_grad_(not frozen)


__all__ = ["ViT", "ViTConfig", "Rotary2D", "VIT_PATTERNS", "parse_vit_pattern",
           "vit_pattern_kwargs"]
