"""fastattn.models.vit (the vision transformer) and the image / downstream tasks: forward and
backward with every attention pattern and position encoding, the sparse layers equal to
dense attention under the same mask, a few training steps that lower the loss through
`fastattn train`, the pre-train -> fine-tune path (--init-from, --freeze-backbone,
--unfreeze-at), and data generators that are deterministic per seed. Sizes are tiny."""

from __future__ import annotations

import math

import pytest
import torch

from fastattn.models.data import CodeCorruption, Compass, make_task
from fastattn.models.vit import ViT, ViTConfig


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(**kw):
    base = dict(image_size=20, patch=4, n_layer=2, n_head=2, n_embd=32, n_classes=5,
                backend="reference", sparse_block=16)
    base.update(kw)
    return ViTConfig(**base)


@pytest.mark.parametrize("patterns", ["dense", "neighborhood:3", "axial", "neighborhood:3,dense"])
@pytest.mark.parametrize("pos,pool", [("learned", "cls"), ("rope2d", "mean"), ("rope2d", "cls"),
                                      ("sincos2d", "cls")])
def test_vit_forward_backward(patterns, pos, pool):
    torch.manual_seed(0)
    m = ViT(tiny(patterns=patterns, pos=pos, pool=pool))
    x = torch.randn(3, 3, 20, 20)
    y = torch.tensor([0, 4, 2])
    out, loss = m(images=x, labels=y)
    assert out["cls"].shape == (3, 5) and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert m.patch_embed.weight.grad.abs().sum() > 0


def test_sincos2d_positions_encode_row_and_column():
    """(1, 1 + g*g, C): [CLS] zeros; the first C/2 channels depend on the row only, the rest on
    the column only, as sin | cos of position x w_i (w_0 = 1); distinct patches differ."""
    from fastattn.models.vit import sincos_2d

    g, C = 5, 16
    pe = sincos_2d(g, C, n_prefix=1)
    assert pe.shape == (1, 1 + g * g, C) and not pe[0, 0].any()
    grid = pe[0, 1:].view(g, g, C)
    assert torch.equal(grid[:, :1, : C // 2].expand(g, g, C // 2), grid[..., : C // 2])
    assert torch.equal(grid[:1, :, C // 2:].expand(g, g, C // 2), grid[..., C // 2:])
    r = torch.arange(g, dtype=torch.float32)
    torch.testing.assert_close(grid[:, 0, 0], torch.sin(r))  # row sin at w_0 = 1
    torch.testing.assert_close(grid[0, :, C // 2 + C // 4], torch.cos(r))  # column cos at w_0
    assert torch.cdist(pe[0, 1:], pe[0, 1:]).add(torch.eye(g * g)).min() > 0.1
    m = ViT(tiny(pos="sincos2d"))
    assert "pos_fixed" in m.state_dict() and not any(p is m.pos_fixed for p in m.parameters())
    with pytest.raises(ValueError, match="n_embd divisible by 4"):
        tiny(pos="sincos2d", n_embd=18, n_head=2)


def test_patchify_is_row_major():
    m = ViT(tiny(image_size=8, patch=2, pool="mean"))
    img = torch.arange(3 * 64, dtype=torch.float32).view(1, 3, 8, 8)
    p = m.patchify(img)
    assert p.shape == (1, 16, 12)
    # patch (r=1, c=2) is token 1 * 4 + 2; its first value is pixel (2, 4) of channel 0
    assert p[0, 6, 0] == img[0, 0, 2, 4] and p[0, 6, 4] == img[0, 1, 2, 4]


@pytest.mark.parametrize("spec,pool", [("neighborhood:3", "cls"), ("axial", "mean")])
def test_sparse_layers_equal_dense_attention_under_the_same_mask(spec, pool, monkeypatch):
    """The cpu kernels with the block mask give what the reference gives with its dense mask."""
    import fastattn
    from conftest import CPU_OK

    if not CPU_OK:
        pytest.skip("cpu backend unavailable")
    torch.manual_seed(1)
    cfg = tiny(patterns=spec, pool=pool, backend="cpu")
    m = ViT(cfg)
    x = torch.randn(2, 3, 20, 20)
    got = m(images=x)[0]["cls"]
    real = fastattn.attention

    def dense(q, k, v, *, block_mask=None, backend=None, **kw):
        return real(q, k, v, backend="reference",
                    **({"block_mask": block_mask} if block_mask is not None else {}), **kw)

    monkeypatch.setattr(fastattn, "attention", dense)
    want = m(images=x)[0]["cls"]
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)


def test_rotary_2d_depends_on_row_and_column():
    from fastattn.models.vit import Rotary2D

    r = Rotary2D(8, 4, 1, 100.0)
    assert torch.equal(r.cos[0], torch.ones(4))  # [CLS] is not rotated
    # token 1 + (1 * 4 + 0) is row 1, column 0: only the row half turns
    assert not torch.allclose(r.cos[5, :2], torch.ones(2)) and torch.allclose(r.cos[5, 2:], torch.ones(2))
    assert torch.allclose(r.cos[2, :2], torch.ones(2)) and not torch.allclose(r.cos[2, 2:], torch.ones(2))


def test_vit_config_errors_name_the_argument():
    with pytest.raises(ValueError, match="image_size .* multiple of patch"):
        ViTConfig(image_size=30, patch=4)
    with pytest.raises(ValueError, match="unknown ViT attention pattern 'bigbird'"):
        ViTConfig(patterns="bigbird")
    with pytest.raises(ValueError, match="pool must be"):
        ViTConfig(pool="max")
    m = ViT(tiny())
    with pytest.raises(ValueError, match=r"images must be \(B, 3, 20, 20\)"):
        m(images=torch.randn(1, 3, 16, 16))


# ---------------------------------------------------------------------------- data
def test_compass_is_deterministic_and_labels_follow_the_markers():
    t = Compass(image_size=32, patch=4, n_distractors=2, noise=0.0)
    a = t.batch("train", 16, 0, torch.Generator().manual_seed(3))
    b = t.batch("train", 16, 0, torch.Generator().manual_seed(3))
    c = t.batch("train", 16, 0, torch.Generator().manual_seed(4))
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])
    assert not torch.equal(a["images"], c["images"])
    assert a["images"].shape == (16, 3, 32, 32) and a["labels"].max() < 8
    # recompute each label from the pixels: red = channel 0 only, green = channel 1 only
    for img, lab in zip(a["images"], a["labels"], strict=True):
        red = (img[0] > 0.5) & (img[1] < 0.5)
        green = (img[1] > 0.5) & (img[0] < 0.5)
        if not red.any() or not green.any():
            continue  # a distractor covered a marker corner; the label still stands
        (ry, rx), (gy, gx) = (red.nonzero().min(0).values.float(),
                              green.nonzero().min(0).values.float())
        ang = math.atan2(-(gy - ry), gx - rx)
        want = math.floor(ang / (2 * math.pi) * 8 + 0.5) % 8
        # corners may be occluded by distractors: accept the exact or a neighbouring sector
        assert int(lab) in (want, (want + 1) % 8, (want - 1) % 8)


def test_compass_fixed_training_set_and_token_count():
    t = make_task("compass", image_size=128, patch=2, n_train=8)
    assert (t.image_size // t.patch) ** 2 == 4096
    b = t.batch("train", 32, 0, torch.Generator().manual_seed(0))
    assert b["images"].shape == (32, 3, 128, 128)
    uniq = torch.unique(b["images"].flatten(1), dim=0)
    assert uniq.shape[0] <= 8  # drawn from the fixed 8-image labelled set
    with pytest.raises(ValueError, match="multiple of patch"):
        Compass(image_size=30, patch=4)


def test_code_corruption_keeps_the_byte_histogram():
    t = CodeCorruption(span=16)
    b = t.batch("val", 24, 64, torch.Generator().manual_seed(0))
    b2 = t.batch("val", 24, 64, torch.Generator().manual_seed(0))
    assert torch.equal(b["idx"], b2["idx"]) and set(b["labels"].tolist()) <= {0, 1, 2}
    assert b["idx"].shape == (24, 64)
    # the same draw without corruption: identical histograms, and label 0 rows unchanged
    g = torch.Generator().manual_seed(0)
    L = 63
    i = torch.randint(0, len(t.val) - L, (24,), generator=g)
    orig = t.val[i.unsqueeze(1) + torch.arange(L)].long()
    for r in range(24):
        assert torch.equal(torch.bincount(orig[r], minlength=256),
                           torch.bincount(b["idx"][r, 1:], minlength=256))
        if int(b["labels"][r]) == 0:
            assert torch.equal(orig[r], b["idx"][r, 1:])
    small = CodeCorruption(n_train=5)
    s = small.batch("train", 20, 32, torch.Generator().manual_seed(1))
    assert torch.unique(s["idx"], dim=0).shape[0] <= 5


# ---------------------------------------------------------------------------- training
def test_a_few_training_steps_lower_the_loss(tmp_path):
    from fastattn.models.train import TrainConfig, train

    c = TrainConfig(task="compass", task_args="image_size=16,patch=4,n_dirs=4,noise=0.1",
                    out=str(tmp_path / "vit"), batch_size=16, steps=30, lr=3e-3, warmup=0,
                    eval_every=1000, eval_batches=2, n_layer=2, n_head=2, n_embd=32,
                    patterns="neighborhood:3,dense", backend="reference", sparse_block=16,
                    progress=False, plot=False, seed=0)
    s = train(c)
    losses = [h["loss"] for h in s["history"] if "loss" in h]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert "acc" in s["final"]


def test_pretrain_then_finetune_with_unfreeze(tmp_path):
    from fastattn.models.train import TrainConfig, train

    kw = dict(task="compass", batch_size=8, eval_every=1000, eval_batches=2, n_layer=1,
              n_head=2, n_embd=16, backend="reference", progress=False, plot=False,
              pool="mean", patterns="neighborhood:3", sparse_block=16)
    pre = train(TrainConfig(task_args="image_size=16,patch=4", out=str(tmp_path / "pre"),
                            steps=3, **kw))
    before = {k: v.clone() for k, v in pre["model"].state_dict().items()}
    ft = train(TrainConfig(task_args="image_size=16,patch=4,n_dirs=4,n_train=16",
                           out=str(tmp_path / "ft"), steps=4, init_from=str(tmp_path / "pre/ckpt.pt"),
                           freeze_backbone=True, unfreeze_at=2, warmup=0, **kw))
    m = ft["model"]
    assert m.classifier.out_features == 4
    after = m.state_dict()
    assert not torch.equal(after["patch_embed.weight"], before["patch_embed.weight"])  # unfrozen at 2
    # resuming a finished run changes nothing and keeps the unfrozen state
    ft2 = train(TrainConfig(task_args="image_size=16,patch=4,n_dirs=4,n_train=16",
                            out=str(tmp_path / "ft"), steps=4, init_from=str(tmp_path / "pre/ckpt.pt"),
                            freeze_backbone=True, unfreeze_at=2, warmup=0, resume=True, **kw))
    assert torch.equal(ft2["model"].state_dict()["patch_embed.weight"], after["patch_embed.weight"])


def test_probe_norm_head_standardizes_the_pooled_state():
    from fastattn.models.model import ModelConfig, Transformer

    m = Transformer(ModelConfig(kind="bert", n_layer=1, n_embd=32, n_head=2, block_size=16,
                                n_classes=3, probe_norm=True, backend="reference"))
    assert isinstance(m.classifier[0], torch.nn.BatchNorm1d) and not m.classifier[0].affine
    idx = torch.randint(0, 256, (4, 16))
    out, loss = m(idx, labels=torch.tensor([0, 1, 2, 0]))
    loss.backward()
    m.freeze_backbone(True)
    assert [p.requires_grad for p in m.classifier.parameters()] == [True, True]
    assert not m.wte.weight.requires_grad
