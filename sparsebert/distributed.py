"""Multi-process training on PyTorch's own distributed engine (``torchrun``, ``torch.distributed``, DDP).

``sparsebert pretrain`` and ``sparsebert finetune`` read the environment ``torchrun`` sets
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); without it they run as
one process, unchanged. Under ``torchrun`` this module:

* joins the process group (:func:`setup`): NCCL on GPUs (one GPU per rank: ``cuda:LOCAL_RANK``),
  gloo on CPUs;
* splits every global batch (drawn identically on every rank from the same seeded generator)
  into contiguous per-rank slices (:func:`shard`): the global batch is the per-rank
  ``--batch-size`` × world size, and the data each rank sees is disjoint, as with
  ``DistributedSampler``;
* wraps the training objective in ``DistributedDataParallel`` (:func:`wrap`) and builds a new
  wrapper whenever the Pruner changes a ``BlockSparseLinear`` layout (:func:`rewrap`: DDP sizes
  its gradient buckets at construction);
* computes each pruning decision once, on rank 0, and broadcasts it (:func:`broadcast_keeps`,
  installed as ``Pruner.decision_hook``), so masks are identical on every rank at every step;
* all-gathers every rank's layouts, parameter shapes and checksums (and optimizer state) and
  compares them with rank 0's (:func:`verify_identical`): a rank that differs raises
  :class:`DistributedMismatchError` on every rank, naming the rank and the first differing
  tensor, instead of hanging in a collective of the wrong size;
* keeps output on rank 0 (:func:`is_main`, :func:`print0`) and writes checkpoints from rank 0
  only (the callers do, with :func:`barrier` after).
"""
from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import nn


class DistributedMismatchError(RuntimeError):
    """A rank's model (layouts, parameter shapes or values) or optimizer state differs from rank 0's."""


@dataclass
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


_CTX = Context()


def launched() -> bool:
    """True when started by ``torchrun`` (or anything setting ``WORLD_SIZE``/``RANK``)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def context() -> Context:
    return _CTX


def is_main() -> bool:
    return _CTX.rank == 0


DATA_TURNS = 3


def data_turn(ctx: Optional[Context] = None) -> int:
    """When this rank may fill a data cache, for ``DATA_TURNS`` turns separated by barriers:
    0 global rank 0 (fetches and unpacks first); 1 the first rank of every other node (a node
    with a cache of its own fills it once, not once per rank); 2 every other rank (it only reads)."""
    ctx = ctx or _CTX
    return 0 if ctx.rank == 0 else 1 if ctx.local_rank == 0 else 2


def print0(*args, **kwargs) -> None:
    """``print`` on rank 0 only."""
    if is_main():
        print(*args, **kwargs)


class DistributedSetupError(ValueError):
    """torchrun's environment cannot be served on this machine (more ranks than GPUs): a ValueError,
    so the command line reports it in one line."""


def choose(device: str, local_rank: int, cuda_available: bool, cuda_count: int,
           nccl_available: bool) -> tuple:
    """``(torch.device, backend)`` for a rank with ``LOCAL_RANK`` ``local_rank``.

    ``device``: ``auto`` (CUDA when there is a GPU, else CPU), ``cpu``, ``cuda`` or ``cuda:N`` (the
    index is ignored: rank ``r`` of a node always takes GPU ``LOCAL_RANK``, so ``--nproc-per-node``
    must not exceed the node's GPUs). Backend: NCCL with CUDA (gloo, which also reduces CUDA
    tensors, where this torch has no NCCL), gloo on CPUs."""
    want_cuda = device.startswith("cuda") or (device == "auto" and cuda_available)
    if not want_cuda:
        return torch.device("cpu"), "gloo"
    if not cuda_available or cuda_count == 0:
        raise DistributedSetupError(f"--device {device}: no CUDA GPU is available to this rank "
                                    "(use --device cpu for gloo on CPUs)")
    if not 0 <= local_rank < cuda_count:
        raise DistributedSetupError(f"LOCAL_RANK {local_rank} has no GPU: this node has {cuda_count} "
                                    f"(start at most {cuda_count} ranks per node: torchrun --nproc-per-node "
                                    f"{cuda_count})")
    return torch.device("cuda", local_rank), ("nccl" if nccl_available else "gloo")


def setup(device: str = "auto", timeout_s: float = 600.0) -> Context:
    """Join the process group torchrun describes (a no-op returning a world-1 context otherwise).

    Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (0 when unset); the rendezvous itself
    (``MASTER_ADDR``/``MASTER_PORT``, set by torchrun on every node from ``--rdzv-endpoint`` or
    ``--master-addr``) is the default ``env://``. Device and backend: :func:`choose`; with CUDA
    the rank's GPU is made the current device before the group is created, and NCCL is bound to
    it (``device_id``)."""
    global _CTX
    import torch.distributed as dist

    if not launched():
        from .study.training import pick_device
        _CTX = Context(device=pick_device(device))
        return _CTX
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    dev, backend = choose(device, local, cuda, torch.cuda.device_count() if cuda else 0,
                          dist.is_nccl_available())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        kw = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s), **kw)
    _CTX = Context(rank=rank, world=world, local_rank=local, device=dev, backend=backend)
    return _CTX


def teardown() -> None:
    global _CTX
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _CTX = Context(device=_CTX.device)


def barrier() -> None:
    if _CTX.enabled:
        import torch.distributed as dist
        dist.barrier()


def _comm_device() -> torch.device:
    """Where collectives' tensors live: NCCL reduces CUDA tensors only; gloo takes CPU ones."""
    return _CTX.device if _CTX.backend == "nccl" else torch.device("cpu")


def all_mean(value: float) -> float:
    """The mean of a float over ranks (the value itself in one process)."""
    if not _CTX.enabled:
        return value
    import torch.distributed as dist
    t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return float(t.item()) / _CTX.world


def shard(global_batch: torch.Tensor, *others: torch.Tensor):
    """This rank's contiguous slice of a global batch (dim 0), and of each tensor in ``others``.

    Every rank draws the same global batch; rank ``r`` of ``W`` takes rows ``[r*b, (r+1)*b)`` with
    ``b = len // W`` (the global batch must divide evenly)."""
    n = global_batch.shape[0]
    if n % _CTX.world:
        raise ValueError(f"global batch of {n} does not split evenly over {_CTX.world} ranks")
    b = n // _CTX.world
    sl = slice(_CTX.rank * b, (_CTX.rank + 1) * b)
    out = (global_batch[sl],) + tuple(t[sl] for t in others)
    return out if others else out[0]


# ---------------------------------------------------------------------------------------------
# DDP
# ---------------------------------------------------------------------------------------------
def wrap(module: nn.Module, model: Optional[nn.Module] = None, optimizer=None, where: str = "start") -> nn.Module:
    """``module`` in ``DistributedDataParallel`` (``module`` itself in one process), after checking
    that every rank holds the same model (``model``, default ``module``) and optimizer state."""
    if not _CTX.enabled:
        return module
    verify_identical(model if model is not None else module, optimizer, where)
    from torch.nn.parallel import DistributedDataParallel as DDP
    ids = [_CTX.device.index] if _CTX.device.type == "cuda" else None
    # buffers (masks, block indices) are kept identical by broadcast pruning decisions and checked
    # by verify_identical; parameters are broadcast from rank 0 at construction. Unused parameters
    # (BERT's pooler in MLM training) are allowed: their grads stay None, as in one process.
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        return DDP(module, device_ids=ids, broadcast_buffers=False, find_unused_parameters=True)


def unwrap(module: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP
    return module.module if isinstance(module, DDP) else module


def rewrap(ddp: nn.Module, model: Optional[nn.Module] = None, optimizer=None, where: str = "") -> nn.Module:
    """A fresh DDP around ``ddp``'s module: call after a layout change (the old reducer's buckets
    have the old parameter sizes). Verifies the ranks agree first."""
    if not _CTX.enabled:
        return ddp
    import gc
    inner = unwrap(ddp)
    del ddp
    gc.collect()            # the old reducer's autograd hooks go with it
    return wrap(inner, model, optimizer, where)


# ---------------------------------------------------------------------------------------------
# Pruning decisions: computed on rank 0, broadcast
# ---------------------------------------------------------------------------------------------
def broadcast_keeps(keeps: List[torch.Tensor]) -> List[torch.Tensor]:
    """Rank 0's keep masks on every rank (``keeps`` unchanged in one process)."""
    if not _CTX.enabled:
        return keeps
    import torch.distributed as dist
    dev = _comm_device()
    flat = torch.cat([k.reshape(-1).to(torch.uint8) for k in keeps]).to(dev)
    dist.broadcast(flat, src=0)
    flat = flat.cpu()
    out, i = [], 0
    for k in keeps:
        n = k.numel()
        out.append(flat[i:i + n].reshape(k.shape).to(torch.bool).to(k.device))
        i += n
    return out


def install(pruner) -> None:
    """Make ``pruner`` take rank 0's decisions (a no-op in one process)."""
    if _CTX.enabled:
        pruner.decision_hook = broadcast_keeps


# ---------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------
def _digest(t: torch.Tensor) -> str:
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return hashlib.sha1(t.contiguous().cpu().numpy().tobytes()).hexdigest()[:16]


def signature(model: nn.Module, optimizer=None) -> Dict[str, tuple]:
    """Per tensor: ``(shape, dtype, sha1 prefix)`` of every parameter and buffer, each sparse
    layer's layout (block size and block mask, or the mask's digest) and, with ``optimizer``,
    every per-parameter state tensor."""
    from .nn import BlockSparseLinear
    sig: Dict[str, tuple] = {}
    names = {}
    for name, p in model.named_parameters(remove_duplicate=True):
        sig["param " + name] = (tuple(p.shape), str(p.dtype), _digest(p))
        names[id(p)] = name
    for name, b in model.named_buffers():
        sig["buffer " + name] = (tuple(b.shape), str(b.dtype), _digest(b))
    for name, mod in model.named_modules():
        if isinstance(mod, BlockSparseLinear):
            lay = mod.layout
            sig["layout " + name] = (tuple(lay.block), int(lay.nnz), _digest(lay.block_mask.to(torch.uint8)))
    if optimizer is not None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                for k, v in optimizer.state.get(p, {}).items():
                    if torch.is_tensor(v):
                        sig[f"optimizer {names.get(id(p), '?')}.{k}"] = (tuple(v.shape), str(v.dtype), _digest(v))
    return sig


def verify_identical(model: nn.Module, optimizer=None, where: str = "") -> int:
    """All-gather every rank's :func:`signature` and compare it with rank 0's; raise
    :class:`DistributedMismatchError` (on every rank) if any rank differs. Returns the number of
    tensors compared (0 in one process)."""
    if not _CTX.enabled:
        return 0
    import torch.distributed as dist
    mine = signature(model, optimizer)
    gathered: List[Optional[dict]] = [None] * _CTX.world
    dist.all_gather_object(gathered, mine)
    ref = gathered[0]
    problems = []
    for r, sig in enumerate(gathered[1:], start=1):
        if sig.keys() != ref.keys():
            extra = sorted(set(sig) - set(ref))[:3]
            missing = sorted(set(ref) - set(sig))[:3]
            problems.append(f"rank {r} has different tensors than rank 0 (extra {extra}, missing {missing})")
            continue
        # layouts first: a differing layout is the cause of differing shapes
        for k, v in sorted(ref.items(), key=lambda kv: not kv[0].startswith("layout")):
            if sig[k] != v:
                what = "layout" if k.startswith("layout") else (
                    "shape" if sig[k][0] != v[0] else "dtype" if sig[k][1] != v[1] else "values")
                problems.append(f"rank {r} differs from rank 0 in {k} ({what}: rank 0 {v}, rank {r} {sig[k]})")
                break
    if problems:
        raise DistributedMismatchError(
            f"ranks disagree{' ' + where if where else ''}: " + "; ".join(problems)
            + " -- every rank must hold the same model, layouts and optimizer state")
    return len(ref)
