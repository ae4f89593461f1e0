"""Config loading, overrides and the errors a user sees for bad input."""

import pytest

from amortized3d.config import CONFIG_DIR, ConfigError, config_from_dict, config_to_dict, load_config, parse_override
from amortized3d.data.corpora import CorpusError, load_corpus


def test_recipe_and_overrides_apply():
    cfg = load_config("shapeworld-16", overrides=["train.steps=7", "distill.method=sds", "camera.fovy_range=[30,40]"])
    assert cfg.corpus.name == "shapeworld-16"
    assert cfg.train.steps == 7 and cfg.distill.method == "sds"
    assert cfg.camera.fovy_range == [30.0, 40.0]
    assert cfg.render.height == 32  # from configs/shapeworld.yaml, not the dataclass default 64


def test_round_trip_through_dict():
    cfg = load_config("shapeworld-16", overrides=["optim.lr_geometry=0.002"])
    again = config_from_dict(config_to_dict(cfg))
    assert config_to_dict(again) == config_to_dict(cfg)


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.stepz=3", ["train.stepz", "steps"]),
        ("trian.steps=3", ["trian", "train"]),
        ("distill.method=vsdx", ["vsdx", "asd", "sds", "csd"]),
        ("train.steps=abc", ["train.steps", "integer"]),
        ("train.steps=-5", ["train.steps", "[1, 1000000000]"]),
        ("render.random_background_prob=1.5", ["random_background_prob", "[0, 1]"]),
        ("optim.lr_geometry=.nan", ["optim.lr_geometry", "finite"]),
        ("optim.lr_geometry=-.inf", ["optim.lr_geometry", "finite"]),
        ("camera.fovy_range=[30,.inf]", ["camera.fovy_range", "finite"]),
        ("regularizers.eikonal=[[0.0,.nan]]", ["regularizers.eikonal", "finite"]),
        ("optim.eps=-1", ["optim.eps", "(0, 1)"]),
        ("optim.lr_geometry=2", ["optim.lr_geometry", "(0, 1]"]),
        ("prior.perp_neg_scale=0.5", ["prior.perp_neg_scale", "[-10, 0]", "-0.5"]),
        ("distill.asd_shift=random", ["distill.asd_shift", "paper", "reference", "deterministic", "fixed"]),
        ("distill.t_min=[0.99,0.02]", ["distill.t_min", "T_min must not exceed T_max"]),
        ("train.seed=-1", ["train.seed", "[0, "]),
        ("generator.sphere_radius=1.0", ["generator.sphere_radius", "generator.bound=1.0"]),
        ("train.steps=2.5", ["train.steps", "integer"]),
        ("camera.distance_range=[2,1]", ["distance_range", "low <= high"]),
        ("trainsteps", ["section.key=value"]),
    ],
)
def test_bad_overrides_name_the_key_and_the_allowed_values(override, words):
    with pytest.raises(ConfigError) as err:
        load_config("shapeworld-16", overrides=[override])
    for w in words:
        assert w in str(err.value)


def test_unknown_corpus_names_the_known_ones():
    with pytest.raises(CorpusError) as err:
        load_config("shapeworld-17")
    assert "shapeworld-17" in str(err.value) and "shapeworld-16" in str(err.value)
    with pytest.raises(CorpusError):
        load_corpus("no-such-corpus")


def test_corpus_without_recipe_explains_why(monkeypatch):
    from amortized3d.data import corpora

    entries = dict(corpora.catalog(), mine={"source": "file", "file": "mine.json", "about": "a corpus without a recipe"})
    monkeypatch.setattr(corpora, "catalog", lambda: entries)
    with pytest.raises(CorpusError) as err:
        load_config("mine")
    assert "no training recipe" in str(err.value) and "--config configs/mg15.yaml" in str(err.value)
    assert "mg15" in str(err.value) and "shapeworld-16" in str(err.value)
    cfg = load_config("mine", config_file=str(CONFIG_DIR / "mg15.yaml"))
    assert cfg.corpus.name == "mine" and cfg.prior.kind == "stable_diffusion"


def test_paper_recipes_resolve():
    expected = {"df415": ("conv3d", 1, "adam", 100000), "at2520": ("conv3d", 1, "adam", 50000), "cp100k": ("conv3d", 2, "adan", 300000)}
    for name, (kind, m, optimizer, steps) in expected.items():
        cfg = load_config(name)
        assert (cfg.generator.kind, cfg.generator.channel_multiplier, cfg.optim.name, cfg.train.steps) == (kind, m, optimizer, steps)
        assert cfg.prior.kind == "stable_diffusion" and cfg.generator.sphere_radius == 0.8
    assert load_config("cp100k").optim.betas == [0.98, 0.92, 0.99]
    # DL17k (reference notes, its multi-view recipe): triplane, MVDream, 1 prompt x 4 views as one orbit per object,
    # elevation [0, 30], fovy [15, 60], distance [0.8, 1.0] / tan(fovy / 2), gradient accumulation 2, Adan 2e-4
    dl = load_config("dl17k")
    assert (dl.generator.kind, dl.prior.kind, dl.train.prompts_per_step, dl.train.views_per_prompt, dl.train.grad_accum) == ("triplane", "mvdream", 1, 4, 2)
    assert dl.camera.group_views and dl.camera.relative_distance and dl.camera.distance_range == [0.8, 1.0]
    assert (dl.camera.elevation_range, dl.camera.fovy_range, dl.optim.name, dl.optim.lr_geometry) == ([0.0, 30.0], [15.0, 60.0], "adan", 2e-4)
    with pytest.raises(ConfigError, match="learned branch of a single-view prior"):
        load_config("dl17k", overrides=["distill.method=vsd"])
    for overrides, message in [(["train.views_per_prompt=3"], "trained on 4 views"), (["camera.group_views=false"], "group_views=true"),
                               (["prior.perp_neg=true"], "view words"), (["prior.view_dependent=true"], "view words")]:
        with pytest.raises(ConfigError, match=message):
            load_config("dl17k", overrides=overrides)
    with pytest.raises(ConfigError, match="views_per_prompt"):  # the joint analytic prior needs objects of several views
        load_config("shapeworld-16", overrides=["prior.kind=analytic_multiview"])
    with pytest.raises(ConfigError, match="adan takes 3 betas"):
        load_config("shapeworld-16", overrides=["optim.name=adan"])


def test_mg15_recipe_is_the_reference_recipe():
    cfg = load_config("mg15")
    assert (cfg.prior.kind, cfg.prior.model, cfg.text.encoder) == ("stable_diffusion", "stabilityai/stable-diffusion-2-1-base", "prior")
    assert (cfg.render.height, cfg.render.n_proposal, cfg.render.n_importance) == (64, 128, 64)
    assert (cfg.optim.lr_geometry, cfg.optim.lr_background, cfg.optim.betas) == (4e-3, 1e-3, [0.0, 0.99])
    assert (cfg.distill.method, cfg.distill.guidance_scale, cfg.train.steps) == ("asd", 7.5, 50000)
    assert (cfg.generator.n_levels, cfg.generator.log2_hashmap_size, cfg.generator.mlp_hidden) == (16, 19, 64)


def test_parse_override_yaml_values():
    assert parse_override("distill.guidance_scale=null") == {"distill": {"guidance_scale": None}}
    assert parse_override("train.wandb=disabled") == {"train": {"wandb": "disabled"}}


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("render:\n  heigth: 10\n")
    with pytest.raises(ConfigError) as err:
        load_config("shapeworld-16", config_file=str(bad))
    assert "render.heigth" in str(err.value) and "height" in str(err.value)
    with pytest.raises(ConfigError):
        load_config("shapeworld-16", config_file=str(tmp_path / "missing.yaml"))


def test_exponent_numbers_read_as_numbers():
    """YAML 1.1 reads 1e-3 (no dot) as a string; the README writes learning rates that way, so they must be numbers."""
    cfg = load_config("shapeworld-16", overrides=["optim.lr_geometry=1e-3", "optim.eps=1E-15", "train.steps=5e2"])
    assert cfg.optim.lr_geometry == 0.001 and cfg.optim.eps == 1e-15 and cfg.train.steps == 500


def test_every_number_in_the_config_has_a_range():
    """A property of the config tree: every int or float field (or list of them) has bounds on the field."""
    import typing

    from amortized3d.config import RANGES, SECTIONS, field_interval

    def numbers_in(annotation) -> bool:  # a mapping (phase2.prior) holds another section's keys, checked by that section's ranges
        return typing.get_origin(annotation) is not dict and (
            annotation in (int, float) or any(numbers_in(arg) for arg in typing.get_args(annotation)))

    numeric = {(section, key) for section, model in SECTIONS.items() for key, field in model.model_fields.items()
               if numbers_in(field.annotation)}
    assert numeric and all(field_interval(SECTIONS[s].model_fields[k]) for s, k in numeric), sorted(numeric - set(RANGES))
    assert numeric == set(RANGES)


def test_config_files_that_are_not_yaml_name_the_file(tmp_path):
    for name, data in [("tabs.yaml", b"train:\n\tsteps: 3\n"), ("list.yaml", b"- 1\n- 2\n"), ("latin1.yaml", b"train:\n  wandb: \xe9\n"),
                       ("deep.yaml", b"[" * 20000 + b"]" * 20000)]:
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ConfigError) as err:
            load_config("shapeworld-16", config_file=str(path))
        assert str(path) in str(err.value)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("shapeworld-16", config_file=str(tmp_path))


@pytest.mark.parametrize(
    "override, words",
    [
        # a typo'd section: the source, the name, the allowed sections and the close match
        ("rendr.height=32", ["override 'rendr.height=32'", "rendr", "allowed sections:", "render", "Did you mean 'render'?"]),
        # a wrong type: the key, the value, what it must be and an example
        ("render.height=tall", ["override 'render.height=tall'", "render.height='tall'", "must be an integer", "e.g. render.height=1000"]),
        ("prior.perp_neg=maybe", ["prior.perp_neg='maybe'", "must be true or false", "e.g. prior.perp_neg=true"]),
        # out of range: the key, the value, the interval, the hint and the fix
        ("optim.eps=2", ["override 'optim.eps=2'", "optim.eps=2", "(0, 1)", "Adam's term", "set optim.eps to such a value"]),
        # a choice: the allowed values
        ("generator.kind=nerf", ["generator.kind='nerf'", "choose one of: hyper_ingp, conv3d, triplane"]),
        # a conflict between keys: both keys, their values and the fix
        ("generator.spectral_norm=true", []),
    ],
)
def test_error_messages_name_the_source_key_allowed_values_and_fix(override, words):
    with pytest.raises(ConfigError) as err:
        load_config("shapeworld-16", overrides=[override, "generator.kind=conv3d"] if "spectral" in override else [override])
    message = str(err.value)
    assert "\n" not in message
    for w in words or ["generator.spectral_norm=true", "generator.kind='conv3d'", "set generator.spectral_norm=false"]:
        assert w in message, message


def test_recipe_and_file_errors_name_their_source(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: 0\n")
    with pytest.raises(ConfigError, match=f"^{bad}: train.steps=0: the value must be a finite number in \\[1, 1000000000\\]"):
        load_config("shapeworld-16", config_file=str(bad))
    with pytest.raises(ConfigError, match="^saved: unknown key train.stepz; allowed keys in train: steps, .* Did you mean 'steps'"):
        config_from_dict({"train": {"stepz": 3}}, source="saved")
    with pytest.raises(ConfigError, match="^saved: train.eval_every=3 must be 0 \\(off\\) or a multiple of train.ckpt_every=2"):
        config_from_dict({"train": {"eval_every": 3, "ckpt_every": 2}}, source="saved")


def test_integral_floats_are_integers_and_ints_are_floats():
    cfg = load_config("shapeworld-16", overrides=["render.height=1e2", "train.seed=7.0", "render.inv_std=20", "optim.betas=[0,1e-1]"])
    assert (cfg.render.height, cfg.train.seed) == (100, 7) and type(cfg.render.height) is int
    assert cfg.render.inv_std == 20.0 and type(cfg.render.inv_std) is float and cfg.optim.betas == [0.0, 0.1]
    for bad in ["train.steps=true", "render.inv_std=true", "train.wandb=1", "prior.perp_neg=1"]:
        with pytest.raises(ConfigError):
            load_config("shapeworld-16", overrides=[bad])


def test_generator_and_prior_sections_hold_their_own_configs():
    from amortized3d.generators.conv3d import Conv3DConfig
    from amortized3d.generators.hyper_ingp import HyperINGPConfig
    from amortized3d.priors.analytic import AnalyticPriorConfig

    cfg = load_config("shapeworld-16", overrides=["generator.kind=conv3d", "generator.preset=tiny"])
    assert cfg.generator.part(Conv3DConfig) == Conv3DConfig(preset="tiny", sphere_radius=0.5, bound=1.0)
    assert cfg.generator.part(HyperINGPConfig).n_levels == 8
    assert cfg.prior.part(AnalyticPriorConfig) == AnalyticPriorConfig(std=0.05, uncond_std=3.0, n_proposal=32, n_importance=16)
