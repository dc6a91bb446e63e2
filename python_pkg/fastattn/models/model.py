"""A small transformer on fastattn, in three shapes, read top to bottom:

    kind="gpt"     decoder-only LM: causal self-attention, next-token head
    kind="bert"    bidirectional encoder: masked-LM head + next-sentence head (+ classifier)
    kind="encdec"  encoder (bidirectional) + decoder (causal self-attention, cross-attention)

Pre-norm blocks (LayerNorm -> attention/MLP -> residual), rotary or learned positions,
tied input/output embeddings, dropout on embeddings and residual branches, and
attention-probability dropout inside fastattn's kernels (attn_dropout). Every attention call is
fastattn.attention; KV-cache decoding calls fastattn.decode.decode_attention.

Attention patterns are chosen per layer in the config (`patterns`), e.g.
("window:256", "bigbird") alternating. Masks depend only on the sequence length: the model
builds them once per forward (cached per length) and threads them through the layers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import fastattn
from fastattn.decode import decode_attention

# ----------------------------------------------------------------------------- patterns

PATTERNS = ("dense", "window", "bigbird", "longformer", "streaming", "dilated", "strided", "fixed",
            "blocklocal")


def parse_pattern(spec: str) -> tuple[str, list[int]]:
    """'window:256' -> ('window', [256]); 'dense' -> ('dense', [])."""
    name, *args = spec.split(":")
    if name not in PATTERNS:
        raise ValueError(f"unknown attention pattern {spec!r}; expected one of {PATTERNS} "
                         f"(with ':'-separated int arguments, e.g. 'window:128')")
    try:
        return name, [int(a) for a in args]
    except ValueError:
        raise ValueError(f"pattern arguments must be ints, got {spec!r}") from None


def pattern_kwargs(spec: str, T: int, causal: bool, cfg: ModelConfig, device) -> dict:
    """fastattn.attention keyword arguments (causal/window/block_mask) for one pattern over
    T tokens. Block-sparse patterns come from fastattn.sparse."""
    name, args = parse_pattern(spec)
    kw = {"causal": causal}
    if name == "dense":
        return kw
    if name == "window":  # w keys on each side (only behind the query if causal)
        w = args[0] if args else cfg.window
        kw["window"] = (w, w)
        return kw
    import fastattn.sparse as fs  # block-sparse patterns only

    bs = cfg.sparse_block
    if name == "bigbird":  # global + 3-block sliding + random blocks (ITC), seeded
        bm = fs.bigbird(T, bigbird_block_size=bs, num_random_blocks=cfg.n_random_blocks,
                        num_global_blocks=cfg.n_global_blocks, seed=cfg.pattern_seed,
                        device=device)
    elif name == "longformer":  # window of w/2 each side + the first n_global tokens global
        w = args[0] if args else cfg.window
        bm = fs.longformer(T, T, window=2 * w, global_tokens=tuple(range(min(cfg.n_global_tokens, T))),
                           block_size=(bs, bs), device=device)
    elif name == "streaming":  # attention sinks + recent window (causal by definition)
        w = args[0] if args else cfg.window
        bm = fs.streaming(T, T, sink_size=cfg.n_global_tokens, window_size=w,
                          block_size=(bs, bs), device=device)
    elif name == "dilated":
        w, d = (args + [cfg.window, 2])[:2] if len(args) < 2 else args[:2]
        bm = fs.dilated_window(T, T, w, d, causal=causal, block_size=(bs, bs), device=device)
    elif name == "fixed":  # Sparse Transformer fixed: own stride-block + c summary columns
        stride = args[0] if args else cfg.window
        c = args[1] if len(args) > 1 else max(1, stride // 8)
        bm = fs.fixed(T, T, stride=stride, c=min(c, stride), causal=causal, block_size=(bs, bs),
                      device=device)
    elif name == "blocklocal":  # non-overlapping chunks of w tokens (LRA's local attention)
        bm = fs.block_local(T, args[0] if args else cfg.window, causal=causal,
                            block_size=(bs, bs), device=device)
    else:  # strided (Sparse Transformer), causal
        bm = fs.strided(T, T, stride=args[0] if args else cfg.window, block_size=(bs, bs),
                        device=device)
    kw["block_mask"] = bm
    return kw


def padding_block_mask(keep: torch.Tensor, block: int):
    """keep (B, S) bool, True on real tokens -> a BlockMask with one layout per row b in
    which a real query sees the real keys of its row and a padding query sees nothing.
    Right padding (the usual case) is an interval rule, classified per block without
    evaluating tokens (~0.1 s for 32 x 2000 at block 64); any other layout evaluates its
    tokens."""
    import fastattn.sparse as fs

    B, S = keep.shape
    lens = keep.sum(1)
    if torch.equal(keep, torch.arange(S, device=keep.device) < lens[:, None]):
        def fn(b, h, q, kv):
            return (q < lens[b]) & (kv < lens[b])
    else:
        def fn(b, h, q, kv):  # b (E, 1, 1), q (E, BM, 1), kv (E, 1, BN)
            return keep[b, q] & keep[b, kv]
    return fs.from_mask_fn(fn, S, S, B=B, block_size=block, device=keep.device)


def with_padding(layer_kw: list[dict], pad) -> list[dict]:
    """Each layer's attention kwargs intersected with the padding BlockMask pad (layers
    that share a pattern share the result)."""
    out, seen = [], {}
    for kw in layer_kw:
        if id(kw) not in seen:
            bm = kw.get("block_mask")
            seen[id(kw)] = dict(kw, block_mask=pad if bm is None else bm & pad)
        out.append(seen[id(kw)])
    return out


# ----------------------------------------------------------------------------- modules

class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021), half-split (GPT-NeoX) layout."""

    def __init__(self, head_dim: int, max_len: int, base: float):
        super().__init__()
        inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        ang = torch.outer(torch.arange(max_len, dtype=torch.float32), inv)  # (L, hd/2)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def forward(self, x, pos):
        # x (B, H, T, hd); pos (T,) shared or (B, T) per row
        cos, sin = self.cos[pos], self.sin[pos]  # (T, hd/2) or (B, T, hd/2)
        if pos.ndim == 2:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class KVCache:
    """Per-layer K/V buffers (B, Hkv, max_len, hd) and the valid length of each row."""

    def __init__(self, n_layer, B, n_kv_head, max_len, head_dim, dtype, device):
        shape = (B, n_kv_head, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.seqlens = torch.zeros(B, dtype=torch.long, device=device)
        self.max_len = max_len
        self.cross = [None] * n_layer  # encoder-decoder: (k, v) of the memory per layer

    def write(self, layer, k, v, pos):
        # k, v (B, Hkv, T, hd) for positions pos (B, T)
        B, _, T, _ = k.shape
        if int(pos.max()) >= self.max_len:
            raise ValueError(f"KV cache full: position {int(pos.max())} >= max_len {self.max_len}")
        rows = torch.arange(B, device=k.device).unsqueeze(1).expand(B, T)
        self.k[layer][rows, :, pos] = k.transpose(1, 2).to(self.k[layer].dtype)
        self.v[layer][rows, :, pos] = v.transpose(1, 2).to(self.v[layer].dtype)


class Attention(nn.Module):
    """Multi-head (GQA when n_kv_head < n_head) self- or cross-attention."""

    def __init__(self, cfg, layer: int, cross: bool = False):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.n_head, cfg.n_kv_head or cfg.n_head, cfg.n_embd // cfg.n_head
        self.layer, self.cross, self.backend = layer, cross, cfg.backend
        self.q = nn.Linear(cfg.n_embd, self.nh * self.hd, bias=cfg.bias)
        self.kv = nn.Linear(cfg.n_embd, 2 * self.nkv * self.hd, bias=cfg.bias)
        self.proj = nn.Linear(self.nh * self.hd, cfg.n_embd, bias=cfg.bias)
        self.proj.residual = True  # scaled init
        self.drop = nn.Dropout(cfg.dropout)
        self.attn_dropout = cfg.attn_dropout

    def _heads(self, x, n):
        B, T, _ = x.shape
        return x.view(B, T, n, self.hd).transpose(1, 2)  # (B, n, T, hd)

    def forward(self, x, mask_kw, rope=None, pos=None, memory=None, cache=None):
        # x (B, T, C); memory (B, S, C) for cross-attention; pos (T,) or (B, T)
        B, T, C = x.shape
        q = self._heads(self.q(x), self.nh)
        drop_kw = {}  # attention dropout: counter-based in the kernels, regenerated in backward
        if self.training and self.attn_dropout > 0:
            drop_kw = {"dropout_p": self.attn_dropout}
            mask_kw = dict(mask_kw or {}, **drop_kw)
        if self.cross:
            if cache is not None and cache.cross[self.layer] is not None:
                k, v = cache.cross[self.layer]
            else:
                k, v = (self._heads(t, self.nkv) for t in self.kv(memory).chunk(2, dim=-1))
                if cache is not None:
                    cache.cross[self.layer] = (k, v)
            y = fastattn.attention(q, k, v, backend=self.backend, **drop_kw)
        else:
            k, v = (self._heads(t, self.nkv) for t in self.kv(x).chunk(2, dim=-1))
            if rope is not None:
                q, k = rope(q, pos), rope(k, pos)
            if cache is None:
                y = fastattn.attention(q, k, v, backend=self.backend, **mask_kw)
            else:
                cache.write(self.layer, k, v, pos if pos.ndim == 2 else pos.expand(B, T))
                if T > 1 and int(cache.seqlens.max()) == 0:  # prefill: the ordinary kernel
                    y = fastattn.attention(q, k, v, backend=self.backend, **mask_kw)
                else:  # decode: few queries against the cache, per-row lengths
                    y = decode_attention(q, cache.k[self.layer].to(q.dtype),
                                         cache.v[self.layer].to(q.dtype),
                                         cache_seqlens=cache.seqlens + T,
                                         window_left=_decode_window(mask_kw, self.layer))
        y = y.transpose(1, 2).reshape(B, T, self.nh * self.hd)
        return self.drop(self.proj(y))


def _decode_window(mask_kw, layer):
    """The window_left a cached decode step needs for this layer's pattern."""
    if "block_mask" in mask_kw:
        raise ValueError(f"layer {layer}: KV-cache decoding supports dense and window patterns; "
                         f"block-sparse patterns need generate(..., use_cache=False)")
    w = mask_kw.get("window")
    return None if w is None else w[0]


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.proj.residual = True
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm block: x + attn(ln(x)) [+ cross(ln(x), memory)] + mlp(ln(x))."""

    def __init__(self, cfg, layer: int, with_cross: bool = False):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = Attention(cfg, layer)
        self.cross = None
        if with_cross:
            self.ln_c = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
            self.cross = Attention(cfg, layer, cross=True)
        self.ln2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x, mask_kw, rope=None, pos=None, memory=None, cache=None):
        x = x + self.attn(self.ln1(x), mask_kw, rope, pos, cache=cache)
        if self.cross is not None:
            x = x + self.cross(self.ln_c(x), None, memory=memory, cache=cache)
        return x + self.mlp(self.ln2(x))


# ----------------------------------------------------------------------------- config

@dataclass
class ModelConfig:
    kind: str = "gpt"  # "gpt" | "bert" | "encdec"
    vocab_size: int = 260  # 256 bytes + 4 specials (see fastattn.models.data)
    block_size: int = 256  # longest sequence (rotary table / learned positions)
    n_layer: int = 4  # encoder layers for bert/encdec, decoder layers for gpt
    n_dec_layer: int = 0  # encdec decoder layers; 0 = n_layer
    n_head: int = 4
    n_kv_head: int = 0  # 0 = n_head (plain MHA); fewer = grouped-query attention
    n_embd: int = 128
    dropout: float = 0.0
    attn_dropout: float = 0.0  # attention-probability dropout, applied in the kernels (training)
    bias: bool = False
    pos: str = "rope"  # "rope" | "learned"
    rope_base: float = 10000.0
    tie_weights: bool = True
    backend: str = "auto"  # fastattn backend for every attention call
    # Per-layer attention pattern, cycled over the layers: "dense", "window[:w]", "bigbird",
    # "longformer[:w]", "streaming[:w]", "dilated[:w:d]", "strided[:s]", "fixed[:s[:c]]"
    # (bidirectional in an encoder), "blocklocal[:w]".
    patterns: tuple = ("dense",)
    window: int = 128  # default window (tokens each side) for window-like patterns
    sparse_block: int = 64  # block size of block-sparse patterns (BigBird's block)
    n_global_blocks: int = 1  # BigBird global blocks (first and last)
    n_random_blocks: int = 2  # BigBird random blocks per query block
    n_global_tokens: int = 1  # Longformer global tokens / streaming sinks (first tokens)
    pattern_seed: int = 0  # BigBird's random blocks are fixed per model, like the paper's
    n_classes: int = 0  # > 0 adds a classification head (bert)
    # what the head reads: "mean" of the final states, or "cls" = the [CLS] (first) state, as
    # BERT's and the LRA paper's classifiers do (a long mean dilutes one decisive token)
    pool: str = "mean"
    # the head starts with an affine-free BatchNorm (the linear probe of He et al. 2022, MAE
    # sec. 4 / appendix: mean-pooled states vary little between inputs, standardized they do)
    probe_norm: bool = False
    n_segments: int = 2  # bert token types (sentence A / B)
    # bert: the token id that marks padding. When set, padding keys are masked out of every
    # attention call (a padding query sees nothing: its attention output is 0) and the mean
    # pool averages the real tokens only, as BERT's attention_mask does. None: every token
    # is real (the padding is attended to like any token).
    pad_id: int | None = None

    def __post_init__(self):
        if self.kind not in ("gpt", "bert", "encdec"):
            raise ValueError(f"kind must be 'gpt', 'bert' or 'encdec', got {self.kind!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.n_kv_head and self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.pool not in ("mean", "cls"):
            raise ValueError(f"pool must be 'mean' or 'cls', got {self.pool!r}")
        if self.pos not in ("rope", "learned"):
            raise ValueError(f"pos must be 'rope' or 'learned', got {self.pos!r}"
                             + (" ('sincos' is for image (ViT) tasks only)" if self.pos == "sincos" else ""))
        if isinstance(self.patterns, str):
            self.patterns = tuple(p for p in self.patterns.split(",") if p)
        self.patterns = tuple(self.patterns)
        for p in self.patterns:
            parse_pattern(p)

    def pattern(self, layer: int) -> str:
        return self.patterns[layer % len(self.patterns)]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patterns"] = list(self.patterns)
        return d


# ----------------------------------------------------------------------------- model

class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        C = cfg.n_embd
        self.wte = nn.Embedding(cfg.vocab_size, C)
        self.wpe = nn.Embedding(cfg.block_size, C) if cfg.pos == "learned" else None
        self.rope = Rotary(C // cfg.n_head, cfg.block_size, cfg.rope_base) if cfg.pos == "rope" else None
        self.drop = nn.Dropout(cfg.dropout)
        n_dec = cfg.n_dec_layer or cfg.n_layer
        if cfg.kind == "gpt":
            self.enc, self.dec = None, nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        elif cfg.kind == "bert":
            self.enc, self.dec = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer)), None
        else:
            self.enc = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
            self.dec = nn.ModuleList(Block(cfg, i, with_cross=True) for i in range(n_dec))
        self.ln_enc = nn.LayerNorm(C, bias=cfg.bias) if self.enc is not None else None
        self.ln_dec = nn.LayerNorm(C, bias=cfg.bias) if self.dec is not None else None
        if self.dec is not None:
            self.lm_head = nn.Linear(C, cfg.vocab_size, bias=False)
            if cfg.tie_weights:
                self.lm_head.weight = self.wte.weight
        if cfg.kind == "bert":
            self.wse = nn.Embedding(cfg.n_segments, C)  # segment (token type) embedding
            self.mlm_transform = nn.Sequential(nn.Linear(C, C), nn.GELU(), nn.LayerNorm(C))
            self.mlm_head = nn.Linear(C, cfg.vocab_size, bias=True)
            if cfg.tie_weights:
                self.mlm_head.weight = self.wte.weight
            self.pooler = nn.Sequential(nn.Linear(C, C), nn.Tanh())  # on [CLS]
            self.nsp_head = nn.Linear(C, 2)
            self.classifier = None
            if cfg.n_classes > 0:
                self.classifier = nn.Linear(C, cfg.n_classes)
                if cfg.probe_norm:
                    self.classifier = nn.Sequential(nn.BatchNorm1d(C, affine=False),
                                                    self.classifier)
        self.apply(self._init)
        self._mask_cache: dict = {}

    def _init(self, m):
        if isinstance(m, nn.Linear):
            # GPT-2: residual projections scaled down by depth so the stream stays O(1)
            n = self.cfg.n_layer + (self.cfg.n_dec_layer or self.cfg.n_layer) * (self.cfg.kind == "encdec")
            std = 0.02 / math.sqrt(2 * n) if getattr(m, "residual", False) else 0.02
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- masks: built once per (stack, length), threaded through the layers
    def masks(self, stack: str, T: int, device) -> list[dict]:
        causal = stack == "dec"
        key = (stack, T, str(device))
        if key not in self._mask_cache:
            n = len(self.dec if causal else self.enc)
            by_spec = {}
            for i in range(n):
                spec = self.cfg.pattern(i)
                if spec not in by_spec:
                    by_spec[spec] = pattern_kwargs(spec, T, causal, self.cfg, device)
            self._mask_cache[key] = [by_spec[self.cfg.pattern(i)] for i in range(n)]
        return self._mask_cache[key]

    def _embed(self, idx, pos, segments=None):
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(pos)
        if segments is not None:
            x = x + self.wse(segments)
        return self.drop(x)

    def _check_len(self, T):
        if T > self.cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.cfg.block_size}")

    def encode(self, idx, segments=None):
        """Bidirectional stack (bert / encdec encoder): idx (B, S) -> (B, S, C)."""
        return self._encode(idx, segments, self._keep(idx))

    def _encode(self, idx, segments, keep):
        # keep: (B, S) bool of real tokens (self._keep), or None
        B, S = idx.shape
        self._check_len(S)
        pos = torch.arange(S, device=idx.device)
        x = self._embed(idx, pos, segments)
        masks = self.masks("enc", S, idx.device)
        if keep is not None:  # padding masked out of every layer's attention
            masks = with_padding(masks, padding_block_mask(keep, self.cfg.sparse_block))
        for blk, kw in zip(self.enc, masks, strict=True):
            x = blk(x, kw, self.rope, pos)
        return self.ln_enc(x)

    def _keep(self, idx):
        """(B, S) bool, True on real tokens, or None when nothing is padding."""
        if self.cfg.kind != "bert" or self.cfg.pad_id is None:
            return None
        keep = idx != self.cfg.pad_id
        return None if bool(keep.all()) else keep

    def decode(self, idx, memory=None, cache=None):
        """Causal stack (gpt / encdec decoder): idx (B, T) -> (B, T, C). With a cache, idx
        holds the next tokens of each row, at positions cache.seqlens[b] + t."""
        B, T = idx.shape
        if cache is None:
            self._check_len(T)
            pos = torch.arange(T, device=idx.device)
        else:
            pos = cache.seqlens.unsqueeze(1) + torch.arange(T, device=idx.device)  # (B, T)
            self._check_len(int(pos.max()) + 1)
        x = self._embed(idx, pos)
        for blk, kw in zip(self.dec, self.masks("dec", T, idx.device), strict=True):
            x = blk(x, kw, self.rope, pos, memory=memory, cache=cache)
        if cache is not None:
            cache.seqlens += T
        return self.ln_dec(x)

    def forward(self, idx=None, targets=None, *, segments=None, mlm_labels=None, nsp_labels=None,
                labels=None, src=None):
        """gpt:    forward(idx, targets)                 -> (logits (B, T, V), loss)
        encdec: forward(tgt_in, tgt_out, src=src)     -> (logits (B, T, V), loss)
        bert:   forward(idx, segments=, mlm_labels=, nsp_labels=, labels=)
                                                      -> ({mlm, nsp, cls logits}, loss)
        Label -100 is ignored (unmasked MLM positions)."""
        if self.cfg.kind == "bert":
            return self._bert(idx, segments, mlm_labels, nsp_labels, labels)
        memory = self.encode(src) if self.cfg.kind == "encdec" else None
        h = self.decode(idx, memory)
        logits = self.lm_head(h)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        return logits, loss

    def _bert(self, idx, segments, mlm_labels, nsp_labels, labels):
        keep = self._keep(idx)  # padding, masked in attention and in the mean pool
        h = self._encode(idx, segments, keep)
        pooled = self.pooler(h[:, 0])
        out, loss = {}, None

        def add(term):
            nonlocal loss
            loss = term if loss is None else loss + term

        if mlm_labels is not None:  # logits only where a label exists (15% of tokens)
            sel = mlm_labels != -100
            out["mlm"] = self.mlm_head(self.mlm_transform(h[sel]))
            add(F.cross_entropy(out["mlm"].float(), mlm_labels[sel]))
        if nsp_labels is not None:
            out["nsp"] = self.nsp_head(pooled)
            add(F.cross_entropy(out["nsp"].float(), nsp_labels))
        if self.classifier is not None:
            # mean of the final states (default): a frozen-feature probe that does not depend
            # on how well NSP trained the [CLS] pooler (short pre-training leaves it near
            # constant); "cls": the raw [CLS] state, trained end to end with the task
            if self.cfg.pool == "cls":
                feat = h[:, 0]
            elif keep is None:
                feat = h.mean(1)
            else:  # mean over the real tokens of each row
                w = keep.unsqueeze(-1).to(h.dtype)
                feat = (h * w).sum(1) / w.sum(1).clamp(min=1)
            out["cls"] = self.classifier(self.drop(feat))
            if labels is not None:
                add(F.cross_entropy(out["cls"].float(), labels))
        return out, loss

    # -- fine-tuning
    def backbone_parameters(self):
        head = set(map(id, self.classifier.parameters())) if getattr(self, "classifier", None) else set()
        return [p for p in self.parameters() if id(p) not in head]

    def freeze_backbone(self, frozen: bool = True):
        for p in self.backbone_parameters():
            p.requires_grad_(not frozen)

    # -- generation
    @torch.no_grad()
    def generate(self, prompt, max_new_tokens, *, prompt_lens=None, src=None, temperature=1.0,
                 top_k=None, top_p=None, greedy=False, use_cache=True, eos_id=None,
                 generator=None):
        """Continue prompt (B, P) token by token (gpt; encdec with src (B, S), prompt = the
        start token). Rows may have different prompt lengths prompt_lens (B,) (right-padded
        prompts). Returns (B, max(prompt_lens) + max_new_tokens) with each row's generated
        tokens right after its own prompt (positions past a row's end hold eos_id or 0).

        use_cache=True: prefill then one token per step through the KV cache (split-KV
        decode kernel); False: recompute the whole sequence every step (the reference)."""
        if self.cfg.kind == "bert":
            raise ValueError("bert models do not generate; use kind='gpt' or 'encdec'")
        B, P = prompt.shape
        dev = prompt.device
        lens = (torch.full((B,), P, dtype=torch.long, device=dev) if prompt_lens is None
                else prompt_lens.to(device=dev, dtype=torch.long).clone())
        total = P + max_new_tokens
        self._check_len(int(lens.max()) + max_new_tokens - 1)  # the last token is never fed
        out = torch.full((B, total), 0 if eos_id is None else eos_id, dtype=prompt.dtype, device=dev)
        out[:, :P] = prompt
        memory = self.encode(src) if self.cfg.kind == "encdec" else None
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        rows = torch.arange(B, device=dev)
        cache = None
        if use_cache:
            hd = self.cfg.n_embd // self.cfg.n_head
            dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else self.wte.weight.dtype
            cache = KVCache(len(self.dec), B, self.cfg.n_kv_head or self.cfg.n_head,
                            int(lens.max()) + max_new_tokens, hd, dtype, dev)
            h = self.decode(prompt, memory, cache)  # prefill
            cache.seqlens.copy_(lens)
            h_last = h[rows, lens - 1]
        for _ in range(max_new_tokens):
            if not use_cache:
                h_last = self.decode(out[:, : int(lens.max())], memory)[rows, lens - 1]
            logits = self.lm_head(h_last).float()  # (B, V)
            nxt = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                         greedy=greedy, generator=generator)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done |= nxt == eos_id
            out[rows, lens] = nxt
            lens += 1
            if eos_id is not None and bool(done.all()):
                break
            if use_cache and _ < max_new_tokens - 1:
                h_last = self.decode(nxt.unsqueeze(1), memory, cache)[:, 0]
        return out


def sample(logits, *, temperature=1.0, top_k=None, top_p=None, greedy=False, generator=None):
    """Next token per row from logits (B, V): greedy argmax, or temperature / top-k /
    nucleus (top-p: the smallest set of tokens whose probability reaches p) sampling."""
    if greedy or temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        srt, idx = torch.sort(logits, dim=-1, descending=True)
        cum = srt.softmax(-1).cumsum(-1)
        drop = cum - srt.softmax(-1) >= top_p  # tokens after the mass already reached p
        srt = srt.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, srt)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def build_model(cfg: ModelConfig | dict) -> Transformer:
    return Transformer(cfg if isinstance(cfg, ModelConfig) else ModelConfig(**cfg))


__all__ = ["ModelConfig", "Transformer", "KVCache", "build_model", "sample", "parse_pattern",
           "pattern_kwargs", "PATTERNS"]
