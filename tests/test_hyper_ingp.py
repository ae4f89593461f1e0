"""HyperINGP: per-prompt batching, sphere init, weight count, spectral norm, config round trip."""

import json
import math

import pytest
import torch

from amortized3d.generators.hyper_ingp import HyperINGP, HyperINGPConfig

SMALL = dict(n_levels=4, log2_hashmap_size=12, base_resolution=8, per_level_scale=2.0, hyper_hidden=16, mlp_hidden=16)


def small(**overrides) -> HyperINGP:
    return HyperINGP(16, HyperINGPConfig(**{**SMALL, **overrides}))


def trained_looking_model(seed: int = 0, **overrides) -> HyperINGP:
    """A small model with O(1) grid features, so the per-prompt MLPs visibly shape the outputs."""
    torch.manual_seed(seed)
    model = small(**overrides)
    with torch.no_grad():
        model.grid.table.uniform_(-1, 1)
        model.background_grid.table.uniform_(-1, 1)
    return model


def points_and_directions(n_prompts: int, n: int = 50, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    points = torch.rand(n_prompts, n, 3, generator=generator) * 4 - 2
    directions = torch.nn.functional.normalize(torch.randn(n_prompts, n, 3, generator=generator), dim=-1)
    return points, directions


def all_outputs(model: HyperINGP, text: torch.Tensor, points: torch.Tensor, directions: torch.Tensor):
    field = model(text)
    sdf, rgb = field.sdf_and_color(points)
    return field.sdf(points), sdf, rgb, field.background(directions)


def test_batched_prompts_equal_one_at_a_time():
    model = trained_looking_model()
    text = torch.randn(4, 16)
    points, directions = points_and_directions(4)
    batched = all_outputs(model, text, points, directions)
    for p in range(4):
        single = all_outputs(model, text[p : p + 1], points[p : p + 1], directions[p : p + 1])
        for got, expected in zip(batched, single):
            torch.testing.assert_close(got[p : p + 1], expected, atol=1e-5, rtol=1e-5)


def test_permuting_prompts_permutes_outputs():
    model = trained_looking_model()
    text = torch.randn(5, 16)
    points, directions = points_and_directions(5)
    order = torch.tensor([3, 0, 4, 1, 2])
    original = all_outputs(model, text, points, directions)
    permuted = all_outputs(model, text[order], points[order], directions[order])
    for got, expected in zip(permuted, original):
        torch.testing.assert_close(got, expected[order], atol=1e-5, rtol=1e-5)


def test_prompts_change_the_field():
    model = trained_looking_model()
    points, directions = points_and_directions(1)
    a = all_outputs(model, torch.randn(1, 16), points, directions)
    b = all_outputs(model, torch.randn(1, 16), points, directions)
    for x, y in zip(a, b):
        assert (x - y).abs().max() > 1e-3


def test_sdf_agrees_with_sdf_and_color_and_skips_the_color_mlp():
    model = trained_looking_model()
    field = model(torch.randn(2, 16))
    points, _ = points_and_directions(2)
    sdf, rgb = field.sdf_and_color(points)
    assert sdf.shape == (2, 50) and rgb.shape == (2, 50, 3)
    assert rgb.min() >= 0 and rgb.max() <= 1
    torch.testing.assert_close(field.sdf(points), sdf, atol=1e-5, rtol=1e-5)
    field.color_hidden = torch.full_like(field.color_hidden, float("nan"))
    field.color_out = torch.full_like(field.color_out, float("nan"))
    torch.testing.assert_close(field.sdf(points), sdf, atol=1e-5, rtol=1e-5)


def test_init_is_the_sphere_with_grey_color_and_background():
    torch.manual_seed(0)
    model = small()
    points, directions = points_and_directions(3, n=200)
    field = model(torch.randn(3, 16))
    sdf, rgb = field.sdf_and_color(points)
    torch.testing.assert_close(sdf, points.norm(dim=-1) - 0.5, atol=1e-3, rtol=0)
    torch.testing.assert_close(rgb, torch.full_like(rgb, 0.5), atol=1e-3, rtol=0)
    background = field.background(directions)
    torch.testing.assert_close(background, torch.full_like(background, 0.5), atol=1e-3, rtol=0)


@pytest.mark.parametrize("spectral_norm", [False, True])
def test_generated_weights_have_fan_in_scale_at_init(spectral_norm):
    torch.manual_seed(0)
    model = small(spectral_norm=spectral_norm)
    field = model(torch.randn(64, 16) * 3.0)
    encoding = model.grid.output_dim
    assert abs(field.sdf_hidden.std().item() / math.sqrt(2 / encoding) - 1) < 0.15
    assert abs(field.color_hidden.std().item() / math.sqrt(2 / encoding) - 1) < 0.15
    assert abs(field.color_out.std().item() / math.sqrt(1 / SMALL["mlp_hidden"]) - 1) < 0.2


def test_generated_weight_count_matches_the_formula():
    model = HyperINGP(1024, HyperINGPConfig())  # defaults: 32-d encoding, 64 hidden
    expected = 32 * 64 + 64 * 1 + 32 * 64 + 64 * 3
    assert expected == 4352 == HyperINGP.n_generated_weights(32, 64)
    assert model.hypernet.weight_head.out_features == expected
    assert model.hypernet.text_projection.in_features == 1024 and model.hypernet.text_projection.bias is None
    field = model(torch.randn(2, 1024))
    per_prompt = sum(w[0].numel() for w in (field.sdf_hidden, field.sdf_out, field.color_hidden, field.color_out))
    assert per_prompt == expected
    hypernet_parameters = sum(p.numel() for p in model.hypernet.parameters())
    assert hypernet_parameters == 1024 * 64 + 2 * 64 + 64 * 4352 + 4352  # about 0.35 M


def test_spectral_norm_flag_bounds_the_hypernet_singular_values():
    torch.manual_seed(0)
    model = small(spectral_norm=True)
    with torch.no_grad():  # make the raw weights far from unit norm
        model.hypernet.weight_head.parametrizations.weight.original.mul_(50.0)
    for _ in range(30):  # power iterations run in training mode
        model(torch.randn(2, 16))
    for hypernet in (model.hypernet, model.background_hypernet):
        for layer in (hypernet.text_projection, hypernet.weight_head):
            assert torch.linalg.matrix_norm(layer.weight.detach(), ord=2) <= 1.02
    plain = small(spectral_norm=False)
    assert not hasattr(plain.hypernet.weight_head, "parametrizations")
    assert torch.linalg.matrix_norm(plain.hypernet.weight_head.weight.detach(), ord=2) > 1.02


@pytest.mark.parametrize("spectral_norm", [False, True])
def test_config_round_trip(spectral_norm):
    model = trained_looking_model(spectral_norm=spectral_norm)
    config = json.loads(json.dumps(model.config.model_dump()))
    rebuilt = HyperINGP(model.text_dim, HyperINGPConfig(**config))
    rebuilt.load_state_dict(model.state_dict())
    model.eval(), rebuilt.eval()
    text = torch.randn(2, 16)
    points, directions = points_and_directions(2)
    for got, expected in zip(all_outputs(rebuilt, text, points, directions), all_outputs(model, text, points, directions)):
        torch.testing.assert_close(got, expected)


def test_gradients_reach_grids_and_both_hypernetworks():
    model = trained_looking_model()
    points, directions = points_and_directions(2)
    field = model(torch.randn(2, 16))
    sdf, rgb = field.sdf_and_color(points)
    (sdf.square().sum() + rgb.sum() + field.background(directions).sum()).backward()
    for parameter in model.geometry_parameters() + model.background_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0
    assert len(model.geometry_parameters()) + len(model.background_parameters()) == len(list(model.parameters()))


def test_rejects_mismatched_shapes():
    model = small()
    with pytest.raises(ValueError, match="text_pooled"):
        model(torch.randn(2, 8))
    field = model(torch.randn(2, 16))
    with pytest.raises(ValueError, match="P=2"):
        field.sdf(torch.zeros(3, 5, 3))
