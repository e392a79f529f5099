"""sparsify / densify / save_sparse / load_sparse on tiny random BERTs, and the CLI."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from transformers import BertForMaskedLM, BertForSequenceClassification, BertModel

import sparsebert
from sparsebert import BlockSparseLinear, CheckpointError, MaskedEmbedding, MaskedLinear


def _ids(n=2, s=12):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 200, (n, s), generator=g)


@pytest.mark.parametrize("cls", [BertModel, BertForMaskedLM, BertForSequenceClassification])
@pytest.mark.parametrize("mode", ["block", "unstructured"])
def test_sparsify_equals_masked_dense_model_outputs_and_gradients(tiny_bert_config, cls, mode):
    torch.manual_seed(0)
    model = cls(tiny_bert_config).eval()
    sparse = sparsebert.sparsify(copy.deepcopy(model), sparsity=0.5, block=(32, 32), mode=mode)
    kinds = {type(m) for m in sparse.modules()}
    assert (BlockSparseLinear if mode == "block" else MaskedLinear) in kinds
    dense = sparsebert.densify(copy.deepcopy(sparse))
    assert not any(isinstance(m, (BlockSparseLinear, MaskedLinear, MaskedEmbedding)) for m in dense.modules())
    ids = _ids()
    out_s, out_d = sparse(input_ids=ids), dense(input_ids=ids)
    key = "last_hidden_state" if cls is BertModel else "logits"
    ys, yd = out_s[key], out_d[key]
    assert torch.allclose(ys, yd, atol=1e-5, rtol=1e-4)
    ys.square().sum().backward()
    yd.square().sum().backward()
    q_s = sparse.get_submodule(_q(cls))
    q_d = dense.get_submodule(_q(cls))
    if mode == "block":
        g_s = q_s.layout.scatter(q_s.values.grad)
        g_d = q_d.weight.grad * q_s.layout.element_mask()
    else:
        g_s, g_d = q_s.weight.grad, q_d.weight.grad * q_s.mask
    assert torch.allclose(g_s, g_d, atol=1e-5, rtol=1e-4)


def _q(cls):
    prefix = "" if cls is BertModel else "bert."
    return prefix + "encoder.layer.0.attention.self.query"


def test_default_targets_are_the_papers(tiny_bert_config):
    model = sparsebert.sparsify(BertForMaskedLM(tiny_bert_config), sparsity=0.5, mode="unstructured")
    names = {n for n, m in model.named_modules() if isinstance(m, (MaskedLinear, MaskedEmbedding))}
    per_layer = {"attention.self.query", "attention.self.key", "attention.self.value",
                 "attention.output.dense", "intermediate.dense", "output.dense"}
    expected = {f"bert.encoder.layer.{i}.{s}" for i in range(2) for s in per_layer}
    expected |= {"bert.embeddings.word_embeddings", "cls.predictions.decoder"}
    assert names == expected          # BertForMaskedLM has no pooler; the MLM transform is not pruned
    emb, dec = model.bert.embeddings.word_embeddings, model.cls.predictions.decoder
    assert dec.weight is emb.weight and dec.mask is emb.mask
    assert type(model.cls.predictions.transform.dense) is nn.Linear


def test_pooler_and_any_model_via_targets(tiny_bert_config):
    model = sparsebert.sparsify(BertModel(tiny_bert_config), sparsity=0.5)
    assert isinstance(model.pooler.dense, BlockSparseLinear)
    mlp = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 32))
    sparsebert.sparsify(mlp, sparsity=0.75, block=16, targets=[r".*"])
    assert isinstance(mlp[0], BlockSparseLinear) and mlp[2].density == 0.25
    with pytest.raises(ValueError, match="no nn.Linear"):
        sparsebert.sparsify(nn.Sequential(nn.ReLU()), sparsity=0.5, targets=[r".*"])


def test_block_not_dividing_a_layer_names_it(tiny_bert_config):
    with pytest.raises(ValueError, match=r"attention\.self\.query's weight \(64, 64\)"):
        sparsebert.sparsify(BertModel(tiny_bert_config), sparsity=0.5, block=(48, 48))


def test_mask_stays_fixed_through_finetuning_with_tied_decoder(tiny_bert_config):
    torch.manual_seed(0)
    model = sparsebert.sparsify(BertForMaskedLM(tiny_bert_config), sparsity=0.6, mode="unstructured")
    emb = model.bert.embeddings.word_embeddings
    pruned = ~emb.mask.clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    for _ in range(5):
        ids = _ids()
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(); loss.backward(); opt.step()
    assert torch.count_nonzero(emb.weight[pruned]) == 0


@pytest.mark.parametrize("mode", ["block", "unstructured"])
def test_save_load_round_trip_is_exact(tmp_path, tiny_bert_config, mode):
    torch.manual_seed(0)
    model = sparsebert.sparsify(BertForMaskedLM(tiny_bert_config), sparsity=0.75, mode=mode).eval()
    sparsebert.save_sparse(model, tmp_path)
    loaded = sparsebert.load_sparse(str(tmp_path)).eval()
    ids = _ids()
    assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    for (n1, t1), (n2, t2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2
        if torch.is_tensor(t1):
            assert torch.equal(t1, t2), n1
    assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight


def test_block_checkpoint_holds_only_kept_blocks(tmp_path, tiny_bert_config):
    from safetensors import safe_open
    model = sparsebert.sparsify(BertModel(tiny_bert_config), sparsity=0.75)
    sparsebert.save_sparse(model, tmp_path)
    with safe_open(os.path.join(tmp_path, "sparse_model.safetensors"), "pt") as f:
        keys = set(f.keys())
        v = f.get_tensor("encoder.layer.0.intermediate.dense.values")
    assert "encoder.layer.0.intermediate.dense.weight" not in keys
    assert v.shape == (2, 32, 32)       # [128, 64] weight = 4 x 2 blocks, 25% kept
    assert v.shape[0] == model.encoder.layer[0].intermediate.dense.layout.nnz


def test_corrupt_truncated_or_mismatched_checkpoint_raises(tmp_path, tiny_bert_config):
    model = sparsebert.sparsify(BertModel(tiny_bert_config), sparsity=0.5)
    good = tmp_path / "good"
    sparsebert.save_sparse(model, good)
    tensor_file = good / "sparse_model.safetensors"
    data = tensor_file.read_bytes()
    tensor_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt checkpoint"):
        sparsebert.load_sparse(str(good))
    tensor_file.write_bytes(data[:-5] + b"xxxxx")
    with pytest.raises(CheckpointError, match="SHA-256"):
        sparsebert.load_sparse(str(good))
    tensor_file.write_bytes(data)
    (good / "sparsebert.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        sparsebert.load_sparse(str(good))
    with pytest.raises(CheckpointError, match="missing"):
        sparsebert.load_sparse(str(tmp_path / "nowhere"))
    # a model of another shape
    sparsebert.save_sparse(model, good)
    other = copy.deepcopy(tiny_bert_config)
    other.intermediate_size = 256
    before = copy.deepcopy(BertModel(other).state_dict())
    target = BertModel(other)
    target.load_state_dict(before)
    with pytest.raises(CheckpointError, match="intermediate"):
        sparsebert.load_sparse(str(good), model=target)
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), before.values()))


def _cli(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return subprocess.run([sys.executable, "-m", "sparsebert", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def test_cli_info_lists_backends_with_reasons():
    r = _cli("info")
    assert r.returncode == 0, r.stderr
    assert "torch" in r.stdout
    for name in ("reference", "dense", "triton", "cuda", "cpu"):
        assert name in r.stdout
    assert "unavailable: " in r.stdout          # no GPU here: the cuda backend says why
    from sparsebert.ops import cpu_bsr
    if cpu_bsr.unavailable_reason() is None:    # and which compiled CPU kernel set runs
        assert f"cpu        available ({cpu_bsr.isa()} kernels)" in r.stdout


def test_cli_prune_writes_checkpoint_and_table(tmp_path, tiny_bert_config):
    src = tmp_path / "model"
    BertForSequenceClassification(tiny_bert_config).save_pretrained(src)
    r = _cli("prune", str(src), "--sparsity", "0.5", "--block", "32", "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert "bert.encoder.layer.1.intermediate.dense" in r.stdout and "0.500" in r.stdout
    meta = json.loads((tmp_path / "out" / "sparsebert.json").read_text())
    assert meta["model_class"] == "BertForSequenceClassification"
    loaded = sparsebert.load_sparse(str(tmp_path / "out"))
    assert isinstance(loaded.bert.pooler.dense, BlockSparseLinear)
    r = _cli("prune", str(tmp_path / "nothing"), "--sparsity", "0.5", "--out", str(tmp_path / "x"))
    assert r.returncode != 0 and "cannot load" in r.stderr


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_intermediate_gelu_is_fused_and_unfused(tmp_path, tiny_bert_config, backend):
    """sparsify runs BERT's intermediate GELU inside the sparse layer (same outputs and gradients
    as the unfused model); densify and save/load keep the model equivalent."""
    from sparsebert.hf import FusedActivation
    from sparsebert.ops import backends
    if backends.unavailable_reason(backend, "cpu") is not None:
        pytest.skip(backends.unavailable_reason(backend, "cpu"))
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config).eval()
    plain = sparsebert.sparsify(copy.deepcopy(model), 0.5, block=(16, 16), backend=backend,
                                fuse_activation=False)
    fused = sparsebert.sparsify(copy.deepcopy(model), 0.5, block=(16, 16), backend=backend)
    inter = fused.bert.encoder.layer[1].intermediate
    assert inter.dense.activation == "gelu" and isinstance(inter.intermediate_act_fn, FusedActivation)
    assert plain.bert.encoder.layer[1].intermediate.dense.activation == "none"
    assert all(m.activation == "none" for n, m in fused.named_modules()
               if isinstance(m, BlockSparseLinear) and not n.endswith("intermediate.dense"))
    ids = _ids()
    with torch.no_grad():                                   # inference: the fused kernel path
        torch.testing.assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
    fused(input_ids=ids).logits.square().sum().backward()  # training: gelu as its own op
    plain(input_ids=ids).logits.square().sum().backward()
    g = lambda m: m.bert.encoder.layer[0].intermediate.dense.values.grad
    torch.testing.assert_close(g(fused), g(plain), rtol=1e-5, atol=1e-5)

    sparsebert.save_sparse(fused, str(tmp_path / "ck"))
    loaded = sparsebert.load_sparse(str(tmp_path / "ck"))
    assert isinstance(loaded.bert.encoder.layer[0].intermediate.intermediate_act_fn, FusedActivation)
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, plain(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
    dense = sparsebert.densify(copy.deepcopy(fused))
    act = dense.bert.encoder.layer[0].intermediate.intermediate_act_fn
    assert type(act).__name__ == "GELUActivation"
    with torch.no_grad():
        torch.testing.assert_close(dense(input_ids=ids).logits, plain(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_tanh_gelu_is_not_fused_and_a_fused_checkpoint_needs_an_exact_gelu(tmp_path, tiny_bert_config):
    torch.manual_seed(0)
    exact = sparsebert.sparsify(BertModel(tiny_bert_config), 0.5, block=(16, 16))
    sparsebert.save_sparse(exact, str(tmp_path / "ck"))
    cfg = copy.deepcopy(tiny_bert_config)
    cfg.hidden_act = "gelu_new"                          # the tanh approximation: not the kernels' GELU
    tanh_model = BertModel(cfg)
    sparsebert.sparsify(tanh_model, 0.5, block=(16, 16))
    assert tanh_model.encoder.layer[0].intermediate.dense.activation == "none"
    with pytest.raises(CheckpointError, match="fused GELU"):
        sparsebert.load_sparse(str(tmp_path / "ck"), model=BertModel(cfg))


def _everything(name, module):
    return True


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_targeted_tied_decoder_prunes_the_embeddings_with_it(tmp_path, tiny_bert_config, scope):
    """Targets that include the tied MLM decoder but not the word embeddings: the one weight is
    pruned once, with one mask applied in both forwards — the embedding lookup masks too, so
    nothing regrows through it (it used to after two SGD steps), and a save/load round trip is
    exact (it used to differ by ~0.1)."""
    torch.manual_seed(0)
    model = sparsebert.sparsify(BertForMaskedLM(tiny_bert_config), 0.5, mode="unstructured",
                                scope=scope, targets=_everything)
    emb, dec = model.bert.embeddings.word_embeddings, model.cls.predictions.decoder
    assert isinstance(emb, MaskedEmbedding) and isinstance(dec, MaskedLinear)
    assert dec.weight is emb.weight and dec.mask is emb.mask
    if scope == "layer":
        assert emb.density == 0.5                    # one tensor, pruned once (not twice)
    pruned = ~emb.mask.clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.01)
    for _ in range(3):
        ids = _ids()
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(); loss.backward(); opt.step()
    assert torch.count_nonzero(emb.weight[pruned]) == 0
    model.eval()
    sparsebert.save_sparse(model, tmp_path)
    loaded = sparsebert.load_sparse(str(tmp_path)).eval()
    ids = _ids()
    assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    lemb, ldec = loaded.bert.embeddings.word_embeddings, loaded.cls.predictions.decoder
    assert ldec.weight is lemb.weight and ldec.mask is lemb.mask and torch.equal(lemb.mask, emb.mask)
    # the Pruner manages the tied pair as one layer, and keeps it tied
    from sparsebert.pruning import OneShotSchedule, Pruner
    pruner = Pruner(model, OneShotSchedule(0.8))
    assert sum(1 for _, m in pruner.layers if m.weight is emb.weight) == 1
    pruner.step(0)
    assert dec.mask is emb.mask and emb.density == pytest.approx(0.2, abs=1e-3 if scope == "layer" else 0.3)


def test_tied_decoder_with_embeddings_false_is_refused(tiny_bert_config):
    with pytest.raises(ValueError, match=r"cls\.predictions\.decoder\.weight is tied to "
                                         r"bert\.embeddings\.word_embeddings\.weight.*embeddings=False"):
        sparsebert.sparsify(BertForMaskedLM(tiny_bert_config), 0.5, mode="unstructured",
                            targets=_everything, embeddings=False)


def test_block_mode_refuses_to_untie_the_tied_decoder(tmp_path, tiny_bert_config):
    """A BlockSparseLinear stores its own copy of the kept blocks: the decoder used to be
    silently untied from the embeddings."""
    torch.manual_seed(0)
    model = BertForMaskedLM(tiny_bert_config).eval()
    with pytest.raises(ValueError, match=r"cls\.predictions\.decoder\.weight is tied to "
                                         r"bert\.embeddings\.word_embeddings\.weight.*block mode"):
        sparsebert.sparsify(model, 0.5, block=(32, 8), targets=_everything)
    assert type(model.cls.predictions.decoder) is nn.Linear          # nothing was converted
    assert not any(isinstance(m, BlockSparseLinear) for m in model.modules())
    # leaving it out works, and the decoder's bias tie (cls.predictions.bias) is untouched
    sparsebert.sparsify(model, 0.5, block=(32, 8), targets=lambda n, m: not n.endswith("decoder"))
    assert isinstance(model.cls.predictions.transform.dense, BlockSparseLinear)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    sparsebert.save_sparse(model, tmp_path)
    loaded = sparsebert.load_sparse(str(tmp_path)).eval()
    assert torch.equal(model(input_ids=_ids()).logits, loaded(input_ids=_ids()).logits)
    assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight


@pytest.mark.parametrize("mode", ["block", "unstructured"])
def test_frozen_linears_stay_frozen(tiny_bert_config, mode):
    model = BertModel(tiny_bert_config)
    for p in model.encoder.layer[0].parameters():
        p.requires_grad_(False)
    model.encoder.layer[1].attention.self.query.bias.requires_grad_(False)
    sparsebert.sparsify(model, 0.5, block=(32, 32), mode=mode)
    q0, q1 = model.encoder.layer[0].attention.self.query, model.encoder.layer[1].attention.self.query
    w = "values" if mode == "block" else "weight"
    assert not getattr(q0, w).requires_grad and not q0.bias.requires_grad
    assert getattr(q1, w).requires_grad and not q1.bias.requires_grad
    assert model.encoder.layer[1].intermediate.dense.bias.requires_grad


@pytest.mark.parametrize("mode", ["block", "unstructured"])
def test_a_bare_linear_is_converted(mode):
    lin = nn.Linear(64, 32)
    x = torch.randn(3, 64)
    new = sparsebert.sparsify(lin, 0.5, block=16, mode=mode)
    assert isinstance(new, BlockSparseLinear if mode == "block" else MaskedLinear)
    assert new.density == 0.5
    w = new.dense_weight() if mode == "block" else new.masked_weight()
    torch.testing.assert_close(new(x), x @ w.T + lin.bias)
    back = sparsebert.densify(new)
    assert type(back) is nn.Linear
    torch.testing.assert_close(back(x), new(x))
    with pytest.raises(ValueError, match="already sparse"):
        sparsebert.sparsify(new, 0.5, block=16, mode=mode)
    other = sparsebert.sparsify(nn.Linear(64, 32), 0.5, block=16, mode=mode, targets=[".*"])
    assert isinstance(other, BlockSparseLinear if mode == "block" else MaskedLinear)
    assert "" not in dict(other.named_children())


@pytest.mark.parametrize("mode", ["block", "unstructured"])
def test_sparsify_twice_says_already_sparse(tiny_bert_config, mode):
    model = sparsebert.sparsify(BertModel(tiny_bert_config), 0.5, mode=mode)
    with pytest.raises(ValueError, match=r"already sparse: encoder\.layer\.0\.attention\.self\.query is a "
                                         r"(BlockSparseLinear|MaskedLinear).*Pruner"):
        sparsebert.sparsify(model, 0.7, mode=mode)


def test_bad_targets_name_the_pattern(tiny_bert_config):
    with pytest.raises(ValueError, match=r"targets pattern 'layer\.\(.*' is not a valid regular expression"):
        sparsebert.sparsify(BertModel(tiny_bert_config), 0.5, targets=[r"query$", r"layer.(\d"])
    with pytest.raises(ValueError, match="targets must be"):
        sparsebert.sparsify(BertModel(tiny_bert_config), 0.5, targets=3)


def test_a_module_registered_twice_is_replaced_everywhere():
    shared = nn.Linear(32, 32)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    sparsebert.sparsify(model, 0.5, block=16, targets=[r"^\d+$"])
    assert isinstance(model[0], BlockSparseLinear) and model[2] is model[0]


def test_already_sparse_check_survives_a_predicate_written_for_nn_linear(tiny_bert_config):
    model = sparsebert.sparsify(BertForMaskedLM(tiny_bert_config), 0.5)
    by_shape = lambda n, m: m.weight.shape[0] == 64          # BlockSparseLinear has no .weight
    sparsebert.sparsify(model, 0.5, block=(32, 32), targets=by_shape)   # the MLM transform is left
    assert isinstance(model.cls.predictions.transform.dense, BlockSparseLinear)
