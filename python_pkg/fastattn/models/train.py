"""`fastattn train`: pre-train or fine-tune a fastattn.models.Transformer on an offline task.

    fastattn train --task text --steps 2000 --out runs/gpt            # GPT on stdlib bytes
    fastattn train --task mlm --out runs/bert                         # MLM + NSP
    fastattn train --task classify --init-from runs/bert/ckpt.pt \\
                   --freeze-backbone --out runs/bert-cls              # frozen fine-tune
    fastattn train --task reverse --out runs/s2s                      # seq2seq
    fastattn train --task compass --task-args image_size=128,patch=2 \
                   --patterns neighborhood:7 --out runs/vit            # ViT, 4096 patches
    fastattn train ... --resume                                       # continue exactly
    torchrun --nproc-per-node 2 -m fastattn train ...                 # data parallel (DDP)
    torchrun --nproc-per-node 2 -m fastattn train --context-parallel  # split each sequence

AdamW (decay on matrices only), linear warm-up then cosine decay to min_lr, gradient
accumulation and clipping, optional bfloat16 autocast, periodic evaluation (val loss +
the task's metric), a progress bar with loss, tokens/s and peak memory, a JSON-lines log,
training curves as PNG, and atomic checkpoints (temp file + os.replace) holding the model
config, weights, optimizer, step, data-stream and RNG states, so --resume continues the
same loss trajectory as an uninterrupted run.

Under torchrun (see models/parallel.py) --batch-size is the global batch, split across
ranks; rank 0 alone prints, logs, plots and checkpoints; every rank resumes from the same
checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import time
from dataclasses import asdict, dataclass

import torch

from .data import make_task
from .model import ModelConfig, Transformer
from .vit import ViT, ViTConfig
from .parallel import init_distributed, local_batch, mean_over_ranks, rank0_decides, wrap_model


@dataclass
class TrainConfig:
    task: str = "text"
    out: str = "runs/fastattn"
    seq_len: int = 256
    batch_size: int = 16
    grad_accum: int = 1
    steps: int = 1000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 100
    weight_decay: float = 0.1
    beta2: float = 0.99  # small models, short runs: a shorter second-moment memory helps
    grad_clip: float = 1.0
    dtype: str = "float32"  # "float32" | "bfloat16" (autocast)
    eval_every: int = 200
    eval_batches: int = 8
    log_every: int = 10
    save_every: int = 0  # 0: only at the end (and at evals)
    seed: int = 1337
    resume: bool = False
    init_from: str = ""  # fine-tune: start from this checkpoint's weights and config
    freeze_backbone: bool = False
    unfreeze_at: int = -1  # step at which a frozen backbone starts training (-1: never)
    probe_norm: bool = False  # classifier head = affine-free BatchNorm + linear (MAE's probe)
    max_time: float = 0.0  # seconds; 0 = no limit (stops cleanly, saving a checkpoint)
    stop_after: int = 0  # stop this invocation after this many steps (0: run to `steps`)
    progress: bool = True
    plot: bool = True
    # model (ignored when resuming or fine-tuning: the checkpoint's config wins)
    n_layer: int = 4
    n_dec_layer: int = 0
    n_head: int = 4
    n_kv_head: int = 0
    n_embd: int = 128
    dropout: float = 0.0
    attn_dropout: float = 0.0  # attention-probability dropout inside the kernels
    pos: str = "rope"  # ViT: "rope" = 2D rotary
    pool: str = "auto"  # classifier input: [CLS] state or mean of states (auto: ViT cls, bert mean)
    mask_padding: bool = False  # bert: mask the task's padding out of attention and the pool
    bias: bool = False  # biases in the linear layers and LayerNorms (BERT has them)
    kernel: int = 7  # ViT: default neighbourhood kernel (patches per side, odd)
    backend: str = "auto"
    patterns: str = "dense"
    window: int = 128
    sparse_block: int = 64
    # task options, "key=value,key=value" passed to the task's constructor
    task_args: str = ""
    # torchrun: split each sequence across the ranks (ring attention) instead of the batch
    context_parallel: bool = False


def lr_at(step: int, c: TrainConfig) -> float:
    """Linear warm-up over c.warmup steps, then cosine decay to c.min_lr at c.steps."""
    if step < c.warmup:
        return c.lr * (step + 1) / c.warmup
    t = min(1.0, (step - c.warmup) / max(1, c.steps - c.warmup))
    return c.min_lr + 0.5 * (c.lr - c.min_lr) * (1 + math.cos(math.pi * t))


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _task_kwargs(s: str) -> dict:
    out = {}
    for item in filter(None, s.split(",")):
        k, v = item.split("=")
        out[k] = int(v) if v.lstrip("-").isdigit() else float(v) if "." in v else v
    return out


def save_checkpoint(path: str, obj: dict) -> None:
    """Atomic: write a temp file next to path, then os.replace (never a half-written file)."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def build_model(model_config: dict):
    """The model a checkpoint's config describes: a ViT (kind "vit") or a Transformer."""
    if model_config.get("kind") == "vit":
        return ViT(ViTConfig(**model_config))
    return Transformer(ModelConfig(**model_config))


def model_config_for(c: TrainConfig, task):
    if task.kind == "vit":
        return ViTConfig(image_size=task.image_size, patch=task.patch, channels=task.channels,
                         n_layer=c.n_layer, n_head=c.n_head, n_kv_head=c.n_kv_head,
                         n_embd=c.n_embd, dropout=c.dropout, attn_dropout=c.attn_dropout,
                         pos={"rope": "rope2d", "sincos": "sincos2d"}.get(c.pos, c.pos),
                         pool="cls" if c.pool == "auto" else c.pool,
                         backend=c.backend, patterns=c.patterns, kernel=c.kernel,
                         sparse_block=c.sparse_block, n_classes=task.n_classes, bias=c.bias)
    block = c.seq_len + (1 if task.kind == "encdec" else 0)  # decoder input has BOS
    return ModelConfig(kind=task.kind, vocab_size=task.vocab_size, block_size=block,
                       n_layer=c.n_layer, n_dec_layer=c.n_dec_layer, n_head=c.n_head,
                       n_kv_head=c.n_kv_head, n_embd=c.n_embd, dropout=c.dropout, attn_dropout=c.attn_dropout, pos=c.pos,
                       backend=c.backend, patterns=c.patterns, window=c.window,
                       sparse_block=c.sparse_block, n_classes=task.n_classes,
                       probe_norm=c.probe_norm, pool="mean" if c.pool == "auto" else c.pool,
                       pad_id=padding_id(c, task), bias=c.bias)


def padding_id(c: TrainConfig, task):
    """The pad token the model masks (--mask-padding), or None."""
    if not c.mask_padding:
        return None
    if task.kind != "bert" or task.pad_id is None:
        raise ValueError(f"--mask-padding: task {c.task!r} has no padding to mask (it is for "
                         f"bert tasks whose batches are padded, e.g. listops, classify); "
                         f"drop the flag")
    return task.pad_id


def make_optimizer(model, c: TrainConfig):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": c.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=c.lr, betas=(0.9, c.beta2))


@torch.no_grad()
def evaluate(model, task, c: TrainConfig, autocast) -> dict:
    """Val loss and task metrics on a fixed stream (seeded apart from training)."""
    model.eval()
    g = torch.Generator().manual_seed(c.seed + 1)
    losses = []
    with autocast():
        for _ in range(c.eval_batches):
            _, loss = model(**task.batch("val", c.batch_size, c.seq_len, g))
            losses.append(float(loss))
        metrics = task.evaluate(model, "val", c.batch_size, c.seq_len, max(1, c.eval_batches // 2),
                                torch.Generator().manual_seed(c.seed + 2))
    model.train()
    return {"val_loss": sum(losses) / len(losses), **metrics}


def plot_curves(history: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = [(h["step"], h["loss"]) for h in history if "loss" in h]
    va = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 4))
    if tr:
        ax.plot(*zip(*tr, strict=True), label="train loss", lw=1)
    if va:
        ax.plot(*zip(*va, strict=True), "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def train(c: TrainConfig) -> dict:
    """Runs training as configured; returns a summary (history, final metrics, speed)."""
    rank, world = init_distributed()
    main = rank == 0
    os.makedirs(c.out, exist_ok=True)
    ckpt_path = os.path.join(c.out, "ckpt.pt")
    torch.manual_seed(c.seed)
    task = make_task(c.task, **_task_kwargs(c.task_args))
    data_gen = torch.Generator().manual_seed(c.seed)
    start, history = 0, []

    resume = c.resume and os.path.exists(ckpt_path)
    if resume:
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model = build_model(ck["model_config"])
        model.load_state_dict(ck["model"])
    elif c.init_from:
        ck = torch.load(c.init_from, map_location="cpu", weights_only=False)
        mc = dict(ck["model_config"], n_classes=task.n_classes, dropout=c.dropout,
                  attn_dropout=c.attn_dropout)
        if mc.get("kind") != "vit":
            mc["probe_norm"] = c.probe_norm
        if c.pool != "auto":
            mc["pool"] = c.pool
        if c.mask_padding:
            mc["pad_id"] = padding_id(c, task)
        if (mc.get("kind") == "vit") != (task.kind == "vit"):
            raise ValueError(f"--init-from {c.init_from} holds a {mc.get('kind')!r} model but "
                             f"task {c.task!r} trains a {task.kind!r} model")
        if "vocab_size" in mc and task.vocab_size > mc["vocab_size"]:
            raise ValueError(f"task {c.task!r} needs vocab {task.vocab_size} > checkpoint's "
                             f"{mc['vocab_size']}")
        model = build_model(mc)
        # the head is new (its class count may differ): only the backbone is loaded
        state = {k: v for k, v in ck["model"].items() if not k.startswith("classifier.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        bad = [k for k in missing if not k.startswith("classifier.")]
        if bad or unexpected:
            raise ValueError(f"checkpoint {c.init_from} does not match: missing {bad}, "
                             f"unexpected {unexpected}")
    else:
        cfg = model_config_for(c, task)
        model = ViT(cfg) if cfg.kind == "vit" else Transformer(cfg)
    if getattr(model.cfg, "block_size", c.seq_len) < c.seq_len:
        raise ValueError(f"seq_len {c.seq_len} exceeds the model's block_size {model.cfg.block_size}")
    frozen = c.freeze_backbone
    model.freeze_backbone(frozen)
    opt = make_optimizer(model, c)
    if resume:
        opt.load_state_dict(ck["optimizer"])
        start, history = ck["step"], ck["history"]
        data_gen.set_state(ck["data_rng"])
        torch.set_rng_state(ck["torch_rng"])
        frozen = ck.get("frozen", frozen)
        model.freeze_backbone(frozen)

    net = wrap_model(model, world, c.context_parallel)  # what the training step calls
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=c.dtype == "bfloat16")
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if main:
        print(f"[train] task={c.task} kind={model.cfg.kind} params={model.num_params() / 1e6:.2f}M "
              f"(trainable {n_train / 1e6:.2f}M) patterns={','.join(model.cfg.patterns)} "
              f"backend={model.cfg.backend} seq_len={c.seq_len} batch={c.batch_size}x{c.grad_accum} "
              f"dtype={c.dtype} threads={torch.get_num_threads()}" + (f" resume@{start}" if resume else "")
              + (f" ranks={world}{' context-parallel' if c.context_parallel else ''}" if world > 1 else ""))

    def checkpoint(step):
        if not main:
            return
        save_checkpoint(ckpt_path, {
            "model_config": model.cfg.to_dict(), "train_config": asdict(c),
            "model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
            "history": history, "data_rng": data_gen.get_state(),
            "torch_rng": torch.get_rng_state(), "frozen": frozen, "task": c.task})

    log_path = os.path.join(c.out, "log.jsonl")
    if main:
        with open(log_path, "w") as f:  # the history so far (resume), then one line per record
            f.writelines(json.dumps(h) + "\n" for h in history)

    def log(rec):
        if not main:
            return
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    bar = None
    if c.progress and main:
        from tqdm import tqdm

        bar = tqdm(total=c.steps, initial=start, dynamic_ncols=True, leave=True)
    t_start = time.time()
    tokens_done, t_tok = 0, time.time()
    model.train()
    step = start
    for step in range(start, c.steps):
        if frozen and c.unfreeze_at >= 0 and step >= c.unfreeze_at:
            frozen = False
            model.freeze_backbone(False)
        if step % c.eval_every == 0 and step > start:
            history.append({"step": step, **evaluate(model, task, c, autocast)})
            log(history[-1])
            checkpoint(step)
        lr = lr_at(step, c)
        for group in opt.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for _ in range(c.grad_accum):
            batch = task.batch("train", c.batch_size, c.seq_len, data_gen)
            tokens_done += sum(batch[k].numel() for k in ("idx", "src") if k in batch)
            if "images" in batch:  # ViT: one token per patch
                tokens_done += batch["images"].shape[0] * model.cfg.grid ** 2
            batch = local_batch(batch, rank, world, c.context_parallel)
            with autocast():
                _, loss = net(**batch)
            (loss / c.grad_accum).backward()
            loss_sum += loss.item() / c.grad_accum
        loss_sum = mean_over_ranks(loss_sum, world)
        norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                              c.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rec = {"step": step, "loss": loss_sum, "lr": lr, "grad_norm": float(norm)}
        if (step + 1) % c.log_every == 0 or step == c.steps - 1:
            dt = time.time() - t_tok
            rec.update(tok_s=tokens_done / max(dt, 1e-9), peak_mb=peak_rss_mb())
            tokens_done, t_tok = 0, time.time()
            if bar is not None:
                bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{rec['tok_s']:.0f}",
                                mem=f"{rec['peak_mb']:.0f}MB", refresh=False)
        history.append(rec)
        log(rec)
        if bar is not None:
            bar.update(1)
        if c.save_every and (step + 1) % c.save_every == 0:
            checkpoint(step + 1)
        if c.stop_after and step + 1 - start >= c.stop_after:
            break
        if c.max_time and rank0_decides(time.time() - t_start > c.max_time, world):
            print(f"[train] time limit {c.max_time:.0f}s reached at step {step + 1}")
            break
    end = step + 1 if c.steps > start else start
    if bar is not None:
        bar.close()
    final = {"step": end, **evaluate(model, task, c, autocast)}
    history.append(final)
    checkpoint(end)
    log(final)
    if c.plot and main:
        plot_curves(history, os.path.join(c.out, "curves.png"),
                    f"{c.task} ({model.cfg.kind}, {','.join(model.cfg.patterns)})")
    speeds = [h["tok_s"] for h in history if "tok_s" in h]
    summary = {"final": final, "steps": end, "wall_s": time.time() - t_start,
               "tok_s": sum(speeds[1:]) / max(1, len(speeds) - 1) if len(speeds) > 1 else
               (speeds[0] if speeds else 0.0), "peak_mb": peak_rss_mb(),
               "params": model.num_params(), "history": history, "model": model}
    if main:
        print("[train] final " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in final.items()))
    return summary


# ----------------------------------------------------------------------------- CLI

def add_subparser(subparsers) -> argparse.ArgumentParser:
    """Adds `train` to an argparse subparsers object (its defaults come from TrainConfig)."""
    p = subparsers.add_parser("train", help="pre-train or fine-tune a fastattn.models transformer",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from ..dispatch import BACKEND_NAMES
    from .data import TASKS
    from .model import PATTERNS
    from .vit import VIT_PATTERNS

    # help and choices per option; defaults come from TrainConfig
    helps = {
        "task": ("the offline task (data is generated or shipped, never downloaded)", tuple(TASKS)),
        "out": ("run directory: checkpoint, JSON-lines log, curves PNG", None),
        "seq_len": ("tokens per training sequence", None),
        "batch_size": ("sequences per optimizer step (global under torchrun)", None),
        "grad_accum": ("micro-batches accumulated per optimizer step", None),
        "steps": ("optimizer steps in the whole run (the schedule's length)", None),
        "lr": ("peak learning rate", None),
        "min_lr": ("learning rate at the end of the cosine decay", None),
        "warmup": ("linear warm-up steps (0: none)", None),
        "weight_decay": ("AdamW weight decay (matrices only)", None),
        "beta2": ("AdamW beta2", None),
        "grad_clip": ("clip the gradient norm to this (0: off)", None),
        "dtype": ("training precision (bfloat16 = autocast)", ("float32", "bfloat16")),
        "eval_every": ("evaluate (and checkpoint) every N steps", None),
        "eval_batches": ("batches per evaluation", None),
        "log_every": ("log every N steps", None),
        "save_every": ("also checkpoint every N steps (0: at evals and the end only)", None),
        "seed": ("seed of weights, data stream and dropout", None),
        "resume": ("continue exactly from --out's checkpoint", None),
        "init_from": ("fine-tune: start from this checkpoint's weights and model config", None),
        "freeze_backbone": ("fine-tune only the head (with --init-from)", None),
        "unfreeze_at": ("step at which a frozen backbone starts training (-1: never)", None),
        "probe_norm": ("bert classifier head: affine-free BatchNorm, then the linear layer "
                       "(the linear probe of MAE; standardizes mean-pooled features)", None),
        "max_time": ("stop cleanly (with a checkpoint) after this many seconds (0: no limit)", None),
        "stop_after": ("stop this invocation after N steps; --resume continues", None),
        "progress": ("show a progress bar", None),
        "plot": ("write training curves as PNG", None),
        "n_layer": ("transformer layers (encoder / decoder-only)", None),
        "n_dec_layer": ("decoder layers of an encoder-decoder task", None),
        "n_head": ("query heads", None),
        "n_kv_head": ("key/value heads for GQA (0: = n_head)", None),
        "n_embd": ("model width", None),
        "dropout": ("residual/MLP dropout", None),
        "attn_dropout": ("attention-probability dropout inside the kernels", None),
        "pos": ("position encoding (ViT: rope = 2D rotary, sincos = fixed 2D sine-cosine, "
                "ViT only)", ("rope", "learned", "sincos")),
        "pool": ("classifier input: the [CLS] state or the mean of the final states (auto: "
                 "cls for ViT tasks, mean for bert tasks)", ("auto", "cls", "mean")),
        "bias": ("biases in the linear layers and LayerNorms (BERT and the LRA models have "
                 "them; off: the GPT-2-style default)", None),
        "mask_padding": ("bert tasks: mask padding tokens out of attention and out of the "
                         "mean pool (like BERT's attention_mask)", None),
        "kernel": ("ViT: default kernel of 'neighborhood' layers (patches per side, odd)", None),
        "backend": ("fastattn backend of every attention call", ("auto", *BACKEND_NAMES)),
        "patterns": (f"comma-separated attention pattern per layer, cycled over the layers: "
                     f"{', '.join(PATTERNS)} (ViT tasks: {', '.join(VIT_PATTERNS)}), each with "
                     f"optional ':'-separated int arguments, e.g. 'window:128,bigbird', "
                     f"'neighborhood:7' or 'dense'", None),
        "window": ("default window (tokens each side) of window-like patterns", None),
        "sparse_block": ("block size of block-sparse patterns", None),
        "task_args": ("task options as key=value,key=value (e.g. 'max_depth=10')", None),
        "context_parallel": ("under torchrun: split each sequence over the ranks (ring "
                             "attention) instead of the batch", None),
    }
    d = TrainConfig()
    for name, value in asdict(d).items():
        flag = "--" + name.replace("_", "-")
        text, choices = helps.get(name, ("", None))
        text = f"{text} (default: %(default)s)" if text else "(default: %(default)s)"
        if isinstance(value, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=value, help=text)
        else:
            p.add_argument(flag, type=type(value), default=value, choices=choices, help=text)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    fields = TrainConfig.__dataclass_fields__
    c = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    train(c)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastattn")
    sub = parser.add_subparsers(dest="command", required=True)
    add_subparser(sub)
    args = parser.parse_args(["train", *(argv if argv is not None else __import__("sys").argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
