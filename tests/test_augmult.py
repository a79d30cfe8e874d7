"""Augmentation multiplicity: K augmentations per example, averaged before clipping; privacy unchanged."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from dpvision.engines.augmult import AugmultPerSample, augment
from dpvision.engines.clipping import CLIPPING_RULES
from dpvision.engines.per_sample import VmapPerSample
from dpvision.models import SampleConvNet


def _accumulate(backend, model, x, y, max_grad_norm=1.0, weights=None):
    total = sum(p.numel() for p in model.parameters())
    acc, views, offset = torch.zeros(total, dtype=torch.float64).float(), [], 0
    for p in model.parameters():
        views.append(acc[offset:offset + p.numel()])
        offset += p.numel()
    w = torch.ones(len(x)) if weights is None else weights
    clip = functools.partial(CLIPPING_RULES["flat"].factors, max_grad_norm=max_grad_norm)
    backend.accumulate(x, y, w, clip, views, torch.zeros(()), torch.zeros(()))
    return acc


def test_crops_are_windows_of_the_padded_image_and_flips_mirror_them():
    x = torch.randn(3, 2, 8, 8)
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    windows = lambda i: [padded[i, :, a:a + 8, b:b + 8] for a in range(9) for b in range(9)]  # noqa: E731
    out = augment(x, k=5, flip=False, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 5, 2, 8, 8)
    assert all(any(torch.equal(out[i, k], win) for win in windows(i)) for i in range(3) for k in range(5))
    flipped = augment(x, k=20, flip=True, generator=torch.Generator().manual_seed(1))
    mirrored = [any(torch.equal(flipped[i, k].flip(-1), win) for win in windows(i)) and
                not any(torch.equal(flipped[i, k], win) for win in windows(i)) for i in range(3) for k in range(20)]
    assert 0 < sum(mirrored) < len(mirrored)  # some flipped, some not
    # the generator decides everything: same seed, same crops
    again = augment(x, k=5, flip=False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_identical_augmentations_give_the_plain_clipped_sum():
    torch.manual_seed(0)
    model = SampleConvNet()
    x, y = torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,))
    plain = _accumulate(VmapPerSample(model), model, x, y, max_grad_norm=0.5)
    same = _accumulate(AugmultPerSample(model, k=3, flip=False, pad=0, generator=torch.Generator()), model, x, y,
                       max_grad_norm=0.5)
    assert torch.allclose(plain, same, atol=1e-6)


def test_gradients_are_averaged_before_clipping():
    """K different views: the clipped vector is the clip of the MEAN gradient, not the mean of clips."""
    torch.manual_seed(0)
    model = SampleConvNet()
    x, y = torch.randn(1, 1, 28, 28), torch.randint(0, 10, (1,))
    backend = AugmultPerSample(model, k=4, flip=False, generator=torch.Generator().manual_seed(3))
    got = _accumulate(backend, model, x, y, max_grad_norm=1e6)  # no clipping: the plain mean gradient
    views = augment(x, k=4, flip=False, generator=torch.Generator().manual_seed(3))[0]  # [K, 1, 28, 28]
    model.zero_grad()
    F.cross_entropy(model(views), y.expand(4)).backward()
    mean_grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert torch.allclose(got, mean_grad, atol=1e-5)
    clipped = _accumulate(AugmultPerSample(model, k=4, flip=False, generator=torch.Generator().manual_seed(3)),
                          model, x, y, max_grad_norm=1e-3)
    assert torch.allclose(clipped, mean_grad * (1e-3 / (mean_grad.norm() + 1e-6)), atol=1e-7)


def test_cuda_augmult_chunks_hold_at_most_512_examples_from_k_2_unless_asked():
    """On CUDA an augmult chunk of K >= 2 views an example holds at most 512 examples and 4,096 views by default
    (where kept gradients come from the bf16 operands: faster there, measured on an H100); an explicit
    physical_batch_size is taken as given; CPU unchanged."""
    from dpvision.engines.options import FastOptions

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    chunk = {k: FastOptions(augmult=k).resolve(cuda, dp=True).max_physical for k in (0, 1, 2, 3, 4, 8, 16, 32)}
    assert chunk == {0: 4096, 1: 4096, 2: 512, 3: 512, 4: 512, 8: 512, 16: 256, 32: 128}
    assert FastOptions(augmult=4, physical_batch_size=4096).resolve(cuda, dp=True).max_physical == 1024
    assert FastOptions(augmult=4).resolve(cpu, dp=True).max_physical == 128
