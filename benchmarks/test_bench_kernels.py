"""pytest-benchmark over the grid of ``bench_kernels.py`` (CUDA only; its CPU dry run, which CI
runs, is ``tests/test_bench_scripts.py::test_bench_kernels_dry_run_on_the_cpu``).

    pytest benchmarks/test_bench_kernels.py --benchmark-enable -p no:cacheprovider -m gpu

Each benchmark synchronises inside the timed function. Cases are built once per
(shape, block, sparsity) and shared by the providers.
"""
import functools
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_kernels as bk  # noqa: E402


@functools.lru_cache(maxsize=1)
def _case(K, N, block, sparsity):
    return bk.make_case(K, N, block, sparsity)


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd", "dx", "dw"])
@pytest.mark.parametrize("provider", bk.PROVIDERS)
@pytest.mark.parametrize("sparsity", bk.SPARSITIES, ids=lambda s: f"s{int(s * 100)}")
@pytest.mark.parametrize("block", bk.BLOCKS, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("shape", bk.SHAPES, ids=lambda s: f"{s[0]}to{s[1]}")
def test_kernel(benchmark, cuda, shape, block, sparsity, provider, mode):
    case = _case(shape[0], shape[1], block, sparsity)
    built = bk.build_provider(provider, case)
    if isinstance(built, str):
        pytest.skip(f"{provider}: {built}")
    idx = ["fwd", "fwd_bwd", "dx", "dw"].index(mode)
    fn = built[idx] if len(built) > idx else None
    if fn is None:
        pytest.skip(f"{provider}: no {mode}")

    def timed():
        fn()
        torch.cuda.synchronize()

    timed()
    benchmark.extra_info.update(shape=f"{shape[0]}->{shape[1]}", block=block, sparsity=sparsity,
                                provider=provider, mode=mode, kept=case.kept)
    benchmark.pedantic(timed, rounds=20, iterations=1, warmup_rounds=3)

