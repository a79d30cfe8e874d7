"""dpvision.data.synthetic: labelled images from random processes (a prior that uses no real data)."""

from __future__ import annotations

import builtins
import io
import pathlib
import time

import pytest
import torch
from torch import nn

from dpvision.data.synthetic import CLASS_NAMES, generate, load_synthetic
from dpvision.data.tensors import ImageTensors, channel_stats


def test_same_seed_same_images_other_seed_other_images():
    a, b = generate(60, image_size=16, seed=3), generate(60, image_size=16, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.mean == b.mean
    c = generate(60, image_size=16, seed=4)
    assert not torch.equal(a.images, c.images)


def test_no_hidden_global_randomness():
    torch.manual_seed(0)
    a = generate(24, image_size=8, seed=1)
    torch.manual_seed(123)
    torch.rand(5)
    assert torch.equal(a.images, generate(24, image_size=8, seed=1).images)


@pytest.mark.parametrize("size,channels", [(8, 1), (28, 1), (32, 3), (20, 4)])
def test_shapes_dtypes_and_stats(size, channels):
    data = generate(30, image_size=size, channels=channels, seed=0)
    assert isinstance(data, ImageTensors)
    assert data.images.shape == (30, channels, size, size) and data.images.dtype == torch.uint8
    assert data.labels.dtype == torch.int64 and int(data.labels.max()) < len(CLASS_NAMES)
    assert (data.mean, data.std) == channel_stats(data.images)
    assert int(data.images.max()) > 200 and int(data.images.min()) < 55  # the full range is used


def test_classes_are_balanced_and_shuffled():
    data = generate(601, image_size=8, seed=0)
    counts = data.labels.bincount(minlength=len(CLASS_NAMES)).tolist()
    assert max(counts) - min(counts) <= 1 and sum(counts) == 601
    assert data.labels[:12].tolist() != [i % 6 for i in range(12)]


def test_train_and_test_are_different_draws_with_train_stats():
    train, test, names = load_synthetic(n_train=36, n_test=12, image_size=8, channels=3, seed=0)
    assert names == CLASS_NAMES and len(train) == 36 and len(test) == 12
    assert (test.mean, test.std) == (train.mean, train.std)
    assert not torch.equal(train.images[:12], test.images)


def test_reads_no_file(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"synthetic data opened a file: {args[:1]}")

    monkeypatch.setattr(builtins, "open", refuse)
    monkeypatch.setattr(io, "open", refuse)
    monkeypatch.setattr(pathlib.Path, "open", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert len(generate(12, image_size=8, seed=0)) == 12


@pytest.mark.parametrize("bad", [{"n": 0}, {"image_size": 2}, {"channels": 0}, {"image_size": 16.0}])
def test_bad_sizes_name_the_argument(bad):
    args = {"n": 6, "image_size": 8, "channels": 1, **bad}
    name = next(iter(bad))
    with pytest.raises(ValueError, match=f"synthetic images: {name} must be an integer"):
        generate(args["n"], image_size=args["image_size"], channels=args["channels"])


def test_a_small_cnn_learns_the_pretext_task_in_seconds():
    torch.manual_seed(0)
    started = time.process_time()  # CPU seconds: the wall clock depends on the shared machine
    train, test, _ = load_synthetic(n_train=600, n_test=300, image_size=16, channels=3, seed=0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                          nn.Flatten(), nn.Linear(64, len(CLASS_NAMES)))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = train.normalize(train.images), train.labels
    for step in range(150):
        batch = torch.arange(step * 64, step * 64 + 64) % len(train)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = (model(test.normalize(test.images)).argmax(1) == test.labels).float().mean().item()
    assert accuracy > 0.5, accuracy  # chance is 1/6
    assert time.process_time() - started < 60  # a few CPU seconds
