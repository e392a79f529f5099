"""Bugs found by probing the paths users take (deep copies, reloads, bad inputs, ...): each test
failed on the code before its fix."""
import copy
import pickle

import pytest
import torch

import sparsebert
from sparsebert import BlockLayout, BlockSparseLinear


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "fresh"])
def test_compile_fullgraph_with_cold_layout(how):
    # A layout whose caches are empty (deepcopy, pickle, load_sparse, a new pruning layout) made
    # torch.compile trace `int(mask.sum())` for its block count: a data-dependent guard, so
    # fullgraph=True raised and a plain compile broke the graph.
    torch.manual_seed(0)
    layer = BlockSparseLinear.from_dense(torch.nn.Linear(64, 32), sparsity=0.5, block=16)
    x = torch.randn(4, 64)
    ref = layer(x)
    if how == "deepcopy":
        layer = copy.deepcopy(layer)
    elif how == "pickle":
        layer = pickle.loads(pickle.dumps(layer))
    else:
        layer.layout = BlockLayout.from_mask(layer.layout.block_mask, (16, 16))
    torch._dynamo.reset()
    y = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(y, ref)
