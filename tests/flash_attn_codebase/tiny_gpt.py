"""A tiny GPT written against FlashAttention 2, the way many training/inference codebases
use it: flash_attn_func for training, unpad_input + flash_attn_varlen_func + pad_input for
right-padded batches, flash_attn_with_kvcache (in-place cache append + rotary) for
generation. A naive attention path (attn_impl="naive") is kept beside it as the slow
reference, nanoGPT style.

This file is a fixture of tests/test_flash_attn_compat_codebase.py: the test swaps the two
flash_attn import lines below for fastattn.flash_attn_compat and runs it unchanged on the
CPU. It never imports fastattn itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
from flash_attn.bert_padding import pad_input, unpad_input


@dataclass
class GPTConfig:
    vocab_size: int = 96
    block_size: int = 128
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int = 2  # GQA
    n_embd: int = 96
    rotary_base: float = 10000.0
    window: int = -1  # sliding window (keys behind the query); -1 = full causal
    softcap: float = 0.0


def rotary_tables(seqlen, rotary_dim, base, device=None):
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, device=device).float() / rotary_dim))
    angles = torch.outer(torch.arange(seqlen, device=device).float(), inv_freq)
    return angles.cos(), angles.sin()  # (seqlen, rotary_dim / 2)


def apply_rotary(x, cos, sin, positions):
    """GPT-NeoX style rotary on x (B, T, H, D) at positions (B, T)."""
    half = cos.shape[1]
    c, s = cos[positions].unsqueeze(2), sin[positions].unsqueeze(2)
    x1, x2 = x[..., :half].float(), x[..., half:2 * half].float()
    rot = torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], -1).to(x.dtype)
    return torch.cat([rot, x[..., 2 * half:]], -1)


def naive_attention(q, k, v, causal_offsets, window=-1, softcap=0.0, key_mask=None):
    """q (B, Tq, H, D), k/v (B, Tk, Hk, D); query i sits at key position i + offset[b]."""
    B, Tq, H, D = q.shape
    Tk, Hk = k.shape[1], k.shape[2]
    k = k.repeat_interleave(H // Hk, dim=2)
    v = v.repeat_interleave(H // Hk, dim=2)
    att = torch.einsum("bihd,bjhd->bhij", q.float(), k.float()) / math.sqrt(D)
    if softcap > 0:
        att = softcap * torch.tanh(att / softcap)
    pos_q = torch.arange(Tq).view(1, Tq, 1) + causal_offsets.view(B, 1, 1)
    pos_k = torch.arange(Tk).view(1, 1, Tk)
    ok = pos_k <= pos_q
    if window >= 0:
        ok = ok & (pos_k >= pos_q - window)
    if key_mask is not None:
        ok = ok & key_mask.view(B, 1, Tk)
    att = att.masked_fill(~ok.unsqueeze(1), float("-inf"))
    att = torch.nan_to_num(torch.softmax(att, -1), nan=0.0)
    return torch.einsum("bhij,bjhd->bihd", att, v.float()).to(q.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, attn_impl: str):
        super().__init__()
        self.cfg, self.attn_impl = cfg, attn_impl
        self.head_dim = cfg.n_embd // cfg.n_head
        kv_dim = cfg.n_kv_head * self.head_dim
        self.qkv = nn.Linear(cfg.n_embd, cfg.n_embd + 2 * kv_dim, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        cos, sin = rotary_tables(cfg.block_size, self.head_dim, cfg.rotary_base)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _split(self, x):
        B, T, _ = x.shape
        H, Hk, D = self.cfg.n_head, self.cfg.n_kv_head, self.head_dim
        q, k, v = self.qkv(x).split([H * D, Hk * D, Hk * D], dim=-1)
        return q.view(B, T, H, D), k.view(B, T, Hk, D), v.view(B, T, Hk, D)

    def forward(self, x, attention_mask=None):
        """x (B, T, C); attention_mask (B, T) right padding (1 = token) or None."""
        B, T, C = x.shape
        q, k, v = self._split(x)
        pos = torch.arange(T, device=x.device).expand(B, T)
        q, k = apply_rotary(q, self.cos, self.sin, pos), apply_rotary(k, self.cos, self.sin, pos)
        window = (self.cfg.window, 0)
        if self.attn_impl == "naive":
            y = naive_attention(q, k, v, torch.zeros(B, dtype=torch.long), self.cfg.window,
                                self.cfg.softcap, key_mask=None if attention_mask is None
                                else attention_mask.bool())
            if attention_mask is not None:
                y = y * attention_mask[..., None, None]
        elif attention_mask is None:
            y = flash_attn_func(q, k, v, causal=True, window_size=window,
                                softcap=self.cfg.softcap)
        else:
            q_unpad, indices, cu_seqlens, max_seqlen, _ = unpad_input(q, attention_mask)
            k_unpad = unpad_input(k, attention_mask)[0]
            v_unpad = unpad_input(v, attention_mask)[0]
            y = flash_attn_varlen_func(q_unpad, k_unpad, v_unpad, cu_seqlens, cu_seqlens,
                                       max_seqlen, max_seqlen, causal=True, window_size=window,
                                       softcap=self.cfg.softcap)
            y = pad_input(y, indices, B, T)
        return self.proj(y.reshape(B, T, C))

    def step(self, x, k_cache, v_cache, cache_seqlens):
        """Incremental decoding: x (B, T_new, C) new tokens; appends their keys/values to
        the caches in place (the kernel also applies rotary to q and the new keys)."""
        B, T, C = x.shape
        q, k, v = self._split(x)
        if self.attn_impl == "naive":
            pos = cache_seqlens.long().view(B, 1) + torch.arange(T).view(1, T)
            q, k = (apply_rotary(t, self.cos, self.sin, pos) for t in (q, k))
            for b in range(B):
                n = int(cache_seqlens[b])
                k_cache[b, n:n + T], v_cache[b, n:n + T] = k[b], v[b]
            L = int((cache_seqlens + T).max())
            key_mask = torch.arange(L).view(1, L) < (cache_seqlens + T).view(B, 1)
            y = naive_attention(q, k_cache[:, :L], v_cache[:, :L], cache_seqlens.long(),
                                self.cfg.window, self.cfg.softcap, key_mask)
        else:
            y = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, rotary_cos=self.cos,
                                        rotary_sin=self.sin, cache_seqlens=cache_seqlens,
                                        causal=True, window_size=(self.cfg.window, 0),
                                        softcap=self.cfg.softcap, rotary_interleaved=False)
        return self.proj(y.reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg, attn_impl):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg, attn_impl)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(),
                                 nn.Linear(4 * cfg.n_embd, cfg.n_embd))

    def forward(self, x, attention_mask=None):
        x = x + self.attn(self.ln1(x), attention_mask)
        return x + self.mlp(self.ln2(x))

    def step(self, x, k_cache, v_cache, cache_seqlens):
        x = x + self.attn.step(self.ln1(x), k_cache, v_cache, cache_seqlens)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig, attn_impl: str = "flash"):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, attn_impl) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def forward(self, idx, attention_mask=None, targets=None):
        x = self.wte(idx)
        for block in self.blocks:
            x = block(x, attention_mask)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)

    @torch.no_grad()
    def generate(self, prompt, max_new_tokens):
        """Greedy decoding with a KV cache: prefill the prompt, then one token per step.
        Returns the tokens (B, T0 + max_new_tokens) and each step's logits."""
        B, T0 = prompt.shape
        H_k, D = self.cfg.n_kv_head, self.cfg.n_embd // self.cfg.n_head
        shape = (B, self.cfg.block_size, H_k, D)
        caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in self.blocks]
        seqlens = torch.zeros(B, dtype=torch.int32)
        tokens, step_logits, x_new = prompt, [], prompt
        for _ in range(max_new_tokens):
            x = self.wte(x_new)
            for block, (kc, vc) in zip(self.blocks, caches, strict=True):
                x = block.step(x, kc, vc, seqlens)
            logits = self.lm_head(self.ln_f(x))[:, -1]
            seqlens = seqlens + x_new.shape[1]
            x_new = logits.argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, x_new], 1)
            step_logits.append(logits)
        return tokens, torch.stack(step_logits, 1)


def train_steps(model, data, steps=3, lr=1e-2, attention_mask=None):
    """A few AdamW steps of next-token prediction; returns the losses."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        targets = data[:, 1:].clone()
        if attention_mask is not None:
            targets[attention_mask[:, 1:] == 0] = -1
        _, loss = model(data[:, :-1], None if attention_mask is None else attention_mask[:, :-1],
                        targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


if __name__ == "__main__":
    torch.manual_seed(0)
    model = GPT(GPTConfig())
    data = torch.randint(0, 96, (4, 65))
    print("losses", train_steps(model, data))
    print("generated", model.generate(data[:2, :8], 16)[0].tolist())
