"""Starting from a checkpoint and fine-tuning part of a model (``dpvision.models.init``)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from dpvision.models.external import make_dp_compatible, resolve_model
from dpvision.models.init import (
    find_head, load_init, phase, prepare, read_state_dict, set_trainable, trainable_parameters,
)  # fmt: skip


def small_vit(num_classes: int) -> nn.Module:
    return torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2,
                                                hidden_dim=8, mlp_dim=16, num_classes=num_classes)


class HeadFirst(nn.Module):
    """The head is registered first: the last registered Linear is not the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.classify = nn.Linear(6, 4)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU())
        self.aux = nn.Linear(6, 4)  # registered last, never run

    def forward(self, x):
        return self.classify(self.body(x))


@pytest.mark.parametrize(("name", "head"), [("torchvision:resnet18", "fc"), ("torchvision:mobilenet_v3_small",
                                                                               "classifier.3")])
def test_find_head_of_torchvision_models(name, head):
    model = resolve_model(name, in_channels=3, num_classes=5, image_size=32)
    assert find_head(model, torch.zeros(1, 3, 32, 32)) == head


def test_find_head_follows_the_forward_not_the_registration():
    assert find_head(HeadFirst(), torch.zeros(1, 3, 2, 2)) == "classify"
    assert find_head(make_dp_compatible(small_vit(3)), torch.zeros(1, 3, 16, 16)) == "heads.head"
    with pytest.raises(ValueError, match="no nn.Linear layer computes the logits"):
        find_head(nn.Sequential(nn.Conv2d(3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()), torch.zeros(1, 3, 4, 4))


def test_round_trip_restores_every_tensor(tmp_path):
    torch.manual_seed(0)
    source, target = HeadFirst(), HeadFirst()
    torch.save(source.state_dict(), tmp_path / "w.pt")
    info = load_init(target, tmp_path / "w.pt")
    assert info == {"loaded": 6, "reset": [], "ignored": []}
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))


def test_shape_mismatch_names_the_tensor_and_both_shapes_and_changes_nothing(tmp_path):
    source = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 10))
    torch.save(source.state_dict(), tmp_path / "w.pt")
    target = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 4))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError) as err:
        load_init(target, tmp_path / "w.pt")
    assert str(err.value) == (f"model.init {tmp_path / 'w.pt'}: tensor 3.weight has shape [10, 6] in the file but "
                              "[4, 6] in the model (set model.init_head: reset to start the classifier head afresh)")
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # checked before any copy
    info = load_init(target, tmp_path / "w.pt", head="reset", head_name="3")
    assert info == {"loaded": 2, "reset": ["3.bias", "3.weight"], "ignored": []}
    assert torch.equal(target[1].weight, source[1].weight) and torch.equal(target[3].weight, before["3.weight"])
    with pytest.raises(ValueError, match=r"tensor 1.weight has shape \[6, 12\] in the file but \[6, 8\]"):
        load_init(nn.Sequential(nn.Flatten(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)), tmp_path / "w.pt",
                  head="reset", head_name="3")  # only the head is exempt


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    torch.save({"0.weight": torch.zeros(2, 4)}, tmp_path / "few.pt")
    with pytest.raises(ValueError, match=r"few.pt: the file has no tensor 0.bias \(1 missing in all\)$"):
        load_init(nn.Sequential(nn.Linear(4, 2)), tmp_path / "few.pt")
    torch.save({"0.weight": torch.zeros(2, 4), "0.bias": torch.zeros(2), "extra.weight": torch.zeros(1)},
               tmp_path / "many.pt")
    with pytest.raises(ValueError, match=r"many.pt: tensor extra.weight is not in the model \(1 unexpected"):
        load_init(nn.Sequential(nn.Linear(4, 2)), tmp_path / "many.pt")


def test_a_pickle_with_code_is_refused_without_running_it(tmp_path):
    class Boom:
        def __reduce__(self):
            return (exec, ("import pathlib; pathlib.Path('ran').write_text('x')",))

    torch.save({"0.weight": Boom()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"evil.pt: refused: the file holds Python objects, not only tensors"):
        read_state_dict(tmp_path / "evil.pt")
    assert not (tmp_path / "ran").exists()
    with pytest.raises(ValueError, match=r"nothing.pt: no such file$"):
        read_state_dict(tmp_path / "nothing.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"text.pt: (not a PyTorch state_dict file|refused)"):
        read_state_dict(tmp_path / "text.pt")


def test_wrappers_are_unwrapped(tmp_path):
    model = nn.Sequential(nn.Linear(4, 2))
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "ddp.pt")
    assert set(read_state_dict(tmp_path / "ddp.pt")) == {"0.weight", "0.bias"}


def test_pretrained_torchvision_weights_load_into_the_dp_compatible_model(tmp_path):
    """A BatchNorm ResNet's state_dict (as torchvision publishes it) into the GroupNorm ResNet: the affine
    parameters load, the running statistics are named as ignored, and a 1000-class head is reset."""
    torch.manual_seed(0)
    public = torchvision.models.resnet18(weights=None)  # 1000 classes, BatchNorm
    torch.save(public.state_dict(), tmp_path / "resnet18.pt")
    model = resolve_model("torchvision:resnet18", in_channels=3, num_classes=10, image_size=32)
    info = load_init(model, tmp_path / "resnet18.pt", head="reset", head_name=find_head(model,
                                                                                      torch.zeros(1, 3, 32, 32)))
    assert info["reset"] == ["fc.bias", "fc.weight"] and "bn1.running_mean" in info["ignored"]
    assert len(info["ignored"]) == 3 * 20  # 20 BatchNorms, 3 statistics each
    assert torch.equal(model.layer1[0].conv1.weight, public.layer1[0].conv1.weight)
    assert torch.equal(model.bn1.weight, public.bn1.weight)


def test_packed_attention_weights_load_into_dp_attention(tmp_path):
    """nn.MultiheadAttention's in_proj_weight is split into DPMultiheadAttention's q/k/v: the same function."""
    torch.manual_seed(0)
    public = small_vit(3)
    torch.save(public.state_dict(), tmp_path / "vit.pt")
    model = make_dp_compatible(small_vit(3))
    info = load_init(model, tmp_path / "vit.pt")
    assert info["ignored"] == [] and info["loaded"] == len(model.state_dict())
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(model(x), public(x), atol=1e-5)


def test_fine_tuning_modes():
    model = HeadFirst()
    assert set_trainable(model, "linear_probe", head_name="classify") == ["classify.weight", "classify.bias"]
    assert [p.numel() for p in trainable_parameters(model)] == [24, 4]
    assert len(set_trainable(model, "all")) == 6
    assert [phase("probe_then_all", e, probe_epochs=1) for e in (1, 2)] == ["linear_probe", "all"]
    assert phase("linear_probe", 5, probe_epochs=0) == "linear_probe"
    with pytest.raises(ValueError, match="model.finetune must be one of"):
        phase("probe", 1, probe_epochs=1)
    with pytest.raises(ValueError, match="model.init_head must be one of"):
        load_init(model, "x.pt", head="drop")


def test_prepare_fine_tunes_a_public_checkpoint_with_a_linear_probe_then_everything(tmp_path):
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "public.pt")
    model = resolve_model("torchvision:resnet18", in_channels=3, num_classes=10, image_size=32)
    example = torch.zeros(1, 3, 32, 32)
    first = prepare(model, example, init=tmp_path / "public.pt", init_head="reset", finetune="probe_then_all",
                    probe_epochs=1, epoch=1)
    assert first["head"] == "fc" and first["mode"] == "linear_probe" and first["trainable"] == ["fc.weight",
                                                                                                "fc.bias"]
    assert first["init"]["reset"] == ["fc.bias", "fc.weight"]
    second = prepare(model, example, finetune="probe_then_all", probe_epochs=1, epoch=2)
    assert second["mode"] == "all" and len(second["trainable"]) == len(list(model.parameters()))
    assert prepare(model, example)["head"] is None  # nothing needs the head: no forward is run
