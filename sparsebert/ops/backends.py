"""Backend registry and the ``auto`` choice.

Backends are modules following the contract in ``docs/CONTRACT.md``. They are imported lazily:
a backend whose module or compiled library is missing is reported with the reason, never
raised at ``import sparsebert``.
"""
from __future__ import annotations

import importlib
import time
import warnings
from typing import Dict, Optional

import torch

from ..layout import LayoutTensors

_MODULES = {
    "reference": "sparsebert.ops.reference",
    "dense": "sparsebert.ops.dense",
    "triton": "sparsebert.ops.triton",
    "cuda": "sparsebert.ops.cuda_bsr",
    "cpu": "sparsebert.ops.cpu_bsr",
}
NAMES = tuple(_MODULES)
_loaded: Dict[str, object] = {}
_import_errors: Dict[str, str] = {}


def check_name(name) -> str:
    """``name`` if it is a backend a layer may be given ("auto" or one of :data:`NAMES`), else a
    one-line ``ValueError`` (raised where the layer is made, not at its first forward)."""
    if not isinstance(name, str) or (name != "auto" and name not in _MODULES):
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(NAMES)} or 'auto'")
    return name


def saved_name(name: str, where: str) -> str:
    """The backend a saved layer asked for, or ``"auto"`` with a warning when this version has no
    such backend: the backend only chooses how the product is computed, so the checkpoint loads."""
    try:
        return check_name(name)
    except ValueError:
        warnings.warn(f"{where}: saved with backend {name!r}, which this version does not have "
                      f"({', '.join(NAMES)}); using 'auto'", stacklevel=3)
        return "auto"


def get(name: str):
    """The backend module ``name``; raises ``ValueError`` for unknown names, ``RuntimeError`` if it cannot load."""
    if name not in _MODULES:
        check_name(name)   # raises: only "auto" passes, and it is no module
        raise ValueError("'auto' is a choice among the backends, not a backend module")
    if name not in _loaded and name not in _import_errors:
        try:
            _loaded[name] = importlib.import_module(_MODULES[name])
        except Exception as e:  # ImportError, or a compiled library that fails to load
            _import_errors[name] = f"{type(e).__name__}: {e}"
    if name in _import_errors:
        raise RuntimeError(f"backend {name!r} cannot be loaded: {_import_errors[name]}")
    return _loaded[name]


def unavailable_reason(name: str, device=None) -> Optional[str]:
    """Why backend ``name`` cannot run on ``device`` here, or None if it can."""
    try:
        mod = get(name)
    except RuntimeError as e:
        return str(e)
    return mod.unavailable_reason(torch.device(device) if device is not None else None)


def unsupported_reason(name: str, x, values, lt) -> Optional[str]:
    reason = unavailable_reason(name, x.device)
    if reason is not None:
        return reason
    fn = getattr(get(name), "unsupported_reason", None)
    return fn(x, values, lt) if fn is not None else None


def report(device=None) -> Dict[str, Optional[str]]:
    """``{backend: None if usable else reason}`` for ``device`` (default: CUDA if present, else CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return {name: unavailable_reason(name, device) for name in NAMES}


# ---- auto -----------------------------------------------------------------------------------
_choice_cache: Dict[tuple, str] = {}


def _candidates(device: torch.device):
    # The reference backend is the ground truth, never the fastest: timing it would only make
    # every new (shape, density) key slower to settle. It stays the fallback below.
    if device.type == "cuda":
        return ("triton", "cuda", "dense")
    return ("cpu", "dense")


def _layout_key(layout) -> tuple:
    """``(shape, block, density)`` of a :class:`BlockLayout` or a :class:`LayoutTensors` (the
    custom ops hold only the latter); both give the same key for the same layout."""
    if isinstance(layout, LayoutTensors):
        R, C = layout.n_row_blocks, layout.n_col_blocks
        return (layout.N, layout.K), (layout.bn, layout.bk), layout.nnz / max(1, R * C)
    return layout.shape, layout.block, layout.density


def _rounded_layout_key(layout) -> tuple:
    """:func:`_layout_key` with the density rounded as the ``auto`` cache keys it; for a
    :class:`BlockLayout` computed once (layouts are immutable: a changed layer has a new one)."""
    if isinstance(layout, LayoutTensors):
        shape, block, density = _layout_key(layout)
        return shape, block, round(density, 2)
    key = layout._cache.get("auto_key")
    if key is None:
        shape, block, density = _layout_key(layout)
        key = layout._cache["auto_key"] = (shape, block, round(density, 2))
    return key


def _auto_key(device_type: str, dtype, M: int, layout, train: bool) -> tuple:
    m_bucket = 1 << max(0, (max(M, 1) - 1).bit_length())   # next power of two
    shape, block, density = _rounded_layout_key(layout)
    return (device_type, dtype, m_bucket, shape, block, density, train)


_OPS = ("forward", "grad_input", "grad_weight")
_DENSE_MARGIN = 0.95      # dense wins unless another backend is at least 5% faster


_EVICT_BYTES = 8 << 20    # more than a core's L2 on the CPUs measured (1-4 MiB)
_evict_buf: list = []


def _evict_cpu_caches() -> None:
    """Write a buffer larger than L2, so the next timed call reads its weights from L3 or memory,
    as a layer inside a model does (the other layers' weights went through L2 since). Timed with
    the weights hot, the dense backend's per-call copy of a full layout looked 5-15% faster than
    the block kernels at MiniLM shapes, while inside the model the block kernels were the faster
    (RESULTS, "CPU inference: one call per layer")."""
    if not _evict_buf:
        with torch.inference_mode(False):
            _evict_buf.append(torch.empty(_EVICT_BYTES, dtype=torch.uint8))
    _evict_buf[0].fill_(1)


def _time_ops(mod, x, values, lt, train: bool, reps: int = 3) -> Dict[str, float]:
    """Best of ``reps`` wall times of each op (the forward only, unless training); on the CPU each
    rep starts with L2 evicted (:func:`_evict_cpu_caches`)."""
    cpu = x.device.type == "cpu"
    if cpu:
        reps += 2      # each rep starts cold there: less steady than hot repeats
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    dy = mod.forward(x, values, None, lt)           # warm-up (JIT compile, autotune) and a dy
    calls = {"forward": (lambda: mod.forward(x, values, None, lt), (x,))}
    if train:
        calls["grad_input"] = (lambda: mod.grad_input(dy, values, lt), (dy,))
        calls["grad_weight"] = (lambda: mod.grad_weight(x, dy, lt), (x, dy))
    times = {}
    for op, (call, inputs) in calls.items():
        call()
        sync()
        best = float("inf")
        for _ in range(reps):
            if cpu:
                _evict_cpu_caches()
                for t in inputs:           # the activations, as in a model, fresh from the last op
                    t.sum()
            t0 = time.perf_counter()
            call()
            sync()
            best = min(best, time.perf_counter() - t0)
        times[op] = best
    return times


def plan_names(plan: str):
    """``(forward, grad_input, grad_weight)`` backend names of a plan string: one name for all
    three, or three comma-separated names."""
    names = _plans.get(plan)
    if names is None:
        names = tuple(plan.split(","))
        names = names * 3 if len(names) == 1 else names
        if len(_plans) < 1024:      # plans come from a handful of names; never grow unbounded
            _plans[plan] = names
    return names


_plans: Dict[str, tuple] = {}


def cached_choice(device_type: str, dtype, M: int, layout, train: bool) -> Optional[str]:
    """The plan :func:`choose` settled for this key, or None if it has not timed it yet."""
    return _choice_cache.get(_auto_key(device_type, dtype, M, layout, train))


def choose(x, values, layout, train: bool = False) -> str:
    """The backend plan ``auto`` uses for these inputs: a name, or ``"fwd,dx,dw"`` names.

    ``layout`` is a :class:`~sparsebert.BlockLayout` or its :class:`LayoutTensors` on ``x``'s
    device. The choice is cached per (device, dtype, tokens rounded up to a power of two, shape,
    block, density, training) key. The first call with a new key times every usable candidate on
    the real inputs, each op on its own (the forward, plus both gradients when training), the
    dense path included, and takes the fastest per op — so no op of a sparse layer is slower than
    the dense one. Under ``torch.compile`` the same happens at run time, inside the custom op, on
    its first call (the op layer passes ``"auto"`` through the graph), so a compiled model needs
    no eager warm-up and never falls back to the reference path for want of a timing.
    """
    # (x.is_cpu: building x.device.type costs more than the rest of a cache hit)
    key = _auto_key("cpu" if x.is_cpu else x.device.type, x.dtype, x.shape[0], layout, train)
    hit = _choice_cache.get(key)
    if hit is not None:
        return hit
    lt = layout if isinstance(layout, LayoutTensors) else layout.tensors(x.device)
    reasons = {n: unsupported_reason(n, x, values, lt) for n in _candidates(x.device)}
    usable = [n for n, r in reasons.items() if r is None]
    if not any(n != "dense" for n in usable):
        skipped = "; ".join(f"{n}: {r}" for n, r in reasons.items() if r is not None)
        _warn_once(f"sparsebert auto: no sparse backend can run these inputs ({skipped}); "
                   f"using {usable[0] if usable else 'reference'}")
    if not usable:
        usable = ["reference"]
    if len(usable) == 1:
        _choice_cache[key] = usable[0]
        return usable[0]
    times: Dict[str, Dict[str, float]] = {}
    with torch.no_grad():
        for n in usable:
            try:
                times[n] = _time_ops(get(n), x.detach(), values.detach(), lt, train)
            except Exception as e:   # not chosen, and said so once
                msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
                _warn_once(f"sparsebert auto: backend {n!r} raised while being timed and is not "
                           f"chosen ({type(e).__name__}: {msg})")
    if not times:
        _warn_once("sparsebert auto: every candidate backend failed while being timed; "
                   "using the reference backend")
        choice = "reference"
    else:
        # On GPUs a sparse kernel must beat dense by a margin: single timings are noisy, and a
        # wrong pick of a sparse kernel costs more than a wrong pick of dense. On CPUs the timing
        # flatters dense instead, so the margin is the other way: its output (and oneDNN's
        # buffers) are fresh pages on every call inside a model, which a layer timed alone
        # reuses (MiniLM at 0%, batch 8: ~10,600 minor faults a forward on dense, ~860 on the
        # block kernels, whose outputs come from their pool).
        margin = 1.0 / _DENSE_MARGIN if x.is_cpu else _DENSE_MARGIN

        def cost(n, op):
            return times[n].get(op, float("inf")) * (margin if n == "dense" else 1.0)
        best = [min(times, key=lambda n: cost(n, op)) for op in _OPS]
        choice = best[0] if not train or len(set(best)) == 1 else ",".join(best)
    _choice_cache[key] = choice
    return choice


_warned: set = set()


def _warn_once(message: str) -> None:
    """``auto`` never falls back silently: each distinct reason is a warning, once per process."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def clear_auto_cache() -> None:
    _choice_cache.clear()
