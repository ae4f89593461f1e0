"""3D-conv and Triplane-Transformer generators: paper-size parameter counts, batching, latents,
state-dict round trips, and memory knobs that must not change results."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from amortized3d.generators.conv3d import Conv3DConfig, Conv3DGenerator
from amortized3d.generators.hyper_ingp import HyperINGP, HyperINGPConfig
from amortized3d.generators.triplane import TriplaneConfig, TriplaneTransformer
from tests.fixtures import tiny_config

TEXT_DIM = 24


def n_params(module, prefix=""):
    return sum(p.numel() for name, p in module.named_parameters() if name.startswith(prefix))


def test_paper_sizes_match_the_reference_counts():
    # Reference figures (worked out from the reference implementation's layer shapes).
    expected = {
        "conv3d m=1": (Conv3DGenerator(1024, Conv3DConfig(preset="paper", channel_multiplier=1)), 88.7e6),
        "conv3d m=2": (Conv3DGenerator(1024, Conv3DConfig(preset="paper", channel_multiplier=2)), 144.8e6),
        "triplane": (TriplaneTransformer(1024, TriplaneConfig(preset="paper")), 120.5e6),
    }
    for name, (model, count) in expected.items():
        total = n_params(model) - n_params(model.background)  # the environment map is an addition (about 1 k)
        assert abs(total - count) / count < 0.02, (name, total)
    conv = expected["conv3d m=1"][0]
    voxel = sum(p.numel() for n, p in conv.named_parameters() if "voxel_bias" in n)
    assert abs(voxel - 44.3e6) / 44.3e6 < 0.02
    hyper = HyperINGP(1024, HyperINGPConfig())
    assert abs(n_params(hyper, "grid.") - 12.6e6) / 12.6e6 < 0.02 and abs(n_params(hyper, "hypernet.") - 0.35e6) / 0.35e6 < 0.02


def tiny(kind, **kwargs):
    torch.manual_seed(0)
    if kind == "conv3d":
        model = Conv3DGenerator(TEXT_DIM, Conv3DConfig(preset="tiny", bound=1.0, sphere_radius=0.8, **kwargs))
    else:
        model = TriplaneTransformer(TEXT_DIM, TriplaneConfig(preset="tiny", bound=1.0, sphere_radius=0.8, **kwargs))
    with torch.no_grad():  # move every output off its zero initialization so the comparisons mean something
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def inputs(P=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(P, TEXT_DIM, generator=gen), torch.randn(P, 7, TEXT_DIM, generator=gen), torch.randn(P, 16, generator=gen)


@pytest.mark.parametrize("kind", ["conv3d", "triplane"])
def test_batch_equals_one_by_one_and_permutes(kind):
    model = tiny(kind)
    pooled, tokens, z = inputs()
    points = torch.rand(3, 50, 3, generator=torch.Generator().manual_seed(2)) * 1.8 - 0.9
    with torch.no_grad():
        field = model(pooled, tokens, z=z)
        sdf, rgb = field.sdf_and_color(points)
        assert sdf.shape == (3, 50) and rgb.shape == (3, 50, 3)
        for i in range(3):
            one = model(pooled[i : i + 1], tokens[i : i + 1], z=z[i : i + 1])
            s1, c1 = one.sdf_and_color(points[i : i + 1])
            torch.testing.assert_close(s1, sdf[i : i + 1], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(c1, rgb[i : i + 1], atol=1e-5, rtol=1e-4)
        perm = torch.tensor([2, 0, 1])
        permuted = model(pooled[perm], tokens[perm], z=z[perm]).sdf_and_color(points[perm])
        torch.testing.assert_close(permuted[0], sdf[perm], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(permuted[1], rgb[perm], atol=1e-5, rtol=1e-4)
        # Different prompts give different fields (the condition reaches the output).
        assert (sdf[0] - model(pooled[1:2].expand(1, -1), tokens[1:2], z=z[0:1]).sdf(points[0:1])[0]).abs().max() > 1e-4


def test_the_latent_changes_the_3d_conv_shape():
    model = tiny("conv3d")
    pooled, tokens, z = inputs(P=1)
    points = torch.rand(1, 200, 3) * 1.6 - 0.8
    with torch.no_grad():
        a = model(pooled, tokens, z=z).sdf(points)
        b = model(pooled, tokens, z=-z).sdf(points)
        c = model(pooled, tokens).sdf(points)
        d = model(pooled, tokens).sdf(points)
    assert (a - b).abs().max() > 1e-3
    torch.testing.assert_close(c, d)  # the default latent is fixed


@pytest.mark.parametrize("kind", ["conv3d", "triplane"])
def test_state_dict_round_trip(kind, tmp_path):
    model = tiny(kind)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "m.safetensors"))
    torch.manual_seed(123)
    rebuilt = type(model)(model.text_dim, type(model.config)(**model.config.model_dump()))
    rebuilt.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    pooled, tokens, z = inputs()
    points = torch.rand(3, 40, 3) * 1.8 - 0.9
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(pooled, tokens, z=z).sdf_and_color(points), model(pooled, tokens, z=z).sdf_and_color(points))


@pytest.mark.parametrize("kind", ["conv3d", "triplane"])
def test_activation_checkpointing_keeps_outputs_and_gradients(kind):
    plain, ckpt = tiny(kind), tiny(kind, activation_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    pooled, tokens, z = inputs()
    points = torch.rand(3, 40, 3) * 1.8 - 0.9
    outs = []
    for model in (plain, ckpt):
        model.zero_grad()
        sdf, rgb = model(pooled, tokens, z=z).sdf_and_color(points)
        (sdf.square().sum() + rgb.sum()).backward()
        outs.append((sdf.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    assert outs[0][1].keys() == outs[1][1].keys() and len(outs[0][1]) > 5
    for name in outs[0][1]:
        torch.testing.assert_close(outs[0][1][name], outs[1][1][name], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("kind", ["conv3d", "triplane"])
def test_bf16_autocast_stays_close(kind):
    model = tiny(kind)
    pooled, tokens, z = inputs()
    points = torch.rand(3, 40, 3) * 1.8 - 0.9
    with torch.no_grad():
        full = model(pooled, tokens, z=z).sdf(points)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(pooled, tokens, z=z).sdf(points)
    assert low.dtype == torch.float32 and (low - full).abs().max() < 0.05


@pytest.mark.parametrize("kind", ["conv3d", "triplane"])
def test_trainer_and_generate_take_every_generator(kind, tmp_path):
    import trimesh

    from amortized3d.inference.generate import generate
    from amortized3d.training.train import train

    run = train(tiny_config(f"generator.kind={kind}", "generator.preset=tiny", "train.steps=2"), tmp_path / "run")
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2 and '"skipped_steps": 0' in rows[-1]
    results = generate(["a large red cube"], run, tmp_path / "out", resolution=24, frames=2, image_size=16, seed=5)
    assert len(trimesh.load(results[0]["mesh_glb"], force="mesh").faces) > 0


def test_describe_reports_sizes_and_memory(capsys):
    from amortized3d.cli import main

    from pathlib import Path

    assert main(["describe", str(Path(__file__).resolve().parents[1] / "configs" / "df415.yaml")]) == 0
    import json

    out = capsys.readouterr().out
    report = json.loads(out[out.index('{\n "parameters"'):])
    assert abs(report["parameters"] - 88.7e6) / 88.7e6 < 0.02
    memory = report["training_step_memory_mb (estimate)"]
    assert memory["parameters + gradients + Adam moments"] == pytest.approx(16 * report["parameters"] / 2**20, rel=1e-3)
    assert memory["samples with gradient per step"] == 64 * 64 * (128 + 64)  # one 64x64 view, 128 + 64 samples per ray


@pytest.mark.parametrize("kind", ["conv3d", "triplane"])
def test_chunked_field_queries_equal_one_pass(kind):
    from amortized3d.inference.baked import bake_field

    model = tiny(kind)
    pooled, tokens, z = inputs(P=1)
    with torch.no_grad():
        field = model(pooled, tokens, z=z)
        one_pass = bake_field(field, resolution=20, bound=1.0, chunk_points=20**3)
        chunked = bake_field(field, resolution=20, bound=1.0, chunk_points=777)
    torch.testing.assert_close(chunked.values, one_pass.values, atol=1e-6, rtol=1e-5)
