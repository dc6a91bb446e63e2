"""Offline data for fastattn.models: nothing is downloaded.

Text: a byte-level corpus built from the Python standard library's own sources (present on
every machine that runs Python), split into train/val by file.

Tasks (each yields batches for Transformer.forward(**batch) and knows its metric):

    text      gpt     next-byte prediction on the stdlib corpus
    mlm       bert    masked LM (15% of tokens: 80% [MASK], 10% random, 10% kept) + next
                      sentence prediction (50% the true next chunk, 50% a random one)
    classify  bert    which stdlib package a source snippet comes from (held-out files)
    corrupt   bert    is a source snippet intact, or has one span been reversed / shuffled
                      (a downstream task for MLM pre-training; same byte histogram per class)
    compass   vit     images: the compass sector of the green marker seen from the red one
    listops   bert    LRA ListOps (Tay et al. 2021; Nangia & Bowman 2018): value of a nested
                      MIN/MAX/MED/SM expression, 10 classes
    recall    gpt     multi-query associative recall: key-value pairs, a long filler gap,
                      then the keys again; predict each key's value
    needle    bert    every position names the one needle symbol hidden in a long noisy sequence
    majority  bert    every position names the (slightly) more frequent of two symbols
    copy      encdec  target = source
    reverse   encdec  target = reversed source

Every random draw takes a torch.Generator, so a batch stream is reproducible from its seed
and resumable from the generator's state.
"""

from __future__ import annotations

import functools
import math
import os
import random
import statistics
import sysconfig

import torch

# Byte-level vocabulary: 0..255 are bytes, then four specials.
PAD, BOS, EOS, MASK = 256, 257, 258, 259
CLS, SEP = BOS, EOS  # BERT names for the same ids
BYTE_VOCAB = 260

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3"}


# ----------------------------------------------------------------------------- corpus

@functools.lru_cache(maxsize=1)
def stdlib_files() -> tuple[str, ...]:
    """Every .py file of the standard library outside test and site-packages dirs, sorted."""
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in _SKIP_DIRS)
        out += [os.path.join(d, f) for f in sorted(files) if f.endswith(".py")]
    return tuple(out)


_CORPUS: dict = {}


def stdlib_corpus(max_bytes: int = 8 << 20, val_every: int = 20, seed: int = 0):
    """(train, val) uint8 tensors of concatenated stdlib sources (files separated by a
    blank line). Files are shuffled with `seed` and taken until max_bytes; every
    val_every-th file goes to val, so val is text the model never saw."""
    key = (max_bytes, val_every, seed)
    if key not in _CORPUS:
        files = list(stdlib_files())
        random.Random(seed).shuffle(files)
        train, val, total = [], [], 0
        for i, f in enumerate(files):
            with open(f, "rb") as fh:
                b = fh.read() + b"\n\n"
            (val if i % val_every == 0 else train).append(b)
            total += len(b)
            if total >= max_bytes:
                break
        _CORPUS[key] = tuple(torch.frombuffer(bytearray(b"".join(x)), dtype=torch.uint8)
                             for x in (train, val))
    return _CORPUS[key]


def unigram_entropy(data: torch.Tensor) -> float:
    """Entropy of the byte distribution of data, in nats (the loss of the best model that
    ignores context)."""
    p = torch.bincount(data.long(), minlength=256).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())


def _randint(hi, n, g):
    return torch.randint(0, hi, (n,), generator=g)


# ----------------------------------------------------------------------------- tasks

class Task:
    name = "?"
    kind = "gpt"  # the model shape it trains
    vocab_size = BYTE_VOCAB
    n_classes = 0
    pad_id = None  # the token id its batches pad with (None: it never pads)

    def batch(self, split: str, batch_size: int, seq_len: int, g: torch.Generator) -> dict:
        raise NotImplementedError

    def evaluate(self, model, split: str, batch_size: int, seq_len: int, n_batches: int,
                 g: torch.Generator) -> dict:
        """Task metric(s) beyond the loss (e.g. accuracy); {} if only the loss matters."""
        return {}


class TextLM(Task):
    """Next-byte prediction on the stdlib corpus: x = data[i:i+T], y = data[i+1:i+T+1]."""

    name, kind = "text", "gpt"

    def __init__(self, max_bytes: int = 8 << 20):
        self.train, self.val = stdlib_corpus(max_bytes)

    def batch(self, split, batch_size, seq_len, g):
        data = self.train if split == "train" else self.val
        i = _randint(len(data) - seq_len - 1, batch_size, g)
        idx = i.unsqueeze(1) + torch.arange(seq_len + 1)
        chunk = data[idx].long()
        return {"idx": chunk[:, :-1], "targets": chunk[:, 1:]}


def mask_tokens(x: torch.Tensor, special: torch.Tensor, g: torch.Generator, p: float = 0.15,
                n_random: int = 256):
    """BERT's masking (Devlin et al. 2019, sec. 3.1): each non-special token is chosen with
    probability p; a chosen token becomes [MASK] 80% of the time, a random byte 10%, and
    stays unchanged 10%. Returns (inputs, labels) with label -100 where not chosen."""
    chosen = (torch.rand(x.shape, generator=g) < p) & ~special
    labels = torch.where(chosen, x, torch.full_like(x, -100))
    r = torch.rand(x.shape, generator=g)
    inp = torch.where(chosen & (r < 0.8), torch.full_like(x, MASK), x)
    rand_tok = torch.randint(0, n_random, x.shape, generator=g)
    inp = torch.where(chosen & (r >= 0.8) & (r < 0.9), rand_tok, inp)
    return inp, labels


class MLMNSP(Task):
    """[CLS] A [SEP] B [SEP] byte chunks; B follows A in the corpus half the time (label 0,
    IsNext) and is a random chunk otherwise (label 1, NotNext)."""

    name, kind = "mlm", "bert"

    def __init__(self, max_bytes: int = 8 << 20):
        self.train, self.val = stdlib_corpus(max_bytes)

    def batch(self, split, batch_size, seq_len, g):
        data = self.train if split == "train" else self.val
        la = (seq_len - 3) // 2
        lb = seq_len - 3 - la
        i = _randint(len(data) - la - lb, batch_size, g)
        is_next = torch.rand(batch_size, generator=g) < 0.5
        j = torch.where(is_next, i + la, _randint(len(data) - lb, batch_size, g))
        a = data[i.unsqueeze(1) + torch.arange(la)].long()
        b = data[j.unsqueeze(1) + torch.arange(lb)].long()
        col = lambda v: torch.full((batch_size, 1), v, dtype=torch.long)
        x = torch.cat([col(CLS), a, col(SEP), b, col(SEP)], dim=1)
        seg = torch.cat([torch.zeros(batch_size, la + 2, dtype=torch.long),
                         torch.ones(batch_size, lb + 1, dtype=torch.long)], dim=1)
        special = x >= 256
        inp, labels = mask_tokens(x, special, g)
        return {"idx": inp, "segments": seg, "mlm_labels": labels,
                "nsp_labels": (~is_next).long()}

    @torch.no_grad()
    def evaluate(self, model, split, batch_size, seq_len, n_batches, g):
        ok_m = n_m = ok_n = n_n = 0
        for _ in range(n_batches):
            b = self.batch(split, batch_size, seq_len, g)
            out, _ = model(**b)
            sel = b["mlm_labels"] != -100
            ok_m += int((out["mlm"].argmax(-1) == b["mlm_labels"][sel]).sum())
            n_m += int(sel.sum())
            ok_n += int((out["nsp"].argmax(-1) == b["nsp_labels"]).sum())
            n_n += batch_size
        return {"mlm_acc": ok_m / max(n_m, 1), "nsp_acc": ok_n / max(n_n, 1)}


class CodeOrigin(Task):
    """Labelled snippets: [CLS] + seq_len-1 bytes from a random file of one of these stdlib
    packages; the label is the package. Files are split train/val (every 4th file is val),
    so val accuracy measures generalization to unseen files. Classes are balanced."""

    name, kind = "classify", "bert"
    pad_id = PAD  # files shorter than the sequence are right-padded
    PACKAGES = ("asyncio", "email", "tkinter", "multiprocessing")

    def __init__(self, packages=PACKAGES):
        self.n_classes = len(packages)
        root = sysconfig.get_paths()["stdlib"]
        self.files = {"train": [], "val": []}  # per class: list of uint8 tensors
        all_files = stdlib_files()
        for pkg in packages:
            fs = [f for f in all_files if f.startswith(os.path.join(root, pkg) + os.sep)]
            tr, va = [], []
            for n, f in enumerate(fs):
                with open(f, "rb") as fh:
                    raw = fh.read()
                if len(raw) >= 1024:  # skip stubs like empty __init__.py
                    t = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
                    (va if n % 4 == 0 else tr).append(t)
            self.files["train"].append(tr)
            self.files["val"].append(va)

    def batch(self, split, batch_size, seq_len, g):
        labels = _randint(self.n_classes, batch_size, g)
        rows = []
        for c in labels.tolist():
            files = self.files[split][c]
            sizes = torch.tensor([len(f) for f in files], dtype=torch.float)
            f = files[int(torch.multinomial(sizes, 1, generator=g))]
            L = min(seq_len - 1, len(f))
            i = int(_randint(len(f) - L + 1, 1, g))
            row = torch.full((seq_len,), PAD, dtype=torch.long)
            row[0] = CLS
            row[1:1 + L] = f[i:i + L].long()
            rows.append(row)
        return {"idx": torch.stack(rows), "labels": labels}

    @torch.no_grad()
    def evaluate(self, model, split, batch_size, seq_len, n_batches, g):
        ok = n = 0
        for _ in range(n_batches):
            b = self.batch(split, batch_size, seq_len, g)
            out, _ = model(**b)
            ok += int((out["cls"].argmax(-1) == b["labels"]).sum())
            n += batch_size
        return {"acc": ok / n}


# ListOps ---------------------------------------------------------------------------------

LISTOPS_OPS = ("[MIN", "[MAX", "[MED", "[SM")
LISTOPS_TOKENS = ("<pad>", "<cls>", *[str(d) for d in range(10)], *LISTOPS_OPS, "]")
_LISTOPS_ID = {t: i for i, t in enumerate(LISTOPS_TOKENS)}


def listops_tree(rng: random.Random, depth: int = 1, max_depth: int = 10, max_args: int = 10,
                 value_p: float = 0.25):
    """LRA's generator rule: below max_depth a node is an operator with probability value_p
    (2..max_args children) and a digit otherwise; at max_depth always a digit."""
    r = rng.random() if depth < max_depth else 1.0
    if r > value_p:
        return rng.randint(0, 9)
    n = rng.randint(2, max_args)
    return (rng.choice(LISTOPS_OPS), [listops_tree(rng, depth + 1, max_depth, max_args, value_p)
                                      for _ in range(n)])


def listops_tree_capped(rng: random.Random, budget: int, depth: int = 1, max_depth: int = 10,
                        max_args: int = 10, value_p: float = 0.25):
    """listops_tree with the same random draws in the same order, abandoned (None) as soon
    as its token count exceeds budget; else (tree, token count). A tree that fits is exactly
    the tree listops_tree draws from the same state, so rejection sampling on the length
    keeps its distribution, without generating the oversized trees to the end."""
    r = rng.random() if depth < max_depth else 1.0
    if r > value_p:
        return (rng.randint(0, 9), 1) if budget >= 1 else None
    n = rng.randint(2, max_args)
    op = rng.choice(LISTOPS_OPS)
    used, kids = 2, []  # the operator and "]"
    for _ in range(n):
        res = listops_tree_capped(rng, budget - used, depth + 1, max_depth, max_args, value_p)
        if res is None:
            return None
        kids.append(res[0])
        used += res[1]
    return ((op, kids), used) if used <= budget else None


def listops_eval(t) -> int:
    if isinstance(t, int):
        return t
    op, args = t
    v = [listops_eval(a) for a in args]
    if op == "[MIN":
        return min(v)
    if op == "[MAX":
        return max(v)
    if op == "[MED":
        return int(statistics.median(v))
    return sum(v) % 10  # [SM


def listops_tokens(t) -> list[str]:
    if isinstance(t, int):
        return [str(t)]
    op, args = t
    return [op] + [tok for a in args for tok in listops_tokens(a)] + ["]"]


class ListOps(Task):
    """LRA ListOps as [CLS] + tokens, right-padded to seq_len; 10 classes (the value).
    Trees are drawn by the LRA rule and rejected until their length lies in
    [min_frac * seq_len, seq_len - 1]. value_p (probability that a node below max_depth is
    an operator) defaults to an auto rule that raises it for long sequences so that long
    trees are not too rare to find; LRA's own data used value_p 0.25 with lengths 500-2000,
    i.e. min_frac=0.25, value_p=0.25 at seq_len 2000 (about 11 draws per kept tree)."""

    name, kind = "listops", "bert"
    vocab_size = len(LISTOPS_TOKENS)
    pad_id = LISTOPS_TOKENS.index("<pad>")
    n_classes = 10

    def __init__(self, min_frac: float = 0.5, max_depth: int = 10, max_args: int = 10,
                 value_p: float | None = None):
        if value_p is not None and not 0.0 < value_p < 1.0:
            raise ValueError(f"value_p must be in (0, 1), got {value_p}")
        self.min_frac, self.max_depth, self.max_args = min_frac, max_depth, max_args
        self.value_p = value_p

    def sample(self, rng: random.Random, seq_len: int):
        value_p = self.value_p
        if value_p is None:
            value_p = 0.25 if seq_len <= 512 else min(0.45, 0.25 + 0.05 * math.log2(seq_len / 512))
        lo = int(self.min_frac * seq_len)
        while True:  # rejection on the length; oversized trees are abandoned early
            res = listops_tree_capped(rng, seq_len - 1, 1, self.max_depth, self.max_args,
                                      value_p)
            if res is not None and res[1] >= lo:
                toks = listops_tokens(res[0])
                return toks, listops_eval(res[0])

    def batch(self, split, batch_size, seq_len, g):
        # a python RNG seeded from the torch generator keeps one state to save/resume
        rng = random.Random(int(torch.randint(0, 2**62, (1,), generator=g)) + (split != "train"))
        x = torch.full((batch_size, seq_len), _LISTOPS_ID["<pad>"], dtype=torch.long)
        y = torch.empty(batch_size, dtype=torch.long)
        for r in range(batch_size):
            toks, val = self.sample(rng, seq_len)
            x[r, 0] = _LISTOPS_ID["<cls>"]
            x[r, 1:1 + len(toks)] = torch.tensor([_LISTOPS_ID[t] for t in toks])
            y[r] = val
        return {"idx": x, "labels": y}

    evaluate = CodeOrigin.evaluate


# Associative recall ----------------------------------------------------------------------

class AssocRecall(Task):
    """Multi-query associative recall (Arora et al. 2023, "Zoology", MQAR) over a long gap:

        k1 v1 k2 v2 ... kP vP  _ _ _ ... _ _  kq1 vq1 kq2 vq2 ... kqQ vqQ
        |---- P pairs ------|  filler gap    |-- Q queries at the end ---|

    Keys are distinct draws from n_keys symbols and values from n_values symbols (disjoint
    ranges); the queries repeat Q of the keys in random order. The loss and the accuracy
    count only the value predicted right after each queried key, so every answer needs a
    key seen about seq_len tokens earlier."""

    name, kind = "recall", "gpt"

    def __init__(self, n_pairs: int = 16, n_queries: int = 16, n_keys: int = 64,
                 n_values: int = 64):
        self.P, self.Q, self.nk, self.nv = n_pairs, n_queries, n_keys, n_values
        self.FILL = n_keys + n_values
        self.vocab_size = n_keys + n_values + 1

    def batch(self, split, batch_size, seq_len, g):
        P, Q = self.P, self.Q
        if 2 * (P + Q) > seq_len + 1:
            raise ValueError(f"recall needs seq_len >= {2 * (P + Q) - 1}, got {seq_len}")
        keys = torch.rand(batch_size, self.nk, generator=g).argsort(-1)[:, :P]  # distinct
        vals = self.nk + torch.randint(0, self.nv, (batch_size, P), generator=g)
        which = torch.rand(batch_size, P, generator=g).argsort(-1)[:, :Q]
        T1 = seq_len + 1  # inputs and shifted targets from one sequence
        seq = torch.full((batch_size, T1), self.FILL, dtype=torch.long)
        seq[:, 0:2 * P:2], seq[:, 1:2 * P:2] = keys, vals
        q0 = T1 - 2 * Q
        seq[:, q0::2] = keys.gather(1, which)
        seq[:, q0 + 1::2] = vals.gather(1, which)
        x, y = seq[:, :-1], seq[:, 1:].clone()
        answer = torch.zeros_like(y, dtype=torch.bool)
        answer[:, q0::2] = True  # the position of each queried key predicts its value
        y[~answer] = -100
        return {"idx": x, "targets": y}

    @torch.no_grad()
    def evaluate(self, model, split, batch_size, seq_len, n_batches, g):
        ok = n = 0
        for _ in range(n_batches):
            b = self.batch(split, batch_size, seq_len, g)
            logits, _ = model(**b)
            sel = b["targets"] != -100
            ok += int((logits[sel].argmax(-1) == b["targets"][sel]).sum())
            n += int(sel.sum())
        return {"acc": ok / n}


class Needle(Task):
    """Needle retrieval over a long noisy context (a one-hop long-range task):

        [CLS] n n n n ... n n  X  n n ... n        every position's label = X
              |-- noise: n_noise symbols --|       X: one of n_classes needle symbols,
                                                   at a uniform position in the sequence

    Every position must report the single needle symbol, wherever it is; positions farther
    from the needle than a local (window) model's receptive field cannot know it. Labels go
    through the encoder's token head (mlm_labels), so every token is a training signal."""

    name, kind = "needle", "bert"

    def __init__(self, n_classes: int = 16, n_noise: int = 8):
        self.n_classes, self.n_noise = n_classes, n_noise
        self.CLS = n_classes + n_noise
        self.vocab_size = n_classes + n_noise + 1

    def batch(self, split, batch_size, seq_len, g):
        x = self.n_classes + torch.randint(0, self.n_noise, (batch_size, seq_len), generator=g)
        x[:, 0] = self.CLS
        pos = 1 + torch.randint(0, seq_len - 1, (batch_size,), generator=g)
        y = torch.randint(0, self.n_classes, (batch_size,), generator=g)
        x[torch.arange(batch_size), pos] = y
        return {"idx": x, "mlm_labels": y.unsqueeze(1).expand(batch_size, seq_len).clone()}

    @torch.no_grad()
    def evaluate(self, model, split, batch_size, seq_len, n_batches, g):
        """acc: all positions; far_acc: positions >= seq_len / 4 from the needle."""
        ok = n = ok_far = n_far = 0
        for _ in range(n_batches):
            b = self.batch(split, batch_size, seq_len, g)
            out, _ = model(**b)
            hit = (out["mlm"].argmax(-1) == b["mlm_labels"].flatten()).view(batch_size, seq_len)
            pos = (b["idx"] < self.n_classes).float().argmax(1, keepdim=True)
            far = (torch.arange(seq_len) - pos).abs() >= seq_len // 4
            ok += int(hit.sum())
            n += hit.numel()
            ok_far += int(hit[far].sum())
            n_far += int(far.sum())
        return {"acc": ok / n, "far_acc": ok_far / max(n_far, 1)}


class Majority(Task):
    """Global majority over a long sequence (a whole-sequence long-range task):

        [CLS] a b b a b a a ... b        every position's label = the symbol (a or b) that
                                          occurs more often in the whole sequence

    The surplus of the majority symbol is small (margin_lo..margin_hi of the length, e.g.
    20..60 tokens out of 4096) and its positions are random, so a model that sees only a
    local window estimates the answer from a sample, while one attending to every token
    reads it off the exact mean. Labels go through the encoder's token head (mlm_labels):
    every position is a training signal."""

    name, kind = "majority", "bert"
    vocab_size = 3  # a = 0, b = 1, CLS = 2

    def __init__(self, margin_lo: float = 0.02, margin_hi: float = 0.06):
        self.lo, self.hi = margin_lo, margin_hi

    def batch(self, split, batch_size, seq_len, g):
        n = seq_len - 1
        frac = self.lo + (self.hi - self.lo) * torch.rand(batch_size, generator=g)
        sign = torch.randint(0, 2, (batch_size,), generator=g)
        n_a = (n / 2 + torch.where(sign == 0, 1, -1) * (frac * n / 2).ceil()).long()  # a-count
        order = torch.rand(batch_size, n, generator=g).argsort(1)
        body = (order >= n_a.unsqueeze(1)).long()  # n_a zeros (a), the rest ones (b), shuffled
        x = torch.cat([torch.full((batch_size, 1), 2), body], 1)
        y = (n_a < n - n_a).long()  # 0 if a is the majority
        return {"idx": x, "mlm_labels": y.unsqueeze(1).expand(batch_size, seq_len).clone()}

    @torch.no_grad()
    def evaluate(self, model, split, batch_size, seq_len, n_batches, g):
        """acc: over all positions; cls_acc: at [CLS] only."""
        ok = n = ok_cls = n_cls = 0
        for _ in range(n_batches):
            b = self.batch(split, batch_size, seq_len, g)
            out, _ = model(**b)
            hit = (out["mlm"].argmax(-1) == b["mlm_labels"].flatten()).view(batch_size, seq_len)
            ok += int(hit.sum())
            n += hit.numel()
            ok_cls += int(hit[:, 0].sum())
            n_cls += batch_size
        return {"acc": ok / n, "cls_acc": ok_cls / n_cls}


# Images ----------------------------------------------------------------------------------

class Compass(Task):
    """Procedurally generated images for a vision transformer (kind "vit"): in which of
    n_dirs compass sectors does the green marker lie, seen from the red one?

        image_size x image_size RGB, background noise (std noise), a red square marker
        (channel 0 only) and a green one (channel 1 only), marker x marker pixels (default
        image_size // 8), at least min_dist * image_size apart; n_distractors blue squares
        (channel 2, the same size) anywhere, and n_yellow yellow ones (channels 0 and 1: a
        harder variant, where telling a marker from a distractor needs both channels).
        Label: the sector of the angle
        atan2(-(y_g - y_r), x_g - x_r) (up = north), counter-clockwise; sector_offset=0.5
        centres sector 0 on east, sector_offset=0 starts it there (with n_dirs=4: the
        quadrant, i.e. whether the green marker is right of / above the red one).

    The answer needs the positions of two markers that are far apart (a quarter of the image
    or more), so it depends on long-range spatial structure; the sector boundaries and the
    noise keep it from being trivial. image_size and patch (the model's patch side) set the
    token count: (image_size / patch)^2, e.g. image_size=128, patch=2 -> 4096 patches.
    n_train > 0 fixes the training split to that many images (a small labelled set, cycled);
    val is always fresh images from a stream seeded apart. Every draw takes the generator:
    the stream is deterministic per seed."""

    name, kind = "compass", "vit"
    channels = 3

    def __init__(self, image_size: int = 64, patch: int = 4, n_dirs: int = 8, marker: int = 0,
                 n_distractors: int = 2, n_yellow: int = 0, noise: float = 0.2,
                 min_dist: float = 0.25, sector_offset: float = 0.5, n_train: int = 0):
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8 pixels, got {image_size}")
        if patch < 1 or image_size % patch:
            raise ValueError(f"image_size ({image_size}) must be a multiple of patch ({patch}); "
                             f"e.g. image_size=128,patch=2 gives 64 x 64 = 4096 patches")
        if n_dirs < 2:
            raise ValueError(f"n_dirs must be >= 2, got {n_dirs}")
        self.image_size, self.patch, self.n_classes = image_size, patch, n_dirs
        self.marker = marker or max(2, image_size // 8)
        self.n_distractors, self.n_yellow = n_distractors, n_yellow
        self.noise, self.min_dist, self.sector_offset = noise, min_dist, sector_offset
        self.n_train = n_train
        self._pool = None

    def sample(self, n: int, g: torch.Generator) -> dict:
        S, m = self.image_size, self.marker
        hi = S - m + 1
        pos = torch.randint(0, hi, (n, 2, 2), generator=g)  # (n, red/green, y/x)
        far = self.min_dist * S
        for _ in range(100):  # redraw the pairs that are too close
            d = (pos[:, 0] - pos[:, 1]).float().norm(dim=-1)
            bad = d < far
            if not bool(bad.any()):
                break
            pos[bad] = torch.randint(0, hi, (int(bad.sum()), 2, 2), generator=g)
        nd, ny = self.n_distractors, self.n_yellow
        dis = torch.randint(0, hi, (n, nd + ny, 2), generator=g)
        img = self.noise * torch.randn(n, 3, S, S, generator=g)
        yy = torch.arange(S).view(1, 1, S, 1)
        xx = torch.arange(S).view(1, 1, 1, S)

        def squares(p):  # p (n, k, 2) -> (n, k, S, S) bool
            y, x = p[..., 0, None, None], p[..., 1, None, None]
            return (yy >= y) & (yy < y + m) & (xx >= x) & (xx < x + m)

        mk = squares(pos).float()
        img[:, 0] += mk[:, 0]
        img[:, 1] += mk[:, 1]
        if nd + ny:
            ds = squares(dis).float()
            if nd:
                img[:, 2] += ds[:, :nd].amax(1)
            if ny:
                yellow = ds[:, nd:].amax(1)
                img[:, 0] += yellow
                img[:, 1] += yellow
        dy = (pos[:, 1, 0] - pos[:, 0, 0]).float()
        dx = (pos[:, 1, 1] - pos[:, 0, 1]).float()
        ang = torch.atan2(-dy, dx)  # up = north, counter-clockwise
        k = self.n_classes
        label = torch.floor((ang / (2 * math.pi) * k + self.sector_offset)).long() % k
        return {"images": img, "labels": label}

    def batch(self, split, batch_size, seq_len, g):
        if split == "train" and self.n_train:
            if self._pool is None:  # the fixed labelled set, the same for every seed
                self._pool = self.sample(self.n_train, torch.Generator().manual_seed(12345))
            i = torch.randint(0, self.n_train, (batch_size,), generator=g)
            return {k: v[i] for k, v in self._pool.items()}
        return self.sample(batch_size, g)

    evaluate = CodeOrigin.evaluate


class CodeCorruption(Task):
    """A labelled downstream task for MLM pre-training (kind "bert"): is a 127-byte snippet
    of stdlib source intact, or has one span of span bytes (default 64) been reversed or
    shuffled?

        [CLS] + seq_len - 1 bytes from a stdlib file; label 0: unchanged, 1: the bytes of one
        random span (length span) reversed, 2: the same span's bytes randomly permuted

    The three classes have the same byte histogram (a corruption only reorders bytes), so
    a bag of bytes says nothing: the label needs to know what source code looks like in
    context, which masked-LM pre-training learns. Files are split as in `mlm` (the same
    held-out files: val snippets come from files pre-training never saw). n_train > 0 fixes the training split to that many snippets (a small
    labelled set, the same for every seed); val is fresh snippets from held-out files."""

    name, kind = "corrupt", "bert"
    n_classes = 3

    def __init__(self, span: int = 64, n_train: int = 0):
        if span < 2:
            raise ValueError(f"span must be >= 2 bytes, got {span}")
        self.span, self.n_train = span, n_train
        self.train, self.val = stdlib_corpus()
        self._pool = None

    def sample(self, split, batch_size, seq_len, g):
        data = self.train if split == "train" else self.val
        L = seq_len - 1
        span = min(self.span, L)
        i = _randint(len(data) - L, batch_size, g)
        x = data[i.unsqueeze(1) + torch.arange(L)].long()
        y = _randint(3, batch_size, g)
        s0 = _randint(L - span + 1, batch_size, g)
        cols = s0.unsqueeze(1) + torch.arange(span)  # (B, span)
        perm = torch.rand(batch_size, span, generator=g).argsort(1)
        rev = torch.arange(span - 1, -1, -1).expand(batch_size, span)
        order = torch.where((y == 1).unsqueeze(1), rev, perm)
        seg = x.gather(1, cols)
        new = seg.gather(1, order)
        x = x.scatter(1, cols, torch.where((y == 0).unsqueeze(1), seg, new))
        cls = torch.full((batch_size, 1), CLS, dtype=torch.long)
        return {"idx": torch.cat([cls, x], 1), "labels": y}

    def batch(self, split, batch_size, seq_len, g):
        if split == "train" and self.n_train:
            if self._pool is None or self._pool["idx"].shape[1] != seq_len:
                self._pool = self.sample("train", self.n_train, seq_len,
                                         torch.Generator().manual_seed(12345))
            i = torch.randint(0, self.n_train, (batch_size,), generator=g)
            return {k: v[i] for k, v in self._pool.items()}
        return self.sample(split, batch_size, seq_len, g)

    evaluate = CodeOrigin.evaluate


# Seq2seq ---------------------------------------------------------------------------------

class CopyReverse(Task):
    """src = seq_len random symbols (from n_symbols); target = src (copy) or reversed
    (reverse). Teacher forcing: tgt_in = [BOS] + target, tgt_out = target + [EOS]."""

    kind = "encdec"

    def __init__(self, reverse: bool = True, n_symbols: int = 16):
        self.name = "reverse" if reverse else "copy"
        self.reverse, self.n = reverse, n_symbols
        self.BOS, self.EOS = n_symbols, n_symbols + 1
        self.vocab_size = n_symbols + 2

    def batch(self, split, batch_size, seq_len, g):
        src = torch.randint(0, self.n, (batch_size, seq_len), generator=g)
        tgt = src.flip(1) if self.reverse else src
        col = lambda v: torch.full((batch_size, 1), v, dtype=torch.long)
        return {"src": src, "idx": torch.cat([col(self.BOS), tgt], 1),
                "targets": torch.cat([tgt, col(self.EOS)], 1)}

    @torch.no_grad()
    def evaluate(self, model, split, batch_size, seq_len, n_batches, g):
        """Greedy decoding from the start token with the KV cache: exact-match rate of the
        whole sequence and per-token accuracy."""
        exact = tok = n = 0
        for _ in range(n_batches):
            b = self.batch(split, batch_size, seq_len, g)
            start = b["idx"][:, :1]
            out = model.generate(start, seq_len + 1, src=b["src"], greedy=True)[:, 1:]
            match = out == b["targets"]
            exact += int(match.all(1).sum())
            tok += int(match.float().mean(1).sum())
            n += batch_size
        return {"exact_match": exact / n, "token_acc": tok / n}


TASKS = {"text": TextLM, "mlm": MLMNSP, "classify": CodeOrigin, "corrupt": CodeCorruption,
         "listops": ListOps, "compass": Compass,
         "recall": AssocRecall, "needle": Needle, "majority": Majority,
         "copy": lambda: CopyReverse(reverse=False),
         "reverse": lambda: CopyReverse(reverse=True)}


def make_task(name: str, **kw) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")
    return TASKS[name](**kw)
