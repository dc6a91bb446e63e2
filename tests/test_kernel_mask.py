"""The named mask hand-off (fastattn.kernel_mask <-> csrc/common/block_mask_fields.h)."""

import re
from pathlib import Path

import pytest
import torch

import fastattn
from fastattn import sparse
from fastattn.kernel_mask import BlockLists, KernelMask, int64_seed

HEADER = Path(__file__).resolve().parents[1] / "csrc" / "common" / "block_mask_fields.h"


def _header_names():
    text = HEADER.read_text()
    body = re.search(r"kBlockMaskFieldNames\[kBlockMaskFieldCount\]\s*=\s*\{(.*?)\};", text, re.S)
    return re.findall(r'"(\w+)"', body.group(1))


def _header_enum():
    text = HEADER.read_text()
    body = re.search(r"enum BlockMaskField : int \{(.*?)\};", text, re.S).group(1)
    return re.findall(r"^\s*(k\w+)", body, re.M)


def test_python_and_cpp_name_the_same_fields_in_the_same_order():
    assert _header_names() == list(BlockLists._fields)
    # enum kKvNumBlocks ... <-> kv_num_blocks ...: CamelCase of the same names, same order
    camel = ["k" + "".join(w.capitalize() for w in n.split("_")) for n in BlockLists._fields]
    assert _header_enum() == camel + ["kBlockMaskFieldCount"]


def test_block_mask_hands_one_cached_named_record():
    bm = sparse.sliding_window(300, 300, 40, causal=True, block_size=(64, 32))
    km = bm.kernel_mask()
    assert km is bm.kernel_mask()
    assert isinstance(km, KernelMask) and km.is_sparse
    assert km.window == bm.window and km.block_size == (64, 32)
    assert km.lists.kv_num_blocks is km.tensors[0]
    assert km.lists.partial_masks.dtype == torch.uint8
    assert km.lists.q_indices.shape[2] == -(-300 // 32)
    assert KernelMask(window=(-1, 0)).tensors == []


def test_problem_mask_folds_window_once():
    from fastattn.backends.base import Problem
    bm = sparse.causal(64, block_size=16)
    base = dict(device=torch.device("cpu"), dtype=torch.float32, B=1, Hq=1, Hkv=1, Nq=64, Nk=64,
                D=8, Dv=8, scale=1.0, needs_grad=False, return_lse=False)
    assert Problem(window=(3, 0), block_mask=None, **base).mask == KernelMask(window=(3, 0))
    assert Problem(window=(-1, -1), block_mask=bm, **base).mask is bm.kernel_mask()
    with pytest.raises(ValueError, match="folded into the mask"):
        Problem(window=(3, 0), block_mask=bm, **base).mask


@pytest.mark.parametrize("bad", ["kv_indices", "partial_masks"])
def test_cpu_binding_names_the_malformed_field(bad):
    if not fastattn.available_backends()["cpu"][0]:
        pytest.skip("cpu extension not built")
    bm = sparse.causal(64, block_size=16)
    lists = bm.kernel_mask().lists._asdict()
    lists[bad] = lists[bad].to(torch.int64)
    q = torch.randn(1, 1, 64, 8)
    with pytest.raises(ValueError, match=f"block_mask.{bad}"):
        torch.ops.fastattn.cpu_fwd(q, q, q, 1.0, -1, 0, list(lists.values()))


def test_int64_seed_wraps_64_bits():
    assert int64_seed(0) == 0 and int64_seed(2**63) == -(2**63) and int64_seed(2**64 + 5) == 5
    assert int64_seed(-1) == -1
