"""sparsebert.optimize's BertLayer at CPU inference: the layer op (csrc/cpu/bert_layer.cpp) and the
one-function Python path must give the module path's output bit for bit, and be left for the
module path wherever they do not restate it."""
import importlib

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

import sparsebert
from sparsebert.hf import unfuse_activations
from sparsebert.ops import backends

opt_mod = importlib.import_module("sparsebert.optimize")    # (sparsebert.optimize is the function)
VOCAB = 120


def _skip_without_kernels():
    from transformers.models.bert.modeling_bert import BertLayer
    from sparsebert.ops import cpu_bsr
    if cpu_bsr.layer_op() is None:
        pytest.skip("sparsebert._C has no bert_layer op here")
    if not opt_mod._direct_ff_ok(BertLayer):
        pytest.skip("this transformers' BertLayer.forward is not the one optimize restates")


def _model(kind="block", sparsity=0.5, layers=2, **cfg):
    torch.manual_seed(0)
    config = BertConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=160, vocab_size=VOCAB, max_position_embeddings=64,
                        attn_implementation="sdpa", **cfg)
    m = BertForMaskedLM(config)
    if kind == "block":
        sparsebert.sparsify(m, sparsity, block=(16, 16))
    return sparsebert.optimize(m).eval()


def _ids(B=3, S=21, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (B, S), generator=g)


class _Paths:
    """Counts the layer calls each path served; ``force`` switches paths off."""

    def __init__(self, monkeypatch, force=None):
        self.op = self.served = 0
        real_layer, real_op = opt_mod._infer_layer, opt_mod._infer_layer_op

        def layer(*a):
            if force == "module":
                return None
            y = real_layer(*a)
            self.served += y is not None
            return y

        def op(*a):
            if force in ("module", "python"):
                return None
            y = real_op(*a)
            self.op += y is not None
            return y
        monkeypatch.setattr(opt_mod, "_infer_layer", layer)
        monkeypatch.setattr(opt_mod, "_infer_layer_op", op)

    @property
    def python(self):            # layer calls the Python path served
        return self.served - self.op


def _run(m, ids, mask=None, **kw):
    with torch.inference_mode():
        return m.bert(input_ids=ids, attention_mask=mask, **kw).last_hidden_state


def _module_path(monkeypatch, m, ids, mask=None):
    with monkeypatch.context() as mp:
        _Paths(mp, force="module")
        return _run(m, ids, mask)


@pytest.mark.parametrize("sparsity, padded", [(0.5, False), (0.9, True), (0.0, True), (0.7, False)])
def test_layer_op_is_the_module_path_bit_for_bit(monkeypatch, sparsity, padded):
    _skip_without_kernels()
    m = _model(sparsity=sparsity)
    for layer in m.modules():                       # auto's timing settled or not, the same op
        if isinstance(layer, sparsebert.BlockSparseLinear):
            layer.backend = "cpu"
    ids = _ids()
    mask = None
    if padded:
        mask = torch.ones_like(ids)
        mask[1, 13:] = 0
        mask[2, 5:] = 0
    ref = _module_path(monkeypatch, m, ids, mask)
    paths = _Paths(monkeypatch)
    first = _run(m, ids, mask)                      # (a first call may check the backend first)
    out = _run(m, ids, mask)
    assert paths.op >= 2 and paths.served == 4
    assert torch.equal(first, ref) and torch.equal(out, ref)
    with torch.no_grad():                           # the unoptimized model, to fp32 rounding
        sparsebert.unoptimize(m)
        torch.testing.assert_close(m.bert(input_ids=ids, attention_mask=mask).last_hidden_state, ref,
                                   rtol=1e-5, atol=1e-5)


def test_python_path_serves_dense_and_unsettled_layers_bit_for_bit(monkeypatch):
    _skip_without_kernels()
    ids = _ids()
    for kind in ("dense", "block"):
        m = _model(kind)
        ref = _module_path(monkeypatch, m, ids)
        if kind == "block":
            m.bert.encoder.layer[1].output.dense.backend = "reference"   # one layer not on cpu
        with monkeypatch.context() as mp:
            paths = _Paths(mp)
            out = _run(m, ids)
            out2 = _run(m, ids)
        assert paths.served == 4, kind
        assert paths.op == 0 if kind == "dense" else paths.op in (1, 2), kind   # never layer 1
        assert torch.equal(out2, ref) if kind == "dense" else torch.allclose(out2, ref, atol=1e-5)
        if kind == "dense":
            assert torch.equal(out, ref)


def test_auto_takes_the_op_once_its_choice_is_settled(monkeypatch):
    _skip_without_kernels()
    m = _model(sparsity=0.8, layers=1)
    ids = _ids(S=23)
    for env in ("cpu", None):            # SPARSEBERT_BACKEND=cpu, then auto's own timing
        backends.clear_auto_cache()
        if env:
            monkeypatch.setenv("SPARSEBERT_BACKEND", env)
        else:
            monkeypatch.delenv("SPARSEBERT_BACKEND", raising=False)
        with monkeypatch.context() as mp:
            paths = _Paths(mp)
            _run(m, ids)
            assert paths.op == (0 if env is None else paths.op)   # auto: not timed yet
            _run(m, ids)
        names = {backends.cached_choice("cpu", torch.float32, 3 * 23, lin.layout, False)
                 for lin in m.modules() if isinstance(lin, sparsebert.BlockSparseLinear)}
        if env or names == {"cpu"}:
            assert paths.op >= 1, env
        else:
            assert paths.op == 0 and paths.python == 2   # some layer timed faster elsewhere


@pytest.mark.parametrize("case", ["hook", "train_dropout", "grad", "unfused_gelu", "output_attentions", "fp64"])
def test_layer_paths_leave_every_other_call_to_the_modules(monkeypatch, case):
    _skip_without_kernels()
    m = _model(sparsity=0.6, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    for layer in m.modules():
        if isinstance(layer, sparsebert.BlockSparseLinear):
            layer.backend = "cpu"
    ids = _ids()
    _run(m, ids)                                    # settles the backend checks
    hooked = []
    if case == "hook":
        m.bert.encoder.layer[0].attention.self.key.register_forward_hook(lambda *a: hooked.append(1))
    elif case == "unfused_gelu":
        unfuse_activations(m)
    elif case == "fp64":
        m.double()
        for layer in m.modules():
            if isinstance(layer, sparsebert.BlockSparseLinear):
                layer.backend = "auto"
    paths = _Paths(monkeypatch)
    with torch.inference_mode(case not in ("grad",)):
        if case == "train_dropout":
            m.train()
            torch.manual_seed(3)
            out = m.bert(input_ids=ids).last_hidden_state
        elif case == "grad":
            out = m.bert(input_ids=ids).last_hidden_state
            assert out.requires_grad
        elif case == "output_attentions":
            res = m.bert(input_ids=ids, output_attentions=True)
            assert len(res.attentions) == 2
        else:
            m.bert(input_ids=ids)
    if case == "hook":
        assert hooked == [1] and paths.op == 1 and paths.python == 0
    elif case in ("unfused_gelu", "train_dropout"):
        assert paths.op == 0 and paths.python == 2  # (the activation, the dropouts: module calls)
    else:
        assert paths.op == 0 and paths.python == 0, case
    if case == "train_dropout":                     # the same random numbers as the module path
        with monkeypatch.context() as mp:
            _Paths(mp, force="module")
            torch.manual_seed(3)
            with torch.inference_mode():
                assert torch.equal(m.bert(input_ids=ids).last_hidden_state, out)


def test_unfused_gelu_python_path_is_the_module_path(monkeypatch):
    _skip_without_kernels()
    m = _model(sparsity=0.6)
    unfuse_activations(m)
    ids = _ids()
    ref = _module_path(monkeypatch, m, ids)
    paths = _Paths(monkeypatch)
    assert torch.equal(_run(m, ids), ref) and paths.python == 2


def test_layer_op_names_bad_arguments():
    _skip_without_kernels()
    op = torch.ops.sparsebert_cpu.bert_layer
    x = torch.randn(6, 32)
    with pytest.raises(RuntimeError, match="six layers expected"):
        op(x, [], [], [], [], None, 1, 2, 1.0, None, None, 1e-5, None, None, 1e-5)
    with pytest.raises(RuntimeError, match="does not split into"):
        op(x, [x] * 6, [None] * 6, [x] * 6, [0] * 24, None, 4, 2, 1.0, None, None, 1e-5, None, None, 1e-5)


@pytest.mark.parametrize("change, op_calls", [("no_layernorm", 1), ("plain_layernorm", 2),
                                              ("dropout_on", 1), ("swapped_linear", 1)])
def test_layer_op_follows_changes_to_the_layer(monkeypatch, change, op_calls):
    # every condition is read at each call: a layer changed after optimize (and after op calls)
    # leaves the op, and its output stays the module path's
    _skip_without_kernels()
    m = _model(sparsity=0.6, hidden_dropout_prob=0.1)
    for layer in m.modules():
        if isinstance(layer, sparsebert.BlockSparseLinear):
            layer.backend = "cpu"
    ids = _ids()
    _run(m, ids)
    _run(m, ids)
    block = m.bert.encoder.layer[1]
    if change == "no_layernorm":
        block.output.LayerNorm = torch.nn.Identity()
    elif change == "plain_layernorm":             # no affine parameters: still the op
        block.output.LayerNorm = torch.nn.LayerNorm(64, elementwise_affine=False)
    elif change == "dropout_on":                  # training mode with p > 0: not fused
        block.attention.output.train()
    elif change == "swapped_linear":              # a user's own module in place of a sparse layer
        block.intermediate.dense = torch.nn.Sequential(block.intermediate.dense)
    torch.manual_seed(5)
    ref = _module_path(monkeypatch, m, ids)
    paths = _Paths(monkeypatch)
    torch.manual_seed(5)
    out = _run(m, ids)
    assert paths.op == op_calls
    assert torch.equal(out, ref)



def test_a_dropout_left_in_training_mode_in_an_eval_model_still_drops(monkeypatch):
    # Hugging Face's BertOutput calls its dropout module, whose own mode decides; the fused
    # add + LayerNorm (module path and layer op alike) must not skip it when only the parent is eval
    _skip_without_kernels()
    torch.manual_seed(0)
    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=160,
                        vocab_size=VOCAB, max_position_embeddings=64, attn_implementation="sdpa",
                        hidden_dropout_prob=0.3)
    ref = BertForMaskedLM(config)
    sparsebert.sparsify(ref, 0.5, block=(16, 16))
    ref.eval()
    opt = sparsebert.optimize(__import__("copy").deepcopy(ref), dropout="torch").eval()
    for m in (ref, opt):
        m.bert.encoder.layer[1].output.dropout.train()
    ids = _ids()
    for _ in range(2):
        outs = []
        for m in (ref, opt):
            torch.manual_seed(7)
            with torch.no_grad():
                outs.append(m.bert(input_ids=ids).last_hidden_state)
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("where", ["output.LayerNorm", "output.dropout", "attention.output.LayerNorm",
                                   "attention.output.dropout", "intermediate.intermediate_act_fn"])
def test_a_hook_on_a_module_the_fused_paths_do_not_call_runs(monkeypatch, where):
    # the fused add + LayerNorm calls neither the dropout nor the LayerNorm module, and the layer
    # paths never call the (fused) activation module: a hook on any of them must send the call to
    # the modules, where it runs (here it doubles the module's output, as the unoptimized model does)
    _skip_without_kernels()
    m = _model(sparsity=0.5)
    for layer in m.modules():
        if isinstance(layer, sparsebert.BlockSparseLinear):
            layer.backend = "cpu"
    ref = __import__("copy").deepcopy(m)
    sparsebert.unoptimize(ref)
    ids = _ids()
    _run(m, ids)
    _run(m, ids)                                    # hooks registered after fast calls
    calls = []
    for model in (ref, m):
        mod = model.bert.encoder.layer[1]
        for name in where.split("."):
            mod = getattr(mod, name)
        mod.register_forward_hook(lambda mo, i, o: (calls.append(1), o * 2)[1])
    expected = _run(ref, ids)
    out = _run(m, ids)
    assert len(calls) == 2
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_trainer_evaluate_runs_the_fast_layer_paths(monkeypatch, tmp_path):
    # Trainer passes num_items_in_batch down to every BertLayer: a loss-only argument, which must
    # not send the layers to the module path (it did: no fast layer call under Trainer)
    _skip_without_kernels()
    from transformers import BertForSequenceClassification, Trainer, TrainingArguments
    torch.manual_seed(0)
    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=160,
                        vocab_size=VOCAB, max_position_embeddings=64, attn_implementation="sdpa")
    m = BertForSequenceClassification(config)
    sparsebert.sparsify(m, 0.5, block=(16, 16))
    sparsebert.optimize(m).eval()
    g = torch.Generator().manual_seed(2)
    data = [{"input_ids": torch.randint(1, VOCAB, (9,), generator=g), "labels": torch.tensor(i % 2)}
            for i in range(6)]
    losses = []
    for force in (None, "module"):
        with monkeypatch.context() as mp:
            paths = _Paths(mp, force=force)
            tr = Trainer(model=m, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[],
                                                         per_device_eval_batch_size=3), eval_dataset=data)
            losses.append(tr.evaluate()["eval_loss"])
            if force is None:
                assert paths.served == 2 * 2            # two layers, two batches
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_fast_paths_survive_a_call_that_asked_for_hidden_states_or_attentions(monkeypatch):
    # transformers 5 installs its output-capturing hooks for good at the first such call; while no
    # capture runs they do nothing, and must not turn the fast paths off for the model's lifetime
    _skip_without_kernels()
    m = _model(sparsity=0.5)
    ids = _ids()
    ref = _module_path(monkeypatch, m, ids)
    with torch.inference_mode():
        hs = m.bert(input_ids=ids, output_hidden_states=True, output_attentions=True)
    assert len(hs.hidden_states) == 3 and len(hs.attentions) == 2
    assert m.bert.encoder.layer[0].attention.self._forward_hooks      # (the capture hooks are there)
    paths = _Paths(monkeypatch)
    assert torch.equal(_run(m, ids), ref)
    assert paths.served == 2
    with torch.inference_mode():                  # a capturing call still gets every state
        again = m.bert(input_ids=ids, output_hidden_states=True)
    assert paths.served == 2 and len(again.hidden_states) == 3
    for a, b in zip(again.hidden_states, hs.hidden_states):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
