"""Starting from a checkpoint (``model.init``) and fine-tuning only part of a model.

:func:`load_init` reads a ``state_dict`` file with ``torch.load(weights_only=True)``: the safe unpickler
builds tensors and plain containers only and never runs code from the file (a pickle that holds anything
else is refused in one line). The file is matched to the model key by key, and every mismatch is one
``ValueError`` line naming ``model.init``, the file and the tensor:

* a tensor of another shape: its name and both shapes; with ``head="reset"`` the classifier head's
  tensors (:func:`find_head`) are exempt, and keep their fresh initialisation instead (fine-tuning a
  model pretrained on another number of classes);
* a tensor the model has but the file lacks (``missing``), or the file has but the model lacks
  (``unexpected``). Exempt: a private input normalisation's statistics (:class:`ChannelStandardize`: the run
  fits them after loading, so a checkpoint of the same model with a GroupNorm starts it), and, because the
  model was made DP-compatible after it was saved, a BatchNorm's
  running statistics where the model now has a GroupNorm (its ``weight``/``bias`` load into the
  GroupNorm), and ``nn.MultiheadAttention``'s packed ``in_proj_weight``/``in_proj_bias``, split into
  Opacus's ``DPMultiheadAttention`` q/k/v projections (the same function).

Fine-tuning modes (``FINETUNE_MODES``): ``all`` trains every parameter, ``linear_probe`` only the head's,
``probe_then_all`` the head's for the first ``probe_epochs`` epochs and then every parameter
(:func:`phase`). :func:`set_trainable` applies a mode through ``requires_grad``; :func:`prepare` does all of
it for a job (``model.init``, ``model.init_head``, ``model.finetune``, ``model.probe_epochs``).

Example:
    >>> import torch, tempfile, os
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> find_head(net, torch.zeros(1, 1, 2, 2))
    '3'
    >>> path = os.path.join(tempfile.mkdtemp(), "init.pt")
    >>> torch.save(nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 5)).state_dict(), path)
    >>> load_init(net, path, head="keep")
    Traceback (most recent call last):
    ...
    ValueError: model.init ...init.pt: tensor 3.weight has shape [5, 8] in the file but [3, 8] in the model (set model.init_head: reset to start the classifier head afresh)
    >>> load_init(net, path, head="reset", head_name="3")
    {'loaded': 2, 'reset': ['3.bias', '3.weight'], 'ignored': []}
    >>> set_trainable(net, "linear_probe", head_name="3")
    ['3.weight', '3.bias']
"""

from __future__ import annotations

import os
import pickle

import torch
from torch import nn

from dpvision.models.input_norm import ChannelStandardize

FINETUNE_MODES = ("all", "linear_probe", "probe_then_all")
HEAD_MODES = ("keep", "reset")
BATCHNORM_STATS = ("running_mean", "running_var", "num_batches_tracked")
NESTED_KEYS = ("state_dict", "model")  # {"state_dict": {...}} / {"model": {...}} as training scripts save them
WRAPPER_PREFIXES = ("module.", "_module.")  # DistributedDataParallel / Opacus GradSampleModule


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a ``state_dict`` file (on the CPU), loaded without running any code from it."""
    where = f"model.init {os.fspath(path)}"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{where}: no such file") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        if isinstance(err, pickle.UnpicklingError) or "weights_only" in str(err):
            raise ValueError(f"{where}: refused: the file holds Python objects, not only tensors (it is loaded "
                             "with weights_only=True, which never runs code from it); save "
                             "model.state_dict() with torch.save") from None
        raise ValueError(f"{where}: not a PyTorch state_dict file ({str(err).splitlines()[0][:200]})") from None
    for key in NESTED_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict) and len(state) <= 3:
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ValueError(f"{where}: not a state_dict (a mapping of names to tensors), got {type(state).__name__}")
    for prefix in WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def find_head(model: nn.Module, example: torch.Tensor) -> str:
    """The name of the classifier head: the last ``nn.Linear`` to run whose output is the logits' width.

    Found by running ``model`` once on ``example`` [1, C, H, W] (hooks record the Linear layers in the
    order they run), so it holds for any forward, not only for modules registered in forward order.
    """
    ran: list[tuple[str, int]] = []
    names = {m: n for n, m in model.named_modules()}
    hooks = [m.register_forward_hook(lambda mod, i, out: ran.append((names[mod], out.shape[-1])))
             for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            logits = model(example)
    finally:
        for h in hooks:
            h.remove()
    heads = [name for name, width in ran if width == logits.shape[-1]]
    if not heads:
        raise ValueError(f"{type(model).__name__}: no nn.Linear layer computes the logits, so there is no "
                         "classifier head for model.init_head: reset or model.finetune: linear_probe")
    return heads[-1]


def _attention_keys(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with packed ``in_proj_*`` tensors split for the model's ``DPMultiheadAttention`` layers."""
    from opacus.layers import DPMultiheadAttention  # noqa: PLC0415 (only models made DP-compatible have it)

    state = dict(state)
    for name, module in model.named_modules():
        if not isinstance(module, DPMultiheadAttention):
            continue
        prefix = f"{name}." if name else ""
        for kind in ("weight", "bias"):
            packed = state.pop(f"{prefix}in_proj_{kind}", None)
            if packed is not None:  # [3 E, ...] -> q, k, v [E, ...] (nn.MultiheadAttention's order)
                for proj, part in zip(("qlinear", "klinear", "vlinear"), packed.chunk(3, dim=0)):
                    state[f"{prefix}{proj}.{kind}"] = part
    return state


def load_init(model: nn.Module, path: str | os.PathLike, *, head: str = "keep",
              head_name: str | None = None) -> dict:
    """Copy the checkpoint at ``path`` into ``model``'s parameters and buffers, in place.

    ``head``: ``"keep"`` (every tensor must match) or ``"reset"`` (the tensors of module ``head_name``,
    the classifier head, are skipped when their shapes differ). Returns ``{"loaded": n, "reset": [...],
    "ignored": [...]}`` (the head tensors left fresh; the file's tensors that no longer apply).
    """
    if head not in HEAD_MODES:
        raise ValueError(f"model.init_head must be one of {HEAD_MODES}, got {head!r}")
    if head == "reset" and head_name is None:
        raise ValueError("load_init(head='reset') needs head_name (find_head(model, example))")
    where = f"model.init {os.fspath(path)}"
    state = _attention_keys(model, read_state_dict(path))
    own = model.state_dict()
    modules = dict(model.named_modules())
    ignored = sorted(k for k in state if k not in own and _is_converted_batchnorm(k, modules))
    unexpected = [k for k in state if k not in own and k not in ignored]
    if unexpected:
        raise ValueError(f"{where}: tensor {unexpected[0]} is not in the model ({len(unexpected)} unexpected "
                         f"in all; the model's first tensors: {', '.join(list(own)[:3])})")
    missing = [k for k in own if k not in state and not isinstance(modules.get(k.rpartition(".")[0]),
                                                                       ChannelStandardize)]
    if missing:
        raise ValueError(f"{where}: the file has no tensor {missing[0]} ({len(missing)} missing in all)")
    reset = []
    for key, value in state.items():
        if key in ignored or value.shape == own[key].shape:
            continue
        if head == "reset" and key.rpartition(".")[0] == head_name:
            reset.append(key)
            continue
        hint = " (set model.init_head: reset to start the classifier head afresh)" if head == "keep" else ""
        raise ValueError(f"{where}: tensor {key} has shape {list(value.shape)} in the file but "
                         f"{list(own[key].shape)} in the model{hint}")
    keep = {k: v for k, v in state.items() if k not in ignored and k not in reset}
    with torch.no_grad():
        for key, value in keep.items():
            own[key].copy_(value)  # state_dict() tensors share storage with the parameters/buffers
    return {"loaded": len(keep), "reset": sorted(reset), "ignored": ignored}


def _is_converted_batchnorm(key: str, modules: dict[str, nn.Module]) -> bool:
    owner, _, attr = key.rpartition(".")
    return attr in BATCHNORM_STATS and isinstance(modules.get(owner), nn.GroupNorm)


def set_trainable(model: nn.Module, mode: str, *, head_name: str | None = None) -> list[str]:
    """Set ``requires_grad`` for fine-tuning ``mode`` (``"all"`` or ``"linear_probe"``); the trainable names.

    ``probe_then_all`` is not a state of the model: ask :func:`phase` which of the two an epoch is in.
    """
    if mode not in ("all", "linear_probe"):
        raise ValueError(f"set_trainable mode must be 'all' or 'linear_probe' (see phase()), got {mode!r}")
    if mode == "linear_probe" and head_name is None:
        raise ValueError("linear_probe needs head_name (find_head(model, example))")
    prefix = f"{head_name}."
    for name, param in model.named_parameters():
        param.requires_grad_(mode == "all" or name.startswith(prefix))
    return [name for name, param in model.named_parameters() if param.requires_grad]


def phase(mode: str, epoch: int, probe_epochs: int) -> str:
    """The mode epoch ``epoch`` (1-based) trains in: ``probe_then_all`` probes for ``probe_epochs`` epochs.

    >>> [phase("probe_then_all", e, probe_epochs=2) for e in (1, 2, 3)]
    ['linear_probe', 'linear_probe', 'all']
    """
    if mode not in FINETUNE_MODES:
        raise ValueError(f"model.finetune must be one of {FINETUNE_MODES}, got {mode!r}")
    if mode == "probe_then_all":
        return "linear_probe" if epoch <= probe_epochs else "all"
    return mode


def prepare(model: nn.Module, example: torch.Tensor, *, init: str | os.PathLike | None = None,
            init_head: str = "keep", finetune: str = "all", probe_epochs: int = 0, epoch: int = 1) -> dict:
    """``model.init`` and ``model.finetune`` applied to a freshly built ``model`` for epoch ``epoch`` (1-based).

    ``example`` [1, C, H, W] finds the head (:func:`find_head`) when one is needed. Returns what was done:
    ``{"head": name or None, "mode": "all"|"linear_probe", "trainable": [names], "init": load_init's
    answer or None}``. Call it again with the next epoch for ``probe_then_all``: the mode changes after
    ``probe_epochs`` epochs (the engine must then be rebuilt on the new trainable set).
    """
    mode = phase(finetune, epoch, probe_epochs)
    needs_head = init_head == "reset" or finetune != "all"
    head = find_head(model, example) if needs_head else None
    loaded = load_init(model, init, head=init_head, head_name=head) if init is not None else None
    return {"head": head, "mode": mode, "trainable": set_trainable(model, mode, head_name=head), "init": loaded}


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters a DP step updates, in ``model.parameters()`` order (P counts only these)."""
    return [p for p in model.parameters() if p.requires_grad]


__all__ = ["FINETUNE_MODES", "HEAD_MODES", "find_head", "load_init", "phase", "prepare", "read_state_dict",
           "set_trainable", "trainable_parameters"]
