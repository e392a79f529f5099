"""The Hugging Face way: save_pretrained / from_pretrained, Trainer checkpoints and resume,
PruningCallback, SparsityConfig, and the optimizer-built-before-sparsify error."""
import copy
import json
import math
import os

import pytest
import torch
from torch import nn
from transformers import (AutoModelForMaskedLM, BertForMaskedLM, BertForSequenceClassification, Trainer,
                          TrainerCallback, TrainingArguments)

import sparsebert
from sparsebert import BlockSparseLinear, MaskedEmbedding, MaskedLinear, SparsityConfig
from sparsebert.hf import PruningCallback, sparse_layers


def _ids(n=2, s=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 200, (n, s), generator=g)


def _logits(model, ids=None):
    with torch.no_grad():
        return model(input_ids=_ids() if ids is None else ids).logits


def _same_sparse_model(a, b):
    """Same sparse layers (class, layout / mask, activation, backend), same tensors and dtypes."""
    la, lb = dict(sparse_layers(a)), dict(sparse_layers(b))
    assert list(la) == list(lb)
    for n, m in la.items():
        o = lb[n]
        assert type(o) is type(m), n
        if isinstance(m, BlockSparseLinear):
            assert o.layout == m.layout and o.activation == m.activation and o.backend == m.backend, n
        else:
            assert torch.equal(o.mask, m.mask), n
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k, v in sa.items():
        assert sb[k].dtype == v.dtype and torch.equal(sb[k], v), k


# ---- save_pretrained -> plain transformers (dense) and sparsebert (sparse) ------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["block", "unstructured"])
def test_save_pretrained_loads_dense_in_transformers_and_sparse_in_sparsebert(tmp_path, tiny_bert_config,
                                                                              mode, dtype):
    torch.manual_seed(0)
    model = sparsebert.sparsify(BertForMaskedLM(tiny_bert_config).to(dtype), 0.5, block=32, mode=mode).eval()
    if mode == "block":
        assert any(m.activation == "gelu" for _, m in sparse_layers(model))   # fused GELU included
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["sparsebert"]["sparsity_config"]["mode"] == mode

    dense = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()   # plain transformers
    assert not any(isinstance(m, (BlockSparseLinear, MaskedLinear, MaskedEmbedding)) for m in dense.modules())
    assert {p.dtype for p in dense.parameters()} == {dtype}
    for name, m in sparse_layers(model):
        w = dense.get_submodule(name).weight
        kept = m.layout.element_mask() if mode == "block" else m.mask
        assert torch.equal(w[~kept], torch.zeros_like(w[~kept])), name       # pruned: exactly zero
        want = m.dense_weight() if mode == "block" else m.weight
        assert torch.equal(w, want.detach()), name
    ref = sparsebert.densify(copy.deepcopy(model))
    assert torch.equal(_logits(dense), _logits(ref))          # the masked-dense model's outputs
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(_logits(dense).float(), _logits(model).float(), atol=tol, rtol=tol)

    for loaded in (sparsebert.from_pretrained(tmp_path), sparsebert.load_sparse(tmp_path)):
        assert not loaded.training
        _same_sparse_model(model, loaded)
        assert torch.equal(_logits(loaded), _logits(model))
        assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight
        assert sparsebert.get_sparsity_config(loaded) == sparsebert.get_sparsity_config(model)
        if mode == "unstructured":   # the tied decoder and the embeddings share one mask
            assert loaded.cls.predictions.decoder.mask is loaded.bert.embeddings.word_embeddings.mask


@pytest.mark.parametrize("mode", ["block", "unstructured"])
def test_a_sharded_save_pretrained_loads_both_ways(tmp_path, tiny_bert_config, mode):
    torch.manual_seed(0)
    model = sparsebert.sparsify(BertForMaskedLM(tiny_bert_config), 0.5, block=32, mode=mode).eval()
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    shards = sorted(f for f in os.listdir(tmp_path) if f.startswith("model-") and f.endswith(".safetensors"))
    assert len(shards) >= 2 and not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    marks = [k for k in index if k.endswith((".block_mask", ".mask_bits"))]
    assert marks and len(set(index.values())) == len(shards)
    dense = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()          # plain transformers
    assert torch.allclose(_logits(dense), _logits(model), atol=1e-5)
    for loaded in (sparsebert.from_pretrained(tmp_path), sparsebert.load_sparse(tmp_path)):
        _same_sparse_model(model, loaded)
        assert torch.equal(_logits(loaded), _logits(model))
        assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight


def test_a_shard_index_pointing_outside_the_folder_is_refused(tmp_path, tiny_bert_config):
    torch.manual_seed(0)
    model = sparsebert.sparsify(BertForMaskedLM(tiny_bert_config), 0.5, block=32).eval()
    ck = tmp_path / "ck"
    model.save_pretrained(ck, max_shard_size="200KB")
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    os.rename(ck / first, tmp_path / first)                       # a shard outside, named by ../
    index["weight_map"] = {k: ("../" + v if v == first else v) for k, v in index["weight_map"].items()}
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(sparsebert.CheckpointError, match=r"names '\.\./model-.*' as a shard: not a file of"):
        sparsebert.from_pretrained(ck)


def test_from_pretrained_into_a_template_and_a_sub_module_sparsified(tmp_path, tiny_bert_config):
    torch.manual_seed(0)
    model = BertForMaskedLM(tiny_bert_config).eval()
    sparsebert.sparsify(model.bert, 0.5, block=32)        # sparsified as a sub-module
    model.save_pretrained(tmp_path)
    template = BertForMaskedLM(tiny_bert_config)
    loaded = sparsebert.from_pretrained(tmp_path, model=template)
    _same_sparse_model(model, loaded)
    assert not sparse_layers(template)                    # the template is left alone
    assert loaded.bert.encoder.layer[0].intermediate.dense.activation == "gelu"


def test_load_state_dict_restores_any_layout_and_optimizer_state_follows(tiny_bert_config):
    torch.manual_seed(0)
    src = sparsebert.sparsify(BertForMaskedLM(tiny_bert_config), 0.75, block=32)
    dst = sparsebert.sparsify(BertForMaskedLM(tiny_bert_config), 0.0, block=32)
    q = dst.bert.encoder.layer[0].attention.self.query
    values = q.values
    dst.load_state_dict(src.state_dict())                 # fewer blocks: values shrinks in place
    assert q.values is values
    _same_sparse_model(src.eval(), dst.eval())
    # back to a denser layout (not a sub-layout): Adam state of the old shape is dropped, not a crash
    opt = torch.optim.AdamW(dst.parameters(), lr=1e-3)
    dst(input_ids=_ids()).logits.sum().backward()
    opt.step()
    dense_again = sparsebert.sparsify(BertForMaskedLM(tiny_bert_config), 0.25, block=32)
    dst.load_state_dict(dense_again.state_dict())
    assert q.values is values and q.values.shape[0] == dense_again.bert.encoder.layer[0].attention.self.query.layout.nnz
    opt.zero_grad()
    dst(input_ids=_ids()).logits.sum().backward()
    opt.step()
    assert opt.state[q.values]["exp_avg"].shape == q.values.shape


def test_a_plain_dense_state_dict_loads_into_a_sparse_model_keeping_its_masks(tiny_bert_config):
    torch.manual_seed(0)
    dense = BertForMaskedLM(tiny_bert_config)
    for mode in ("block", "unstructured"):
        sparse = sparsebert.sparsify(BertForMaskedLM(tiny_bert_config), 0.5, block=32, mode=mode)
        before = {n: (m.layout if mode == "block" else m.mask.clone()) for n, m in sparse_layers(sparse)}
        sparse.load_state_dict(dense.state_dict())
        for n, m in sparse_layers(sparse):
            if mode == "block":
                assert m.layout == before[n]
                assert torch.equal(m.dense_weight(), dense.get_submodule(n).weight * m.layout.element_mask())
            else:
                assert torch.equal(m.mask, before[n])
                assert torch.equal(m.weight, torch.where(m.mask, dense.get_submodule(n).weight, 0.0))


# ---- SparsityConfig -----------------------------------------------------------------------------
def test_sparsity_config_round_trip_and_sparsify_with_it(tmp_path, tiny_bert_config):
    cfg = SparsityConfig(mode="unstructured", sparsity=0.6, scope="global", targets=[r"intermediate\.dense$"],
                         schedule={"initial_sparsity": 0.1, "end_step": 100, "frequency": 5})
    assert SparsityConfig.from_json(cfg.to_json()) == cfg
    cfg.save(tmp_path / "s.json")
    assert SparsityConfig.load(tmp_path / "s.json") == cfg
    json.loads((tmp_path / "s.json").read_text())          # plain JSON
    sched = cfg.cubic_schedule()
    assert (sched.initial_sparsity, sched.final_sparsity, sched.end_step, sched.frequency) == (0.1, 0.6, 100, 5)
    assert SparsityConfig(block=16).block == (16, 16)
    for bad in ({"mode": "blocks"}, {"sparsity": 1.5}, {"block": "32"}, {"targets": lambda n, m: True},
                {"schedule": {"end": 3}}, {"scope": "model"}):
        with pytest.raises(ValueError):
            SparsityConfig(**bad)
    with pytest.raises(ValueError, match="unknown SparsityConfig fields"):
        SparsityConfig.from_dict({"mode": "block", "sparsty": 0.5})

    torch.manual_seed(0)
    base = BertForMaskedLM(tiny_bert_config)
    a = sparsebert.sparsify(copy.deepcopy(base), cfg)
    b = sparsebert.sparsify(copy.deepcopy(base), **cfg.sparsify_kwargs())
    _same_sparse_model(a.eval(), b.eval())
    assert sparsebert.get_sparsity_config(a) == cfg
    with pytest.raises(ValueError, match="not also as arguments"):
        sparsebert.sparsify(copy.deepcopy(base), cfg, block=16)
    # saved into both folder formats, and re-applied
    a.save_pretrained(tmp_path / "hf")
    sparsebert.save_sparse(a, tmp_path / "sp")
    for d in ("hf", "sp"):
        assert SparsityConfig.load(tmp_path / d) == cfg
    c = sparsebert.sparsify(copy.deepcopy(base), SparsityConfig.load(tmp_path / "sp"))
    _same_sparse_model(a, c.eval())
    # keyword arguments are recorded too
    d = sparsebert.sparsify(copy.deepcopy(base), 0.5, block=32)
    assert sparsebert.get_sparsity_config(d) == SparsityConfig(mode="block", sparsity=0.5, block=32)
    assert "sparsebert" not in sparsebert.densify(d).config.to_dict()


# ---- an optimizer built before sparsify ----------------------------------------------------------
def test_an_optimizer_built_before_block_sparsify_raises_at_its_step(tiny_bert_config):
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sparsebert.sparsify(model, 0.5, block=32)
    model(input_ids=_ids()).logits.sum().backward()
    with pytest.raises(RuntimeError, match=r"steps bert\.encoder\.layer\.0\.attention\.self\.query\.weight.*"
                                           r"build the optimizer after sparsify"):
        opt.step()
    good = torch.optim.AdamW(model.parameters(), lr=1e-3)   # built after: fine
    good.step()


# ---- Trainer ------------------------------------------------------------------------------------
class _Data(torch.utils.data.Dataset):
    def __init__(self, n=16):
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, 200, (n, 12), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def _trainer(out, cfg_bert, callback, **args):
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg_bert)
    targs = TrainingArguments(output_dir=str(out), max_steps=3, save_steps=2, per_device_train_batch_size=4,
                              learning_rate=1e-3, report_to="none", seed=0, **args)
    return Trainer(model=model, args=targs, train_dataset=_Data(), callbacks=[callback])


@pytest.mark.parametrize("mode", ["block", "unstructured"])
def test_trainer_checkpoints_and_resumes_while_the_callback_prunes(tmp_path, tiny_bert_config, mode):
    sched = {"initial_sparsity": 0.0, "start_step": 0, "end_step": 3, "frequency": 1}
    cfg = SparsityConfig(mode=mode, sparsity=0.75, block=32, schedule=sched)
    cb = PruningCallback(cfg)
    t = _trainer(tmp_path / "run", tiny_bert_config, cb)
    model = t.model
    assert sparse_layers(model)                           # sparsified when the Trainer was built
    t.train()                                             # default save: safetensors, at steps 2 and 3
    final = model.eval()
    assert abs(cb.pruner.sparsity() - 0.75) < 0.02        # the callback reached the target
    ck2, ck3 = tmp_path / "run" / "checkpoint-2", tmp_path / "run" / "checkpoint-3"
    assert (ck2 / "model.safetensors").is_file() and (ck3 / "model.safetensors").is_file()
    assert json.loads((ck3 / "config.json").read_text())["sparsebert"]["sparsity_config"]["sparsity"] == 0.75
    logged = [h for h in t.state.log_history if "sparsity" in h]
    assert logged and abs(logged[-1]["kept_fraction"] - 0.25) < 0.02

    # the checkpoints load both ways
    _same_sparse_model(final, sparsebert.from_pretrained(ck3))
    dense = BertForSequenceClassification.from_pretrained(ck3).eval()
    with torch.no_grad():
        assert torch.allclose(dense(input_ids=_ids()).logits, final(input_ids=_ids()).logits, atol=1e-5)

    # resume at step 2 (layouts pruned further since step 0) in a fresh Trainer: the same model at step 3
    mid = sparsebert.from_pretrained(ck2)
    t2 = _trainer(tmp_path / "resumed", tiny_bert_config, PruningCallback(cfg))
    assert max(m.density for _, m in sparse_layers(t2.model)) == 1.0    # a fresh model at 0% ...
    t2.train(resume_from_checkpoint=str(ck2))                           # ... takes the step-2 layouts
    resumed = t2.model.eval()
    for (n, a), (_, b) in zip(sparse_layers(final), sparse_layers(resumed)):
        if mode == "block":
            assert a.layout == b.layout, n
        else:
            assert torch.equal(a.mask, b.mask), n
    for (k, v), (_, w) in zip(final.state_dict().items(), resumed.state_dict().items()):
        assert torch.allclose(v.float(), w.float(), atol=1e-6), k
    assert mid.training is False


@pytest.mark.parametrize("added", ["callbacks=", "add_callback"])
def test_the_sparsity_reaches_every_log_reporter(tmp_path, tiny_bert_config, monkeypatch, added):
    """Trainer puts the report_to integrations (TensorBoard, W&B) ahead of the user's callbacks:
    a reporter in their place, and one the user lists first, must see the sparsity in `logs`."""
    import transformers.trainer

    seen = {"integration": [], "user": []}

    class Reporter(TrainerCallback):
        def __init__(self, name):
            self.name = name

        def on_log(self, args, state, control, logs=None, **kw):
            seen[self.name].append(dict(logs))

    monkeypatch.setattr(transformers.trainer, "get_reporting_integration_callbacks",
                        lambda report_to: [Reporter("integration")])
    cfg = SparsityConfig(mode="block", sparsity=0.5, block=16, schedule={"start_step": 0, "end_step": 2, "frequency": 1})
    cb = PruningCallback(cfg)
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config)
    targs = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                              learning_rate=1e-3, report_to="none", save_strategy="no", logging_steps=1, seed=0)
    if added == "callbacks=":
        t = Trainer(model=model, args=targs, train_dataset=_Data(), callbacks=[Reporter("user"), cb])
    else:
        cb.prepare(model)
        t = Trainer(model=model, args=targs, train_dataset=_Data(), callbacks=[Reporter("user")])
        t.add_callback(cb)
    t.train()
    for name, logs in seen.items():
        steps = [l for l in logs if "loss" in l]
        assert len(steps) == 2, (name, logs)
        assert all("sparsity" in l and "kept_fraction" in l for l in steps), (name, logs)
        assert steps[-1]["sparsity"] == pytest.approx(0.5, abs=0.02), name
    assert sum(c is cb for c in t.callback_handler.callbacks) == 1


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("mode", ["block", "unstructured"])
def test_callback_reaches_the_target_at_the_end_of_its_ramp_with_pruned_weights_zero(tmp_path, tiny_bert_config,
                                                                                  mode, scope):
    cfg = SparsityConfig(mode=mode, sparsity=0.5, block=16, scope=scope,
                         schedule={"start_step": 0, "end_step": 2, "frequency": 1})
    cb = PruningCallback(cfg)
    t = _trainer(tmp_path, tiny_bert_config, cb, save_strategy="no", logging_steps=1)
    seen = []

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            seen.append((state.global_step, cb.pruner.sparsity()))

    t.add_callback(Watch())
    t.train()
    assert seen[0][0] == 1 and 0.3 < seen[0][1] < 0.47             # ramping: 0.4375 at step 1 of 2
    assert all(abs(s - 0.5) < 0.02 for step, s in seen if step >= 2)   # target reached at end_step
    for _, m in sparse_layers(t.model):
        if mode == "block":
            w = m.dense_weight()
            assert torch.equal(w[~m.layout.element_mask()], torch.zeros(int((~m.layout.element_mask()).sum())))
        else:
            assert torch.equal(m.weight[~m.mask], torch.zeros(int((~m.mask).sum())))
    assert [h["sparsity"] for h in t.state.log_history if "sparsity" in h]


def test_trainer_save_model_of_a_model_sparsified_beforehand(tmp_path, tiny_bert_config):
    torch.manual_seed(0)
    model = sparsebert.sparsify(BertForSequenceClassification(tiny_bert_config), 0.5, block=32)
    t = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to="none",
                                                    per_device_train_batch_size=4), train_dataset=_Data())
    t.train()
    t.save_model(str(tmp_path / "final"))
    _same_sparse_model(model.eval(), sparsebert.from_pretrained(tmp_path / "final"))


def test_a_state_dict_of_the_earlier_format_still_loads():
    """sparsebert <= 0.1 saved `values` and an `_extra_state` dict (which safetensors cannot hold)."""
    torch.manual_seed(0)
    layer = BlockSparseLinear.from_dense(nn.Linear(64, 32), sparsity=0.5, block=16)
    old = {"values": layer.values.detach().clone(), "bias": layer.bias.detach().clone(),
           "_extra_state": {"block_mask": layer.layout.block_mask, "shape": layer.layout.shape,
                            "block": layer.layout.block}}
    other = BlockSparseLinear.from_dense(nn.Linear(64, 32), sparsity=0.0, block=16)
    other.load_state_dict(old)
    assert other.layout == layer.layout and torch.equal(other.values, layer.values)
    assert set(layer.state_dict()) == {"weight", "bias", "block_mask"}
    from safetensors.torch import load, save
    back = BlockSparseLinear.from_dense(nn.Linear(64, 32), sparsity=0.0, block=16)
    back.load_state_dict(load(save(layer.state_dict())))       # safetensors: no extra state
    assert back.layout == layer.layout and torch.equal(back.values, layer.values)


@pytest.mark.parametrize("mode", ["block", "unstructured"])
def test_trainer_bf16_trains_a_sparse_model(tmp_path, tiny_bert_config, mode):
    # Trainer(bf16=True) runs the forward under CPU autocast: the sparse layers must take bf16
    # inputs with fp32 weights (they raised "values dtype torch.float32 does not match x dtype
    # torch.bfloat16" before), train (the loss falls, fp32 master weights change, pruned weights
    # stay exactly zero) and save.
    cfg = SparsityConfig(mode=mode, sparsity=0.5, block=32,
                         schedule={"initial_sparsity": 0.5, "start_step": 0, "end_step": 0, "frequency": 1})
    t = _trainer(tmp_path / "run", tiny_bert_config, PruningCallback(cfg), bf16=True, use_cpu=True)
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    t.train()
    layers = sparse_layers(t.model)
    assert layers
    changed = 0
    for name, m in layers:
        if mode == "block":
            assert m.values.dtype == torch.float32
            changed += not torch.equal(m.values.detach(), before[f"{name}.values"])
        else:
            assert m.weight.dtype == torch.float32
            assert torch.count_nonzero(m.weight[~m.mask]) == 0, name
    if mode == "block":   # (a layer may get an exactly zero gradient: a head whose query and key
        # blocks are all pruned gives scores constant over keys, so its softmax ignores them)
        assert changed >= 0.75 * len(layers), f"only {changed}/{len(layers)} block layers trained"
    losses = [h["loss"] for h in t.state.log_history if "loss" in h] or [t.state.log_history[-1]["train_loss"]]
    assert all(math.isfinite(x) for x in losses)
    assert (tmp_path / "run" / "checkpoint-3" / "model.safetensors").is_file()
