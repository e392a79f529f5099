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


@pytest.mark.parametrize("mode", ["block", "unstructured"])
def test_checkpoint_of_a_bare_layer_round_trips(tmp_path, mode):
    # sparsify(nn.Linear) returns the sparse layer itself; load_sparse(model=nn.Linear) of its
    # checkpoint registered the new layer as a child named "" of the template and then refused
    # every key ("missing ['.weight', ...]").
    torch.manual_seed(0)
    layer = sparsebert.sparsify(torch.nn.Linear(64, 32), 0.5, block=16, mode=mode)
    sparsebert.save_sparse(layer, tmp_path)
    x = torch.randn(3, 64)
    for template in (torch.nn.Linear(64, 32), sparsebert.sparsify(torch.nn.Linear(64, 32), 0.75, block=16, mode=mode)):
        loaded = sparsebert.load_sparse(tmp_path, model=template)
        assert type(loaded) is type(layer)
        torch.testing.assert_close(loaded(x), layer(x), rtol=0, atol=0)
