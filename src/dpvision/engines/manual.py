"""The manual per-sample backend: exact per-example norms by per-layer rules, then the clipped sum by book-keeping.

Layers and parameters it computes exactly (anything else: :class:`UnsupportedModelError`, and the engine
falls back to the next backend with its notice; a parameter is never skipped):

* ``nn.Linear`` (inputs [B, d] or [B, ..., d]: the positions are more rows of the example), ``nn.Conv2d``
  (groups 1, zero padding) and ``WSConv2d``: :mod:`dpvision.engines.ghost`;
* affine ``nn.GroupNorm`` (:mod:`.group_norm`) and ``nn.LayerNorm`` (:mod:`.layer_norm`): per-example
  gradients [B, C] formed once;
* torchvision ViT's ``class_token`` and ``pos_embedding`` (:mod:`.tokens`): from the gradient at the
  encoder's summed tokens, one more output gradient of the same backward. Only with ``tokens`` (the fast engine:
  when ``grad_sample_mode='manual'`` is asked for): on an H100 ViT-B/16 at B = 32 ran 85 ms a step here against
  56 ms on the vmap backend (the engine's default for it), with 4x less memory (9.4 GB against 36 GB).

Opacus's ``DPMultiheadAttention`` (what :mod:`dpvision.models.external` makes of ``nn.MultiheadAttention``)
computes its projections with plain ``nn.Linear`` modules on [B, T, D] (batch first), so torchvision's
ViT needs nothing more.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import get_gradient_edge

import dpvision.engines.ghost as ghost
from dpvision.engines.base import UnsupportedModelError
from dpvision.engines.clipping import ClipFn
from dpvision.engines.ghost import GHOST, METHODS, add_clipped_sum, fastest_method, layer_method, layer_norm_sq, sum_sq
from dpvision.engines.group_norm import group_norm_norm_sq
from dpvision.engines.layer_norm import layer_norm_norm_sq
from dpvision.engines.rounding import fp32_matmuls, margin, reduction_length, squares_length
from dpvision.engines.tokens import check_tokens, token_gradients, token_source
from dpvision.models.layers import WSConv2d

KEPT_AMP_MAX_EXAMPLES = 512  # see ManualPerSample.kept_amp_max_examples
# On CUDA pass 1 may keep 1/16 of the card's memory of per-example gradients (float32; 5 GB of an 80 GB card): a
# kept layer's pass 2 is a matrix-vector product instead of a float32 weight-gradient pass (under bf16 its pass 1
# a tensor-core one, :mod:`.rounding`). H100, WRN-16-4, B = 256, bf16, two runs (session 12, bench_dpsgd.py): 15.3
# ms a step with every layer kept against 17.8 ms within ghost.KEEP_BUDGET; the CPU keeps that budget, bit for bit.
KEEP_MEMORY_FRACTION = 1 / 16
# Layers with fewer multiply-adds (B T d p) than this keep the shape rule's method on CUDA too: timing
# them eagerly would measure kernel-launch overhead, not the GPU time that counts inside a CUDA graph.
AUTOTUNE_MIN_MACS = 1 << 28
# Nor are chunks of fewer examples timed (the engine's probe of two examples; with K views an example it passes
# the MACs bar): the method timed fastest there is kept for every chunk of that per-example shape.
AUTOTUNE_MIN_EXAMPLES = 16
NORM_LAYERS = (nn.GroupNorm, nn.LayerNorm)  # per-example gradients [B, C] taken during the backward


def norm_layer_sq(module: nn.Module, a: torch.Tensor, dz: torch.Tensor, exact: bool):
    """([B] squared norms, (gamma, beta) per-example gradients [B, C], beta None without bias) of an affine
    GroupNorm or LayerNorm; ``exact``: LayerNorm's sums of squares in float64."""
    if isinstance(module, nn.LayerNorm):
        return layer_norm_norm_sq(module, a, dz, exact)
    return group_norm_norm_sq(module, a, dz)


def norm_layer_chain(module: nn.Module, exact: bool) -> int:
    """fp32 roundings behind a GroupNorm's or LayerNorm's squared norm (:mod:`.rounding`): its gradients [B, C]
    are the very tensors summed, so only their sums of squares."""
    if isinstance(module, nn.LayerNorm):
        return squares_length(2 * module.weight.numel(), exact)
    return 2 * module.num_channels


def check_layer(module: nn.Module, attr: str, supported: tuple) -> None:
    """``UnsupportedModelError`` unless parameter ``attr`` of ``module`` has an exact rule here."""
    if not all(q.requires_grad for q in module.parameters(recurse=False)):  # layer formulas cover both
        raise UnsupportedModelError(f"manual per-sample gradients: partly frozen {type(module).__name__}")
    if type(module) not in supported or attr not in ("weight", "bias"):
        raise UnsupportedModelError(f"manual per-sample gradients: unsupported layer {type(module).__name__}")
    if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"
                                          or isinstance(module.padding, str)):
        raise UnsupportedModelError("manual per-sample gradients: grouped/padded-mode Conv2d")
    if isinstance(module, NORM_LAYERS) and module.weight is None:
        raise UnsupportedModelError(f"manual per-sample gradients: {type(module).__name__} without affine")


def keep_budget(device: torch.device) -> int:
    """Elements of per-example gradients pass 1 may keep for pass 2 on ``device`` (``KEEP_MEMORY_FRACTION``)."""
    if device.type != "cuda":
        return ghost.KEEP_BUDGET
    memory = torch.cuda.get_device_properties(device).total_memory
    return max(ghost.KEEP_BUDGET, int(memory * KEEP_MEMORY_FRACTION) // 4)


class ManualPerSample:
    """Exact per-example norms without per-example gradients, then the clipped sum by book-keeping.

    Forward hooks keep each layer's input ``a`` and the autograd edge of its output (not the output
    itself, so its memory is freed as in plain training, and an in-place op after the layer is
    harmless); one ``autograd.grad`` of the summed loss to those edges gives each Linear/Conv2d
    output gradient ``dz`` (autograd skips the weight gradients nobody asked for). GroupNorm's and
    LayerNorm's per-example gradients [B, C] are taken by a tensor hook during that backward, so their
    ``dz`` is never kept; a ViT's class token and position embedding take theirs from the gradient at the
    encoder's summed tokens (:mod:`dpvision.engines.tokens`). Pass 1, per Linear/Conv2d layer
    (:mod:`dpvision.engines.ghost`): squared per-example norms, by ghost norms or by materialising that
    layer's per-example gradients (unfolded patches and one batched product, or cuDNN's grouped
    weight-gradient kernel): on the CPU whichever the layer's shapes make cheaper, on CUDA whichever ran
    fastest when timed at the first chunk of that per-example shape
    (``autotune``; ``method`` forces one for every Linear/Conv2d, for tests). All are exact. Then the
    clip factors f_i = w_i clip(||g_i||). Pass 2, per layer: sum_i f_i g_i as the batch weight
    gradient of the output gradients scaled by f (one cuDNN weight-gradient call per conv). Nothing
    per-example outlives its layer; graph-capturable. Where the engine fused GroupNorm -> ReLU -> pool
    (:mod:`dpvision.engines.fused`), that backward hands over the GroupNorm's per-example gradients and the
    per-example bias gradients of the conv before it (:meth:`group_norm_gradients`) instead.

    ``amp_dtype`` (set by the engine for ``precision="bf16"``): autocast of forward/backward, each
    conv and Linear input cast once to that dtype by a pre-hook (the copy autograd and pass 2 share). In every
    precision both passes run in IEEE fp32 (TF32 off) on those stored operands upcast, except that the
    per-example gradients kept for pass 2 are formed from the bf16 operands themselves (tensor cores; their
    norms, in float64, are of the very numbers summed), and under ``tf32``/``bf16`` the factors are taken at
    norm (1 + eta) (:mod:`dpvision.engines.rounding`).

    ``views`` = K > 1 (augmentation multiplicity, :class:`dpvision.engines.augmult.AugmultManual`): ``x`` holds
    K consecutive views of each of the B examples of ``y`` [B]; the loss is each example's mean over its
    views, and every layer's per-example gradient sums over the example's views (:mod:`.ghost`: the views
    are more rows of the example), so one clipping factor per example multiplies the mean over its views.
    """

    name = "manual"
    # exact types: a subclass may compute otherwise
    SUPPORTED = (nn.Linear, nn.Conv2d, WSConv2d, nn.GroupNorm, nn.LayerNorm)

    def __init__(self, model: nn.Module, *, method: str = "auto", tokens: bool = True) -> None:
        if method not in METHODS:
            raise ValueError(f"manual per-sample method must be one of {METHODS}, got {method!r}")
        self.model = model
        self.method = method
        modules = dict(model.named_modules())
        self.entries = []  # (module, attribute) of the trainable parameters, in model.parameters() order
        self.tokens: dict[nn.Module, nn.Module] = {}  # owner of a ViT token parameter -> its torchvision Encoder
        for name, param in model.named_parameters():
            if not param.requires_grad:  # frozen: no per-example gradient, no clipping, no noise
                continue
            owner, _, attr = name.rpartition(".")
            module = modules[owner]
            encoder = token_source(module, attr)
            if encoder is not None and not tokens:  # the engine's default: vmap, faster for ViT-B/16 on an H100
                raise UnsupportedModelError("manual per-sample gradients: a ViT's class token and position "
                                            "embedding need grad_sample_mode='manual' (asked for explicitly)")
            if encoder is not None:
                self.tokens[module] = encoder
            else:
                check_layer(module, attr, self.SUPPORTED)
            self.entries.append((module, attr))
        self.layers = [m for m in dict.fromkeys(m for m, _ in self.entries) if m not in self.tokens]
        self.names = {m: n for n, m in model.named_modules() if m in self.layers}
        # layer (or ViT Encoder) -> (input, output edge or None). An in-place change of a stored input after its
        # layer is caught by autograd itself (every supported layer saves its input for backward).
        self._store: dict[nn.Module, tuple] = {}
        self._norm_layers: dict[nn.Module, tuple] = {}  # GroupNorm/LayerNorm -> (squared norms [B], state)
        self._conv_bias: dict[nn.Module, torch.Tensor] = {}  # Conv2d -> per-example bias gradients, fused blocks
        self._active = False
        self.amp_dtype: torch.dtype | None = None
        # Set by the engine for precision "tf32"/"bf16" (as is amp_dtype for bf16): the clip factors are
        # taken at norm (1 + eta), eta covering the fp32 rounding of both passes (:mod:`.rounding`).
        self.reduced_precision = False
        # CUDA with method "auto": time the exact methods once per layer and shape, keep the fastest
        # (off: the shape rule, as on the CPU, where runs must repeat bit for bit).
        self.autotune = True
        self._tuned: dict[tuple, str] = {}
        self.views = 1  # K views of each example, consecutive in x (augmult)
        first = next(model.parameters(), None)  # elements of per-example gradients pass 1 may keep for pass 2
        self.keep_budget = keep_budget(first.device if first is not None else torch.device("cpu"))
        # Kept gradients from the bf16 operands in chunks of at most 512 examples only (H100, WRN-16-4, bf16):
        # 1,024 examples, K = 1 / 4: 3.6k / 9.1k views/s against 14.6k / 17.9k in fp32 (session 10); 512 examples,
        # K = 4: 26.2k against 14.4k in fp32 and 22.2k in chunks of 256 (session 13, bench_augmult.py); B = 256
        # (chunks of up to 328 examples): 12.5 / 12.8 ms a step against 15.2 with the limit at 256 (bench_dpsgd.py).
        self.kept_amp_max_examples = KEPT_AMP_MAX_EXAMPLES
        self.chosen: dict[str, str | None] = {}  # layer name -> norm method of the last chunk (reports)
        self._handles = [m.register_forward_hook(self._hook) for m in self.layers]
        self._handles += [m.register_forward_pre_hook(self._cast_input) for m in self.layers
                          if isinstance(m, (nn.Conv2d, nn.Linear))]
        self._handles += [e.dropout.register_forward_pre_hook(lambda _, inputs, e=e: self._token_hook(e, inputs[0]))
                          for e in dict.fromkeys(self.tokens.values())]

    @property
    def _exact(self) -> bool:
        """Reduced precision: clip at a margin, the long sums of squares in float64 (:mod:`.rounding`)."""
        return self.reduced_precision or self.amp_dtype is not None

    def _cast_input(self, module, inputs):
        x = inputs[0]
        if self._active and self.amp_dtype is not None and x.is_floating_point() and x.dtype != self.amp_dtype:
            return (x.to(self.amp_dtype), *inputs[1:])
        return None

    def _hook(self, module, inputs, output):
        if not self._active:
            return
        if module in self._store:  # weight sharing: the per-layer formulas would miss a use
            raise UnsupportedModelError(f"manual per-sample gradients: {type(module).__name__} used twice")
        a = inputs[0].detach()
        if isinstance(module, NORM_LAYERS) and inputs[0].requires_grad:
            # Its backward runs on the way to an earlier layer's output: take the gradients there.
            output.register_hook(lambda dz, m=module, a=a: self._norm_layer_hook(m, a, dz))
            self._store[module] = (a, None)
        else:
            self._store[module] = (a, get_gradient_edge(output))

    def _norm_layer_hook(self, module, a, dz):
        with torch.no_grad():
            self._norm_layers[module] = norm_layer_sq(module, a, dz, self._exact)
        self._store[module] = (None, None)  # its input is not needed any more: let autograd free it

    def _token_hook(self, encoder: nn.Module, h: torch.Tensor) -> None:
        """The encoder's dropout input h = tokens + pos_embedding [B, T, D]: its gradient is asked for."""
        if not self._active:
            return
        if encoder in self._store:
            raise UnsupportedModelError("manual per-sample gradients: ViT Encoder used twice")
        check_tokens(encoder, h)
        self._store[encoder] = (None, get_gradient_edge(h))

    def group_norm_gradients(self, module: nn.GroupNorm, gw: torch.Tensor, gb: torch.Tensor,
                             conv: nn.Conv2d | None = None, conv_bias: torch.Tensor | None = None) -> None:
        """From a fused block's backward (:mod:`.fused`): example i's GroupNorm gradients [B, C] each, and
        the per-example bias gradients [B, C] of the conv whose output the GroupNorm normalised."""
        self._norm_layers[module] = (sum_sq(gw) + sum_sq(gb), (gw, gb))
        if conv is not None and conv.bias is not None:
            self._conv_bias[conv] = conv_bias

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor):
        """(logits [B K, classes], losses [B K], {layer: dz} for the layers whose output edge was kept); dz are the
        gradients of the examples' losses, each the mean over its K views."""
        self._store.clear()
        self._norm_layers.clear()
        self._conv_bias.clear()
        self._active = True
        try:
            with torch.enable_grad(), torch.autocast(x.device.type, dtype=self.amp_dtype or torch.bfloat16,
                                                     enabled=self.amp_dtype is not None):
                logits = self.model(x).float()  # [B, classes]
        finally:
            self._active = False
        losses = F.cross_entropy(logits, y, reduction="none")  # [B]
        edges = {m: edge for m, (_, edge) in self._store.items() if edge is not None}
        total = losses.sum() if self.views == 1 else losses.sum() / self.views
        dzs = torch.autograd.grad(total, list(edges.values()))
        return logits, losses, dict(zip(edges, dzs))

    def _method(self, module, a: torch.Tensor, dz: torch.Tensor, kept_dtype: torch.dtype) -> str | None:
        """The norm method: forced, by the shape rule, or (CUDA, "auto") the fastest as timed at first sight
        (ghost in float32, the materialising methods in ``kept_dtype``, as pass 1 would run them)."""
        method = layer_method(module, a, dz, self.method)
        if self.method != "auto" or method is None or a.device.type != "cuda" or not self.autotune:
            return method
        t, d, p = ghost.layer_shape(module, a, dz)
        if len(a) * t * d * p < AUTOTUNE_MIN_MACS or len(a) < AUTOTUNE_MIN_EXAMPLES:
            return method
        # Per layer and per-example shape: the fast engine's bucket sizes differ only in the batch
        # dimension, and are timed once (at the largest, captured first) instead of once per bucket.
        key = (module, tuple(a.shape[1:]), a.dtype, tuple(dz.shape[1:]), dz.dtype, kept_dtype)
        if key not in self._tuned:
            if torch.cuda.is_current_stream_capturing():  # no timing inside a graph capture
                return method
            self._tuned[key] = fastest_method(module, a, dz, torch.float32, kept_dtype=kept_dtype)
        return self._tuned[key]

    def accumulate(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, clip: ClipFn,
                   acc_views: list[torch.Tensor], loss_sum: torch.Tensor, correct: torch.Tensor) -> None:
        k = self.views
        logits, losses, dzs = self._forward_backward(x, y if k == 1 else y.repeat_interleave(k))
        views: dict[nn.Module, dict[str, torch.Tensor]] = {}
        for (m, attr), view in zip(self.entries, acc_views):
            views.setdefault(m, {})[attr] = view
        # Both passes in IEEE fp32 on the stored operands, whatever the forward/backward ran in, except for
        # kept per-example gradients: formed from the bf16 operands, they are the very numbers pass 2 sums
        # (:mod:`dpvision.engines.rounding`): norm and sum are then the same function of the same numbers.
        with torch.no_grad(), fp32_matmuls():
            norm_sq, states, chains = self._norms(x, dzs, exact=self._exact)
            norms = norm_sq.sqrt()  # [B]
            if self._exact:  # clip an upper bound of the norm
                norms = norms * (1 + margin(chains))
            factors = clip(norms) * w  # [B]
            for m, state in states.items():  # pass 2: clipped sums by book-keeping, into the views
                if m in self.tokens:  # {attribute: per-example gradients [B, numel]}
                    for attr, grads in state.items():
                        views[m][attr].addmv_(grads.t(), factors)
                    continue
                a = self._store.get(m, (None,))[0]  # None for a norm layer (its state holds all it needs)
                add_clipped_sum(m, self._by_example(a), self._by_example(dzs.pop(m, None)), factors, state,
                                torch.float32, views[m])
            if k > 1:  # each example's mean loss and mean logits over its views (as the vmap path reports)
                losses, logits = losses.view(-1, k).mean(1), logits.view(-1, k, logits.shape[-1]).mean(1)
            loss_sum.add_((losses.detach() * w).sum())
            correct.add_(((logits.detach().argmax(1) == y).float() * w).sum())
        self._store.clear()

    def _by_example(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """[B K, ...] -> [B, K, ...] (a view) when K > 1: the layout :mod:`.ghost` reads as K views of each example."""
        return t if t is None or self.views == 1 else t.view(-1, self.views, *t.shape[1:])

    def _sum_views(self, entry):
        """A norm layer's (squared norms, (gamma, beta) gradients [B K, C]) of the views -> of the examples (sums
        over the views), or per-example gradients [B K, ...] (a fused block's conv bias, a ViT's tokens) -> [B, ...]."""
        if self.views == 1 or entry is None:
            return entry
        if isinstance(entry, torch.Tensor):
            return entry.view(-1, self.views, *entry.shape[1:]).sum(1)
        gw, gb = (None if g is None else g.view(-1, self.views, g.shape[-1]).sum(1) for g in entry[1])  # [B, C]
        return sum_sq(gw, self._exact) + (0 if gb is None else sum_sq(gb, self._exact)), (gw, gb)

    def _token_norms(self, dzs: dict, exact: bool) -> tuple[torch.Tensor, dict, list[int]]:
        """A ViT's class token and position embedding: ([B] squared norms, {owner: {attribute: per-example
        gradients [B, numel]}}, rounding chains); their encoder's dz leaves ``dzs``."""
        dhs = {}  # Encoder -> dh [B, T, D], float32 (float64 stays float64)
        for e in dict.fromkeys(self.tokens.values()):
            if e in dzs:
                dh = dzs.pop(e)
                dhs[e] = self._sum_views(dh.to(torch.promote_types(dh.dtype, torch.float32)))
        norm_sq, states, chains = 0, {}, []
        for m, attr in self.entries:
            if m in self.tokens and self.tokens[m] in dhs:
                grads = token_gradients(attr, dhs[self.tokens[m]])  # [B, numel]
                states.setdefault(m, {})[attr] = grads
                norm_sq = norm_sq + sum_sq(grads, exact)
                chains.append(squares_length(grads.shape[1], exact))
        return norm_sq, states, chains

    def _kept_dtype(self, examples: int) -> torch.dtype:
        """The dtype whose operands form the per-example gradients kept for pass 2 in a chunk of ``examples``:
        the forward's (bf16 under ``amp_dtype``: tensor cores) up to ``kept_amp_max_examples`` examples, else
        float32; either way the kept numbers are both the norm's and the sum's (:mod:`.rounding`)."""
        return self.amp_dtype if self.amp_dtype and examples <= self.kept_amp_max_examples else torch.float32

    def _norms(self, x: torch.Tensor, dzs: dict, exact: bool) -> tuple[torch.Tensor, dict, list[int]]:
        """Pass 1: ([B] squared per-example norms, each layer's state for pass 2, each layer's rounding
        chain length for :func:`~dpvision.engines.rounding.margin`). A layer the forward skipped: gradient 0.
        ``exact``: the long sums of squares in float64 (shorter chains: a smaller margin)."""
        b = len(x) // self.views
        norm_sq = torch.zeros(b, device=x.device)  # [B]
        token_sq, states, chains = self._token_norms(dzs, exact)
        norm_sq += token_sq
        room = self.keep_budget  # elements of per-example gradients still to keep
        kept_dtype = self._kept_dtype(b)
        for m in self.layers:
            if m in self._norm_layers:
                sq, states[m] = self._sum_views(self._norm_layers.pop(m))
                chains.append(norm_layer_chain(m, exact))
            elif m in dzs:
                a = self._store[m][0]
                if isinstance(m, NORM_LAYERS):  # input without gradient: its dz was asked for
                    sq, states[m] = self._sum_views(norm_layer_sq(m, a, dzs[m], exact))
                    chains.append(norm_layer_chain(m, exact))
                else:
                    a, dz = self._by_example(a), self._by_example(dzs[m])
                    fits = b * m.weight.numel() <= room
                    method = self._method(m, a, dz, kept_dtype if fits else torch.float32)
                    self.chosen[self.names[m]] = method
                    keep = method not in (None, GHOST) and fits
                    room -= b * m.weight.numel() if keep else 0
                    bias = self._sum_views(self._conv_bias.pop(m, None))
                    sq, states[m] = layer_norm_sq(m, a, dz, method, kept_dtype if keep else torch.float32, keep,
                                                  bias_grads=bias, exact=exact)
                    chains.append(reduction_length(method, *ghost.layer_shape(m, a, dz), m.bias is not None, keep)
                                  + (0 if keep else ghost.weight_chain(m)))
            else:
                continue
            norm_sq += sq
        return norm_sq, states, chains

    def close(self) -> None:
        for h in self._handles:
            h.remove()
