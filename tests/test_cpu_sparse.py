"""cpu backend with block-sparse masks: forward, lse and q/k/v gradients against the float64
oracle (the reference backend on to_dense()) for every pattern, per-head/per-batch layouts,
GQA, empty rows, and composition with causal/window."""

import pytest
import torch
from conftest import requires_cpu_ext
from oracle import check_against_oracle, make_qkv

import fastattn
from fastattn import sparse
from fastattn.masking import window_mask

pytestmark = requires_cpu_ext

BS = (16, 32)  # block sizes not equal, lengths below not multiples of them


def _pattern(name, Nq, Nk, H):
    """Builds one pattern lazily (some are self-attention only)."""
    n = Nq  # self-attention-only patterns use Nq
    g = torch.Generator().manual_seed(3)
    builders = {
        "causal": lambda: sparse.causal(Nq, Nk, block_size=BS),
        "sliding_window": lambda: sparse.sliding_window(Nq, Nk, 20, 3, block_size=BS),
        "sliding_window_causal": lambda: sparse.sliding_window(Nq, Nk, 33, causal=True, block_size=BS),
        "dilated_window": lambda: sparse.dilated_window(Nq, Nk, 6, 3, block_size=BS),
        "strided": lambda: sparse.strided(Nq, Nk, stride=12, block_size=BS),
        "fixed": lambda: sparse.fixed(Nq, Nk, stride=16, c=4, block_size=BS),
        "bigbird": lambda: sparse.bigbird(n, bigbird_block_size=16, num_random_blocks=2, num_heads=H,
                                  block_size=(16, 16)),
        "bigbird_unaligned": lambda: sparse.bigbird(n, bigbird_block_size=12, num_random_blocks=1,
                                            block_size=BS),
        "longformer": lambda: sparse.longformer(Nq, Nk, window=10, global_tokens=(0, 5, 60), block_size=BS),
        "streaming": lambda: sparse.streaming(Nq, Nk, sink_size=4, window_size=24, block_size=BS),
        "document": lambda: sparse.document([30, 1, 50, n - 81], causal=True, block_size=BS),
        "prefix_lm": lambda: sparse.prefix_lm(Nq, Nk, prefix_length=37, block_size=BS),
        "from_mask_fn_per_head": lambda: sparse.from_mask_fn(
            lambda b, h, i, j: ((i + j + h) % 3 != 0) | (j == 0), Nq, Nk, H=H, block_size=BS),
        "from_dense_random": lambda: sparse.from_dense(torch.rand(Nq, Nk, generator=g) > 0.7, block_size=BS),
    }
    return builders[name]()


PATTERN_NAMES = ["causal", "sliding_window", "sliding_window_causal", "dilated_window", "strided",
                 "fixed", "bigbird", "bigbird_unaligned", "longformer", "streaming", "document",
                 "prefix_lm", "from_mask_fn_per_head", "from_dense_random"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", PATTERN_NAMES)
def test_cpu_sparse_matches_oracle(name, dtype):
    Nq = Nk = 97
    bm = _pattern(name, Nq, Nk, 4)
    q, k, v = make_qkv(2, 4, 2, Nq, Nk, 40, dtype)
    fn = lambda q_, k_, v_: fastattn.attention(q_, k_, v_, block_mask=bm, backend="cpu",
                                               return_lse=True)
    check_against_oracle(fn, q, k, v, mask=bm.to_dense())


@pytest.mark.parametrize("name", ["causal", "sliding_window", "strided", "streaming", "prefix_lm",
                                  "from_mask_fn_per_head", "from_dense_random"])
@pytest.mark.parametrize("Nq,Nk", [(50, 130), (130, 50)])
def test_cpu_sparse_nq_ne_nk(name, Nq, Nk):
    bm = _pattern(name, Nq, Nk, 2)
    q, k, v = make_qkv(1, 2, 1, Nq, Nk, 16, torch.float32)
    fn = lambda q_, k_, v_: fastattn.attention(q_, k_, v_, block_mask=bm, backend="cpu",
                                               return_lse=True)
    check_against_oracle(fn, q, k, v, mask=bm.to_dense())


@pytest.mark.parametrize("causal,window", [(True, None), (False, (10, 10)), (True, (25, 4))])
def test_cpu_sparse_intersects_causal_and_window(causal, window):
    bm = sparse.from_mask_fn(lambda b, h, i, j: (j % 5 != 1), 80, 80, block_size=BS)
    q, k, v = make_qkv(1, 2, 2, 80, 80, 32, torch.float32)
    from fastattn._validate import normalize_window

    w = normalize_window(window, causal)
    fn = lambda q_, k_, v_: fastattn.attention(q_, k_, v_, block_mask=bm, causal=causal,
                                               window=window, backend="cpu", return_lse=True)
    check_against_oracle(fn, q, k, v, mask=bm.to_dense() & window_mask(80, 80, *w))


def test_cpu_sparse_per_batch_documents_and_empty_rows():
    # per-batch document lengths (Bm = B), and a mask whose rows 0..9 see nothing
    bm = sparse.document(torch.tensor([[20, 44], [64, 0]]), causal=False, block_size=BS)
    q, k, v = make_qkv(2, 2, 2, 64, 64, 16, torch.float32)
    fn = lambda q_, k_, v_: fastattn.attention(q_, k_, v_, block_mask=bm, backend="cpu",
                                               return_lse=True)
    check_against_oracle(fn, q, k, v, mask=bm.to_dense())
    empty = torch.ones(64, 64, dtype=torch.bool)
    empty[:10] = False
    bm2 = sparse.from_dense(empty, block_size=BS)
    out, lse = fastattn.attention(q, k, v, block_mask=bm2, backend="cpu", return_lse=True)
    assert torch.equal(out[:, :, :10], torch.zeros_like(out[:, :, :10]))
    assert torch.isneginf(lse[:, :, :10]).all()
    check_against_oracle(lambda a, b, c: fastattn.attention(a, b, c, block_mask=bm2, backend="cpu",
                                                            return_lse=True),
                         q, k, v, mask=empty)


def test_cpu_sparse_block_mask_for_other_lengths_is_rejected():
    bm = sparse.causal(64, 64, block_size=BS)
    q, k, v = make_qkv(1, 2, 2, 65, 65, 16, torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match="block_mask"):
        fastattn.attention(q, k, v, block_mask=bm, backend="cpu")


def test_cpu_sparse_mismatched_heads_rejected():
    bm = sparse.from_mask_fn(lambda b, h, i, j: j <= i + h, 32, 32, H=3, block_size=BS)
    q, k, v = make_qkv(1, 4, 4, 32, 32, 16, torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match="block_mask"):
        fastattn.attention(q, k, v, block_mask=bm, backend="cpu")


def test_cpu_sparse_malformed_layout_rejected_by_kernel():
    bm = sparse.causal(64, 64, block_size=BS)
    t = [x.clone() for x in bm.kernel_tensors()]
    t[1].fill_(99)  # out-of-range key block indices
    q = torch.randn(1, 1, 64, 16)
    with pytest.raises(ValueError, match="malformed"):
        torch.ops.fastattn.cpu_fwd(q, q, q, 0.25, -1, 0, t)


@pytest.mark.parametrize("H", [1, 3])
def test_cpu_sparse_skips_empty_blocks(H):
    """The kernels compute only the listed blocks: the kernel counters (kernel_stats) see
    exactly B * H * (blocks listed per head) in the forward and in the backward, and the
    result is attention restricted per block (block-diagonal), computed independently."""
    from fastattn.backends.cpu import kernel_stats

    N, bs = 128, 32
    bm = sparse.document([bs] * (N // bs), block_size=(bs, bs))
    assert bm.num_visited_blocks == N // bs
    q, k, v = make_qkv(2, H, H, N, N, 16, torch.float32)
    kernel_stats(reset=True)
    out = fastattn.attention(q, k, v, block_mask=bm, backend="cpu")
    out.sum().backward()
    stats = kernel_stats(reset=True)
    assert stats["fwd_visits"] == stats["bwd_visits"] == 2 * H * (N // bs), stats
    parts = [fastattn.attention(q[:, :, i:i + bs], k[:, :, i:i + bs], v[:, :, i:i + bs],
                                backend="reference") for i in range(0, N, bs)]
    torch.testing.assert_close(out, torch.cat(parts, dim=2), atol=2e-6, rtol=1e-5)
    # the counters count what is listed: a causal mask of the same blocks lists 10 per head
    causal = sparse.causal(N, block_size=(bs, bs))
    fastattn.attention(q, k, v, block_mask=causal, backend="cpu").sum().backward()
    stats = kernel_stats(reset=True)
    assert stats["fwd_visits"] == stats["bwd_visits"] == 2 * H * 10, stats


@pytest.mark.parametrize("block_size", [(128, 128), (256, 64), (128, 32), (96, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_sparse_tall_blocks_walked_in_slices(block_size, dtype):
    # blocks taller than 64 rows are walked in 64-row slices by the backward: bitmask rows,
    # the causal/window rule and a last slice past Nq must line up with each slice
    Nq, Nk = 203, 230
    bm = sparse.from_mask_fn(lambda b, h, i, j: ((i * 7 + j * 3 + h) % 5 != 0) & (j <= i + 40),
                             Nq, Nk, H=4, block_size=block_size)
    assert bm.partial_masks.shape[0] > 0
    q, k, v = make_qkv(1, 4, 2, Nq, Nk, 40, dtype)
    fn = lambda q_, k_, v_: fastattn.attention(q_, k_, v_, block_mask=bm, backend="cpu",
                                               window=(90, -1), return_lse=True)
    check_against_oracle(fn, q, k, v, mask=bm.to_dense() & window_mask(Nq, Nk, 90, -1))
