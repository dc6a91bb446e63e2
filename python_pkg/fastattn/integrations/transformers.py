"""Hugging Face transformers backend: attn_implementation="fastattn".

    import fastattn.integrations.transformers as fastattn_hf
    fastattn_hf.register()
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="fastattn")

register() adds one name to two of transformers' registries:

  AttentionInterface      attention_forward(module, query, key, value, attention_mask,
                          scaling=None, dropout=0.0, sliding_window=None, **kwargs)
                          -> (out (B, N, H, D), None), called by every attention layer
  AttentionMaskInterface  attention_mask(**mask_kwargs), called once per forward by the
                          model's create_*_mask; it decides whether fastattn can compute the
                          pattern natively (then it returns None, as flash-attention's does)
                          or the layers need an explicit mask

How transformers' masks become fastattn arguments (query/key layout (B, H, N, D), GQA kept):

  the model's mask pattern                    the layers get   fastattn computes
  causal                                      None             attention(causal=True)
  causal sliding window W (Mistral, Gemma)    None, W          attention(causal=True,
                                                               window=(W - 1, W - 1))
  bidirectional (encoders)                    None             attention()
  anything else: padding, packed sequences,   bool mask        scaled_dot_product_attention(
  chunked, or_/and_mask_function, a static    (B, 1, Nq, Nk)     attn_mask=mask), i.e.
  cache, a user's 4-D mask, under compile                      torch's SDPA with the mask

"None" needs the queries to be the last Nq of the Nk keys (a DynamicCache, prefill or
decode), which is fastattn's bottom-right alignment, and every key in view unpadded. A
StaticCache (empty slots after the current position) and padded batches get the explicit
mask. Under torch.compile the mask is always explicit (the checks read tensor values).
Attention dropout while training and logit softcapping (Gemma 2's attn_logit_softcapping,
passed as `softcap`) run inside fastattn's kernels on the native path; with an explicit
mask, dropout goes to torch's SDPA and softcap to fastattn's reference (naive) attention.
GPT-2-style modules that pass no `scaling` get their eager scale (scale_attn_weights,
scale_attn_by_inverse_layer_idx). output_attentions gives no weights (as "sdpa");
head_mask, attention sinks (s_aux) and position_bias raise: use "eager".
"""

from __future__ import annotations

import torch

import fastattn

__all__ = ["register", "attention_forward", "attention_mask", "NAME"]

NAME = "fastattn"

_UNSUPPORTED = ("head_mask", "s_aux", "position_bias")


def _require_transformers():
    try:
        import transformers  # noqa: F401
        from transformers import masking_utils
    except ImportError as e:
        raise ImportError(
            "fastattn's Hugging Face integration needs transformers >= 4.57: "
            "pip install 'fastattn[transformers]'"
        ) from e
    return masking_utils


def register(name: str = NAME) -> str:
    """Registers fastattn under `name` with transformers' AttentionInterface and
    AttentionMaskInterface; returns the name to pass as attn_implementation."""
    masking_utils = _require_transformers()
    from transformers import AttentionInterface

    AttentionInterface.register(name, attention_forward)
    masking_utils.AttentionMaskInterface.register(name, attention_mask)
    return name


# ------------------------------------------------------------------ the mask builder


def _closure_var(fn, name):
    code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None)
    if code is None or cells is None or name not in code.co_freevars:
        return None
    return cells[code.co_freevars.index(name)].cell_contents


def _pattern(mask_function):
    """("causal", None), ("sliding", W), ("bidirectional", None), or None for a mask
    function fastattn does not compute natively. Unknown functions (any overlay, padding
    or packing transformers folds in) give None, so the safe explicit mask is built."""
    mu = _require_transformers()
    if mask_function is mu.causal_mask_function:
        return "causal", None
    if mask_function is getattr(mu, "bidirectional_mask_function", object()):
        return "bidirectional", None
    parts = _closure_var(mask_function, "mask_functions")  # and_masks(...)
    if isinstance(parts, tuple) and len(parts) == 2 and mu.causal_mask_function in parts:
        other = parts[0] if parts[1] is mu.causal_mask_function else parts[1]
        W = _closure_var(other, "sliding_window")
        if (getattr(other, "__qualname__", "").startswith("sliding_window_overlay.")
                and isinstance(W, int) and W > 0):
            return "sliding", W
    return None


def _aligned(kw) -> bool:
    """Are the queries the last Nq of the keys (bottom-right alignment)?"""
    kv_end = int(kw.get("kv_offset", 0)) + int(kw["kv_length"])
    if "cache_position" in kw:  # transformers 4.x
        pos = kw["cache_position"]
        q_len = pos.shape[0]
        if q_len == 0:
            return False
        q_start, q_end = int(pos[0]), int(pos[-1]) + 1
        if q_end - q_start != q_len:
            return False
    else:  # transformers 5.x
        q_len = int(kw["q_length"])
        q_end = int(kw.get("q_offset", 0)) + q_len
    return q_end == kv_end and q_len <= int(kw["kv_length"])


def _unpadded(kw) -> bool:
    """Is every key in view (positions kv_offset .. kv_offset + kv_length) a real token?"""
    pad = kw.get("attention_mask")
    if pad is None:
        return True
    lo = int(kw.get("kv_offset", 0))
    hi = lo + int(kw["kv_length"])
    return pad.shape[-1] >= hi and bool(pad[:, lo:hi].bool().all())


def attention_mask(**kwargs):
    """transformers' mask-interface call (keyword arguments of its sdpa_mask). Returns None
    when fastattn computes the pattern itself, else transformers' own boolean sdpa mask
    (B, 1, Nq, Nk), True = visible."""
    mu = _require_transformers()
    pattern = _pattern(kwargs.get("mask_function"))
    if (pattern is not None and kwargs.get("allow_is_causal_skip", True)
            and not torch.compiler.is_compiling()
            and (pattern[0] == "bidirectional" or _aligned(kwargs))
            and _unpadded(kwargs)):
        return None
    return mu.sdpa_mask(**{**kwargs, "allow_is_causal_skip": False})


# ------------------------------------------------------------------ the attention function


def _default_scale(module, value):
    """The scale the module's eager attention uses when it passes no `scaling`."""
    if hasattr(module, "scale_attn_weights"):  # GPT-2 family
        s = value.shape[-1] ** -0.5 if module.scale_attn_weights else 1.0
        if getattr(module, "scale_attn_by_inverse_layer_idx", False):
            s /= float(module.layer_idx + 1)
        return s
    return None  # fastattn's default, head_dim ** -0.5


def _explicit_mask(Nq, Nk, causal, window, device):
    """Bottom-right aligned (Nq, Nk) bool mask, True = visible (for the dropout path)."""
    d = torch.arange(Nk, device=device)[None, :] - (torch.arange(Nq, device=device)[:, None]
                                                    + (Nk - Nq))
    ok = torch.ones(Nq, Nk, dtype=torch.bool, device=device)
    if causal:
        ok &= d <= 0
    if window is not None:
        ok &= (d >= -window[0]) & (d <= window[1])
    return ok


def _masked_softcap(query, key, value, mask, scale, softcap, dropout):
    """Softcapped attention under an arbitrary boolean mask (B|1, 1|H, Nq, Nk): the naive
    reference, which materializes the scores."""
    from fastattn.backends.reference import reference_attention
    from fastattn.score_mods import draw_seed

    out, _ = reference_attention(query, key, value, scale=scale, mask=mask, softcap=softcap,
                                 dropout_p=dropout, dropout_seed=draw_seed() if dropout else 0)
    return out


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                      sliding_window=None, **kwargs):
    """transformers' attention-function signature. query (B, Hq, Nq, D), key/value
    (B, Hkv, Nk, D) with Hq % Hkv == 0; attention_mask None (pattern from is_causal and
    sliding_window, see the module docstring), bool (True = visible) or additive float,
    broadcastable to (B, Hq, Nq, >= Nk). Returns (out (B, Nq, Hq, D), None)."""
    for name in _UNSUPPORTED:
        if kwargs.get(name) is not None:
            raise ValueError(
                f"attn_implementation='fastattn' does not support {name}; load the model with "
                f"attn_implementation='eager' for it"
            )
    scale = scaling if scaling is not None else _default_scale(module, value)
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    is_causal = bool(is_causal)
    window = None
    if sliding_window is not None:
        window = (int(sliding_window) - 1, int(sliding_window) - 1)  # right folds to 0 if causal
    Nq, Nk = query.shape[2], key.shape[2]

    softcap = float(kwargs.get("softcap") or 0.0)
    dropout = float(dropout or 0.0)
    if attention_mask is None:
        out = fastattn.attention(query, key, value, causal=is_causal, window=window, scale=scale,
                                 softcap=softcap or None, dropout_p=dropout or None)
    elif softcap:  # masked + softcap: the naive path applies both exactly
        mask = attention_mask[:, :, :, :Nk]
        if mask.dtype != torch.bool:
            mask = mask > float("-inf")  # additive 0 / -inf masks
        out = _masked_softcap(query, key, value, mask, scale, softcap, dropout)
    else:
        if attention_mask is None:
            mask = _explicit_mask(Nq, Nk, is_causal, window, query.device)
        else:
            mask = attention_mask[:, :, :, :Nk]
        out = fastattn.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=float(dropout), scale=scale,
            enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None
