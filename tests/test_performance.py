"""The performance tooling: the stage profiler's FLOP counts against hand counts, the real architectures that
`random:` models build (parameter counts of the published checkpoints, and hand counts from the architectures'
formulas), and benchmarks/recipe_step.py end to end on tiny models."""

import json
import warnings

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from amortized3d.priors.pretrained import PretrainedLoadError, RandomWeightsWarning, load_component, random_model_dir
from amortized3d.training.profiler import StageProfiler
from tests.fixtures import SD_TINY, load_benchmark

RANDOM_SD = "random:stable-diffusion-2-1-base"


def test_stage_flops_equal_hand_counts_forward_and_backward():
    """A matrix product [B, I] x [I, O] costs 2 B I O FLOPs; its backward computes the input's gradient (2 B I O)
    when the input needs one and the weight's (2 B I O). A convolution: 2 Cout Cin k^2 Hout Wout B, the same per
    gradient. Each backward is charged to the stage whose forward built it; the total equals FlopCounterMode's."""
    torch.manual_seed(0)
    conv, linear = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Linear(8 * 6 * 6, 5)
    x = torch.randn(2, 3, 6, 6)
    profiler = StageProfiler()
    with FlopCounterMode(display=False) as counter, profiler:
        with profiler.stage("conv"):
            h = conv(x).relu().flatten(1)
        with profiler.stage("linear"):
            y = linear(h).square().sum()
        y.backward()
    stats = profiler.table()
    conv_flops = 2 * 8 * 3 * 3 * 3 * 6 * 6 * 2
    linear_flops = 2 * 2 * (8 * 6 * 6) * 5
    assert stats["conv"]["flops"] == conv_flops
    assert stats["linear"]["flops"] == linear_flops
    assert stats["linear backward"]["flops"] == 2 * linear_flops  # input and weight gradients
    assert stats["conv backward"]["flops"] == conv_flops  # x needs no gradient: the weight's only
    assert profiler.total_flops() == counter.get_total_flops() == 2 * conv_flops + 3 * linear_flops


def test_attached_module_stage_and_condition():
    """attach_stage charges a module's calls to its stage only while ``when`` holds, else to the enclosing stage."""
    layer = torch.nn.Linear(4, 4)
    profiler = StageProfiler()
    handles = profiler.attach_stage(layer, "grad-free", when=lambda: not torch.is_grad_enabled())
    x = torch.randn(3, 4)
    with profiler:
        with torch.no_grad():
            layer(x)
        with profiler.stage("outer"):
            layer(x)
    for h in handles:
        h.remove()
    assert profiler.stats["grad-free"]["flops"] == profiler.stats["outer"]["flops"] == 2 * 3 * 4 * 4


def test_random_sd_builds_the_published_architectures():
    """random:stable-diffusion-2-1-base builds its components through load_component (here on the meta device, no
    memory): the UNet has the 865,910,724 parameters of stabilityai/stable-diffusion-2-1-base's unet weights; the
    text encoder the count of OpenCLIP ViT-H/14's text tower without its last layer (SD 2.x uses the
    penultimate one), computed from the architecture's formula."""
    from amortized3d._compat import import_torchvision_safely

    import_torchvision_safely()
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = random_model_dir(RANDOM_SD)
    assert random_model_dir(RANDOM_SD) == folder  # written once, then reused
    with torch.device("meta"):
        unet = load_component(UNet2DConditionModel, folder, "unet", RANDOM_SD)
        vae = load_component(AutoencoderKL, folder, "vae", RANDOM_SD)
        text = load_component(CLIPTextModel, folder, "text_encoder", RANDOM_SD)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(unet) == 865_910_724
    d, ff, layers, vocab, positions = 1024, 4096, 23, 49408, 77
    per_layer = 4 * (d * d + d) + (d * ff + ff) + (ff * d + d) + 2 * 2 * d  # q, k, v, out; MLP; two layer norms
    assert count(text) == vocab * d + positions * d + layers * per_layer + 2 * d
    assert vae.config.scaling_factor == 0.18215 and vae.config.latent_channels == 4
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8  # 512 x 512 renders -> 64 x 64 latents


def test_random_deepfloyd_if_builds_the_published_architectures():
    """random:deepfloyd-if-I-XL-v1.0 on the meta device. UNet: DeepFloyd's stage I XL is 4.3 B parameters (model card),
    and its fp16 weights file is 8.61 GB (2 bytes a parameter); its original config has model_channels 704 with
    channel_mult 1, 2, 3, 4, and 4096-d T5 tokens projected to 2816. Text encoder: T5 v1.1 XXL's encoder by its
    formula (gated-GELU feed-forward, no biases, relative position buckets in the first layer only). Tokens: 77, in
    T5's layout (end token, then padding id 0), ids inside the encoder's vocabulary."""
    from amortized3d._compat import import_torchvision_safely

    import_torchvision_safely()
    from diffusers import UNet2DConditionModel
    from transformers import AutoTokenizer, T5EncoderModel

    model = "random:deepfloyd-if-I-XL-v1.0"
    folder = random_model_dir(model)
    with torch.device("meta"):
        unet = load_component(UNet2DConditionModel, folder, "unet", model)
        text = load_component(T5EncoderModel, folder, "text_encoder", model)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert round(count(unet) / 1e9, 1) == 4.3 and round(2 * count(unet) / 1e9, 2) == 8.61
    assert list(unet.config.block_out_channels) == [704 * m for m in (1, 2, 3, 4)]
    assert (unet.encoder_hid_proj.in_features, unet.encoder_hid_proj.out_features) == (4096, 2816)
    assert (unet.config.in_channels, unet.config.out_channels, unet.config.sample_size) == (3, 6, 64)
    d, ff, heads, d_kv, layers, vocab, buckets = 4096, 10240, 64, 64, 24, 32128, 32
    per_layer = 4 * d * heads * d_kv + 3 * d * ff + 2 * d  # q, k, v, o; wi_0, wi_1, wo; two RMS norms
    assert count(text) == vocab * d + layers * per_layer + buckets * heads + d
    tokenizer = load_component(AutoTokenizer, folder, "tokenizer", model)
    ids = tokenizer(["a hamburger"], padding="max_length", max_length=77, truncation=True).input_ids[0]
    assert len(ids) == 77 and ids[2] == tokenizer.eos_token_id == 1 and set(ids[3:]) == {0} and max(ids) < vocab


def test_random_model_errors_and_warning():
    with pytest.raises(PretrainedLoadError, match="random:stable-diffusion-2-1-base"):
        random_model_dir("random:stable-diffusion-9")
    from amortized3d.config import load_config
    from amortized3d.priors.diffusers_prior import DiffusionPrior

    cfg = load_config("mg15", overrides=[f"prior.model={RANDOM_SD}", "prior.resolution=64"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prior = DiffusionPrior.from_config(cfg)
    assert any(issubclass(w.category, RandomWeightsWarning) and "meaningless" in str(w.message) for w in caught)
    assert prior.vae_factor == 8 and prior.text_encoder.dim == 1024
    latents = prior.encode(torch.rand(1, 3, 64, 64))
    assert latents.shape == (1, 4, 8, 8) and torch.isfinite(latents).all()
    # seeded: a second build has the same weights
    from diffusers import AutoencoderKL

    again = load_component(AutoencoderKL, random_model_dir(RANDOM_SD), "vae", RANDOM_SD)
    assert torch.equal(prior.vae.encoder.conv_in.weight, again.encoder.conv_in.weight)


def test_recipe_step_counts_the_methods_passes(tiny_sd, tmp_path):
    """The mg15 recipe (ASD with Perp-Neg) on the tiny SD folder: the step's UNet stage costs exactly 5 single-image
    UNet forwards per image ([cond(t), uncond(t), neg1, neg2, cond(t + dt)]: ScaleDreamer Alg. 1 plus Perp-Neg's two
    negatives), the VAE's forward and backward exactly one encoder pass each, so the floor's prior part equals them;
    the stage totals equal FlopCounterMode's count of the same step."""
    recipe_step = load_benchmark("recipe_step")
    out = tmp_path / "steps.json"
    overrides = [f"--set={o}" for o in SD_TINY + [f"prior.model={tiny_sd}", "train.prompts_per_step=2", "train.views_per_prompt=2"]]
    (row,) = recipe_step.main(["mg15", "--out", str(out), *overrides])
    assert row["unet_passes_per_image"] == 5 and row["images_per_step"] == 4
    stages, parts = row["stages"], row["floor_parts"]
    assert stages["unet"]["gflop"] == pytest.approx(4 * 5 * parts["unet_forward_per_image"], rel=1e-9)
    vae = stages["vae encode"]["gflop"] + stages["vae encode backward"]["gflop"]
    assert vae == pytest.approx(4 * parts["vae_encode_forward_backward_per_image"], rel=1e-9)
    assert row["ratio"] >= 1.0 and "text encoder" not in stages  # the store's embeddings: no text encoding in a step
    saved = json.loads(out.read_text())
    assert list(saved.values())[0]["recipe"] == "mg15"
    # the same step counted by FlopCounterMode alone
    recipe = recipe_step.Recipe("mg15", ["train.wandb=disabled", *SD_TINY, f"prior.model={tiny_sd}", "train.prompts_per_step=2",
                                         "train.views_per_prompt=2"], torch.device("cpu"), {})
    with FlopCounterMode(display=False) as counter:
        recipe.step(1, 0.9)
    profiler = recipe.profiled_step(1, 0.9)
    assert profiler.total_flops() == counter.get_total_flops()


def test_recipe_step_reports_recipes_that_cannot_run(tmp_path):
    recipe_step = load_benchmark("recipe_step")
    (row,) = recipe_step.main(["dl17k", "--out", str(tmp_path / "x.json"), "--set", "train.views_per_prompt=0"])
    assert "views_per_prompt" in row["not_run"]


def test_gpu_check_dry_run_writes_its_tables(tmp_path):
    """benchmarks/gpu_check.py --dry-run on the CPU: the CUDA-only checks are skipped with their reason, the others
    run (here the inference-latency one, which trains and times a tiny run, and the rasterizer's, with the PyTorch
    backend alone), and the JSON and Markdown tables are written; an unknown check name is refused."""
    gpu_check = load_benchmark("gpu_check")
    out = tmp_path / "check"
    report = gpu_check.main(["--dry-run", "--out", str(out), "--only", "nerfacc_sampling", "generate_latency", "deepspeed_zero2",
                             "gsplat_rasterizer"])
    checks = report["checks"]
    raster = checks["gsplat_rasterizer"]  # the PyTorch backend alone here: nothing compared with gsplat
    assert raster["status"] == "ok" and raster["gsplat_compared"] is False, raster.get("error")
    assert list(raster["rows"]) == ["1000"] and raster["rows"]["1000"]["torch"]["images_per_s"] > 0
    assert checks["nerfacc_sampling"]["status"] == "skipped" and "CUDA" in checks["nerfacc_sampling"]["error"]
    assert checks["deepspeed_zero2"]["status"] == "skipped"
    assert checks["generate_latency"]["status"] == "ok", checks["generate_latency"].get("error")
    assert all(row["bake_s"] > 0 and row["to_mesh_s"] >= row["bake_s"] for row in checks["generate_latency"]["rows"]["shapeworld-16 run"]["rows"])
    assert json.loads(out.with_suffix(".json").read_text())["dry_run"] is True
    assert "| generate_latency | ok |" in out.with_suffix(".md").read_text()
    with pytest.raises(SystemExit):
        gpu_check.main(["--dry-run", "--only", "nerfacc"])


def test_random_clip_is_vit_large_14():
    """random:clip-vit-large-patch14 through load_clip: ViT-L/14's parameter count from the architecture's formula
    (text: 12 layers of width 768; vision: 24 layers of width 1024 on 16 x 16 patches of 14 pixels plus a class
    token; projections to 768; the logit scale), 224-pixel input with OpenAI's normalization, and unit-norm
    features of width 768."""
    from amortized3d.evaluation.clip_models import load_clip

    with pytest.warns(RandomWeightsWarning):
        clip = load_clip("random:clip-vit-large-patch14")

    def layers(n, d, ff):  # q, k, v, out projections; MLP; two layer norms
        return n * (4 * (d * d + d) + (d * ff + ff) + (ff * d + d) + 2 * 2 * d)

    text = 49408 * 768 + 77 * 768 + layers(12, 768, 3072) + 2 * 768
    vision = 3 * 14 * 14 * 1024 + 1024 + (16 * 16 + 1) * 1024 + 2 * 1024 + layers(24, 1024, 4096) + 2 * 1024
    assert sum(p.numel() for p in clip.model.parameters()) == text + vision + 768 * 768 + 1024 * 768 + 1
    assert clip.image_size == 224 and clip.mean.tolist() == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert len(clip.tokenizer) == 49408
    features = clip.encode_text(["a frog", "a hamburger"])
    assert features.shape == (2, 768) and torch.allclose(features.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_gpu_check_cdf_reference_inverts_the_torch_sampler():
    """The nerfacc check's float64 CDF (gpu_check.cdf_at) against two independent facts: at the bin edges it is the
    normalized cumulative mass, and the renderer's inverse-CDF samples land on u_j = (j + 0.5) / n (here with bins
    of equal width and mass bounded away from 0, so float32 rounding moves the CDF by about 1e-7 only)."""
    from amortized3d.rendering.volume import sample_from_pdf

    gpu_check = load_benchmark("gpu_check")
    g = torch.Generator().manual_seed(3)
    edges = torch.linspace(0.5, 4.5, 17).expand(64, 17).contiguous()
    weights = torch.rand(64, 16, generator=g) + 0.1
    at_edges = gpu_check.cdf_at(edges, weights, edges)
    mass = torch.cumsum(weights.double(), -1) / weights.double().sum(-1, keepdim=True)
    torch.testing.assert_close(at_edges[:, 1:], mass)
    assert float(at_edges[:, 0].abs().max()) == 0.0
    u = (torch.arange(8, dtype=torch.float64) + 0.5) / 8
    assert float((gpu_check.cdf_at(edges, weights, sample_from_pdf(edges, weights, 8)) - u).abs().max()) < 1e-6


def test_cpu_attention_is_counted_like_the_cuda_kernels():
    """scaled_dot_product_attention on the CPU runs an op torch's FLOP registry has no formula for (it counted 0);
    amortized3d.training.profiler registers it. Expected by hand: forward = the two products Q K^T and P V, each
    2 s_q s_k d per head (2 m n k per matrix product); backward = five such products (dV, dP, dQ, dK, and Q K^T
    recomputed, as fused attention kernels do), so forward + backward = 3.5 x forward."""
    import amortized3d.training.profiler  # noqa: F401 - registers the CPU formulas

    b, h, s, d = 2, 3, 40, 16
    q, k, v = (torch.randn(b, h, s, d, requires_grad=True) for _ in range(3))
    forward = 2 * (2 * s * s * d) * b * h
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert counter.get_total_flops() == forward
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()
    assert counter.get_total_flops() == forward + 5 * (2 * s * s * d) * b * h
