"""Context parallelism: attention over a sequence sharded across a torch.distributed group.

    out = ring_attention(q, k, v, group=None, causal=False)   # q/k/v: this rank's shards
    out = ring_attention(q, k, v, causal=True, layout="zigzag")   # causal: say how it is sharded
    out = ring_attention(q, k, v, causal=True, window=(4096, 0), layout="contiguous")

Ring attention (Liu et al., 2023): every query shard meets every K/V shard once. Each
meeting is one or more calls of fastattn's own kernels with return_lse=True, and the partial
outputs are merged by log-sum-exp in float32. K/V are never all-gathered, and a rank never
holds another rank's whole shard: shards are exchanged and computed in chunks of at most
chunk_size tokens (default 256). At step s of chunk j a rank sends its own chunk j straight
to rank+s and receives chunk j of rank-s (into one of two receive buffers reused in turn,
while the previous chunk computes), and computes its query chunks against it, each block
trimmed to the rows and keys the mask shows (blocks a causal mask or a sliding window
leaves empty are neither sent nor computed; a window shorter than a shard talks only to
the neighbouring ranks). The backward repeats the exchange: on the cpu backend each block's
gradients come from the kernel's backward fed with the merged output and lse (no forward
recompute); dQ accumulates in float32 in place, and each rank's contribution to another
rank's dK/dV chunk goes straight back to the owner, which sums them in a chunk-sized float32
buffer and writes its own dK/dV chunk once. So besides its inputs, output and gradients (as
one process holds them) a rank holds only chunk-sized buffers.

Sharding (dim 2 of q, k and v is the sequence):

    non-causal, any layout: ranks hold equal-length shards (N_local may be odd).

    causal=True or a window needs layout= (no default: a wrong claim would give wrong
    results, so the call raises until it is given; every rank must pass the same one).

    causal=True, layout="zigzag" (load-balanced, recommended): the sequence is cut into
    2*world chunks of c tokens; rank r holds chunks r and 2*world-1-r, so every rank has
    the same amount of visible work at every ring step:

        world=2, chunks 0 1 2 3:    rank 0: [0 | 3]    rank 1: [1 | 2]

        q shard r vs K/V shard j:  j == r  causal on the whole (2c x 2c) block
                                   j <  r  all 2c queries x first chunk of K/V, no mask
                                   j >  r  second chunk of queries x all 2c keys, no mask

    causal=True, layout="contiguous": rank r holds tokens [r*n, (r+1)*n); blocks from
    later ranks are invisible and skipped (rank 0 idles at most steps; use zigzag).

Use zigzag_shard / zigzag_unshard (or contiguous_shard / contiguous_unshard) to go between a
full sequence and a rank's shard. Every call checks across the group that the ranks agree on
N_local, the head counts and dims, dtype, causal, layout, window and chunk_size (one small
all_reduce), and raises on every rank otherwise.
Supported: float32/float16/bfloat16, GQA/MQA (Hq % Hkv == 0, K/V not expanded), a value
head dim different from D, causal and sliding windows (window=, over global positions).
Not supported: block_mask, score modifiers, unequal N_local across ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import dispatch
from ._validate import check_window
from .api import attention
from .backends.base import Problem

__all__ = ["ring_attention", "zigzag_shard", "zigzag_unshard", "contiguous_shard",
           "contiguous_unshard", "merge_attention"]


# ---------------------------------------------------------------------------------------
# sharding helpers


def _zigzag_check(n: int, world: int, what: str, dim: int) -> int:
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    if n % (2 * world):
        raise ValueError(f"{what}: sequence length {n} (dim {dim}) must divide into 2*world = "
                         f"{2 * world} equal chunks for zigzag sharding; pad it to a multiple "
                         f"of {2 * world}")
    return n // (2 * world)


def zigzag_shard(x: torch.Tensor, rank: int, world: int, dim: int = 2) -> torch.Tensor:
    """Rank `rank`'s zigzag shard of the full sequence x: chunks rank and 2*world-1-rank of
    2*world equal chunks along `dim`, concatenated."""
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world={world}), got {rank}")
    c = _zigzag_check(x.shape[dim], world, "x", dim)
    chunks = x.split(c, dim=dim)
    return torch.cat([chunks[rank], chunks[2 * world - 1 - rank]], dim=dim)


def zigzag_unshard(shards, dim: int = 2) -> torch.Tensor:
    """Inverse of zigzag_shard: the full sequence from the list of every rank's shard."""
    world = len(shards)
    if world == 0:
        raise ValueError("shards must be a non-empty list (one shard per rank)")
    n = shards[0].shape[dim]
    if n % 2 or any(s.shape[dim] != n for s in shards):
        raise ValueError(f"shards: every shard must have the same even length along dim {dim}, "
                         f"got {[s.shape[dim] for s in shards]}")
    chunks = [None] * (2 * world)
    for r, s in enumerate(shards):
        chunks[r], chunks[2 * world - 1 - r] = s.split(n // 2, dim=dim)
    return torch.cat(chunks, dim=dim)


def contiguous_shard(x: torch.Tensor, rank: int, world: int, dim: int = 2) -> torch.Tensor:
    """Rank `rank`'s contiguous shard of the full sequence x: tokens [rank*n, (rank+1)*n)
    along `dim`, n = length / world (the length must divide evenly)."""
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world={world}), got {rank}")
    if x.shape[dim] % world:
        raise ValueError(f"x: sequence length {x.shape[dim]} (dim {dim}) must divide into world = "
                         f"{world} equal shards; pad it to a multiple of {world}")
    n = x.shape[dim] // world
    return x.narrow(dim, rank * n, n)


def contiguous_unshard(shards, dim: int = 2) -> torch.Tensor:
    """Inverse of contiguous_shard: the full sequence from the list of every rank's shard."""
    if len(shards) == 0:
        raise ValueError("shards must be a non-empty list (one shard per rank)")
    if any(s.shape[dim] != shards[0].shape[dim] for s in shards):
        raise ValueError(f"shards: every shard must have the same length along dim {dim}, "
                         f"got {[s.shape[dim] for s in shards]}")
    return torch.cat(list(shards), dim=dim)


# ---------------------------------------------------------------------------------------
# log-sum-exp merge


def merge_attention(out_acc, lse_acc, out_blk, lse_blk):
    """Merges a partial result (out_blk, lse_blk) into the float32 accumulators in place.

    out_*: (B, H, N, Dv), lse_*: (B, H, N). Rows whose lse is -inf on both sides stay
    (0, -inf) instead of becoming NaN."""
    lse_new = torch.logaddexp(lse_acc, lse_blk)
    safe = torch.where(torch.isinf(lse_new), torch.zeros_like(lse_new), lse_new)
    w_acc = torch.exp(lse_acc - safe).unsqueeze(-1)
    w_blk = torch.exp(lse_blk - safe).unsqueeze(-1)
    out_acc.mul_(w_acc).add_(w_blk * out_blk.float())
    lse_acc.copy_(lse_new)


# ---------------------------------------------------------------------------------------
# the ring


_LAYOUTS = ("zigzag", "contiguous")


def _validate(q, k, v, group, causal, layout, window=(-1, -1), chunk_size=None):
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("group: torch.distributed is not initialized; call "
                         "torch.distributed.init_process_group (e.g. under torchrun) first")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup or None, "
                        f"got {type(group).__name__}")
    world = dist.get_world_size(group)
    try:
        window = _check_local(q, k, v, causal, layout, window, chunk_size)
    except (ValueError, TypeError) as e:
        if world > 1:  # tell the other ranks first, so they raise instead of hanging
            _check_ranks_agree(q, k, v, causal, layout, group, world, failed=True)
        raise e
    if world > 1:  # the ranks must agree, or the ring hangs or merges the wrong blocks
        _check_ranks_agree(q, k, v, causal, layout, group, world, window=window,
                           chunk_size=chunk_size)
    return window


def _check_local(q, k, v, causal, layout, window=(-1, -1), chunk_size=None):
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if layout is not None and layout not in _LAYOUTS:
        raise ValueError(f"layout must be 'zigzag' or 'contiguous', got {layout!r}")
    window = check_window(window)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1 (tokens per K/V chunk), got "
                         f"{chunk_size!r}")
    if window != (-1, -1) and layout is None:
        raise ValueError(
            "layout: ring_attention(window=...) needs to know how the sequence was sharded, "
            "and has no default (a wrong guess gives wrong results silently). Pass "
            "layout='zigzag' for shards made by fastattn.distributed.zigzag_shard or "
            "layout='contiguous' for shards made by fastattn.distributed.contiguous_shard")
    if causal and layout is None:
        raise ValueError(
            "layout: ring_attention(causal=True) needs to know how the sequence was sharded, "
            "and has no default (a wrong guess gives wrong results silently). Pass "
            "layout='zigzag' for shards made by fastattn.distributed.zigzag_shard "
            "(load-balanced, recommended) or layout='contiguous' for shards made by "
            "fastattn.distributed.contiguous_shard (rank r holds the r-th equal slice, "
            "e.g. x.chunk(world, dim=2)[rank])")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            raise ValueError(f"{name} must be a 4-D tensor (B, H, N_local, D), got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
    if k.shape[2] != q.shape[2] or v.shape[2] != q.shape[2]:
        raise ValueError(f"q, k, v must hold the same N_local tokens of the sequence on each "
                         f"rank, got q {q.shape[2]}, k {k.shape[2]}, v {v.shape[2]}")
    if (causal or window != (-1, -1)) and layout == "zigzag" and q.shape[2] % 2:
        raise ValueError(f"q: causal zigzag shards hold 2 equal chunks, so N_local must be even, "
                         f"got {q.shape[2]}; the sequence must divide into 2*world chunks "
                         f"(see zigzag_shard)")
    return window


_DTYPE_CODES = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3, torch.float64: 4}


def _check_ranks_agree(q, k, v, causal, layout, group, world, failed=False, window=(-1, -1),
                       chunk_size=None):
    """One all_reduce of (max, -min) over each rank's description of its call, plus which
    ranks failed their local checks; every rank sees the same result and raises (a rank
    that failed locally returns and raises its own error)."""
    rank = dist.get_rank(group)
    fields = [
        "N_local (q.shape[2]; the sequence does not divide evenly across the ranks, or a rank "
        "holds a shard of another layout: every rank needs an equal shard)",
        "batch size (q.shape[0])", "query heads (q.shape[1])", "key/value heads (k.shape[1])",
        "head dim (q.shape[3])", "value head dim (v.shape[3])",
        "dtype (1 float32, 2 float16, 3 bfloat16, 4 float64)", "causal (0 False, 1 True)",
        "layout (0 None, 1 zigzag, 2 contiguous)", "window left (-1 unbounded)",
        "window right (-1 unbounded)", "chunk_size (0 None)",
    ]
    if failed:
        vals = [0] * len(fields)
    else:
        vals = [q.shape[2], q.shape[0], q.shape[1], k.shape[1], q.shape[3], v.shape[3],
                _DTYPE_CODES.get(q.dtype, 0), int(causal),
                0 if layout is None else 1 + _LAYOUTS.index(layout), window[0], window[1],
                chunk_size or 0]
    flags = [0] * world
    flags[rank] = int(failed)
    t = torch.tensor(vals + [-x for x in vals] + flags, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    n = len(fields)
    hi, lo, bad_ranks = t[:n].tolist(), (-t[n:2 * n]).tolist(), t[2 * n:].tolist()
    if any(bad_ranks):
        if failed:
            return
        who = [r for r, f in enumerate(bad_ranks) if f]
        raise ValueError(f"ring_attention: rank(s) {who} of the group rejected their arguments "
                         f"(see the error there); this rank stops too instead of waiting for "
                         f"them")
    bad = [f"{fields[i]} ranges from {lo[i]} to {hi[i]}" for i in range(n) if hi[i] != lo[i]]
    if bad:
        raise ValueError(f"ring_attention: the {world} ranks of the group disagree on their "
                         f"shards or arguments (every rank must call it with the same "
                         f"arguments and equal shards of one layout): " + "; ".join(bad))


class _Ring:
    """Point-to-point exchange between the ranks of the group. At ring step s a rank talks
    to rank+s (it sends its own K/V there) and rank-s (it receives theirs), so a K/V chunk
    reaches every rank straight from its owner; steps whose blocks are all empty (a sliding
    window only talks to its neighbours) exchange nothing."""

    def __init__(self, group):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self._glob = ((lambda r: r) if group is None
                      else (lambda r: dist.get_global_rank(group, r)))
        self.reqs = []

    # one tag per kind of message: K/V chunks and returning dK/dV partials between the same
    # two ranks are posted in different orders on the two sides; within a tag, in the same
    TAG_K, TAG_V, TAG_DK, TAG_DV = 1, 2, 3, 4

    def send(self, t, to, tag, reqs=None):
        (self.reqs if reqs is None else reqs).append(
            dist.isend(t, self._glob(to % self.world), group=self.group, tag=tag))

    def recv(self, buf, frm, tag, reqs=None):
        (self.reqs if reqs is None else reqs).append(
            dist.irecv(buf, self._glob(frm % self.world), group=self.group, tag=tag))

    def wait(self):
        for r in self.reqs:
            r.wait()
        self.reqs = []


def _pieces(rank, world, n, layout, positional):
    """[(local start, global start, length)] of the contiguous pieces of rank's shard."""
    if not positional:
        return [(0, rank * n, n)]
    if layout == "contiguous":
        return [(0, rank * n, n)]
    c = n // 2
    return [(0, rank * c, c), (c, (2 * world - 1 - rank) * c, c)]


def _chunks(rank, world, n, layout, positional, size):
    """[(local start, global start, length)] of the shard cut into chunks of <= size tokens
    (never across a piece boundary). Every rank cuts at the same local offsets."""
    out = []
    for lo, go, ln in _pieces(rank, world, n, layout, positional):
        m = -(-ln // size)
        for i in range(m):
            a, b = ln * i // m, ln * (i + 1) // m
            if b > a:
                out.append((lo + a, go + a, b - a))
    return out


def _visible(qa, nq, ka, nk, left, right):
    """The part of the block (queries [qa, qa+nq) x keys [ka, ka+nk), global positions) that
    the window (left, right) (query i sees key j iff i-left <= j <= i+right, -1 = unbounded)
    touches, as (q offset, q length, k offset, k length, kernel window), or None when
    empty. The rectangle is trimmed to rows that see a key and keys that a row sees, so the
    kernel window (bottom-right aligned, offset nk' - nq') is >= 0 or -1 on each side."""
    q0, q1, k0, k1 = qa, qa + nq, ka, ka + nk
    while True:
        old = (q0, q1, k0, k1)
        if right >= 0:
            q0, k1 = max(q0, k0 - right), min(k1, q1 + right)
        if left >= 0:
            q1, k0 = min(q1, k1 + left), max(k0, q0 - left)
        if q0 >= q1 or k0 >= k1:
            return None
        if (q0, q1, k0, k1) == old:
            break
    full = ((right < 0 or k1 - 1 <= q0 + right) and (left < 0 or k0 >= q1 - 1 - left))
    if full:
        win = (-1, -1)
    else:
        d, off = q0 - k0, (k1 - k0) - (q1 - q0)
        win = (-1 if left < 0 else off - d + left, -1 if right < 0 else d + right - off)
        assert win[0] >= -1 and win[1] >= -1, (qa, nq, ka, nk, left, right, win)
    return q0 - qa, q1 - q0, k0 - ka, k1 - k0, win


class _Plan:
    """Which blocks each rank computes: this rank's query chunks against every rank's K/V
    chunks, trimmed to what the mask shows. Items run in the order (kv chunk j, step s), the
    same on every rank, so point-to-point messages between two ranks match in order."""

    def __init__(self, world, n, causal, window, layout, chunk_size):
        self.world = world
        left, right = window
        if causal:
            right = 0 if right == -1 else min(right, 0)
        self.window = (left, right)
        positional = causal or self.window != (-1, -1)
        self.chunks = [_chunks(r, world, n, layout, positional, chunk_size)
                       for r in range(world)]
        self._cache = {}

    def blocks(self, rank, src, j):
        """[(q local start, q len, kv local start within chunk j, kv len, kernel window)]
        for rank's queries against src's kv chunk j ([] when none is visible)."""
        key = (rank, src, j)
        if key not in self._cache:
            _, kg, kn = self.chunks[src][j]
            res = []
            for ql, qg, qn in self.chunks[rank]:
                vis = _visible(qg, qn, kg, kn, *self.window)
                if vis is not None:
                    qo, qm, ko, km, win = vis
                    res.append((ql + qo, qm, ko, km, win))
            self._cache[key] = res
        return self._cache[key]

    def items(self, rank):
        """[(j, s, recv, send)]: at step s of kv chunk j this rank computes against the
        chunk of rank-s when recv (blocks exist), and sends its own chunk j to rank+s when
        that rank has blocks against it (s > 0)."""
        out = []
        for j in range(len(self.chunks[rank])):
            for s in range(self.world):
                recv = bool(self.blocks(rank, (rank - s) % self.world, j))
                send = s > 0 and bool(self.blocks((rank + s) % self.world, rank, j))
                if recv or send:
                    out.append((j, s, recv, send))
        return out


class _KVStream:
    """Delivers, item by item, the K/V chunk each item computes against: a rank's own
    chunks are views, others arrive in two receive buffers reused in turn (the exchange of
    the next item is posted before the current one is computed)."""

    def __init__(self, ring, plan, k, v):
        self.ring, self.plan, self.k, self.v = ring, plan, k, v
        self.items = plan.items(ring.rank)
        self.bufs = None  # two (k, v) flat receive buffers sized for the longest chunk
        self.turn = 0
        self.sent = []  # contiguous copies of own chunks until their sends complete

    def _own(self, j):
        lo, _, ln = self.plan.chunks[self.ring.rank][j]
        return self.k[:, :, lo:lo + ln], self.v[:, :, lo:lo + ln]

    def _post(self, i):
        """Posts the exchange of item i; returns the buffers its K/V arrive in (or None)."""
        if i >= len(self.items):
            return None
        ring = self.ring
        j, s, recv, send = self.items[i]
        if s == 0:
            return None
        if send:
            kk, vv = self._own(j)
            kk, vv = kk.contiguous(), vv.contiguous()
            self.sent.append((kk, vv))
            ring.send(kk, ring.rank + s, ring.TAG_K)
            ring.send(vv, ring.rank + s, ring.TAG_V)
        if not recv:
            return None
        ln = self.plan.chunks[ring.rank][j][2]
        B, Hkv, _, D = self.k.shape
        Dv = self.v.shape[-1]
        if self.bufs is None:
            m = max(c[2] for c in self.plan.chunks[ring.rank])
            self.bufs = [(self.k.new_empty(B * Hkv * m * D), self.v.new_empty(B * Hkv * m * Dv))
                         for _ in range(2)]
        self.turn ^= 1
        fk, fv = self.bufs[self.turn]
        kb = fk[:B * Hkv * ln * D].view(B, Hkv, ln, D)
        vb = fv[:B * Hkv * ln * Dv].view(B, Hkv, ln, Dv)
        ring.recv(kb, ring.rank - s, ring.TAG_K)
        ring.recv(vb, ring.rank - s, ring.TAG_V)
        return kb, vb

    def __iter__(self):
        """Yields (j, s, src, (k chunk, v chunk) or None, recv, send) per item."""
        ring = self.ring
        nxt = self._post(0)
        for i, (j, s, recv, send) in enumerate(self.items):
            cur = nxt
            ring.wait()  # item i's chunk has arrived; its sends are done
            self.sent = []
            nxt = self._post(i + 1)  # overlap: the next chunk travels while this one computes
            if s == 0:
                cur = self._own(j)
            yield j, s, (ring.rank - s) % ring.world, cur, recv, send
        ring.wait()
        self.sent = []
        self.bufs = None


def _block_grads(q, k, v, dout, out, delta, lse, window, scale, backend):
    """(dq, dk, dv) of one block's share of the merged output, float32.

    cpu: the kernel's backward fed with the merged out and lse (P = exp(S - lse) is the
    block's share of the whole softmax), no recompute. Other backends: recompute the block
    with autograd; the merged out = sum_b w_b out_b with w_b = exp(lse_b - lse), so the
    block receives d out_b = w_b dO and d lse_b = w_b (dO . out_b - dO . out)."""
    if backend == "cpu":
        if q.dtype != torch.float32:  # float32 products: one rounding at the end, not per block
            q, k, v, dout, out = (t.float() for t in (q, k, v, dout, out))
        return torch.ops.fastattn.cpu_bwd(dout.to(q.dtype), q, k, v, out.to(q.dtype), lse,
                                          None, scale, window[0], window[1], [])
    with torch.enable_grad():
        q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
        o_b, l_b = attention(q, k, v, window=window, scale=scale, backend=backend,
                             return_lse=True)
        w = torch.exp(l_b - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse))
        w = torch.where(torch.isinf(l_b), torch.zeros_like(w), w)  # rows that see no key here
        d_lse = w * ((dout.float() * o_b.detach().float()).sum(-1) - delta)
        g = torch.autograd.grad((o_b, l_b), (q, k, v),
                                ((w.unsqueeze(-1) * dout.float()).to(o_b.dtype), d_lse))
        return tuple(t.float() for t in g)


def _resolve_backend(q, k, v, scale, window, backend):
    """The backend name backend= resolves to for this rank's blocks (one dispatch)."""
    name = dispatch.validate_backend_name(backend)
    B, Hq, n, D = q.shape
    p = Problem(device=q.device, dtype=q.dtype, B=B, Hq=Hq, Hkv=k.shape[1], Nq=n, Nk=n, D=D,
                Dv=v.shape[-1], window=window, block_mask=None, scale=scale, needs_grad=True,
                return_lse=True)
    return dispatch.select(p, name).name


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal, window, scale, backend, layout, chunk_size):
        ring = _Ring(group)
        B, H, n, _ = q.shape
        plan = _Plan(ring.world, n, causal, window, layout, chunk_size)
        backend = _resolve_backend(q, k, v, scale, plan.window, backend)
        # float32 inputs accumulate straight into the output; 16-bit ones in a float32
        # buffer that is rounded into the output at the end (and freed)
        acc = torch.zeros(B, H, n, v.shape[-1], dtype=torch.float32, device=q.device)
        lse = torch.full((B, H, n), float("-inf"), dtype=torch.float32, device=q.device)
        for j, s, src, kv, _, _ in _KVStream(ring, plan, k, v):
            if kv is None:
                continue
            kc, vc = kv
            for qo, qn, ko, kn, win in plan.blocks(ring.rank, src, j):
                o_b, l_b = attention(q[:, :, qo:qo + qn], kc[:, :, ko:ko + kn],
                                     vc[:, :, ko:ko + kn], window=win, scale=scale,
                                     backend=backend, return_lse=True)
                merge_attention(acc[:, :, qo:qo + qn], lse[:, :, qo:qo + qn], o_b, l_b)
                del o_b, l_b
        out = acc.to(q.dtype)
        del acc
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.cfg = (group, plan, scale, backend)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group, plan, scale, backend = ctx.cfg
        ring = _Ring(group)
        rank = ring.rank
        # dO . O per row (O rounded to the call's dtype, as the single-process backward)
        delta = None if backend == "cpu" else (dout.float() * out.float()).sum(-1)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dk = k.new_empty(k.shape) if k.dtype != torch.float32 else torch.zeros_like(k)
        dv = v.new_empty(v.shape) if v.dtype != torch.float32 else torch.zeros_like(v)
        B, Hkv, _, D = k.shape
        Dv = v.shape[-1]
        own = None  # (j, float32 dK, dV accumulators of own chunk j)

        def finish(own):
            if own is not None:
                j, ak, av = own
                lo, _, ln = plan.chunks[rank][j]
                dk[:, :, lo:lo + ln].copy_(ak)
                dv[:, :, lo:lo + ln].copy_(av)

        for j, s, src, kv, recv, send in _KVStream(ring, plan, k, v):
            if own is None or own[0] != j:
                finish(own)
                ln = plan.chunks[rank][j][2]
                own = (j, torch.zeros(B, Hkv, ln, D, dtype=torch.float32, device=k.device),
                       torch.zeros(B, Hkv, ln, Dv, dtype=torch.float32, device=k.device))
            part = None
            if kv is not None:
                kc, vc = kv
                ln = kc.shape[2]
                # this rank's contribution to src's chunk j: straight into the owner's
                # accumulator for its own chunk, else a buffer sent back to src
                part = (own[1], own[2]) if s == 0 else (
                    torch.zeros(B, Hkv, ln, D, dtype=torch.float32, device=k.device),
                    torch.zeros(B, Hkv, ln, Dv, dtype=torch.float32, device=k.device))
                for qo, qn, ko, kn, win in plan.blocks(rank, src, j):
                    qs, ks = slice(qo, qo + qn), slice(ko, ko + kn)
                    g = _block_grads(q[:, :, qs], kc[:, :, ks], vc[:, :, ks], dout[:, :, qs],
                                     out[:, :, qs], None if delta is None else delta[:, :, qs],
                                     lse[:, :, qs], win, scale, backend)
                    dq[:, :, qs] += g[0]
                    part[0][:, :, ks] += g[1]
                    part[1][:, :, ks] += g[2]
                    del g
            if s == 0:
                continue
            # partials go back to their owner; ours for chunk j come from rank+s
            reqs = []
            if recv:
                ring.send(part[0], src, ring.TAG_DK, reqs)
                ring.send(part[1], src, ring.TAG_DV, reqs)
            if send:
                ink = torch.empty(own[1].shape, dtype=torch.float32, device=k.device)
                inv = torch.empty(own[2].shape, dtype=torch.float32, device=k.device)
                ring.recv(ink, rank + s, ring.TAG_DK, reqs)
                ring.recv(inv, rank + s, ring.TAG_DV, reqs)
            for r in reqs:
                r.wait()
            if send:
                own[1].add_(ink)
                own[2].add_(inv)
                del ink, inv
            del part
        finish(own)
        del own
        return (dq.to(q.dtype), dk, dv, None, None, None, None, None, None, None)


def ring_attention(q, k, v, *, group=None, causal=False, window=None, scale=None,
                   backend="auto", layout=None, chunk_size=None):
    """Attention over a sequence sharded along dim 2 across the ranks of `group`.

    q: (B, Hq, N_local, D), k: (B, Hkv, N_local, D), v: (B, Hkv, N_local, Dv) are this
    rank's shards (Hq % Hkv == 0). Returns this rank's shard of the output,
    (B, Hq, N_local, Dv), equal to fastattn.attention on the full sequence restricted to
    this rank's queries. window=(left, right) is attention()'s sliding window over global
    positions (query i sees key j iff i-left <= j <= i+right, -1 unbounded; combines with
    causal); blocks it leaves empty are neither sent nor computed. With causal=True or a
    window, `layout` is required and says how the shards were made: "zigzag" (zigzag_shard)
    or "contiguous" (contiguous_shard: rank r holds the r-th equal slice); otherwise it is
    ignored (any equal split works). chunk_size: the shard is exchanged and computed in
    chunks of at most this many tokens (default 256): the memory of chunks in flight and of
    each block's kernel workspace grows with it, the number of kernel calls shrinks. Every rank of the group must
    call it with the same arguments and the same N_local (checked: a mismatch raises on
    every rank). Differentiable in q, k and v; backward uses the same exchange. Kernels
    run through fastattn.attention(..., backend=backend); on the cpu backend the backward
    calls its kernel with the merged out and lse (no recompute)."""
    window = _validate(q, k, v, group, causal, layout, window, chunk_size)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if chunk_size is None:
        chunk_size = 256
    return _RingAttention.apply(q, k, v, group, bool(causal), window, float(scale), backend,
                                layout, chunk_size)
