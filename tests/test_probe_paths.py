"""Bugs found by probing the paths users take (deep copies, reloads, bad inputs, ...): each test
failed on the code before its fix."""
import copy
import pickle
import warnings

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


@pytest.mark.parametrize("bad", [True, "0.5", None])
def test_sparsity_must_be_a_number(tiny_bert_config, bad):
    # True passed the range check as 1.0 and pruned every weight; "0.5" failed inside the scoring
    # with "'<=' not supported between 'float' and 'str'".
    from transformers import BertModel
    with pytest.raises(TypeError, match="sparsity must be a number"):
        sparsebert.sparsify(BertModel(tiny_bert_config), sparsity=bad, block=16)
    if bad is not None:    # from_dense(sparsity=None) means "give mask=": its own error
        with pytest.raises(TypeError, match="sparsity must be a number"):
            BlockSparseLinear.from_dense(torch.nn.Linear(32, 32), sparsity=bad, block=16)


def test_bsr_linear_names_a_non_tensor_argument():
    lay = BlockLayout.dense((32, 32), 16)
    v = torch.randn(lay.nnz, 16, 16)
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        sparsebert.bsr_linear([[0.0] * 32], v, lay)
    with pytest.raises(TypeError, match="bias must be a torch.Tensor, got list"):
        sparsebert.bsr_linear(torch.randn(2, 32), v, lay, [0.0] * 32)


def test_an_unknown_backend_fails_where_the_layer_is_made(tiny_bert_config):
    # the name was stored as given and refused only at the first forward (or, under
    # torch.compile, inside the compiled op at run time)
    from transformers import BertModel
    lay = BlockLayout.dense((32, 32), 16)
    with pytest.raises(ValueError, match="unknown backend 'cpu2'; choose one of .* or 'auto'"):
        BlockSparseLinear(lay, backend="cpu2")
    with pytest.raises(ValueError, match="unknown backend 'Triton'"):
        BlockSparseLinear.from_dense(torch.nn.Linear(32, 32), sparsity=0.5, block=16, backend="Triton")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        sparsebert.sparsify(BertModel(tiny_bert_config), 0.5, block=16, backend="nope")
    layer = BlockSparseLinear(lay, backend="reference")
    with pytest.raises(ValueError, match="unknown backend None"):
        layer.backend = None
    assert layer.backend == "reference"
    layer.backend = "cpu"
    assert layer.backend == "cpu"


def test_a_layer_pickled_with_a_plain_backend_attribute_still_loads():
    # before the checked property the name was an instance attribute `backend`
    layer = BlockSparseLinear(BlockLayout.dense((32, 32), 16), backend="reference")
    state = layer.__dict__.copy()
    state["backend"] = state.pop("_backend")
    old = BlockSparseLinear.__new__(BlockSparseLinear)
    old.__setstate__(state)
    assert old.backend == "reference"
    torch.testing.assert_close(old(torch.ones(2, 32)), layer(torch.ones(2, 32)))


@pytest.mark.parametrize("mode", ["block", "unstructured"])
def test_a_saved_weight_nonzero_where_its_mask_prunes_warns_on_loading(tiny_bert_config, mode):
    # a state dict (save_pretrained folder, Trainer checkpoint) whose weight was edited, or written
    # by another tool, with nonzeros where its own mask prunes: the load zeroed them silently
    from transformers import BertModel
    torch.manual_seed(0)
    model = sparsebert.sparsify(BertModel(tiny_bert_config), 0.5, block=16, mode=mode)
    state = model.state_dict()
    key = "encoder.layer.0.attention.self.query.weight"
    clean = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")         # an untouched state dict loads without a warning
        clean.load_state_dict(state)
    w = state[key]
    pruned = (w == 0).nonzero()[0]
    state[key] = w.clone()
    state[key][tuple(pruned)] = 0.5
    with pytest.warns(UserWarning, match=f"{key}: 1 (blocks|weights) are nonzero where the saved mask prunes"):
        clean.load_state_dict(state)
    assert float(clean.state_dict()[key][tuple(pruned)]) == 0.0
