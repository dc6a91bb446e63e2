"""Hugging Face transformers with attn_implementation="fastattn": tiny random Llama (GQA),
Mistral (sliding window) and GPT-2 built from configs (no download) give eager's logits and
greedy generate() tokens, with and without padding; the unpadded calls run fastattn's fused
path, padded ones the explicit-mask path."""

import copy

import pytest
import torch
from conftest import requires_cpu_ext

transformers = pytest.importorskip(
    "transformers", reason="transformers is an optional extra: pip install 'fastattn[transformers]'")

import fastattn  # noqa: E402
import fastattn.integrations.transformers as fastattn_hf  # noqa: E402

pytestmark = requires_cpu_ext

VOCAB = 101


def _configs():
    # initializer_range 0.3: with HF's default 0.02 the attention output is too small next to
    # the residual stream for a wrong mask to show in the logits.
    common = dict(vocab_size=VOCAB, initializer_range=0.3, pad_token_id=0, eos_token_id=None,
                  bos_token_id=None)
    return {
        "llama_gqa": transformers.LlamaConfig(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, **common),
        "mistral_sliding": transformers.MistralConfig(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, sliding_window=6, max_position_embeddings=128, **common),
        "gpt2": transformers.GPT2Config(
            n_embd=64, n_layer=2, n_head=4, n_positions=128,
            scale_attn_by_inverse_layer_idx=True, **common),
    }


@pytest.fixture(scope="module", autouse=True)
def _registered():
    assert fastattn_hf.register() == "fastattn"


def _pair(cfg):
    """Eager and fastattn models with the same weights (each gets its own config copy:
    from_config writes the implementation into the config)."""
    torch.manual_seed(0)
    eager = transformers.AutoModelForCausalLM.from_config(
        copy.deepcopy(cfg), attn_implementation="eager").eval()
    ours = transformers.AutoModelForCausalLM.from_config(
        copy.deepcopy(cfg), attn_implementation="fastattn").eval()
    ours.load_state_dict(eager.state_dict())
    assert ours.config._attn_implementation == "fastattn"
    assert eager.config._attn_implementation == "eager"
    return eager, ours


class _Paths:
    """Counts the integration's calls of fastattn.attention (fused) and of
    fastattn.scaled_dot_product_attention (explicit mask)."""

    def __init__(self, monkeypatch):
        self.fused = self.masked = 0
        fa, sdpa = fastattn.attention, fastattn.scaled_dot_product_attention

        def fused(*a, **k):
            self.fused += 1
            return fa(*a, **k)

        def masked(*a, **k):
            self.masked += 1
            return sdpa(*a, **k)

        monkeypatch.setattr(fastattn, "attention", fused)
        monkeypatch.setattr(fastattn, "scaled_dot_product_attention", masked)


def _ids(B, N, seed):
    return torch.randint(1, VOCAB, (B, N), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", list(_configs()))
def test_logits_and_generate_match_eager(family, monkeypatch):
    eager, ours = _pair(_configs()[family])
    paths = _Paths(monkeypatch)
    ids = _ids(2, 19, seed=1)  # longer than Mistral's window of 6
    with torch.no_grad():
        ref, got = eager(ids).logits, ours(ids).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert (paths.fused, paths.masked) == (2, 0)  # one fused call per layer

    gen = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref_tokens = eager.generate(ids[:, :5], **gen)
        got_tokens = ours.generate(ids[:, :5], **gen)
    assert torch.equal(got_tokens, ref_tokens)
    assert paths.masked == 0  # prefill and every decode step stayed on the fused path
    # the decode steps ran past Mistral's window (5 + 12 > 6): the cache's trimmed keys
    # stayed aligned with fastattn's bottom-right window


@pytest.mark.parametrize("family", list(_configs()))
def test_left_padding_falls_back_correctly(family, monkeypatch):
    eager, ours = _pair(_configs()[family])
    paths = _Paths(monkeypatch)
    ids = _ids(3, 14, seed=2)
    am = torch.ones_like(ids)
    am[0, :4] = 0
    am[2, :9] = 0
    with torch.no_grad():
        ref = eager(ids, attention_mask=am).logits
        got = ours(ids, attention_mask=am).logits
    real = am.bool()  # padded positions differ by design (torch gives 0, eager a mean)
    torch.testing.assert_close(got[real], ref[real], atol=1e-4, rtol=1e-4)
    assert paths.masked == 2 and paths.fused == 0
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(ours.generate(ids, attention_mask=am, **gen),
                           eager.generate(ids, attention_mask=am, **gen))


def test_static_cache_uses_explicit_mask():
    """A StaticCache holds empty slots after the current position: not bottom-right
    aligned, so the mask builder must hand the layers an explicit mask."""
    eager, ours = _pair(_configs()["llama_gqa"])
    ids = _ids(1, 7, seed=3)
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="static")
    with torch.no_grad():
        assert torch.equal(ours.generate(ids, **gen), eager.generate(ids, **gen))


def test_mask_builder_decisions():
    mu = transformers.masking_utils
    sliding = mu.sliding_window_causal_mask_function(4)
    assert fastattn_hf._pattern(mu.causal_mask_function) == ("causal", None)
    assert fastattn_hf._pattern(sliding) == ("sliding", 4)
    assert fastattn_hf._pattern(mu.and_masks(mu.causal_mask_function, lambda *a: True)) is None
    assert fastattn_hf._pattern(mu.chunked_causal_mask_function(4, torch.zeros(1, dtype=torch.long))) is None


def test_unsupported_features_raise():
    eager, ours = _pair(_configs()["gpt2"])
    ids = _ids(1, 5, seed=4)
    with pytest.raises(ValueError, match="head_mask"):
        ours(ids, head_mask=torch.ones(2, 4))


def test_training_dropout_and_gradients():
    cfg = _configs()["llama_gqa"]
    eager, ours = _pair(cfg)
    ids = _ids(2, 9, seed=5)
    for m in (eager, ours):
        m.train()  # attention_dropout is 0: the fused path with autograd
        m.zero_grad()
        m(ids, labels=ids).loss.backward()
    for (name, a), b in zip(eager.named_parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-4, rtol=1e-3, msg=name)


def _gemma2_config(**over):
    # Gemma 2: logit softcapping in every attention layer, alternating sliding/global layers
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=6,
              attn_logit_softcapping=2.0, final_logit_softcapping=30.0, query_pre_attn_scalar=16,
              max_position_embeddings=128, initializer_range=0.3, pad_token_id=0,
              eos_token_id=None, bos_token_id=None)
    kw.update(over)
    return transformers.Gemma2Config(**kw)


def test_gemma2_softcap_matches_eager(monkeypatch):
    # softcap 2.0 bites hard (scaled scores reach ~10 at initializer_range 0.3): a kernel
    # that ignored it would give clearly different logits
    eager, ours = _pair(_gemma2_config())
    paths = _Paths(monkeypatch)
    ids = _ids(2, 19, seed=6)
    with torch.no_grad():
        ref, got = eager(ids).logits, ours(ids).logits
        no_cap = copy.deepcopy(eager)
        for layer in no_cap.model.layers:
            layer.self_attn.attn_logit_softcapping = None
        uncapped = no_cap(ids).logits
    assert (uncapped - ref).abs().max() > 1e-2  # the cap matters for these inputs
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert paths.fused == 2 and paths.masked == 0
    gen = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(ours.generate(ids[:, :5], **gen), eager.generate(ids[:, :5], **gen))
    # padded batch: explicit mask + softcap (the naive path), same logits on real tokens
    am = torch.ones_like(ids)
    am[0, :5] = 0
    with torch.no_grad():
        ref, got = eager(ids, attention_mask=am).logits, ours(ids, attention_mask=am).logits
    real = am.bool()
    torch.testing.assert_close(got[real], ref[real], atol=1e-4, rtol=1e-4)


def test_attention_dropout_runs_in_fastattn_and_is_seeded(monkeypatch):
    cfg = _configs()["llama_gqa"]
    cfg.attention_dropout = 0.3
    _, ours = _pair(cfg)
    paths = _Paths(monkeypatch)
    ours.train()
    ids = _ids(2, 9, seed=7)
    losses = []
    for _ in range(2):
        torch.manual_seed(11)
        losses.append(ours(ids, labels=ids).loss)
    assert paths.fused == 4 and paths.masked == 0  # 2 layers x 2 calls, all fused
    assert torch.equal(losses[0], losses[1])  # dropout seeded from torch's generator
    torch.manual_seed(12)
    assert not torch.equal(ours(ids, labels=ids).loss, losses[0])
    ours.eval()
    with torch.no_grad():  # eval: attention_dropout is not applied (HF passes 0.0)
        a, b = ours(ids).logits, ours(ids).logits
    assert torch.equal(a, b)
