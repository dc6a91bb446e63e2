"""FlashAttention 2's Python API on fastattn: switch a codebase with one import.

    # from flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
    # from flash_attn.bert_padding import unpad_input, pad_input
    from fastattn.flash_attn_compat import flash_attn_func, flash_attn_varlen_func, \\
        flash_attn_with_kvcache
    from fastattn.flash_attn_compat.bert_padding import unpad_input, pad_input

The package mirrors flash_attn's layout (flash_attn_compat.flash_attn_interface,
flash_attn_compat.bert_padding), so replacing the prefix `flash_attn` with
`fastattn.flash_attn_compat` in import lines is the whole switch. Signatures and semantics
follow FlashAttention 2.6/2.7; see flash_attn_interface for the few documented differences
(S_dmask always returned with return_attn_probs, -inf lse on rows that see no key).
layers.rotary.apply_rotary_emb mirrors flash_attn.layers.rotary's.
The padding helpers are also re-exported here for convenience.
"""

from .bert_padding import (
                           index_first_axis,
                           index_put_first_axis,
                           pad_input,
                           unpad_input,
                           unpad_input_for_concatenated_sequences,
)
from .flash_attn_interface import (
                           flash_attn_func,
                           flash_attn_kvpacked_func,
                           flash_attn_qkvpacked_func,
                           flash_attn_varlen_func,
                           flash_attn_varlen_kvpacked_func,
                           flash_attn_varlen_qkvpacked_func,
                           flash_attn_with_kvcache,
)

# The FlashAttention API level this package mirrors (for code that checks flash_attn.__version__).
__version__ = "2.7.0"

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
    "index_first_axis",
    "index_put_first_axis",
    "pad_input",
    "unpad_input",
    "unpad_input_for_concatenated_sequences",
]
