"""stmvl.models.text: BERT with fusion layers (HF parity lives in test_weights.py)."""

import pytest
import torch

from stmvl.models.config import TextConfig
from stmvl.models.text import BertEncoder

CFG = dict(vocab_size=50, hidden=32, layers=3, heads=4, intermediate=64, max_position=16, dropout=0.0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return BertEncoder(TextConfig(**CFG, fusion_start=2), cross_width=16).eval()


def test_padding_does_not_change_real_tokens(model):
    ids = torch.randint(5, 50, (1, 5))
    mask = torch.ones(1, 5, dtype=torch.long)
    short = model(ids, mask)
    padded = model(torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1), torch.cat([mask, torch.zeros(1, 3, dtype=torch.long)], 1))
    assert torch.allclose(short, padded[:, :5], atol=1e-5)
    video = torch.randn(1, 7, 16)
    fused_short = model.fuse(short, mask, video)
    fused_padded = model.fuse(padded, torch.cat([mask, torch.zeros(1, 3, dtype=torch.long)], 1), video)
    assert torch.allclose(fused_short, fused_padded[:, :5], atol=1e-5)


def test_text_only_fusion_and_both_modes(model):
    ids = torch.randint(5, 50, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    video = torch.randn(2, 7, 16)
    text = model(ids, mask)
    x = model.embeddings(ids)
    for layer in model.layers[:2]:
        x = layer(x, None)
    assert torch.allclose(text, x, atol=1e-6)
    both = model(ids, mask, video_tokens=video)
    assert torch.allclose(both, model.fuse(text, mask, video), atol=1e-6)
    # Video tokens marked invalid are ignored.
    vmask = torch.tensor([[1] * 4 + [0] * 3] * 2)
    noisy = video.clone()
    noisy[:, 4:] = 50.0
    assert torch.allclose(model.fuse(text, mask, video, vmask), model.fuse(text, mask, noisy, vmask), atol=1e-5)
    assert torch.allclose(model.fuse(text, mask, video, vmask), model.fuse(text, mask, video[:, :4]), atol=1e-5)
    with pytest.raises(ValueError, match="video_tokens"):
        model.fuse(text, mask, torch.randn(2, 7, 32))


def test_class_position_only_fusion_matches_the_full_layers_in_value_and_gradient():
    """fuse(first_token_only=True): what VTM and ITM read, at a fraction of the last layer's cost, unchanged."""
    torch.manual_seed(0)
    model = BertEncoder(TextConfig(**{**CFG, "layers": 4}, fusion_start=2), cross_width=16).eval()
    ids = torch.randint(5, 50, (3, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])  # padding is a key the query must skip
    text = model(ids, mask)
    videos = torch.randn(2, 7, 16)
    index = torch.tensor([1, 0, 1])

    def class_state(first_token_only):
        model.zero_grad()
        states = text.detach().requires_grad_()
        fused = model.fuse(states, mask, videos, video_index=index, first_token_only=first_token_only)
        (fused[:, 0] * torch.linspace(-1, 1, 32)).sum().backward()
        grads = [p.grad.clone() for p in model.layers[2:].parameters()]
        return fused, states.grad, grads

    full, full_grad, full_params = class_state(False)
    first, first_grad, first_params = class_state(True)
    assert full.shape == (3, 6, 32) and first.shape == (3, 1, 32)
    assert torch.allclose(first, full[:, :1], atol=1e-5)
    assert torch.allclose(first_grad, full_grad, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(first_params, full_params))


def test_mlm_head_is_tied_to_word_embeddings(model):
    states = torch.randn(2, 3, 32)
    h = model.mlm.norm(torch.nn.functional.gelu(model.mlm.dense(states)))
    assert torch.allclose(model.mlm_logits(states), h @ model.embeddings.word.weight.t() + model.mlm.bias, atol=1e-5)
    assert not any("decoder" in k for k in model.state_dict())


def test_no_fusion_layers_runs_all_layers():
    torch.manual_seed(0)
    plain = BertEncoder(TextConfig(**CFG, fusion_start=3)).eval()
    assert not plain.has_fusion and not any("cross" in k for k in plain.state_dict())
    ids = torch.randint(5, 50, (1, 4))
    x = plain.embeddings(ids)
    for layer in plain.layers:
        x = layer(x, None)
    assert torch.allclose(plain(ids, torch.ones_like(ids)), x, atol=1e-6)
    with pytest.raises(ValueError, match="no fusion layers"):
        plain.fuse(x, torch.ones_like(ids), torch.randn(1, 2, 32))


def test_the_run_configs_dropout_reaches_a_pretrained_text_tower_and_other_sizes_are_named(caplog):
    import dataclasses
    import logging

    from stmvl.models.layers import CrossAttention
    from stmvl.models.stm import build_text

    def dropouts(text):
        return ({m.p for m in text.modules() if isinstance(m, torch.nn.Dropout)}
                | {m.dropout for m in text.modules() if isinstance(m, CrossAttention)})

    cfg = TextConfig(weights="minilm", hidden=384, layers=6, heads=12, intermediate=1536, fusion_start=4, dropout=0.0)
    with caplog.at_level(logging.WARNING):
        assert dropouts(build_text(cfg, cross_width=64)) == {0.0}  # MiniLM's config.json says 0.1
        assert caplog.text == ""
        assert dropouts(build_text(dataclasses.replace(cfg, dropout=0.2), cross_width=64)) == {0.2}
        text = build_text(dataclasses.replace(cfg, hidden=768, heads=16), cross_width=64)
    assert text.cfg.hidden == 384  # the file's sizes win, and the warning names each that differs
    assert "model.text sizes follow the weights" in caplog.text
    assert "hidden 768 -> 384" in caplog.text and "heads 16 -> 12" in caplog.text
