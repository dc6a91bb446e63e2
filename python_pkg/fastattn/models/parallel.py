"""Multi-process training for the trainer, on torch.distributed (launched by torchrun).

    torchrun --nproc-per-node 2 -m fastattn train --task text ...                 # data parallel
    torchrun --nproc-per-node 2 -m fastattn train --task text --context-parallel  # sequence split

Data parallel: every rank draws the same global batch from the same seeded stream and keeps
its rows (so a run matches a single process with the same --batch-size, and the data state
saved in a checkpoint is the same on every rank); DistributedDataParallel averages gradients.

Context parallel (gpt, dense attention): every rank keeps all rows but only its zigzag
shard of each sequence (fastattn.distributed.zigzag_shard), with its tokens' true positions;
attention runs as fastattn.distributed.ring_attention. Each rank's loss is the mean over its
tokens, and DDP's gradient average over ranks makes it the mean over the whole sequence.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..distributed import ring_attention, zigzag_shard


def init_distributed() -> tuple[int, int]:
    """(rank, world) from torchrun's environment, initializing the default group (gloo on
    CPU, nccl on GPU) when WORLD_SIZE > 1; (0, 1) for a plain single-process run."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def local_batch(batch: dict, rank: int, world: int, context_parallel: bool) -> dict:
    """This rank's part of a global batch: rows r*b:(r+1)*b (data parallel), or every row's
    zigzag sequence shard (context parallel)."""
    if world == 1:
        return batch
    if context_parallel:
        return {k: zigzag_shard(v, rank, world, dim=1) for k, v in batch.items()}
    B = next(iter(batch.values())).shape[0]
    if B % world:
        raise ValueError(f"batch_size {B} (the global batch) must divide across {world} ranks")
    b = B // world
    return {k: v[rank * b:(rank + 1) * b] for k, v in batch.items()}


def mean_over_ranks(x: float, world: int) -> float:
    if world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / world


def rank0_decides(flag: bool, world: int) -> bool:
    """Rank 0's value of flag on every rank (stop decisions must agree, or the ring hangs)."""
    if world == 1:
        return flag
    t = torch.tensor([int(flag)])
    dist.broadcast(t, 0)
    return bool(t.item())


def _ring_self_attention(attn, x, rope, pos, group):
    # attn: models.model.Attention; x (B, T_local, C); pos (T_local,) global positions
    B, T, _ = x.shape
    q = attn._heads(attn.q(x), attn.nh)
    k, v = (attn._heads(t, attn.nkv) for t in attn.kv(x).chunk(2, dim=-1))
    if rope is not None:
        q, k = rope(q, pos), rope(k, pos)
    y = ring_attention(q, k, v, group=group, causal=True, layout="zigzag", backend=attn.backend)
    y = y.transpose(1, 2).reshape(B, T, attn.nh * attn.hd)
    return attn.drop(attn.proj(y))


class ContextParallelGPT(nn.Module):
    """Runs a gpt Transformer on this rank's zigzag shard of each sequence: the model's own
    layers and weights, with its causal self-attention replaced by ring attention."""

    def __init__(self, model, group=None):
        super().__init__()
        cfg = model.cfg
        if cfg.kind != "gpt" or any(p != "dense" for p in cfg.patterns):
            raise ValueError(f"context_parallel needs a gpt model with dense attention, got "
                             f"kind={cfg.kind!r} patterns={cfg.patterns}")
        # A group of its own, so the ring's point-to-point traffic never interleaves with
        # DDP's gradient all-reduces on the default group during backward.
        self.model, self.group = model, group if group is not None else dist.new_group()

    def forward(self, idx, targets=None):
        # idx, targets (B, T_local): this rank's zigzag shards
        m, world = self.model, dist.get_world_size(self.group)
        rank = dist.get_rank(self.group)
        T = idx.shape[1] * world
        m._check_len(T)
        pos = zigzag_shard(torch.arange(T, device=idx.device), rank, world, dim=0)
        x = m._embed(idx, pos)
        for blk in m.dec:
            x = x + _ring_self_attention(blk.attn, blk.ln1(x), m.rope, pos, self.group)
            x = x + blk.mlp(blk.ln2(x))
        logits = m.lm_head(m.ln_dec(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                   ignore_index=-100)
        return logits, loss


def wrap_model(model, world: int, context_parallel: bool):
    """The module the training step calls: the model itself (one process), or DDP around
    it or around its ContextParallelGPT."""
    if world == 1:
        if context_parallel:
            raise ValueError("context_parallel needs several processes (run under torchrun "
                             "with --nproc-per-node >= 2)")
        return model
    net = ContextParallelGPT(model) if context_parallel else model
    return nn.parallel.DistributedDataParallel(net)
