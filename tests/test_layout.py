import pytest
import torch

from sparsebert import BlockLayout


def test_index_arrays_match_the_documented_example():
    lay = BlockLayout.from_mask(torch.tensor([[1, 0], [1, 1]]), block=(2, 2))
    lt = lay.tensors()
    assert lt.row_ptr.tolist() == [0, 1, 3]
    assert lt.col_idx.tolist() == [0, 0, 1]
    assert lt.row_idx.tolist() == [0, 1, 1]
    assert lt.col_ptr.tolist() == [0, 2, 3]
    assert lt.t_row_idx.tolist() == [0, 1, 1]
    assert lt.t_perm.tolist() == [0, 1, 2]
    assert all(t.dtype == torch.int32 for t in lt[:6])


def test_transposed_index_lists_each_column_in_row_order():
    g = torch.Generator().manual_seed(1)
    m = torch.rand(7, 5, generator=g) < 0.4
    lt = BlockLayout.from_mask(m, (16, 16)).tensors()
    for c in range(5):
        s, e = lt.col_ptr[c].item(), lt.col_ptr[c + 1].item()
        rows = lt.t_row_idx[s:e].tolist()
        assert rows == sorted(rows) == m[:, c].nonzero().flatten().tolist()
        for j in range(s, e):
            i = lt.t_perm[j].item()
            assert lt.row_idx[i].item() == lt.t_row_idx[j].item() and lt.col_idx[i].item() == c


def test_gather_scatter_round_trip():
    lay = BlockLayout.from_mask(torch.rand(3, 4) < 0.5, (8, 4))
    w = torch.randn(24, 16)
    dense = lay.scatter(lay.gather(w))
    assert torch.equal(dense, w * lay.element_mask())


@pytest.mark.parametrize("kwargs, message", [
    (dict(block_mask=torch.ones(2, 2, dtype=torch.bool), block=(32, 32), shape=(64, 96)), "needs"),
    (dict(block_mask=torch.ones(2, 2), block=(32, 32)), "boolean"),
    (dict(block_mask=torch.ones(2, 3, dtype=torch.bool), block=(32, 32), shape=(64, 100)), "does not divide"),
    (dict(block_mask=torch.ones(2, 3, 1, dtype=torch.bool), block=(32, 32)), "2-D"),
    (dict(block_mask=torch.tensor([[0, 2]]), block=(32, 32)), "other than 0 and 1"),
    (dict(block_mask=torch.ones(1, 1, dtype=torch.bool), block=(0, 32)), "positive"),
])
def test_from_mask_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BlockLayout.from_mask(**kwargs)


def test_from_blocks_rejects_out_of_range_and_duplicates():
    with pytest.raises(ValueError, match="out of range"):
        BlockLayout.from_blocks([0, 2], [0, 0], shape=(64, 64), block=32)
    with pytest.raises(ValueError, match="duplicate"):
        BlockLayout.from_blocks([0, 0], [1, 1], shape=(64, 64), block=32)
    lay = BlockLayout.from_blocks([1, 0], [0, 1], shape=(64, 64), block=32)
    assert lay.block_mask.tolist() == [[False, True], [True, False]]


def test_element_mask_must_be_block_constant():
    m = torch.zeros(64, 64, dtype=torch.bool)
    m[:32, :32] = True
    assert BlockLayout.from_element_mask(m, 32).nnz == 1
    m[40, 40] = True
    with pytest.raises(ValueError, match="not constant"):
        BlockLayout.from_element_mask(m, 32)


def test_values_shape_is_checked():
    lay = BlockLayout.dense((64, 64), 32)
    with pytest.raises(ValueError, match="nnz=4"):
        lay.scatter(torch.zeros(3, 32, 32))


def test_equality_hash_and_pickle():
    import pickle
    a = BlockLayout.from_mask(torch.tensor([[1, 0]]), 16)
    b = BlockLayout.from_mask(torch.tensor([[True, False]]), 16)
    c = BlockLayout.from_mask(torch.tensor([[0, 1]]), 16)
    assert a == b and hash(a) == hash(b) and a != c
    assert pickle.loads(pickle.dumps(a)) == a


def test_positions_in_only_allows_shrinking():
    big = BlockLayout.from_mask(torch.tensor([[1, 1], [0, 1]]), 8)
    small = big.intersect(torch.tensor([[0, 1], [1, 1]]))
    assert small.block_mask.tolist() == [[False, True], [False, True]]
    assert big.positions_in(small).tolist() == [1, 2]
    with pytest.raises(ValueError, match="only shrink"):
        small.positions_in(big)


def test_packed_index_is_reused_not_repacked():
    lay = BlockLayout.from_mask(torch.rand(2, 2) < 0.5, 32)
    lt = lay.tensors()
    assert lt.packed() is lay.index("cpu")
    own = lt._replace(index=None, **{f: getattr(lt, f).clone() for f in lt._fields[:6]})
    assert torch.equal(own.packed(), lay.index("cpu"))


@pytest.mark.parametrize("block", ["32", "3", True, (True, 2), 32.0, (32.0, 32), (32,), (16, 16, 1),
                                   None, torch.tensor([16, 16])])
def test_block_must_be_an_int_or_a_pair_of_ints(block):
    """A string is not iterated into digits ("32" is not (3, 2)), nor is True read as 1."""
    with pytest.raises(ValueError, match="block must be a positive int or a pair"):
        BlockLayout.dense((64, 64), block=block)


def test_block_accepts_ints_and_pairs():
    import numpy as np
    assert BlockLayout.dense((64, 64), block=32).block == (32, 32)
    assert BlockLayout.dense((64, 64), block=[16, 32]).block == (16, 32)
    assert BlockLayout.dense((64, 64), block=(np.int64(16), 16)).block == (16, 16)
    with pytest.raises(ValueError, match="positive"):
        BlockLayout.dense((64, 64), block=(-16, 16))


def test_every_mask_follows_one_rule_bool_or_01_integers():
    """Float masks are refused everywhere (an element mask of 0.3s used to keep everything)."""
    soft = torch.full((64, 64), 0.3)
    with pytest.raises(ValueError, match="boolean"):
        BlockLayout.from_element_mask(soft, (32, 32))
    with pytest.raises(ValueError, match="other than 0 and 1"):
        BlockLayout.from_element_mask(torch.full((64, 64), 2), (32, 32))
    lay = BlockLayout.dense((64, 64), (32, 32))
    with pytest.raises(ValueError, match="boolean"):
        lay.intersect(torch.tensor([[0.0, 1.0], [1.0, 1.0]]))
    with pytest.raises(ValueError, match="shape"):
        lay.intersect(torch.ones(1, 2, dtype=torch.bool))           # no silent broadcasting
    assert lay.intersect(torch.tensor([[0, 1], [1, 1]])).nnz == 3
    assert BlockLayout.from_element_mask(torch.ones(64, 64, dtype=torch.int32), (32, 32)).nnz == 4
