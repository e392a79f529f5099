"""``sparsebert.optimize(model)``: a faster training step for a (sparsified or dense) Hugging Face
BERT, with the user's training loop unchanged::

    model = sparsebert.optimize(sparsebert.sparsify(BertForMaskedLM(...), 0.9))
    loss = model(**batch).loss; loss.backward(); opt.step()          # as before

What it changes, in place (all of it undone by :func:`unoptimize`):

* **MLM head at labelled positions only.** When ``labels`` are passed to a ``BertForMaskedLM`` /
  ``BertForPreTraining``, the prediction head (transform + the 30522-way decoder) runs only on the
  rows whose label is not -100, instead of every token. The loss is Hugging Face's own
  ``CrossEntropyLoss`` over the same rows (its mean ignores -100 rows anyway), so it equals the
  unoptimized loss up to floating-point summation order. **The returned ``logits`` are then
  ``[n_labelled, vocab]``** (the labelled positions, in row-major ``(batch, seq)`` order, i.e.
  ``logits_full[labels != -100]``), not ``[batch, seq, vocab]``. Without labels the head runs on
  every token, as before. Done with forward pre-hooks: no module is replaced, so ``state_dict``,
  ``save_pretrained`` and sparsebert checkpoints are unchanged.
* **Scaled-dot-product attention** where the model supports it (registered as
  ``"sparsebert_sdpa"``, or ``"sparsebert_sdpa_torch_dropout"`` with ``dropout="torch"``): SDPA,
  except CPU inference (fp32, no gradient, no dropout), which runs the fused kernel of
  :mod:`sparsebert.ops.cpu_attention` (equal to SDPA within fp32 rounding). Attention
  probabilities are returned as the eager attention returns them, for ``output_attentions=True``
  in the call or in the config before :func:`optimize`; setting ``config.output_attentions``
  afterwards is refused by transformers, which allows it only for ``"eager"``.
* **BERT's intermediate GELU fused into the block-sparse layer in training too.** Inference
  already runs it in the kernel's epilogue; under autograd :func:`sparsebert.bsr_linear` applies
  it as a separate op. Here one autograd node computes ``gelu(x Wᵀ + b)`` and its backward
  (``dz = gelu'(z) dy``, then dX and dW/db from ``dz``, the bias gradient summed inside the
  weight-gradient kernel where the backend has ``grad_weight_bias``). ``gelu="save"`` keeps the
  pre-activation ``z`` for the backward (one ``[tokens, intermediate]`` tensor per layer);
  ``gelu="recompute"`` runs the forward with the GELU in the kernel epilogue, keeps nothing extra
  and recomputes ``z`` (one more sparse forward) in the backward.

* **Residual add + LayerNorm in one in-place pass at CPU inference** (``fuse_add_norm``): the
  ``LayerNorm(dropout(dense(h)) + h_in)`` that ends BERT's attention-output and output blocks,
  when no gradient is wanted (``torch.no_grad`` / ``inference_mode``) and the dropout is off
  (eval mode), runs as :func:`sparsebert.ops.cpu_bsr.add_layernorm_` over ``dense(h)``'s fresh
  output (fp32 CPU; anything else, and every training step, runs Hugging Face's code).

* **BertLayer's feed-forward called directly** when it is not chunked
  (``chunk_size_feed_forward == 0``, BERT's default): Hugging Face's ``apply_chunking_to_forward``
  inspects the method's signature on every call; the result is the same call, bit for bit. Only
  where ``BertLayer.forward`` is the version this restates (transformers 5.x); chunking,
  cross-attention and the deprecated ``past_key_values`` run Hugging Face's forward. Its
  attention block likewise: ``BertAttention`` → ``BertSelfAttention`` → the attention function
  run without the two module calls (the same operations, bit for bit) when there is no cache, no
  non-``None`` extra argument (``output_attentions``, ...), no hook on either module, the model
  runs sparsebert's attention function, and both forwards are the versions restated.

* **BertLayer at CPU inference in one call** (no gradient, no autocast, fp32, nothing compiled
  or exported, no hook on the layer's submodules, the same restated classes): where all six
  linears are block-sparse layers settled on the ``cpu`` backend (``auto``'s choice timed, or
  the backend named), the intermediate GELU fused, the attention kernel and both add +
  LayerNorm passes applicable, the layer is one ``sparsebert_cpu::bert_layer`` op
  (``csrc/cpu/bert_layer.cpp``: the same nine kernel calls from C++); otherwise (``nn.Linear``
  layers, another backend, an unfused activation, dropout on) one Python function runs the
  layer's operations without the module calls. Either way the output is the module path's, bit
  for bit; anything else runs the modules.

* **Cheaper CPU dropout** (``dropout="fast"``, default): CPU training dropout masks — hidden
  states and attention probabilities — drawn two elements per 64-bit random number
  (:mod:`sparsebert.fused`): the same keep probability (to 2**-32), different random numbers, so
  a seeded run's losses match the unoptimized model's in distribution, not draw for draw
  (``dropout="torch"`` keeps PyTorch's dropout and its random numbers). Not used on GPUs.

What it does not change: the optimizer (a :class:`~sparsebert.BlockSparseLinear` already stores,
and so an optimizer already updates, only the kept blocks; masked layers keep dense weights).
"""
from __future__ import annotations

import copy
import inspect
import threading
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module_mod   # its global hooks (see _hooked)

from . import fused
from .hf import FusedActivation
from .nn import BlockSparseLinear, _exporting, param_of
from .ops import backends
from .ops import cpu_attention
from .ops.bsr_linear import EagerFunction, _any_autocast, _consts, infer_2d, resolve_backend, settled_backend

GELU_MODES = ("save", "recompute")
DROPOUT_MODES = ("fast", "torch")


# ---- the training-mode fused GELU -------------------------------------------------------------
def _grad_input(name, dz, values, lt):
    return backends.get(name).grad_input(dz, values, lt)


def _grad_weight_bias(name, x, dz, lt, want_w, want_b):
    mod = backends.get(name)
    fused = getattr(mod, "grad_weight_bias", None)
    if want_w and want_b and fused is not None:
        return fused(x, dz, lt)
    dw = mod.grad_weight(x, dz, lt) if want_w else None
    db = None
    if want_b:
        acc = torch.float64 if dz.dtype == torch.float64 else torch.float32
        db = dz.sum(0, dtype=acc).to(dz.dtype)
    return dw, db


class LinearGelu(EagerFunction):
    """``gelu(x Wᵀ + b)`` (exact GELU) of a block-sparse ``W``, forward and backward in one node.

    ``x``: ``[M, K]`` contiguous; ``plan``: a backend plan from
    :func:`sparsebert.ops.bsr_linear.resolve_backend`; ``recompute``: see the module docstring.
    ``apply`` returns ``y``. A new-style Function (``setup_context``, which torch.func requires)
    can save only inputs and outputs, so with ``recompute=False`` the forward returns ``(y, z)``,
    ``z`` the pre-activation marked non-differentiable, and ``apply`` hands back ``y`` alone.
    Under torch.func, which re-applies the Function level by level, it runs as ``recompute=True``
    (saves inputs only; the same values). Once differentiable (no double backward)."""

    @classmethod
    def apply(cls, x, values, bias, lt, plan, recompute):
        if torch._C._are_functorch_transforms_active():
            return super().apply(x, values, bias, lt, plan, True)
        out = super().apply(x, values, bias, lt, plan, recompute)
        return out if recompute else out[0]

    @staticmethod
    def forward(x, values, bias, lt, plan, recompute):
        mod = backends.get(backends.plan_names(plan)[0])
        if recompute:
            if "gelu" in getattr(mod, "ACTIVATIONS", ()):
                return mod.forward(x, values, bias, lt, activation="gelu")
            return F.gelu(mod.forward(x, values, bias, lt))
        z = mod.forward(x, values, bias, lt)
        return F.gelu(z), z

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, values, bias, lt, plan, recompute = inputs
        ctx.lt, ctx.plan, ctx.has_bias, ctx.recompute = lt, plan, bias is not None, recompute
        if recompute:
            ctx.save_for_backward(x, values, bias)
        else:
            z = output[1]
            ctx.mark_non_differentiable(z)
            ctx.set_materialize_grads(False)    # no zeros built for z's (absent) gradient
            ctx.save_for_backward(x, values, z)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, _dz=None):
        if dy is None:                          # (grads not materialized: y unused)
            return None, None, None, None, None, None
        fwd, dx_name, dw_name = backends.plan_names(ctx.plan)
        lt = ctx.lt
        if ctx.recompute:
            x, values, bias = ctx.saved_tensors
            z = backends.get(fwd).forward(x, values, bias, lt)
        else:
            x, values, z = ctx.saved_tensors
        dz = torch.ops.aten.gelu_backward(dy.contiguous(), z)
        del z
        dx = _grad_input(dx_name, dz, values, lt) if ctx.needs_input_grad[0] else None
        want_b = ctx.has_bias and ctx.needs_input_grad[2]
        dw, db = _grad_weight_bias(dw_name, x, dz, lt, ctx.needs_input_grad[1], want_b)
        return dx, dw, db, None, None, None


def linear_gelu(x, values, layout, bias=None, backend: str = "auto", recompute: bool = False):
    """``gelu(bsr_linear(x, values, layout, bias))`` through :class:`LinearGelu` (any leading dims)."""
    N, K = layout.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K).contiguous()
    values = values.contiguous()
    plan = resolve_backend(backend, x2, values, layout)
    y = LinearGelu.apply(x2, values, bias, layout.tensors(x.device), plan, recompute)
    return y.reshape(*lead, N)


class TrainingFusedBlockSparseLinear(BlockSparseLinear):
    """A :class:`BlockSparseLinear` whose ``activation="gelu"`` is fused under autograd too
    (:class:`LinearGelu`). Same parameters and state; :func:`optimize` swaps the class of BERT's
    intermediate layers to this one (and :func:`unoptimize` back)."""

    gelu_mode = "save"

    def forward(self, x):
        if self.activation != "gelu" or not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return BlockSparseLinear.forward(self, x)   # inference (kernel epilogue), traced
        values, bias = self.values, self.bias
        needs_grad = x.requires_grad or values.requires_grad or (bias is not None and bias.requires_grad)
        if (not needs_grad or x.dtype != values.dtype or x.device != values.device
                or torch.is_autocast_enabled(x.device.type) or x.shape[-1] != self.in_features
                or _transformed()):
            # no gradient wanted, autocast, errors; forward AD or torch.func (no jvp/vmap rule)
            return BlockSparseLinear.forward(self, x)
        return linear_gelu(x, values, self.layout, bias, self.backend, self.gelu_mode == "recompute")


_INFER_LINEARS = (nn.Linear, BlockSparseLinear, TrainingFusedBlockSparseLinear)   # exact types


# ---- residual add + LayerNorm at CPU inference ---------------------------------------------
_ADD_NORM_CLASSES = ("BertSelfOutput", "BertOutput")
# the forward restated by _add_norm_forward: LayerNorm(dropout(dense(h)) + input_tensor)
_ADD_NORM_NAMES = frozenset(("dense", "dropout", "LayerNorm"))
_ADD_NORM_PARAMS = ("self", "hidden_states", "input_tensor")
_PLAIN_DROPOUTS = (nn.Dropout, fused.FastDropout)
_add_norm_subclasses: dict = {}


_cpu_kernels: list = []   # [cpu_bsr module, or None where its compiled ops do not load]


def _cpu_backend():
    """The ``cpu`` backend module if its compiled ops load here, else None. Decided once: the
    backend loads ``sparsebert._C`` once per process and keeps the outcome."""
    if not _cpu_kernels:
        ok = backends.unavailable_reason("cpu") is None
        _cpu_kernels.append(backends.get("cpu") if ok else None)
    return _cpu_kernels[0]


def _fp32_cpu_or_none(p) -> bool:
    return p is None or (p.dtype == torch.float32 and p.is_cpu)


def _add_norm_ok(module, h, residual) -> bool:
    """Whether ``add_layernorm_`` may run: the same conditions as ever, checked on every call
    (the module, its LayerNorm and the tensors can all change); only the cpu backend's
    availability is decided once."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or _transformed():
        return False
    drop = module.dropout          # its own mode decides, as when Hugging Face calls it
    # exact types: a subclass may do more in its forward (the fused pass calls neither module)
    if type(drop) not in _PLAIN_DROPOUTS or (drop.training and drop.p != 0.0):
        return False
    ln = module._modules["LayerNorm"] if "LayerNorm" in module._modules else module.LayerNorm
    if _hooked(drop) or _hooked(ln):   # the fused pass calls neither module: their hooks would not run
        return False
    if not (h.is_cpu and h.dtype == torch.float32 and residual.dtype == torch.float32
            and h.shape == residual.shape and h.is_contiguous() and residual.is_contiguous()):
        return False
    return (type(ln) is nn.LayerNorm and tuple(ln.normalized_shape) == (h.shape[-1],)
            and _fp32_cpu_or_none(param_of(ln, "weight")) and _fp32_cpu_or_none(param_of(ln, "bias"))
            and _cpu_backend() is not None)


def _add_norm(self, h, input_tensor):
    """``LayerNorm(dropout(h) + input_tensor)`` of BertSelfOutput / BertOutput ``self``, where
    ``h`` is its ``dense``'s own new output (so it may be overwritten)."""
    if _add_norm_ok(self, h, input_tensor):
        ln = self.LayerNorm
        # the dropout is the identity here
        return _cpu_backend().add_layernorm_(h, input_tensor, param_of(ln, "weight"),
                                             param_of(ln, "bias"), ln.eps)
    h = self.dropout(h)
    return self.LayerNorm(h + input_tensor)


def _add_norm_forward(self, hidden_states, input_tensor):
    base = self._sparsebert_base
    if not _restates(base, _ADD_NORM_NAMES, _ADD_NORM_PARAMS):     # patched since optimize
        return base.forward(self, hidden_states, input_tensor)
    dense = self.dense
    h = dense(hidden_states)
    if type(dense) not in _INFER_LINEARS or _hooked(dense):
        # the in-place pass may overwrite h only where nothing else holds it: the fresh output of
        # a linear layer, not seen by a hook (which may have kept it) or aliased to the input
        return self.LayerNorm(self.dropout(h) + input_tensor)
    return _add_norm(self, h, input_tensor)


def _subclass(registry: dict, prefix: str, cls, forward):
    """The subclass ``prefix + cls.__name__`` of ``cls`` with ``forward``, made once; a module
    attribute, so models pickle (:func:`__getattr__` rebuilds it in a new process)."""
    sub = registry.get(cls)
    if sub is None:
        name = f"{prefix}{cls.__name__}"
        sub = type(name, (cls,), {"forward": forward, "__module__": __name__, "_sparsebert_base": cls})
        sub.__qualname__ = name
        globals()[name] = sub
        registry[cls] = sub
    return sub


def _add_norm_class(cls):
    """The subclass of Hugging Face's ``cls`` (BertSelfOutput / BertOutput) whose forward fuses
    the residual add and LayerNorm at CPU inference."""
    return _subclass(_add_norm_subclasses, "AddNorm", cls, _add_norm_forward)


def _fusable_add_norm(m: nn.Module) -> bool:
    return (type(m).__name__ in _ADD_NORM_CLASSES and isinstance(getattr(m, "LayerNorm", None), nn.LayerNorm)
            and isinstance(getattr(m, "dropout", None), nn.Dropout) and hasattr(m, "dense")
            and _restates(type(m), _ADD_NORM_NAMES, _ADD_NORM_PARAMS))


# ---- BertLayer's feed-forward called directly ------------------------------------------------
# Hugging Face's BertLayer.forward ends with apply_chunking_to_forward(self.feed_forward_chunk,
# self.chunk_size_feed_forward, 1, attention_output), which runs inspect.signature on the bound
# method at every call (~15 us, 6 times per MiniLM forward) before calling
# feed_forward_chunk(attention_output) when the chunk size is 0 (BERT's default). The subclass
# below makes that call itself and hands every other case (chunking, cross-attention, the
# deprecated past_key_values) to Hugging Face's forward. It restates one version of that forward,
# so it is used only where BertLayer.forward has the signature and the names this was written
# against (transformers 5.x); elsewhere layers are left alone.
_LAYER_CLASSES = ("BertLayer",)
_LAYER_PARAMS = ("self", "hidden_states", "attention_mask", "encoder_hidden_states",
                 "encoder_attention_mask", "cache", "kwargs")
_LAYER_NAMES = frozenset(("attention", "is_decoder", "hasattr", "ValueError", "crossattention",
                          "apply_chunking_to_forward", "feed_forward_chunk",
                          "chunk_size_feed_forward", "seq_len_dim"))
_LOSS_ONLY_KWARGS = frozenset(("num_items_in_batch",))
_direct_ff_subclasses: dict = {}
_restated_checked: dict = {}       # (class, names, params, method) -> (the method, whether restated)


def _restates(cls, names, params=None, method="forward") -> bool:
    """Whether ``cls.<method>`` (unwrapped) is the version a restatement here was written against:
    its code uses exactly ``names`` and, if given, takes exactly ``params``. Decided once per class
    and method object (a method patched onto the class later is checked afresh)."""
    key = (cls, names, params, method)
    raw = getattr(cls, method, None)
    hit = _restated_checked.get(key)
    if hit is not None and hit[0] is raw:
        return hit[1]
    fn = inspect.unwrap(raw) if raw is not None else None
    code = getattr(fn, "__code__", None)
    ok = code is not None and frozenset(code.co_names) == names
    if ok and params is not None:
        try:
            ok = tuple(inspect.signature(fn).parameters) == params
        except (TypeError, ValueError):
            ok = False
    _restated_checked[key] = (raw, ok)
    return ok


def _direct_ff_forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                       encoder_attention_mask=None, cache=None, **kwargs):
    if (self.chunk_size_feed_forward or (self.is_decoder and encoder_hidden_states is not None)
            or "past_key_values" in kwargs or not _restates(self._sparsebert_base, _LAYER_NAMES, _LAYER_PARAMS)):
        return self._sparsebert_base.forward(self, hidden_states, attention_mask, encoder_hidden_states,
                                             encoder_attention_mask, cache=cache, **kwargs)
    attention_output = None
    # (BertModel passes position_ids=None; Trainer passes num_items_in_batch, which only a loss
    # reads: both reach the attention function below as they would through the modules)
    if cache is None and all(v is None or k in _LOSS_ONLY_KWARGS for k, v in kwargs.items()):
        if not torch.is_grad_enabled():
            out = _infer_layer(self, hidden_states, attention_mask, kwargs)
            if out is not None:
                return out
        attention_output = _direct_attention(self.attention, hidden_states, attention_mask, kwargs)
    if attention_output is None:
        attention_output, _ = self.attention(hidden_states, attention_mask, cache=cache, **kwargs)
    return self.feed_forward_chunk(attention_output)


# BertAttention.forward -> BertSelfAttention.forward -> the registered attention function, restated
# for the plain self-attention case (no cache, no extra arguments, sparsebert's own attention
# function): the two modules' calls, their deprecate_kwarg wrappers and the attention-interface
# lookup cost ~2-4% of a 90%-sparse MiniLM forward at batch 1 (interleaved A/B). Same operations in
# the same order (the same bits, dropout's random numbers included: tested); only where both
# forwards are the transformers 5.x versions written against, checked once per class as for
# BertLayer.
_ATTN_NAMES = frozenset(("is_cross_attention", "output", "self"))
_SELF_ATTN_NAMES = frozenset((
    "ALL_ATTENTION_FUNCTIONS", "EncoderDecoderCache", "_attn_implementation", "attention_head_size", "config",
    "contiguous", "dropout", "eager_attention_forward", "get_interface", "isinstance", "key", "layer_idx", "p",
    "query", "reshape", "scaling", "self_attention_cache", "shape", "training", "transpose", "update", "value",
    "view"))


def _hooked(m: nn.Module) -> bool:
    """Whether calling ``m`` would run hooks (its own or global ones), as Module.__call__ tests: the
    direct path must not skip them (Hugging Face's output_attentions capture is such a hook), except
    transformers' output-capturing hooks while no capture is active (:func:`_idle_capture_hooks`)."""
    mm = _module_mod
    if (m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
            or mm._global_forward_hooks or mm._global_forward_pre_hooks or mm._global_backward_hooks
            or mm._global_backward_pre_hooks):
        return True
    hooks = m._forward_hooks
    return bool(hooks) and not _idle_capture_hooks(hooks)


_capture_state: list = []     # [transformers' output-collector context variable, or None]


def _idle_capture_hooks(hooks) -> bool:
    """Whether every hook in ``hooks`` is transformers' output-capturing hook and no capture is
    active: each then returns at once. transformers 5 installs them for good on the first call with
    ``output_attentions`` / ``output_hidden_states``; without this, that one call would turn the
    direct paths off for the model's lifetime. Anything not recognised counts as a real hook."""
    if not _capture_state:
        try:
            from transformers.utils import output_capturing as oc
            _capture_state.append(oc._active_collector)
        except (ImportError, AttributeError):
            _capture_state.append(None)
    collector = _capture_state[0]
    if collector is None or collector.get():      # a capture is running: its hooks must run
        return False
    return all(getattr(h, "__module__", None) == "transformers.utils.output_capturing"
               and getattr(h, "__name__", None) == "output_capturing_hook" for h in hooks.values())


def _own_attention(sa) -> Optional[str]:
    """The attention implementation of BertSelfAttention ``sa`` when it is sparsebert's (whose
    function the restated paths call directly), else None."""
    impl = sa.config._attn_implementation
    return impl if impl in (fused.ATTENTION_NAME, fused.ATTENTION_NAME_TORCH_DROPOUT) else None


def _attend(sa, query, key, value, attention_mask, kwargs, impl):
    """BertSelfAttention's call of its attention function (sparsebert's ``impl``), restated:
    ``[B, S, heads, D]``."""
    out, _ = fused._attention(sa, query, key, value, attention_mask, 0.0 if not sa.training else sa.dropout.p,
                              sa.scaling, None, kwargs, impl == fused.ATTENTION_NAME)
    return out


def _direct_attention(attention, hidden_states, attention_mask, kwargs):
    """``attention(hidden_states, attention_mask, **kwargs)[0]`` without the module calls, or None
    where this is not that forward (then the caller runs Hugging Face's)."""
    sa = getattr(attention, "self", None)
    if (sa is None or attention.is_cross_attention or not _restates(type(attention), _ATTN_NAMES)
            or not _restates(type(sa), _SELF_ATTN_NAMES) or _hooked(attention) or _hooked(sa)):
        return None
    impl = _own_attention(sa)
    if impl is None:
        return None
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, sa.attention_head_size)
    query = sa.query(hidden_states).view(*hidden_shape).transpose(1, 2)
    key = sa.key(hidden_states).view(*hidden_shape).transpose(1, 2)
    value = sa.value(hidden_states).view(*hidden_shape).transpose(1, 2)
    out = _attend(sa, query, key, value, attention_mask, kwargs, impl)
    return attention.output(out.reshape(*input_shape, -1).contiguous(), hidden_states)


# ---- BertLayer at CPU inference in one call ---------------------------------------------------
# A 90%-sparse MiniLM forward at batch 1 is ~4.2 ms of kernels and ~1.3 ms of Python: 14 module
# calls a layer and each block-sparse layer's general dispatch (autocast, export and compile
# tests). Where none of that can apply (no gradient, no autocast, not compiling or exporting, fp32
# CPU input, no hook on a module skipped, the classes the versions restated, the linears
# nn.Linear or sparsebert's own block-sparse layers), _infer_layer runs the layer's operations
# itself: as one C++ op where every step is a cpu kernel (_infer_layer_op), else from Python; the
# same kernels on the same arguments in the same order either way, so the same bits (tested).
_FF_CHUNK_NAMES = frozenset(("intermediate", "output"))
_INTERMEDIATE_NAMES = frozenset(("dense", "intermediate_act_fn"))


def _infer_classes_ok(layer_t, att_t, sa_t, so_t, inter_t, out_t) -> bool:
    base = layer_t.__dict__.get("_sparsebert_base")
    return (base is not None and so_t.forward is _add_norm_forward and out_t.forward is _add_norm_forward
            and _restates(so_t._sparsebert_base, _ADD_NORM_NAMES, _ADD_NORM_PARAMS)
            and _restates(out_t._sparsebert_base, _ADD_NORM_NAMES, _ADD_NORM_PARAMS)
            and _restates(base, _LAYER_NAMES, _LAYER_PARAMS)
            and _restates(base, _FF_CHUNK_NAMES, method="feed_forward_chunk")
            and _restates(att_t, _ATTN_NAMES) and _restates(sa_t, _SELF_ATTN_NAMES)
            and _restates(inter_t, _INTERMEDIATE_NAMES))


def _infer_linear(m, x2):
    """``m(x2)`` of a 2-D input, ``m`` an nn.Linear or a (training-fused) BlockSparseLinear."""
    if type(m) is nn.Linear:
        p = m._parameters
        return F.linear(x2, p["weight"], p["bias"])
    return infer_2d(x2, param_of(m, "values"), m.layout, param_of(m, "bias"), m.backend, m.activation)


def _transformed() -> bool:
    """Whether forward-mode AD may be running (inside a ``forward_ad.dual_level``, which
    ``torch.func.jvp`` enters too) or a torch.func transform is: the fused paths, whose kernels
    have no forward-AD formula (they would drop the tangents silently) nor batching rule, then
    decline. Tens of ns."""
    return torch.autograd.forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active()


def _infer_layer(layer, x, attention_mask, kwargs):
    """``layer(x, attention_mask)`` (a DirectFF BertLayer) at CPU inference, or None where this is
    not that call (the caller then runs the modules)."""
    if (type(x) is not torch.Tensor or not x.is_cpu or x.dtype != torch.float32 or x.dim() != 3
            or not x.is_contiguous() or torch.compiler.is_compiling() or _any_autocast() or _exporting()):
        return None
    if _transformed():    # its kernels would drop tangents, or see wrapped tensors: the modules' path
        return None
    mods = layer._modules
    att, inter, out = mods.get("attention"), mods.get("intermediate"), mods.get("output")
    if att is None or inter is None or out is None:
        return None
    sa, so = att._modules.get("self"), att._modules.get("output")
    if sa is None or so is None or not _infer_classes_ok(
            type(layer), type(att), type(sa), type(so), type(inter), type(out)):
        return None
    sam, som, outm = sa._modules, so._modules, out._modules
    lins = (sam.get("query"), sam.get("key"), sam.get("value"), som.get("dense"),
            inter._modules.get("dense"), outm.get("dense"))
    skipped = (att, sa, so, inter, out, som.get("LayerNorm"), som.get("dropout"),
               outm.get("LayerNorm"), outm.get("dropout")) + lins
    act_m = inter._modules.get("intermediate_act_fn")      # a module (FusedActivation) is not called
    if (any(type(m) not in _INFER_LINEARS for m in lins) or att.is_cross_attention
            or any(m is None or _hooked(m) for m in skipped) or (act_m is not None and _hooked(act_m))):
        return None
    impl = _own_attention(sa)
    if impl is None:
        return None
    B, S, H = x.shape
    x2 = x.view(-1, H)
    if S:
        y = _infer_layer_op(lins, sa, so, inter, out, x2, B, attention_mask)
        if y is not None:
            return y.view(B, S, -1)
    hidden_shape = (B, S, -1, sa.attention_head_size)
    q, k, v = (_infer_linear(m, x2).view(hidden_shape).transpose(1, 2) for m in lins[:3])
    ctx = _attend(sa, q, k, v, attention_mask, kwargs, impl)
    h = _add_norm(so, _infer_linear(lins[3], ctx.reshape(B * S, -1).contiguous()), x2)
    i = _infer_linear(lins[4], h)
    act = inter.intermediate_act_fn
    if type(act) is not FusedActivation:
        i = act(i.view(B, S, -1)).reshape(B * S, -1)
    return _add_norm(out, _infer_linear(lins[5], i), h).view(B, S, -1)


def _op_ready(m, K: int, x2, acts: str):
    """``(values, bias, packed index, (N, K, bn, bk))`` of block-sparse ``m`` when the layer op may
    run it on a ``[M, K]`` input like ``x2``: its cpu backend settled, its activation ``acts``,
    the parameters as :func:`~sparsebert.ops.bsr_linear.bsr_linear` accepts them (fp32 CPU,
    contiguous, the layout's shapes). Else None."""
    if type(m) is nn.Linear or m.activation != acts:
        return None
    values, bias, layout = param_of(m, "values"), param_of(m, "bias"), m.layout
    c = _consts(layout)
    if (c is None or c.K != K or type(values) not in (nn.Parameter, torch.Tensor)
            or values.dtype != torch.float32 or not values.is_cpu or values.shape != c.values_shape
            or not values.is_contiguous()):
        return None
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_cpu or bias.shape != c.bias_shape
                             or not bias.is_contiguous()):
        return None
    if settled_backend(m.backend, x2.shape[0], x2, layout) != "cpu":
        return None
    lt = layout.tensors(x2.device)
    return values, bias, lt.packed(), (lt.N, lt.K, lt.bn, lt.bk)


def _infer_layer_op(lins, sa, so, inter, out, x2, B, attention_mask):
    """The layer as one ``sparsebert_cpu::bert_layer`` call (``[T, H]``) where every step runs the
    cpu kernels: the six linears block-sparse on the settled cpu backend with the GELU fused into
    the intermediate, the fused attention applicable, both add + LayerNorm passes fusable. Else None."""
    cpu = _cpu_backend()
    op = None if cpu is None else cpu.layer_op()
    if op is None or (sa.training and sa.dropout.p) or type(inter.intermediate_act_fn) is not FusedActivation:
        return None
    T, H = x2.shape
    d = sa.attention_head_size
    parts = []
    K = H
    for j, m in enumerate(lins):
        p = _op_ready(m, K, x2, "gelu" if j == 4 else "none")
        if p is None:
            return None
        parts.append(p)
        N = p[3][0]
        K = H if j < 2 else N     # q, k and v read x; each later layer its predecessor's output
    nq = parts[0][3][0]
    if (parts[1][3][0] != nq or parts[2][3][0] != nq or nq % d or parts[3][3][0] != H
            or parts[5][3][0] != H):
        return None
    S = T // B
    causal = getattr(sa, "is_causal", True)     # as cpu_attention.applies reads it
    if ((causal and attention_mask is None and S > 1)
            or cpu_attention.mask_reason(attention_mask, (B, nq // d, S, S)) is not None
            or not (_add_norm_ok(so, x2, x2) and _add_norm_ok(out, x2, x2))):
        return None
    ln1, ln2 = so.LayerNorm, out.LayerNorm
    return op(
        x2, [p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts],
        [g for p in parts for g in p[3]], attention_mask, B, nq // d, float(sa.scaling),
        param_of(ln1, "weight"), param_of(ln1, "bias"), float(ln1.eps),
        param_of(ln2, "weight"), param_of(ln2, "bias"), float(ln2.eps))


def _direct_ff_ok(cls) -> bool:
    return _restates(cls, _LAYER_NAMES, _LAYER_PARAMS) and callable(getattr(cls, "feed_forward_chunk", None))


def _direct_ff_class(cls):
    return _subclass(_direct_ff_subclasses, "DirectFF", cls, _direct_ff_forward)


# ---- the MLM head at labelled positions -------------------------------------------------------
def _thread_key() -> int:
    """This thread's key for a call's selection; 0 while torch.compile traces the hooks (it cannot
    trace ``threading.get_ident``, and a compiled model's three hooks then all use the traced 0)."""
    return 0 if torch.compiler.is_compiling() else threading.get_ident()


class _SelectRows:
    """Forward pre-hook of the MLM head: keeps only the rows chosen by the model's pre-hook for
    the call running on this thread (threads calling one model each have their own selection)."""

    def __init__(self):
        self.idx: dict = {}            # thread id -> the rows of the call running there

    def __call__(self, module, args):
        idx = self.idx.pop(_thread_key(), None)
        if idx is None or not args:
            return None
        seq = args[0]
        return (seq.reshape(-1, seq.shape[-1]).index_select(0, idx),) + tuple(args[1:])


def _head_selects(head, select: _SelectRows) -> bool:
    """Whether ``select`` is still a pre-hook of ``head`` (the model's head may have been replaced)."""
    return head is not None and any(h is select for h in head._forward_pre_hooks.values())


class _LabelledPositions:
    """Forward pre-hook (with kwargs) of the model: ``labels`` -> the labelled ones, flattened,
    and tells the head's hook which rows to keep."""

    def __init__(self, select: _SelectRows, labels_pos: Optional[int]):
        self.select = select
        self.labels_pos = labels_pos

    def __call__(self, module, args, kwargs):
        self.select.idx.pop(_thread_key(), None)
        positional = self.labels_pos is not None and len(args) > self.labels_pos
        labels = args[self.labels_pos] if positional else kwargs.get("labels")
        if labels is None or _mlm_head(module) is None or not _head_selects(module.cls, self.select):
            return None               # (a head put in after optimize has no selecting hook)
        ids = args[0] if args else kwargs.get("input_ids")
        if ids is None:
            emb = kwargs.get("inputs_embeds")
            shape = None if emb is None else tuple(emb.shape[:-1])
        else:
            shape = tuple(ids.shape)
        if shape is None or tuple(labels.shape) != shape:
            return None               # not per-token labels: leave the call alone
        flat = labels.reshape(-1)
        idx = (flat != -100).nonzero().squeeze(1)
        self.select.idx[_thread_key()] = idx
        new = flat.index_select(0, idx)
        if positional:
            args = tuple(args[:self.labels_pos]) + (new,) + tuple(args[self.labels_pos + 1:])
        else:
            kwargs = dict(kwargs, labels=new)
        return args, kwargs


class _ClearSelection:
    """Forward hook (always called, errors too): no selection outlives the model's call."""

    def __init__(self, select: _SelectRows):
        self.select = select

    def __call__(self, module, args, output):
        self.select.idx.pop(_thread_key(), None)
        return None


_HOOK_TYPES = (_SelectRows, _LabelledPositions, _ClearSelection)
# The models whose own forward computes the masked-LM loss as CrossEntropyLoss over
# logits.view(-1, vocab) and labels.view(-1): only there may the head see the labelled rows alone
# (BertLMHeadModel has the same head but a shifted, causal loss).
_LABELLED_HEAD_MODELS = ("BertForMaskedLM", "BertForPreTraining")


def _mlm_head(model: nn.Module) -> Optional[nn.Module]:
    """The MLM prediction head a labelled-positions hook can sit on, or None: the head of a
    BertForMaskedLM / BertForPreTraining whose forward is Hugging Face's own."""
    head = model._modules.get("cls")
    if head is None or getattr(model, "config", None) is None:
        return None
    if type(head).__name__ not in ("BertOnlyMLMHead", "BertPreTrainingHeads"):
        return None
    for c in type(model).__mro__:
        if c.__name__ in _LABELLED_HEAD_MODELS and c.__module__.startswith("transformers."):
            return head if type(model).forward is c.forward else None
    return None


def _remove_hooks(model: nn.Module) -> None:
    """Remove the labelled-head hooks from ``model`` and its modules (found by type: no handle is
    kept, so the model deep-copies and pickles, and a head replaced since is no obstacle)."""
    for m in model.modules():
        for hooks in (m._forward_pre_hooks, m._forward_hooks):
            for k in [k for k, h in hooks.items() if isinstance(h, _HOOK_TYPES)]:
                del hooks[k]
                m._forward_pre_hooks_with_kwargs.pop(k, None)
                m._forward_hooks_with_kwargs.pop(k, None)
                m._forward_hooks_always_called.pop(k, None)


def _labels_position(model: nn.Module) -> Optional[int]:
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return None
    return params.index("labels") if "labels" in params else None


# ---- optimize / unoptimize --------------------------------------------------------------------
def _own_config(model: nn.Module) -> None:
    """Give ``model`` (and its submodules) a copy of its config. Hugging Face models built from
    one config object share it, and the attention implementation is a field of the config: without
    the copy, switching it here would switch every other model built from that config too."""
    old = model.config
    new = copy.deepcopy(old)
    for m in model.modules():
        if m.__dict__.get("config") is old:
            m.config = new


def _hf_models(model: nn.Module) -> list:
    """The outermost Hugging Face models in ``model``: itself if it is one, else those among its
    submodules (a user's own module around a ``BertModel``, say)."""
    def is_hf(m):
        return hasattr(m, "set_attn_implementation") and getattr(m, "config", None) is not None
    if is_hf(model):
        return [model]
    found = []

    def walk(m):
        for c in m.children():
            if is_hf(c):
                found.append(c)
            else:
                walk(c)
    walk(model)
    return found


def _is_intermediate(parent: nn.Module) -> bool:
    return isinstance(getattr(parent, "dense", None), BlockSparseLinear) and hasattr(parent, "intermediate_act_fn")


def optimize(model: nn.Module, *, labelled_head: bool = True, sdpa: bool = True,
             fuse_gelu: bool = True, gelu: str = "save", dropout: str = "fast",
             fuse_add_norm: bool = True) -> nn.Module:
    """Make a Hugging Face BERT's training (and inference) step faster, in place; returns ``model``.

    Args:
        labelled_head: run the MLM head only at labelled positions when ``labels`` are given (the
            loss is unchanged; **the returned logits are ``[n_labelled, vocab]``**, the rows of
            ``labels != -100`` in row-major order).
        sdpa: switch the attention to ``torch.nn.functional.scaled_dot_product_attention``.
        fuse_gelu: fuse the exact GELU of BERT's intermediate blocks into their block-sparse layer,
            in training too (layers :func:`sparsebert.sparsify` left unfused are fused here).
        gelu: ``"save"`` (keep the pre-activation for the backward) or ``"recompute"``.
        dropout: ``"fast"``: on CPU in training, dropout masks (hidden and attention probabilities)
            come from :mod:`sparsebert.fused` — the same distribution from fewer random draws, so
            losses match the unoptimized model's statistically, not draw for draw (with ``sdpa``,
            attention runs as ``"sparsebert_sdpa"``: SDPA, except CPU training with dropout);
            ``"torch"``: PyTorch's dropout, the same random numbers as without :func:`optimize`.
        fuse_add_norm: at CPU inference (no gradient, dropout off), the residual add and LayerNorm
            of BERT's attention-output and output blocks in one in-place pass.

    Calling it again is harmless (options of the later call win). Undo with :func:`unoptimize`.
    """
    if gelu not in GELU_MODES:
        raise ValueError(f"gelu must be one of {GELU_MODES}, got {gelu!r}")
    if dropout not in DROPOUT_MODES:
        raise ValueError(f"dropout must be one of {DROPOUT_MODES}, got {dropout!r}")
    from .hf import fuse_activations
    unoptimize(model)
    state = {"sdpa_from": []}     # [(Hugging Face model, its attention implementation before)]
    for hf_model in _hf_models(model) if sdpa else ():
        if not getattr(hf_model, "_supports_sdpa", False):
            continue
        current = getattr(hf_model.config, "_attn_implementation", None)
        want = fused.register_attention(fast_dropout=dropout == "fast")
        if current != want:
            _own_config(hf_model)
            hf_model.set_attn_implementation(want)
            state["sdpa_from"].append((hf_model, current))
    if dropout == "fast":
        for m in model.modules():
            if type(m) is nn.Dropout:
                m.__class__ = fused.FastDropout
    if fuse_gelu:
        try:
            fuse_activations(model)         # exact-GELU intermediate blocks not fused yet
        except ValueError:
            pass
        for _, parent in model.named_modules():
            if _is_intermediate(parent) and parent.dense.activation == "gelu":
                layer = parent.dense
                if type(layer) is BlockSparseLinear:
                    layer.__class__ = TrainingFusedBlockSparseLinear
                layer.gelu_mode = gelu
    if fuse_add_norm:
        for m in model.modules():
            if _fusable_add_norm(m):
                m.__class__ = _add_norm_class(type(m))
    for m in model.modules():
        if type(m).__name__ in _LAYER_CLASSES and _direct_ff_ok(type(m)):
            m.__class__ = _direct_ff_class(type(m))
    head = _mlm_head(model) if labelled_head else None
    if head is not None:
        select = _SelectRows()
        head.register_forward_pre_hook(select)
        model.register_forward_pre_hook(_LabelledPositions(select, _labels_position(model)), with_kwargs=True)
        model.register_forward_hook(_ClearSelection(select), always_call=True)
    model._sparsebert_optimized = state
    return model


def unoptimize(model: nn.Module) -> nn.Module:
    """Undo :func:`optimize` (hooks removed, attention and layer classes restored), in place.
    Activations fused by :func:`optimize` stay fused (outputs are the same either way)."""
    state = getattr(model, "_sparsebert_optimized", None)
    if state is None:
        return model
    _remove_hooks(model)
    before = state.get("sdpa_from")
    if isinstance(before, str):            # saved by sparsebert before 2026-12-02: the model itself
        before = [(model, before)]
    for hf_model, impl in before or ():
        hf_model.set_attn_implementation(impl)
    from .fused import FastDropout
    for m in model.modules():
        if type(m) is FastDropout:
            m.__class__ = nn.Dropout
        base = type(m).__dict__.get("_sparsebert_base")    # set only by _subclass
        if base is not None:
            m.__class__ = base
        if type(m) is TrainingFusedBlockSparseLinear:
            m.__class__ = BlockSparseLinear
            m.__dict__.pop("gelu_mode", None)
    del model._sparsebert_optimized
    return model


def is_optimized(model: nn.Module) -> bool:
    return getattr(model, "_sparsebert_optimized", None) is not None


def __getattr__(name):
    # Unpickling an optimized model in a new process: build the subclass on demand.
    for prefix, bases, make in (("AddNorm", _ADD_NORM_CLASSES, _add_norm_class),
                                ("DirectFF", _LAYER_CLASSES, _direct_ff_class)):
        if name.startswith(prefix) and name[len(prefix):] in bases:
            from transformers.models.bert import modeling_bert
            return make(getattr(modeling_bert, name[len(prefix):]))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
