"""The training job's typed config and its YAML recipes: validation, overrides, baseline, every shipped recipe.

No training here: every test reads or builds configs only (a few CLI calls that must fail before any work).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import pytest
import yaml

from dpvision.cli import main
from dpvision.jobs.config import (
    MAX_RECIPE_BYTES, RESOLVED, SECTIONS, DPConfig, RecipeLoader, TrainConfig, load_recipe, parse_value,
)  # fmt: skip
from tests.conftest import REPO_ROOT
from tests.job_helpers import exit_code, train_config

RECIPES = sorted((REPO_ROOT / "recipes").glob("*.yaml"))
RECIPE_DATASETS = {"mnist_seed.yaml": "mnist", "fashion_mnist.yaml": "fashion-mnist",
                   "cifar10_wrn16_4.yaml": "cifar10", "celeba_seed.yaml": "celeba", "imagefolder.yaml": "imagefolder"}


def test_a_recipe_ships_for_every_dataset():
    assert {p.name for p in RECIPES} >= set(RECIPE_DATASETS)
    assert set(RECIPE_DATASETS.values()) == {"mnist", "fashion-mnist", "cifar10", "celeba", "imagefolder"}


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_is_valid_and_round_trips(path):
    config = TrainConfig.from_dict(load_recipe(path), source=str(path))
    if path.name in RECIPE_DATASETS:
        assert config.data.dataset == RECIPE_DATASETS[path.name]
    # what a run folder writes (to_dict through YAML) reads back as the same config
    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    assert TrainConfig.from_dict(yaml.load(text, Loader=RecipeLoader)) == config


def test_mnist_seed_recipe_is_the_seeds_defaults():
    """recipes/mnist_seed.yaml holds exactly what ``python mnist.py`` (no flags) runs."""
    from dpvision.cli_support import OneLineParser
    from dpvision.jobs.mnist_seed import add_mnist_arguments, config_from_args

    recipe = TrainConfig.from_dict(load_recipe(REPO_ROOT / "recipes" / "mnist_seed.yaml"))
    seed = config_from_args(add_mnist_arguments(OneLineParser()).parse_args([]), [])
    assert recipe == seed
    assert (recipe.dp.noise_multiplier, recipe.dp.max_grad_norm, recipe.dp.delta) == (1.3, 1.0, 1e-5)
    assert (recipe.optim.lr, recipe.optim.batch_size, recipe.optim.epochs, recipe.data.k) == (0.15, 256, 30, 30000)


def test_celeba_seed_recipe_is_the_trainers_dp_defaults():
    from dpvision.cli_support import OneLineParser
    from dpvision.jobs.celeba_seed import add_train_arguments, config_from_args

    recipe = TrainConfig.from_dict(load_recipe(REPO_ROOT / "recipes" / "celeba_seed.yaml"))
    argv = ["--data", recipe.data.root, "--mode", "dp"]
    trainer = config_from_args(add_train_arguments(OneLineParser()).parse_args(argv), ["--data", "--mode"])
    # the trainer leaves σ unset, which is the job's default σ: the recipe writes it out
    assert trainer.dp.noise_multiplier is None and recipe.dp.noise_multiplier == DPConfig.DEFAULT_NOISE_MULTIPLIER
    assert recipe == dataclasses.replace(trainer, dp=dataclasses.replace(
        trainer.dp, noise_multiplier=DPConfig.DEFAULT_NOISE_MULTIPLIER))


def test_defaults_and_sections():
    config = TrainConfig()
    assert set(config.to_dict()) == set(SECTIONS) == {"data", "model", "optim", "dp", "run"}
    assert TrainConfig.from_dict({}) == config and TrainConfig.from_dict({"optim": None}) == config
    assert config.dp.enabled and config.dp.noise_multiplier is None and config.dp.target_epsilon is None


@pytest.mark.parametrize("values, named", [
    ({"optim": {"epoch": 3}}, "optim.epoch"),
    ({"dp": {"sigma": 1.0}}, "dp.sigma"),
    ({"data": {"datset": "mnist"}}, "data.datset"),
    ({"training": {"epochs": 3}}, "training"),
    ({"optim": {"lr": 0.1}, "Optim": {"lr": 0.2}}, "Optim"),
])
def test_unknown_keys_are_errors_naming_the_key(values, named):
    with pytest.raises(ValueError) as err:
        TrainConfig.from_dict(values)
    message = str(err.value)
    assert message.startswith(f"{named} is not a") and "\n" not in message


@pytest.mark.parametrize("values, field", [
    ({"optim": {"epochs": 0}}, "optim.epochs"),
    ({"optim": {"epochs": 2.0}}, "optim.epochs"),
    ({"optim": {"epochs": "3"}}, "optim.epochs"),
    ({"optim": {"epochs": True}}, "optim.epochs"),
    ({"optim": {"epochs": 100_001}}, "optim.epochs"),
    ({"optim": {"batch_size": 0}}, "optim.batch_size"),
    ({"optim": {"batch_size": 2**21}}, "optim.batch_size"),
    ({"optim": {"lr": -0.1}}, "optim.lr"),
    ({"optim": {"lr": math.nan}}, "optim.lr"),
    ({"optim": {"lr": "fast"}}, "optim.lr"),
    ({"optim": {"momentum": 1.0}}, "optim.momentum"),
    ({"optim": {"name": "rmsprop"}}, "optim.name"),
    ({"data": {"dataset": "svhn"}}, "data.dataset"),
    ({"data": {"k": 0}}, "data.k"),
    ({"data": {"image_size": 4}}, "data.image_size"),
    ({"data": {"image_size": 100_000}}, "data.image_size"),
    ({"data": {"root": ""}}, "data.root"),
    ({"dp": {"noise_multiplier": -1}}, "dp.noise_multiplier"),
    ({"dp": {"noise_multiplier": math.inf}}, "dp.noise_multiplier"),
    ({"dp": {"target_epsilon": 0}}, "dp.target_epsilon"),
    ({"dp": {"max_epsilon": -1}}, "dp.max_epsilon"),
    ({"dp": {"max_grad_norm": 0}}, "dp.max_grad_norm"),
    ({"dp": {"max_grad_norm": math.inf}}, "dp.max_grad_norm"),
    ({"dp": {"delta": 0}}, "dp.delta"),
    ({"dp": {"delta": 1}}, "dp.delta"),
    ({"dp": {"delta": "often"}}, "dp.delta"),
    ({"dp": {"accountant": "moments"}}, "dp.accountant"),
    ({"dp": {"enabled": "yes"}}, "dp.enabled"),
    ({"run": {"engine": "jax"}}, "run.engine"),
    ({"run": {"device": "tpu"}}, "run.device"),
    ({"run": {"seed": -1}}, "run.seed"),
    ({"run": {"run_name": "../escape"}}, "run.run_name"),
    ({"run": {"run_name": ".."}}, "run.run_name"),
    ({"run": {"select": "best"}}, "run.select"),
    ({"run": {"quiet": 1}}, "run.quiet"),
    ({"run": {"precision": "fp16"}}, "run.precision"),
    ({"run": {"precision": "bf16", "engine": "opacus"}}, "run.precision"),
    ({"optim": 3}, "optim"),
])
def test_bad_values_are_one_line_errors_naming_the_field(values, field):
    with pytest.raises(ValueError) as err:
        TrainConfig.from_dict(values)
    message = str(err.value)
    assert message.startswith(field) and "\n" not in message, message


def test_dp_settings_that_exclude_each_other():
    with pytest.raises(ValueError, match="dp.noise_multiplier and dp.target_epsilon exclude each other"):
        DPConfig(noise_multiplier=1.0, target_epsilon=3.0)
    for name, value in (("noise_multiplier", 2.0), ("target_epsilon", 3.0), ("max_epsilon", 1.0)):
        with pytest.raises(ValueError, match=f"dp.{name} needs DP"):
            DPConfig(enabled=False, **{name: value})
    with pytest.raises(ValueError, match="best_val needs a validation split"):
        TrainConfig.from_dict({"run": {"select": "best_val"}})  # mnist ships no validation split
    TrainConfig.from_dict({"run": {"select": "best_val"}, "data": {"val_size": 100}})


def test_delta_auto_and_numbers():
    assert DPConfig(delta="auto").delta == "auto" and DPConfig(delta=" AUTO ").delta == "auto"
    assert DPConfig(delta="1e-6").delta == 1e-6 and DPConfig(delta=2e-5).delta == 2e-5


def test_deactivated_is_the_same_config_without_dp():
    config = TrainConfig.from_dict({"optim": {"lr": 0.3, "epochs": 4}, "data": {"k": 100},
                                    "dp": {"target_epsilon": 3.0, "max_epsilon": 4.0, "max_grad_norm": 0.5,
                                           "delta": "auto", "accountant": "prv"}})
    baseline = config.deactivated()
    assert baseline.dp == DPConfig(enabled=False, max_grad_norm=0.5, delta="auto", accountant="prv")
    assert (baseline.data, baseline.model, baseline.optim, baseline.run) == (
        config.data, config.model, config.optim, config.run)
    assert config.dp.enabled and config.dp.target_epsilon == 3.0  # the original is untouched
    assert baseline.deactivated() == baseline


def test_with_overrides_validates_and_leaves_the_original():
    config = TrainConfig()
    changed = config.with_overrides({"optim.lr": 0.5, "data.k": 100, "dp.delta": "auto"})
    assert (changed.optim.lr, changed.data.k, changed.dp.delta) == (0.5, 100, "auto")
    assert config == TrainConfig()
    with pytest.raises(ValueError, match=r"^optim\.epoch is not a setting"):
        config.with_overrides({"optim.epoch": 3})
    with pytest.raises(ValueError, match=r"^lr is not a setting: use section\.field"):
        config.with_overrides({"lr": 0.1})
    with pytest.raises(ValueError, match=r"^optim\.lr must be a number >= 0"):
        config.with_overrides({"optim.lr": -1.0})


def test_resolved_section_is_accepted_and_ignored():
    config = TrainConfig.from_dict({"optim": {"lr": 0.2}, RESOLVED: {"noise_multiplier": 9.0, "anything": [1]}})
    assert config == TrainConfig.from_dict({"optim": {"lr": 0.2}})


def test_yaml_numbers_as_people_write_them(tmp_path):
    """Plain YAML 1.1 reads ``1e-5`` as a string; recipes read it as the number it is."""
    path = tmp_path / "r.yaml"
    path.write_text("dp:\n  delta: 1e-5\n  max_grad_norm: 1e0\noptim:\n  lr: .5\n")
    config = TrainConfig.from_dict(load_recipe(path))
    assert (config.dp.delta, config.dp.max_grad_norm, config.optim.lr) == (1e-5, 1.0, 0.5)
    assert parse_value("1e-5") == 1e-5 and parse_value("3") == 3 and parse_value("true") is True
    assert parse_value("null") is None and parse_value("auto") == "auto"


@pytest.mark.parametrize("text, says", [
    ("optim: [1, 2\n", "not valid YAML"),
    ("- a\n- b\n", "a recipe is a mapping"),
    (b"\xff\xfe\x00", "cannot read recipe"),
])
def test_broken_recipe_files_name_the_file(tmp_path, text, says):
    path = tmp_path / "broken.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError) as err:
        load_recipe(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and says in message and "\n" not in message
    with pytest.raises(ValueError, match="cannot read recipe"):
        load_recipe(tmp_path / "missing.yaml")
    assert load_recipe(_write(tmp_path / "empty.yaml", "# nothing\n")) == {}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("recipe, extra, named", [
    ("optim:\n  epoch: 3\n", [], "optim.epoch"),
    ("trainig:\n  epochs: 3\n", [], "trainig"),
    ("optim:\n  epochs: 3\n", ["--set", "dp.sigma=2"], "dp.sigma"),
    ("optim:\n  epochs: 3\n", ["--set", "epochs=2"], "epochs"),
    ("optim:\n  epochs: three\n", [], "optim.epochs"),
    ("optim: {epochs: [3\n", [], "not valid YAML"),
])
def test_cli_recipe_errors_exit_2_with_one_line(tmp_path, capsys, recipe, extra, named):
    path = _write(tmp_path / "recipe.yaml", recipe)
    runs = tmp_path / "runs"
    assert exit_code(main, ["train", "--config", path, "--runs-dir", runs, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dpvision train: error: ") and err.count("\n") == 1 and named in err, err
    if not extra:
        assert str(path) in err  # the file is named
    assert not runs.exists()


def test_cli_flags_override_the_recipe():
    base = ["--config", REPO_ROOT / "recipes" / "mnist_seed.yaml"]
    config = train_config([*base, "--lr", "0.3", "--k", "500", "--set", "optim.momentum=0.5", "--delta", "auto"])
    assert (config.optim.lr, config.data.k, config.optim.momentum, config.dp.delta) == (0.3, 500, 0.5, "auto")
    assert config.dp.noise_multiplier == 1.3  # the rest is the recipe's
    # a target on the command line replaces the recipe's σ, and a σ replaces the recipe's target
    targeted = train_config([*base, "--target-epsilon", "3"])
    assert (targeted.dp.noise_multiplier, targeted.dp.target_epsilon) == (None, 3.0)
    fashion = ["--config", REPO_ROOT / "recipes" / "fashion_mnist.yaml"]
    assert train_config([*fashion, "--sigma", "2"]).dp.noise_multiplier == 2.0
    assert train_config([*fashion, "--sigma", "2"]).dp.target_epsilon is None
    # --disable-dp is the recipe deactivated: its σ is dropped, not an error
    baseline = train_config([*base, "--disable-dp"])
    assert baseline == TrainConfig.from_dict(load_recipe(REPO_ROOT / "recipes" / "mnist_seed.yaml")).deactivated()
    assert dataclasses.replace(baseline.dp, enabled=True, noise_multiplier=1.3) == train_config(base).dp


@pytest.mark.parametrize("text, line, key", [
    ("optim: {lr: 0.1}\noptim: {lr: 5}\n", 2, "optim"),  # the second section would silently win
    ("data: {k: 100, k: 200}\n", 1, "k"),
    ("optim:\n  lr: 0.1\n  epochs: 3\n  lr: 5\n", 4, "lr"),
])
def test_duplicate_recipe_keys_are_refused_with_the_line(tmp_path, text, line, key):
    path = _write(tmp_path / "dup.yaml", text)
    with pytest.raises(ValueError) as err:
        load_recipe(path)
    message = str(err.value)
    assert message.startswith(f"{path}: line {line}, column ") and f"duplicate key {key!r}" in message
    assert "\n" not in message


def test_yaml_errors_give_line_and_column(tmp_path):
    path = _write(tmp_path / "bad.yaml", "optim:\n  lr: 0.1\n  epochs: : 3\n")
    with pytest.raises(ValueError, match=r"bad.yaml: line 3, column 11: not valid YAML: mapping values"):
        load_recipe(path)


def test_recipe_must_be_a_small_regular_file(tmp_path):
    """/dev/zero used to be read until the OOM killer came; a FIFO used to wait for a writer forever."""
    with pytest.raises(ValueError, match="^/dev/zero: a recipe must be a regular file"):
        load_recipe("/dev/zero")
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="a recipe must be a regular file"):
        load_recipe(fifo)
    big = tmp_path / "big.yaml"
    with open(big, "wb") as file:
        file.write(b"# " + b"x" * MAX_RECIPE_BYTES + b"\n")
    with pytest.raises(ValueError, match="a recipe must be at most 1024 KiB"):
        load_recipe(big)


def test_cli_refuses_dev_zero_in_one_line(capsys, tmp_path):
    assert exit_code(main, ["train", "--config", "/dev/zero", "--runs-dir", tmp_path / "runs"]) == 2
    err = capsys.readouterr().err
    assert err == "dpvision train: error: /dev/zero: a recipe must be a regular file (this is not one)\n"


def test_clipping_and_large_delta_fields():
    config = TrainConfig.from_dict({"dp": {"clipping": "automatic", "allow_large_delta": True, "delta": "0.5"}})
    assert (config.dp.clipping, config.dp.allow_large_delta, config.dp.delta) == ("automatic", True, 0.5)
    assert TrainConfig().dp.clipping == "flat" and TrainConfig().dp.allow_large_delta is False
    with pytest.raises(ValueError, match="dp.clipping must be one of flat, automatic"):
        TrainConfig.from_dict({"dp": {"clipping": "adaptive"}})
    with pytest.raises(ValueError, match="dp.allow_large_delta must be true or false"):
        TrainConfig.from_dict({"dp": {"allow_large_delta": "yes"}})


def test_misspelt_flag_names_the_command_and_the_nearest_flag(capsys):
    """Issue 21: ``--epcohs 1`` said ``dpvision: error: unrecognized arguments`` (wrong program, no hint)."""
    assert exit_code(main, ["train", "--epcohs", "1"]) == 2
    assert capsys.readouterr().err == "dpvision train: error: unrecognized argument --epcohs (did you mean --epochs?)\n"
    assert exit_code(main, ["celeba", "train", "--sigmaa", "1"]) == 2
    assert capsys.readouterr().err == ("dpvision celeba train: error: unrecognized argument --sigmaa "
                                       "(did you mean --sigma?)\n")
    assert exit_code(main, ["sweep", "--epsilons", "1", "--out", "x", "--zzz"]) == 2
    assert capsys.readouterr().err == "dpvision sweep: error: unrecognized argument --zzz\n"


def test_train_help_shows_defaults_and_allowed_values(capsys):
    """Issue 21: --help showed no defaults, and --engine, --device, --accountant, --optimizer took free text."""
    assert exit_code(main, ["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("--engine {fast,opacus}", "--device {auto,cpu,cuda}", "--optimizer {sgd,adam}",
                  "--dataset {mnist,fashion-mnist,cifar10,celeba,imagefolder,synthetic}",
                  "--clipping {flat,automatic}",
                  "(optim.lr; default: 0.15)", "(optim.epochs; default: 30)", "(dp.max_grad_norm; default: 1.0)",
                  "(run.engine; default: fast)", "--model MODEL model: one of {sample_convnet,celeba_cnn,wrn16_4,",
                  "--dataset cifar10/fashion-mnist start from the dataset's default recipe"):
        assert shown in text, shown
    assert "--accountant {rdp,prv,pld" in text
    assert exit_code(main, ["train", "--engine", "jax"]) == 2
    assert "dpvision train: error: argument --engine: invalid choice: 'jax'" in capsys.readouterr().err


def test_every_subcommand_is_parsed_by_argparse(capsys):
    """cli.main used to peek at argv for ``mnist`` and ``celeba train`` (whose --help it never showed)."""
    for argv, flag in ((["mnist", "--help"], "--max-per-sample-grad-norm"), (["celeba", "train", "--help"], "--mode")):
        assert exit_code(main, argv) == 0
        assert flag in capsys.readouterr().out


def test_flag_map_renders_core_errors_in_each_front_ends_words():
    from dpvision.jobs.celeba_seed import SPELLINGS
    from dpvision.jobs.flags import FLAGS, FlagMap
    from dpvision.jobs.mnist_seed import SEED_SPELLINGS

    message = "dp.max_grad_norm must be a positive number; dp.target_epsilon and dp.max_epsilon too"
    assert FlagMap(SEED_SPELLINGS).translate(message) == ("--max-per-sample-grad-norm must be a positive number; "
                                                          "--epsilon and --max-epsilon too")
    assert FlagMap(SPELLINGS).translate("data.root is empty") == "--data is empty"
    assert set(FLAGS) <= {f"{s}.{f.name}" for s, kind in SECTIONS.items() for f in dataclasses.fields(kind)}


def test_registries_are_the_configs_vocabulary():
    """Each kind is registered once and the config's valid values come from there (issue 19)."""
    from dpvision.data.registry import DATASET_REGISTRY
    from dpvision.models.registry import MODEL_REGISTRY
    from dpvision.privacy.accountants import ACCOUNTANT_REGISTRY

    assert {n: d.allows_flip for n, d in DATASET_REGISTRY.items()} == {
        "mnist": False, "fashion-mnist": True, "cifar10": True, "celeba": True, "imagefolder": True,
        "synthetic": True, "python": False}
    for section, key, registry in (("data", "dataset", DATASET_REGISTRY), ("model", "name", MODEL_REGISTRY),
                                   ("dp", "accountant", ACCOUNTANT_REGISTRY)):
        for name in registry:
            assert getattr(getattr(TrainConfig.from_dict({section: {key: name}}), section), key) == name
        with pytest.raises(ValueError, match=f"{section}.{key} must be one of {', '.join(registry)}"):
            TrainConfig.from_dict({section: {key: "nope"}})
