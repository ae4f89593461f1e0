import torch

from amortized3d.text.hashed_encoder import HashedTextEncoder, tokenize_words


def test_shapes_and_determinism():
    enc = HashedTextEncoder(dim=64)
    a = enc.encode(["a red cube", "a blue sphere on top of a green cone"])
    b = HashedTextEncoder(dim=64).encode(["a red cube", "a blue sphere on top of a green cone"])
    assert a.tokens.shape == (2, 77, 64) and a.pooled.shape == (2, 64) and a.mask.shape == (2, 77)
    assert torch.equal(a.pooled, b.pooled) and torch.equal(a.tokens, b.tokens)
    assert a.mask[0].sum() == 5  # bos + 3 words + eos
    assert (a.tokens[0, 5:] == 0).all()


def test_binding_and_order_are_encoded():
    enc = HashedTextEncoder(dim=256)
    p = enc.encode(["a red cube on top of a blue sphere", "a blue cube on top of a red sphere", "a blue sphere on top of a red cube"]).pooled
    assert not torch.allclose(p[0], p[1]) and not torch.allclose(p[0], p[2])
    # Case and punctuation do not matter.
    q = enc.encode(["A red cube.", "a red cube"]).pooled
    assert torch.equal(q[0], q[1])


def test_long_prompts_keep_the_end_token():
    enc = HashedTextEncoder(dim=32)
    long_prompt = " ".join(f"w{i}" for i in range(200))
    e = enc.encode([long_prompt])
    assert e.mask.sum() == 77
    eos = enc.encode(["x"]).tokens[0, 2] - enc._vector("x|<eos>") - enc._vector("#position2")
    assert torch.allclose(e.tokens[0, 76] - enc._vector("w74|<eos>") - enc._vector("#position76"), eos, atol=1e-6)


def test_tokenize_words():
    assert tokenize_words("A Red-Cube, on_top!") == ["a", "red", "cube", "on", "top"]
