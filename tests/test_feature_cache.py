"""The frozen-feature cache (dpvision.jobs.features): ScatterNet's scattering computed once per split.

A run with the cache and one without train the same head (same weights, same metrics), the saved model.pt
is the whole model (it predicts on images as the head does on the cached features), a cached run resumes,
and the cache is off (auto) or refused (true) where it is not allowed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from dpvision.cli import main
from dpvision.data.tensors import ImageTensors
from dpvision.jobs.config import TrainConfig
from dpvision.jobs.features import FeatureStore, FeatureTensors, FrozenPrefix, cached_data, compute_features
from dpvision.jobs.setup import Data, load_data
from dpvision.jobs.train import run
from dpvision.models import SampleConvNet, ScatterNetCNN, ScatterNetLinear, build_model
from dpvision.models.registry import MODEL_REGISTRY
from dpvision.models.scattering import Scattering2D
from tests.job_helpers import Interrupt, exit_code, interrupt_at, metrics, summary, weights


def tiny_config(root, runs, name: str, **run_options) -> TrainConfig:
    return TrainConfig.from_dict({
        "data": {"root": str(root), "k": 200, "val_size": 50, "download": False},
        "model": {"name": "scatternet_linear"},
        "optim": {"epochs": 2, "batch_size": 50, "lr": 2.0, "momentum": 0.9, "ema_decay": 0.9},
        "dp": {"noise_multiplier": 1.0, "max_grad_norm": 0.1},
        "run": {"runs_dir": str(runs), "run_name": name, "quiet": True, "device": "cpu", **run_options}})


def images(n: int, seed: int = 0) -> ImageTensors:
    g = torch.Generator().manual_seed(seed)
    return ImageTensors(torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8),
                        torch.randint(0, 10, (n,), generator=g), (0.2860,), (0.3530,))


@pytest.fixture(scope="module")
def two_runs(tiny_mnist_root, tmp_path_factory):
    """The same tiny ScatterNet + linear run without and with the cache."""
    runs = tmp_path_factory.mktemp("feature_runs")
    folders = {}
    for mode in (False, True):
        run(tiny_config(tiny_mnist_root, runs, f"cache_{mode}", cache_features=mode), announce=False)
        folders[mode] = runs / "mnist" / f"cache_{mode}"
    return folders


def test_cached_run_trains_the_same_head(two_runs):
    plain, cached = two_runs[False], two_runs[True]
    assert metrics(cached) == metrics(plain)  # every epoch's loss, accuracy (train, val, test) and ε
    w_plain, w_cached = weights(plain), weights(cached)
    assert w_plain.keys() == w_cached.keys()  # the whole model: the scattering's filters too
    for key in w_plain:
        torch.testing.assert_close(w_cached[key], w_plain[key], rtol=1e-5, atol=1e-6)
    assert summary(cached)["epsilon"] == summary(plain)["epsilon"]


def test_saved_model_predicts_on_images_as_the_head_on_features(two_runs, tiny_mnist_root):
    model = ScatterNetLinear()
    model.load_state_dict(weights(two_runs[True]))  # strict: model.pt is the whole model
    test = TrainConfig.from_dict({"data": {"root": str(tiny_mnist_root), "download": False}})
    data = load_data(test).test
    with torch.no_grad():
        on_images = model(data.normalize(data.images))  # [N, 10]
        features = compute_features(model.frozen_prefix(), data, torch.device("cpu"), batch_size=64, quiet=True)
        model.takes_features = True
        on_features = model(features.images)
    torch.testing.assert_close(on_features, on_images, rtol=1e-5, atol=1e-5)
    accuracy = float((on_images.argmax(1) == data.labels).float().mean())
    assert accuracy == pytest.approx(summary(two_runs[True])["test_accuracy"])


def test_per_example_gradients_are_those_of_the_whole_model():
    torch.manual_seed(0)
    model, data = ScatterNetCNN(), images(6)
    x, y = data.normalize(data.images), data.labels
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    whole = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)  # {name: [6, *shape]}
    features = compute_features(model.frozen_prefix(), data, torch.device("cpu"), batch_size=4, quiet=True)
    model.takes_features = True
    head = vmap(grad(loss), in_dims=(None, 0, 0))(params, features.images, y)
    for name in params:
        torch.testing.assert_close(head[name], whole[name], rtol=1e-4, atol=1e-6)


def test_cached_run_resumes_to_the_same_result(two_runs, tiny_mnist_root, tmp_path):
    config = tiny_config(tiny_mnist_root, tmp_path, "cut", cache_features=True)
    with pytest.raises(Interrupt):
        run(config, announce=False, hook=interrupt_at("epoch", 1))
    folder = tmp_path / "mnist" / "cut"
    run(resume=folder, announce=False)
    assert metrics(folder) == metrics(two_runs[True])
    assert all(torch.equal(a, b) for a, b in zip(weights(folder).values(), weights(two_runs[True]).values()))


def cache_data(config: TrainConfig, model) -> Data:
    split = images(8)
    data = Data(train=split, val=split, test=split, class_names=tuple("0123456789"), val_groups=None,
                test_groups=None, fingerprint="x")
    return cached_data(config, data, model, torch.device("cpu"), quiet=True)


def test_auto_caches_only_where_allowed():
    plain = TrainConfig.from_dict({"model": {"name": "scatternet_linear"}})
    model = ScatterNetLinear()
    data = cache_data(plain, model)
    assert isinstance(data.train, FeatureTensors) and data.train.images.shape == (8, 81, 7, 7)
    assert model.takes_features
    for config in (plain.with_overrides({"optim.augmult": 2}), plain.with_overrides({"run.cache_features": False})):
        model = ScatterNetLinear()
        assert isinstance(cache_data(config, model).train, ImageTensors) and not model.takes_features
    assert isinstance(cache_data(plain, SampleConvNet()).train, ImageTensors)


def test_true_is_refused_where_not_allowed(tmp_path, capsys):
    with pytest.raises(ValueError, match="run.cache_features true: optim.augmult is 2: augmentation"):
        TrainConfig.from_dict({"model": {"name": "scatternet_cnn"}, "optim": {"augmult": 2},
                               "run": {"cache_features": True}})
    with pytest.raises(ValueError, match="model.name sample_convnet has no frozen prefix"):
        TrainConfig.from_dict({"run": {"cache_features": True}})
    with pytest.raises(ValueError, match="run.cache_features"):
        TrainConfig.from_dict({"run": {"cache_features": "yes"}})
    external = TrainConfig.from_dict({"model": {"name": "torchvision:resnet18"}, "run": {"cache_features": True}})
    with pytest.raises(ValueError, match="torchvision:resnet18 declares no frozen prefix"):  # checked when built
        cache_data(external, SampleConvNet())
    argv = ["train", "--model", "scatternet_linear", "--set", "optim.augmult=2", "--set", "run.cache_features=true",
            "--runs-dir", tmp_path / "runs"]
    assert exit_code(main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run.cache_features true: optim.augmult is 2" in err[0]
    assert not (tmp_path / "runs").exists()


def test_registry_declares_the_frozen_prefix_its_models_have():
    for name, entry in MODEL_REGISTRY.items():
        model = build_model(name, in_channels=1, num_classes=10, image_size=28)
        assert isinstance(model, FrozenPrefix) == entry.frozen_prefix, name


def test_a_store_computes_each_split_once():
    store, model, data = FeatureStore(), ScatterNetLinear(), images(4)
    first = store.features(model.frozen_prefix(), data, torch.device("cpu"), batch_size=2, name="train", quiet=True)
    again = store.features(ScatterNetCNN().frozen_prefix(), data, torch.device("cpu"), batch_size=4, name="train",
                           quiet=True)  # the same prefix (scattering + GroupNorm 27) in another model
    assert again is first
    other = store.features(model.frozen_prefix(), images(4, seed=1), torch.device("cpu"), batch_size=2,
                           name="train", quiet=True)
    assert other is not first and not torch.equal(other.images, first.images)


def test_private_input_norm_with_the_cache_and_resume(tiny_mnist_root, tmp_path):
    """The cached features stop before the normalisation: a private one's statistics (fitted after the model is
    built, restored from the checkpoint on resume) are the same with and without the cache, and after a resume."""
    def config(name, cache):
        values = tiny_config(tiny_mnist_root, tmp_path, name, cache_features=cache).to_dict()
        values["model"]["input_norm"] = "private"
        return TrainConfig.from_dict(values)

    for name, cache in (("plain", False), ("cached", True)):
        run(config(name, cache), announce=False)
    with pytest.raises(Interrupt):
        run(config("cut", True), announce=False, hook=interrupt_at("epoch", 1))
    run(resume=tmp_path / "mnist" / "cut", announce=False)
    plain, cached, cut = (tmp_path / "mnist" / name for name in ("plain", "cached", "cut"))
    assert metrics(cached) == metrics(plain) and metrics(cut) == metrics(cached)
    assert torch.equal(weights(cut)["norm.mean"], weights(plain)["norm.mean"])
    assert float(weights(plain)["norm.var"].min()) != 1.0  # fitted, not the identity the buffers start as


def test_a_cached_private_fit_runs_no_scattering_of_its_own(tiny_mnist_root, tmp_path, monkeypatch):
    """With the cache the private statistics are fitted on the cached features: the scattering sees each image
    of each split once, as many as in a cached GroupNorm run (without the cache the fit scatters the whole
    training set once more)."""
    real, seen = Scattering2D.forward, []

    def counted(self, x):
        seen.append(len(x))
        return real(self, x)

    monkeypatch.setattr(Scattering2D, "forward", counted)
    totals = {}
    for norm, cache in (("group", True), ("private", True), ("private", False)):
        values = tiny_config(tiny_mnist_root, tmp_path, f"{norm}_{cache}", cache_features=cache,
                             test_every_epoch=False).to_dict()
        values["model"]["input_norm"] = norm
        values["optim"]["epochs"] = 1
        seen.clear()
        run(TrainConfig.from_dict(values), announce=False)
        totals[norm, cache] = sum(seen)
    # each split's features once (150 train, 50 validation, the test set) and one image per split (their size)
    assert totals["private", True] == totals["group", True] < totals["private", False]


def test_a_sweep_computes_each_split_once(tiny_mnist_root, tmp_path, monkeypatch):
    """The runs of one sweep (here two ε) share its FeatureStore: each split's features are computed once."""
    import dpvision.jobs.features as features_module
    from dpvision.jobs.sweep import sweep

    real, names = features_module.compute_features, []

    def counted(prefix, data, device, **kwargs):
        names.append(kwargs.get("name"))
        return real(prefix, data, device, **kwargs)

    monkeypatch.setattr(features_module, "compute_features", counted)
    base = tiny_config(tiny_mnist_root, tmp_path / "runs", "unused", cache_features=True).to_dict()
    base["dp"] = {"max_grad_norm": 0.1}
    base["optim"]["epochs"] = 1
    rows = sweep(TrainConfig.from_dict(base), epsilons=[2.0, 8.0], seeds=[0], out=tmp_path / "out", baseline=False)
    assert len(rows) == 2 and rows[0]["test_accuracy"] != rows[1]["test_accuracy"]
    assert sorted(names) == sorted(set(names)) and len(names) == 3  # train, validation, test: once each
    # Two sweeps of different recipes handed one store (accuracy.py's frontier): the features are not computed again.
    store, other = FeatureStore(), {**base, "optim": {**base["optim"], "lr": base["optim"].get("lr", 0.1) / 2}}
    for i, recipe in enumerate((base, other)):
        sweep(TrainConfig.from_dict(recipe), epsilons=[2.0], seeds=[0], out=tmp_path / f"shared{i}", baseline=False,
              features=store)
    assert len(names) == 6
