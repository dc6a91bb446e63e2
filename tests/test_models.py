"""fastattn.models: backends agree on whole models, KV-cache generation equals recomputation,
exact resume, training reduces the loss for every model shape, data rules."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import requires_cpu_ext
from fastattn.models import KVCache, ModelConfig, Transformer, sample
from fastattn.models import data as D
from fastattn.models.train import TrainConfig, lr_at, train
from oracle import FLOOR

try:
    import fastattn.sparse  # noqa: F401
    SPARSE = ("bigbird", "longformer:8", "fixed:16:4", "blocklocal:24")
except ImportError:  # block-sparse patterns land with fastattn.sparse
    SPARSE = ()

TINY = dict(n_layer=2, n_embd=64, n_head=4, block_size=160)


def _batch(kind, B=2, T=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (B, T), generator=g)
    if kind == "gpt":
        return {"idx": x, "targets": torch.roll(x, -1, 1)}
    if kind == "encdec":
        return {"src": x, "idx": x[:, : T // 2], "targets": x[:, 1: T // 2 + 1]}
    lab = torch.full_like(x, -100)
    lab[:, ::7] = x[:, ::7]
    return {"idx": x, "segments": (torch.arange(T) >= T // 2).long().expand(B, T),
            "mlm_labels": lab, "nsp_labels": torch.tensor([0, 1] * (B // 2))}


def _run(model, batch):
    out, loss = model(**batch)
    loss.backward()
    logits = out["mlm"] if isinstance(out, dict) else out
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


@requires_cpu_ext
@pytest.mark.parametrize("kind", ["gpt", "bert", "encdec"])
@pytest.mark.parametrize("patterns", [("dense",), ("window:16", "dense"), *[(p,) for p in SPARSE]])
def test_model_cpu_backend_matches_oracle(kind, patterns):
    """Logits and every parameter gradient of a whole model on the cpu backend vs the same
    model in float64 on the reference backend, by the DESIGN rule (<= 2x the error of the
    float32 reference backend + floor)."""
    cfg = dict(TINY, kind=kind, patterns=patterns, n_kv_head=2, sparse_block=16, window=16)
    torch.manual_seed(0)
    ref = Transformer(ModelConfig(**cfg, backend="reference"))
    state = ref.state_dict()
    batch = _batch(kind)
    results = {}
    for name, backend, dtype in [("oracle", "reference", torch.float64),
                                 ("ref32", "reference", torch.float32), ("cpu", "cpu", torch.float32)]:
        m = Transformer(ModelConfig(**cfg, backend=backend)).to(dtype)
        m.load_state_dict(state)
        results[name] = _run(m, batch)
    o_logits, o_grads = results["oracle"]
    for what, got, base in [("logits", results["cpu"][0], results["ref32"][0])] + [
            (f"grad {n}", results["cpu"][1][n], results["ref32"][1][n]) for n in o_grads]:
        ref64 = o_logits if what == "logits" else o_grads[what[5:]]
        err = (got.double() - ref64).abs().max().item()
        tol = 2 * (base.double() - ref64).abs().max().item() + FLOOR[torch.float32]
        assert err <= tol, f"{kind} {patterns} {what}: error {err:.3g} > tolerance {tol:.3g}"


@requires_cpu_ext
@pytest.mark.parametrize("kind,pos,patterns,n_kv", [
    ("gpt", "rope", ("dense",), 0),
    ("gpt", "learned", ("window:6", "dense"), 2),
    ("encdec", "rope", ("dense",), 1),
])
def test_kv_cache_generation_equals_recompute(kind, pos, patterns, n_kv):
    """Greedy and seeded sampling through the KV cache (split-KV decode kernel, per-row
    prompt lengths) give the same tokens as recomputing the whole sequence each step."""
    torch.manual_seed(1)
    cfg = ModelConfig(**dict(TINY, kind=kind, pos=pos, patterns=patterns, n_kv_head=n_kv))
    m = Transformer(cfg).eval()
    prompt = torch.randint(0, 256, (3, 9))
    lens = torch.tensor([9, 3, 6])
    src = torch.randint(0, 256, (3, 17)) if kind == "encdec" else None
    a = m.generate(prompt, 24, prompt_lens=lens, src=src, greedy=True)
    b = m.generate(prompt, 24, prompt_lens=lens, src=src, greedy=True, use_cache=False)
    assert torch.equal(a, b)
    for i, L in enumerate(lens.tolist()):  # prompts kept, generation right after each
        assert torch.equal(a[i, :L], prompt[i, :L])
    kw = dict(prompt_lens=lens, src=src, temperature=0.9, top_k=20, top_p=0.9)
    a = m.generate(prompt, 16, generator=torch.Generator().manual_seed(5), **kw)
    b = m.generate(prompt, 16, generator=torch.Generator().manual_seed(5), use_cache=False, **kw)
    assert torch.equal(a, b)


@requires_cpu_ext
def test_kv_cache_logits_match_full_forward():
    """Per-step logits from the cache equal the last-position logits of a full forward."""
    torch.manual_seed(2)
    m = Transformer(ModelConfig(**TINY, n_kv_head=2)).eval()
    x = torch.randint(0, 256, (2, 20))
    full, _ = m(x)
    cache = KVCache(2, 2, 2, 20, 16, torch.float32, "cpu")
    with torch.no_grad():
        h = m.decode(x[:, :8], cache=cache)
        steps = [m.lm_head(h)]
        for t in range(8, 20):
            steps.append(m.lm_head(m.decode(x[:, t:t + 1], cache=cache)))
    got = torch.cat(steps, 1)
    torch.testing.assert_close(got, full.detach(), atol=2e-5, rtol=1e-4)


def test_sample_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample(logits, top_k=2, generator=g).tolist()) == {3, 4}
    # softmax of 0..4: p(4) = 0.636, p(3) = 0.234 -> nucleus 0.8 is {4, 3}; 0.5 is {4}
    assert set(sample(logits, top_p=0.8, generator=g).tolist()) == {3, 4}
    assert set(sample(logits, top_p=0.5, generator=g).tolist()) == {4}
    assert torch.equal(sample(logits, greedy=True), torch.full((2000,), 4))
    cold = sample(logits, temperature=0.05, generator=g)
    assert (cold == 4).float().mean() > 0.99


def _tc(tmp_path, **kw):
    base = dict(out=str(tmp_path), seq_len=32, batch_size=4, steps=12, warmup=2, lr=3e-3,
                eval_every=1000, eval_batches=1, log_every=4, progress=False, plot=False,
                n_layer=2, n_embd=32, n_head=2, backend="auto")
    base.update(kw)
    return TrainConfig(**base)


def test_resume_reproduces_loss_trajectory(tmp_path):
    """Stop at step 5 (checkpoint), resume to 10: the same losses, bit for bit, as one
    uninterrupted run; with dropout, gradient accumulation and an eval in between."""
    kw = dict(task="text", steps=10, dropout=0.1, grad_accum=2, eval_every=3,
              task_args="max_bytes=1048576")
    full = train(_tc(tmp_path / "a", **kw))
    train(_tc(tmp_path / "b", stop_after=5, **kw))
    resumed = train(_tc(tmp_path / "b", resume=True, **kw))
    la = [h["loss"] for h in full["history"] if "loss" in h]
    lb = [h["loss"] for h in resumed["history"] if "loss" in h]
    assert len(la) == len(lb) == 10
    assert la == lb
    assert full["final"]["val_loss"] == resumed["final"]["val_loss"]


def test_checkpoint_is_atomic(tmp_path):
    from fastattn.models.train import save_checkpoint

    p = str(tmp_path / "ck.pt")
    save_checkpoint(p, {"a": torch.ones(3)})
    save_checkpoint(p, {"a": torch.zeros(3)})
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ck.pt"]  # no temp files left
    assert torch.equal(torch.load(p)["a"], torch.zeros(3))


@pytest.mark.parametrize("task,extra", [
    ("text", dict(task_args="max_bytes=1048576")),
    ("mlm", dict(seq_len=35, task_args="max_bytes=1048576")),
    ("reverse", dict(seq_len=8, lr=1e-2, steps=40)),
    ("recall", dict(seq_len=48, task_args="n_pairs=4,n_queries=4,n_keys=8,n_values=8")),
])
def test_training_reduces_loss(tmp_path, task, extra):
    """A few steps lower the loss for each model shape (gpt, bert, encdec)."""
    s = train(_tc(tmp_path, task=task, **{"steps": 25, **extra}))
    losses = [h["loss"] for h in s["history"] if "loss" in h]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.1, f"{task}: loss {first:.3f} -> {last:.3f}"


def test_frozen_finetune_trains_only_the_head(tmp_path):
    pre = train(_tc(tmp_path / "pre", task="mlm", steps=2, seq_len=35))
    ck = str(tmp_path / "pre" / "ckpt.pt")
    before = {k: v.clone() for k, v in pre["model"].state_dict().items()}
    ft = train(_tc(tmp_path / "ft", task="classify", steps=3, seq_len=33, init_from=ck,
                   freeze_backbone=True))
    after = ft["model"].state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), f"frozen backbone parameter {k} changed"
    assert any(not torch.equal(after[k], torch.zeros_like(after[k])) for k in after
               if k.startswith("classifier."))
    assert "acc" in ft["final"]
    # unfreezing later trains the backbone too
    ft2 = train(_tc(tmp_path / "ft2", task="classify", steps=3, seq_len=33, init_from=ck,
                    freeze_backbone=True, unfreeze_at=1))
    assert not torch.equal(before["wte.weight"], ft2["model"].state_dict()["wte.weight"])


def test_bert_classifier_pooling():
    """pool="mean" (default) classifies the mean final state, "cls" the [CLS] (first) state;
    any other value is refused by name."""
    torch.manual_seed(0)
    cfg = dict(TINY, kind="bert", vocab_size=256, n_classes=5, backend="reference")
    x = torch.randint(0, 256, (2, 40))
    for pool in ("mean", "cls"):
        m = Transformer(ModelConfig(**cfg, pool=pool)).eval()
        with torch.no_grad():
            h = m.encode(x)
            want = m.classifier(h[:, 0] if pool == "cls" else h.mean(1))
            assert torch.equal(m(x)[0]["cls"], want)
    with pytest.raises(ValueError, match="pool"):
        ModelConfig(**cfg, pool="max")


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=requires_cpu_ext)])
@pytest.mark.parametrize("pattern", ["dense", "window:8", "longformer:8", "bigbird"])
def test_bert_pad_id_masks_padding(backend, pattern):
    """pad_id set: padding keys are masked out of attention and the mean pool skips them, so
    a right-padded row classifies exactly as the same row alone without padding (for
    patterns that do not depend on the padded length), and nothing flows to the padding's
    positions. BigBird's layout depends on the padded length: there the masked model must
    agree with the reference backend on the padded batch."""
    torch.manual_seed(0)
    cfg = ModelConfig(**dict(TINY, kind="bert", vocab_size=20, n_classes=3, backend=backend,
                             pos="learned", block_size=80, patterns=(pattern,),
                             sparse_block=16, pad_id=0))
    m = Transformer(cfg).eval()
    lens = [37, 64, 50]
    x = torch.zeros(3, 80, dtype=torch.long)
    for r, n in enumerate(lens):
        x[r, :n] = torch.randint(1, 20, (n,))
    out = m(x)[0]["cls"]
    if pattern != "bigbird":
        for r, n in enumerate(lens):
            alone = m(x[r:r + 1, :n])[0]["cls"]
            torch.testing.assert_close(out[r:r + 1], alone, atol=2e-5, rtol=1e-5)
    else:
        ref = Transformer(ModelConfig(**dict(cfg.to_dict(), backend="reference"))).eval()
        ref.load_state_dict(m.state_dict())
        torch.testing.assert_close(out, ref(x)[0]["cls"], atol=2e-5, rtol=1e-5)
    m.train()
    _, loss = m(x, labels=torch.tensor([0, 1, 2]))
    loss.backward()
    g = m.wpe.weight.grad
    assert torch.count_nonzero(g[max(lens):]) == 0 and torch.count_nonzero(g[:max(lens)]) > 0
    # without pad_id the padding is attended to (and reaches the gradient)
    m2 = Transformer(ModelConfig(**dict(cfg.to_dict(), pad_id=None)))
    m2.load_state_dict(m.state_dict())
    m2(x, labels=torch.tensor([0, 1, 2]))[1].backward()
    assert torch.count_nonzero(m2.wpe.weight.grad[max(lens):]) > 0


def test_padding_block_mask_any_layout():
    """Padding that is not a right-padded prefix is evaluated token by token, exactly."""
    from fastattn.models.model import padding_block_mask
    keep = torch.rand(2, 40, generator=torch.Generator().manual_seed(1)) > 0.3
    for k in (keep, torch.arange(40) < torch.tensor([[17], [40]])):
        dense = padding_block_mask(k, 16).to_dense()
        want = k[:, None, :, None] & k[:, None, None, :]
        assert torch.equal(dense.expand_as(want), want)


def test_train_mask_padding_flag():
    """--mask-padding sets the task's pad token on the model; refused where nothing pads."""
    from fastattn.models.train import model_config_for
    lo = D.make_task("listops")
    assert model_config_for(TrainConfig(task="listops", seq_len=64), lo).pad_id is None
    assert model_config_for(TrainConfig(task="listops", seq_len=64, mask_padding=True),
                            lo).pad_id == lo.pad_id == D.LISTOPS_TOKENS.index("<pad>")
    with pytest.raises(ValueError, match="mask-padding"):
        model_config_for(TrainConfig(task="recall", mask_padding=True), D.make_task("recall"))
    # --bias reaches the model (BERT's linear and LayerNorm biases)
    mc = model_config_for(TrainConfig(task="listops", seq_len=64, bias=True), lo)
    m = Transformer(mc)
    assert mc.bias and m.enc[0].attn.q.bias is not None and m.ln_enc.bias is not None
    assert Transformer(model_config_for(TrainConfig(task="listops", seq_len=64), lo)).ln_enc.bias is None


def test_train_pool_auto_picks_per_model():
    """--pool auto: mean for bert tasks (the recorded fine-tunes), cls for ViT; explicit wins."""
    from fastattn.models.train import model_config_for
    lo = D.make_task("listops")
    assert model_config_for(TrainConfig(task="listops", seq_len=64), lo).pool == "mean"
    assert model_config_for(TrainConfig(task="listops", seq_len=64, pool="cls"), lo).pool == "cls"
    im = D.make_task("compass")
    assert model_config_for(TrainConfig(task="compass"), im).pool == "cls"
    assert model_config_for(TrainConfig(task="compass", pool="mean"), im).pool == "mean"


def test_lr_schedule():
    c = TrainConfig(lr=1.0, min_lr=0.1, warmup=10, steps=110)
    assert lr_at(0, c) == pytest.approx(0.1) and lr_at(9, c) == pytest.approx(1.0)
    assert lr_at(60, c) == pytest.approx(0.55) and lr_at(110, c) == pytest.approx(0.1)


# ----------------------------------------------------------------------------- data

def test_mlm_masking_rule():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (400, 500))
    special = torch.zeros_like(x, dtype=torch.bool)
    special[:, 0] = True
    inp, lab = D.mask_tokens(x, special, g)
    chosen = lab != -100
    assert not chosen[:, 0].any()
    assert abs(chosen.float().mean().item() - 0.15) < 0.005
    frac_mask = (inp[chosen] == D.MASK).float().mean().item()
    frac_same = (inp[chosen] == x[chosen]).float().mean().item()
    assert abs(frac_mask - 0.8) < 0.01
    assert abs(frac_same - (0.1 + 0.1 / 256)) < 0.01  # kept, or replaced by the same byte
    assert torch.equal(inp[~chosen], x[~chosen])


def test_mlm_nsp_batch():
    t = D.MLMNSP(max_bytes=1 << 20)
    b = t.batch("train", 256, 64, torch.Generator().manual_seed(0))
    assert b["idx"].shape == (256, 64) and b["segments"].shape == (256, 64)
    assert (b["idx"][:, 0] == D.CLS).all() and (b["idx"][:, -1] == D.SEP).all()
    assert 0.35 < b["nsp_labels"].float().mean() < 0.65


def test_listops_rules():
    t = ("[MAX", [2, 9, ("[MIN", [4, 7]), 0])
    assert D.listops_eval(t) == 9
    assert D.listops_eval(("[MED", [1, 5, 8, 2])) == 3  # median 3.5 truncated
    assert D.listops_eval(("[SM", [7, 8, 9])) == 4
    assert D.listops_tokens(("[MIN", [4, 7])) == ["[MIN", "4", "7", "]"]
    task = D.ListOps()
    b = task.batch("train", 4, 128, torch.Generator().manual_seed(0))
    assert b["idx"].shape == (4, 128) and ((b["labels"] >= 0) & (b["labels"] < 10)).all()
    toks, val = task.sample(random.Random(0), 128)
    assert 64 <= len(toks) <= 127 and 0 <= val <= 9
    # LRA's own setting (value_p 0.25, lengths from a quarter of seq_len up)
    lra = D.ListOps(min_frac=0.25, value_p=0.25)
    lens = [len(lra.sample(random.Random(s), 256)[0]) for s in range(20)]
    assert all(64 <= n <= 255 for n in lens)
    with pytest.raises(ValueError, match="value_p"):
        D.ListOps(value_p=1.5)
    # the capped generator draws the same tree when it fits and gives up when it does not
    for seed in range(60):
        tree = D.listops_tree(random.Random(seed), 1, 10, 10, 0.35)
        n = len(D.listops_tokens(tree))
        res = D.listops_tree_capped(random.Random(seed), 300, 1, 10, 10, 0.35)
        assert (res == (tree, n)) if n <= 300 else res is None


def test_recall_and_reverse_batches():
    t = D.AssocRecall(n_pairs=4, n_queries=3, n_keys=8, n_values=8)
    b = t.batch("train", 2, 40, torch.Generator().manual_seed(0))
    x, y = b["idx"], b["targets"]
    for r in range(2):
        pairs = {int(x[r, i]): int(x[r, i + 1]) for i in range(0, 8, 2)}
        qs = (y[r] != -100).nonzero().flatten().tolist()
        assert len(qs) == 3
        for q in qs:
            assert pairs[int(x[r, q])] == int(y[r, q])
    s = D.CopyReverse(reverse=True).batch("train", 2, 5, torch.Generator().manual_seed(0))
    assert torch.equal(s["targets"][:, :5], s["src"].flip(1))
    assert torch.equal(s["idx"][:, 1:], s["targets"][:, :5])


def test_unigram_entropy():
    assert D.unigram_entropy(torch.tensor([0, 1, 2, 3], dtype=torch.uint8)) == pytest.approx(
        torch.log(torch.tensor(4.0)).item())


def test_majority_and_needle_batches():
    t = D.Majority(margin_lo=0.02, margin_hi=0.06)
    b = t.batch("train", 64, 1001, torch.Generator().manual_seed(0))
    body = b["idx"][:, 1:]
    n_a, n_b = (body == 0).sum(1), (body == 1).sum(1)
    assert ((n_a + n_b) == 1000).all() and (b["idx"][:, 0] == 2).all()
    surplus = (n_a - n_b).abs()
    assert (surplus >= 20).all() and (surplus <= 62).all()
    assert torch.equal(b["mlm_labels"][:, 0], (n_b > n_a).long())
    assert (b["mlm_labels"] == b["mlm_labels"][:, :1]).all()
    nd = D.Needle(n_classes=16, n_noise=8)
    b = nd.batch("train", 8, 300, torch.Generator().manual_seed(0))
    is_needle = b["idx"] < 16
    assert (is_needle.sum(1) == 1).all()
    assert torch.equal(b["idx"][is_needle], b["mlm_labels"][:, 0])


@pytest.mark.parametrize("kind", ["gpt", "encdec"])
def test_attention_dropout_in_kernels_is_seeded_and_off_in_eval(kind):
    m = Transformer(ModelConfig(**dict(TINY, kind=kind, attn_dropout=0.2)))
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    kw = {"src": x.flip(1)} if kind == "encdec" else {}
    m.train()
    losses = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        losses.append(m(x, x, **kw)[1])
    assert torch.equal(losses[0], losses[1]) and not torch.equal(losses[0], losses[2])
    losses[0].backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    m.eval()  # no attention dropout: deterministic, equal to the same model without it
    plain = Transformer(ModelConfig(**dict(TINY, kind=kind))).eval()
    plain.load_state_dict(m.state_dict())
    with torch.no_grad():
        assert torch.equal(m(x, **kw)[0], plain(x, **kw)[0])


def test_train_help_explains_every_option():
    """`fastattn train --help`: every option has help text; the closed sets list choices."""
    import argparse

    from fastattn.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    train = sub.choices["train"]
    opts = {a.dest: a for a in train._actions if a.option_strings and a.dest != "help"}
    bare = [d for d, a in opts.items() if not a.help or a.help.startswith("(default")]
    assert not bare, f"options without help text: {bare}"
    assert "listops" in opts["task"].choices and "reverse" in opts["task"].choices
    assert set(opts["pos"].choices) == {"rope", "learned", "sincos"}
    assert "cpu" in opts["backend"].choices
    assert "bigbird" in opts["patterns"].help and "window:128" in opts["patterns"].help
