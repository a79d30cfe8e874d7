"""The manual backend's per-layer rules (ghost norms, materialised norms, book-keeping) against real Opacus.

Reference: Opacus's ``GradSampleModule`` (per-sample gradients by its own formulas) and
``DPOptimizer`` (its flat clipping) with the noise off, SGD at lr 1 and expected batch size 1, so
that the parameter change is exactly minus the clipped sum sum_i min(1, C/(||g_i||+1e-6)) g_i.
Every layer type the backend handles, each norm method forced both ways, on the CPU (and the GPU
where marked).
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpvision.engines.clipping import CLIPPING_RULES
from dpvision.engines.ghost import GHOST, GROUPED, MATERIALISE, choose_method, conv_patches, patch_gram
from dpvision.engines.per_sample import ManualPerSample

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA")])]
C = 0.05  # small clipping norm: most examples are clipped


def flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double().cpu() for p in params])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def opacus_clipped_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
    """sum_i clip(g_i) by real Opacus: the negated update of DPOptimizer (noise 0, lr 1, expected batch 1)."""
    from opacus.grad_sample import GradSampleModule
    from opacus.optimizers import DPOptimizer

    model = copy.deepcopy(model)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=c,
                      expected_batch_size=1, loss_reduction="sum")
    start = flat(model.parameters())
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(gsm(x), y, reduction="sum").backward()
    opt.step()
    gsm._close()
    return start - flat(model.parameters())


def manual_clipped_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, c: float, method: str = "auto",
                       weights: torch.Tensor | None = None, amp_dtype: torch.dtype | None = None):
    """(clipped sum [P] by ManualPerSample, the backend) with the given norm method."""
    backend = ManualPerSample(model, method=method)
    backend.amp_dtype = amp_dtype
    acc = torch.zeros(sum(p.numel() for p in model.parameters()), device=x.device)
    views, offset = [], 0
    for p in model.parameters():
        views.append(acc[offset:offset + p.numel()])
        offset += p.numel()
    w = torch.ones(len(x), device=x.device) if weights is None else weights
    clip = functools.partial(CLIPPING_RULES["flat"].factors, max_grad_norm=c)
    backend.accumulate(x, y, w, clip, views, torch.zeros((), device=x.device), torch.zeros((), device=x.device))
    backend.close()
    return acc.double().cpu(), backend


class Seq3d(nn.Module):
    """Linear layers on 3-D and 4-D inputs ([B, T, d]: Opacus sums per-sample outer products over T)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc_seq = nn.Linear(4, 5)  # on [B, 3, 4]: T = 3
        self.fc_grid = nn.Linear(5, 6, bias=False)  # on [B, 1, 3, 5]: T = 3
        self.head = nn.Linear(18, 3)

    def forward(self, x):
        h = torch.tanh(self.fc_seq(x.reshape(len(x), 3, 4)))  # [B, 3, 5]
        h = torch.tanh(self.fc_grid(h.unsqueeze(1)))  # [B, 1, 3, 6]
        return self.head(h.flatten(1))


def linear_2d():
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 7), nn.ReLU(), nn.Linear(7, 3)), (1, 3, 4)


def linear_3d():
    return Seq3d(), (1, 3, 4)


def convs():
    """Padding, stride, dilation, rectangular kernels, with and without bias."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.ReLU(),  # [B, 4, 5, 5]
        nn.Conv2d(4, 3, (3, 2), stride=(1, 2), padding=(2, 1), dilation=2, bias=False), nn.Tanh(),  # [B, 3, 5, 3]
        nn.Conv2d(3, 2, 1), nn.Flatten(), nn.Linear(30, 3)), (2, 9, 9)


def group_norm():
    """GroupNorm on the input (its dz is asked for) and after convs (taken by a hook during the backward)."""
    return nn.Sequential(nn.GroupNorm(1, 2), nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1, stride=2), nn.GroupNorm(4, 4, eps=1e-3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(36, 3)), (2, 6, 6)


MODELS = {"linear_2d": linear_2d, "linear_3d": linear_3d, "convs": convs, "group_norm": group_norm}


def batch(shape, n: int = 10, classes: int = 3, seed: int = 0, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, *shape, generator=g).to(device), torch.randint(0, classes, (n,), generator=g).to(device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("keep", [True, False], ids=["kept", "bookkeeping"])
@pytest.mark.parametrize("method", [GHOST, MATERIALISE, GROUPED, "auto"])
@pytest.mark.parametrize("arch", list(MODELS))
def test_clipped_sum_equals_opacus(arch, method, keep, device, monkeypatch):
    """Pass 2 both ways: from per-example gradients kept by pass 1, and by book-keeping (none kept)."""
    import dpvision.engines.ghost as ghost

    if not keep:
        monkeypatch.setattr(ghost, "KEEP_BUDGET", 0)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(1)
    model, shape = MODELS[arch]()
    model = model.to(device)
    x, y = batch(shape, device=device)
    ours, backend = manual_clipped_sum(model, x, y, C, method)
    ref = opacus_clipped_sum(model, x, y, C)
    assert ref.norm() > 0 and rel(ours, ref) < 1e-5
    used = {m for m in backend.chosen.values() if m is not None}  # None: 2-D Linear, GroupNorm (no choice)
    if method != "auto" and arch != "linear_2d":  # "grouped" is for convs: a 3-D Linear materialises
        assert used == ({MATERIALISE} if (method, arch) == (GROUPED, "linear_3d") else {method})


def test_unclipped_examples_match_plain_gradients():
    """With C far above every norm the clipped sum is the plain gradient of the summed loss (both methods)."""
    torch.manual_seed(2)
    model, shape = convs()
    x, y = batch(shape)
    F.cross_entropy(model(x), y, reduction="sum").backward()
    plain = flat(p.grad for p in model.parameters())
    for method in (GHOST, MATERIALISE, GROUPED):
        ours, _ = manual_clipped_sum(model, x, y, 1e6, method)
        assert rel(ours, plain) < 1e-5


def test_padding_slots_weigh_nothing():
    torch.manual_seed(3)
    model, shape = group_norm()
    x, y = batch(shape, n=9)
    w = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 0], dtype=torch.float32)
    keep = w.bool()
    for method in (GHOST, MATERIALISE):
        ours, _ = manual_clipped_sum(model, x, y, C, method, weights=w)
        assert rel(ours, opacus_clipped_sum(model, x[keep], y[keep], C)) < 1e-5


def test_norm_methods_chosen_by_shape():
    """Fewer multiply-adds wins: ghost for few positions and many channels, materialise for large maps."""
    def pick(c_in, c_out, side, stride=1):
        conv = nn.Conv2d(c_in, c_out, 3, stride, padding=1)
        return choose_method(conv, torch.zeros(1, c_in, side, side), torch.zeros(1, c_out, side // stride,
                                                                                  side // stride))
    assert pick(256, 256, 8) == GHOST  # WRN-16-4, 8x8 stage
    assert pick(128, 256, 16, stride=2) == GHOST  # its first conv (T = 64)
    assert pick(128, 128, 16) == GHOST  # 16x16 stage: the padded-input Gram (324^2 x 128) beats T d p
    assert pick(64, 64, 32) == MATERIALISE  # 32x32 stage
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),  # T = 16, d = 27, p = 8: materialise
                          nn.Conv2d(8, 64, 3, padding=1), nn.ReLU(),  # T = 16, d = 72, p = 64: ghost
                          nn.Flatten(), nn.Linear(64 * 16, 3))
    x, y = batch((3, 4, 4))
    ours, backend = manual_clipped_sum(model, x, y, C)
    assert backend.chosen == {"0": MATERIALISE, "2": GHOST, "5": None}
    assert rel(ours, opacus_clipped_sum(model, x, y, C)) < 1e-5


def test_chunked_examples_equal_one_chunk(monkeypatch):
    """A tiny patch budget forces one example per chunk: same sums."""
    import dpvision.engines.ghost as ghost

    torch.manual_seed(4)
    model, shape = convs()
    x, y = batch(shape)
    full = {m: manual_clipped_sum(model, x, y, C, m)[0] for m in (GHOST, MATERIALISE, GROUPED)}
    monkeypatch.setattr(ghost, "PATCH_BUDGET", 1)
    for m in (GHOST, MATERIALISE, GROUPED):
        assert rel(manual_clipped_sum(model, x, y, C, m)[0], full[m]) < 1e-6


def test_conv_patches_match_unfold():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(2, 3, 7, 8, generator=g)
    conv = nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 3))
    ref = F.unfold(a, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    assert torch.equal(conv_patches(conv, a), ref.transpose(1, 2))


@pytest.mark.parametrize(("stride", "padding", "dilation"), [(1, 1, 1), (2, 1, 1), (1, 2, 2), ((2, 1), (0, 2), (1, 3))])
def test_patch_gram_equals_unfolded_gram(stride, padding, dilation):
    """The padded-input Gram summed over kernel offsets is A A^T (both branches of patch_gram)."""
    g = torch.Generator().manual_seed(6)
    for side, c in ((9, 2), (5, 40)):  # small maps with many channels take the input-Gram branch
        a = torch.randn(3, c, side, side + 1, generator=g, dtype=torch.float64)
        conv = nn.Conv2d(c, 4, (3, 2), stride=stride, padding=padding, dilation=dilation)
        rows = conv_patches(conv, a)
        assert torch.allclose(patch_gram(conv, a), rows @ rows.transpose(1, 2), rtol=1e-12, atol=1e-10)


def test_in_place_op_after_layer_output():
    """ReLU(inplace=True) on a conv's and a GroupNorm's output: gradients w.r.t. the outputs before the change."""
    torch.manual_seed(5)

    def model(inplace: bool) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(inplace=inplace), nn.GroupNorm(2, 4),
                             nn.ReLU(inplace=inplace), nn.Flatten(), nn.Linear(4 * 7 * 7, 3))

    x, y = batch((2, 9, 9))
    ref = opacus_clipped_sum(model(False), x, y, C)
    for method in (GHOST, MATERIALISE):
        assert rel(manual_clipped_sum(model(True), x, y, C, method)[0], ref) < 1e-5


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="method"):
        ManualPerSample(nn.Linear(2, 2), method="fast")


def test_wide_resnet_equals_opacus():
    """The WRN-16-4 architecture (narrow: widen 1) on 8x8 images, every layer type at once."""
    wide_resnet = pytest.importorskip("dpvision.models.wide_resnet")
    torch.manual_seed(6)
    model = wide_resnet.WideResNet(in_channels=3, num_classes=4, depth=10, widen=1)
    x, y = batch((3, 8, 8), n=6, classes=4)
    ref = opacus_clipped_sum(model, x, y, C)
    for method in ("auto", GHOST, MATERIALISE, GROUPED):
        ours, _ = manual_clipped_sum(model, x, y, C, method)
        assert rel(ours, ref) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA")
@pytest.mark.parametrize("method", [GHOST, MATERIALISE])
def test_bf16_close_to_fp32_on_cuda(method):
    """Mixed precision (bf16 autocast and bf16 per-layer products): the clipped sum's error is below 1% of
    n C, the most n clipped gradients can add up to (relative to the sum itself it can be larger: the
    examples' gradients partly cancel, their rounding errors do not)."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(7)
    model, shape = group_norm()
    model = model.cuda()
    x, y = batch(shape, n=64, device="cuda")
    fp32, _ = manual_clipped_sum(model, x, y, C, method)
    bf16, _ = manual_clipped_sum(model, x, y, C, method, amp_dtype=torch.bfloat16)
    assert (bf16 - fp32).norm() < 1e-2 * len(x) * C



def test_keep_budget_is_a_sixteenth_of_the_card_on_cuda_and_fixed_on_the_cpu(monkeypatch):
    """The manual backend (augmult or not) may keep 1/16 of a CUDA card's memory of per-example gradients (every
    WRN-16-4 layer at B = 256: faster on the H100); on the CPU the fixed budget, so CPU runs repeat bit for bit."""
    import types

    import dpvision.engines.ghost as ghost
    import dpvision.engines.manual as manual
    from dpvision.engines.augmult import AugmultManual

    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    assert ManualPerSample(model).keep_budget == ghost.KEEP_BUDGET
    card = types.SimpleNamespace(total_memory=80 * 2 ** 30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: card)
    assert manual.keep_budget(torch.device("cuda")) == 80 * 2 ** 30 // 16 // 4  # float32 elements: 5 GiB
    small = types.SimpleNamespace(total_memory=2 ** 30)  # 1 GiB card: never below the CPU's budget
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: small)
    assert manual.keep_budget(torch.device("cuda")) == ghost.KEEP_BUDGET
    monkeypatch.setattr(manual, "keep_budget", lambda device: 123 if device.type == "cpu" else 0)
    augmult = AugmultManual(model, k=2, flip=False, generator=torch.Generator())
    assert augmult.keep_budget == ManualPerSample(model).keep_budget == 123  # one rule for both backends
