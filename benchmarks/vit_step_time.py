"""ViT training-step and inference time: dense attention (torch SDPA and fastattn) vs
fastattn's 2D neighbourhood and axial block masks, side by side in one process.

    python benchmarks/vit_step_time.py --out benchmarks/results/vit_step_time

The model is the one of benchmarks/paper_runs.py vit (2 layers x 64 wide, 2 heads,
sincos2d positions, [CLS] pooling, float32) on `compass` images; the grid side g gives
g * g patch tokens + [CLS]. A training step is zero_grad + forward + cross-entropy +
backward + AdamW step on one batch; inference is a forward under no_grad. Providers
alternate inside each repetition (medians of --reps); every provider runs the same batch.
FlexAttention is not a peer here: it has no CPU backward. Timings are this machine's: the
file names the CPU, the kernel variant run and the thread count.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import torch
from tqdm import tqdm

import fastattn
from cpu_suite import machine_lines  # benchmarks/cpu_suite.py: CPU, kernel variant, torch, env
from fastattn.models.data import Compass
from fastattn.models.vit import ViT, ViTConfig

# (label, attention pattern, fastattn backend of every attention call)
PROVIDERS = [
    ("dense, torch SDPA", "dense", "sdpa"),
    ("dense, fastattn", "dense", "cpu"),
    ("neighborhood:7, fastattn", "neighborhood:7", "cpu"),
    ("axial, fastattn", "axial", "cpu"),
]


def build(grid: int, patch: int, pattern: str, backend: str, batch: int):
    cfg = ViTConfig(image_size=grid * patch, patch=patch, n_layer=2, n_head=2, n_embd=64,
                    pos="sincos2d", pool="cls", backend=backend, patterns=(pattern,),
                    sparse_block=64, n_classes=8)
    torch.manual_seed(0)
    model = ViT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    task = Compass(image_size=grid * patch, patch=patch, n_dirs=8, n_distractors=0, noise=0.0)
    b = task.batch("train", batch, 0, torch.Generator().manual_seed(1))
    return model, opt, b


def step_fn(model, opt, b):
    def step():
        opt.zero_grad(set_to_none=True)
        _, loss = model(**b)
        loss.backward()
        opt.step()
    return step


def infer_fn(model, b):
    def infer():
        with torch.no_grad():
            model(images=b["images"])
    return infer


def interleaved(fns: dict, reps: int, pbar) -> dict:
    """Median seconds per provider; one warm-up call each, then providers alternate."""
    for f in fns.values():
        f()
    times = {n: [] for n in fns}
    for _ in range(reps):
        for n, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[n].append(time.perf_counter() - t0)
        pbar.update(1)
    return {n: statistics.median(t) for n, t in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grids", type=int, nargs="+", default=[32, 64],
                   help="grid sides: g x g patch tokens (64 -> 4096, the paper_runs setting)")
    p.add_argument("--patch", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="", help="write <out>.md and <out>.png")
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    rows = []  # (grid, label, step s, infer s)
    with tqdm(total=len(a.grids) * a.reps * 2, desc="vit step time") as pbar:
        for g in a.grids:
            built = {lab: build(g, a.patch, pat, be, a.batch) for lab, pat, be in PROVIDERS}
            steps = interleaved({lab: step_fn(*x) for lab, x in built.items()}, a.reps, pbar)
            infers = interleaved({lab: infer_fn(x[0], x[2]) for lab, x in built.items()}, a.reps, pbar)
            rows += [(g, lab, steps[lab], infers[lab]) for lab, _, _ in PROVIDERS]
            del built

    base = {g: s for g, lab, s, _ in rows if lab == "dense, torch SDPA"}
    base_i = {g: i for g, lab, _, i in rows if lab == "dense, torch SDPA"}
    cmd = "python benchmarks/vit_step_time.py " + " ".join(sys.argv[1:])
    lines = ["# ViT step time: dense vs 2D neighbourhood / axial attention (one run)", "",
             f"- command: `{cmd}`",
             f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%dT%H:%M UTC}",
             *machine_lines(None),
             f"- model: ViT 2 layers x 64 wide, 2 heads (head dim 32), sincos2d positions, [CLS], "
             f"float32; batch {a.batch} compass images, patch {a.patch}; block masks 64 x 64 "
             "([CLS] global in both sparse patterns)",
             f"- timing: medians of {a.reps} interleaved repetitions after one warm-up call per "
             "provider; train step = zero_grad + forward + loss + backward + AdamW step",
             "",
             "| patches | attention | train step s | vs dense SDPA | inference s | vs dense SDPA |",
             "|---|---|---|---|---|---|"]
    for g, lab, s, i in rows:
        lines.append(f"| {g * g} | {lab} | {s:.3f} | **{base[g] / s:.2f}x** | {i:.3f} | "
                     f"{base_i[g] / i:.2f}x |")
    lines += ["", "vs dense SDPA: torch SDPA's time / this row's time (above 1: faster)."]
    print("\n".join(lines))
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out + ".md", "w") as f:
            f.write("\n".join(lines) + "\n")
        plot(rows, a.out + ".png", a)
        print(f"wrote {a.out}.md, {a.out}.png")


def plot(rows, path, a):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for lab, _, _ in PROVIDERS:
        pts = [(g * g, s) for g, l2, s, _ in rows if l2 == lab]
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=lab)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("patch tokens")
    ax.set_ylabel("train step (s), median")
    ax.set_title(f"ViT train step, batch {a.batch}, {a.threads} thread(s), {fastattn.cpu_info()['variant']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
