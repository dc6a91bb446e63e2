"""Mirrors flash_attn.layers: `rotary.apply_rotary_emb` (the functional rotary embedding)."""
