"""Bugs found by a third probe of the paths users take with ``sparsebert.optimize``: each test
failed on the code before its fix."""
import copy
import threading

import pytest
import torch
from torch import nn

import sparsebert


def _cfg(**kw):
    from transformers import BertConfig
    return BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                      vocab_size=100, max_position_embeddings=64, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, **kw)


def _ids(B=2, S=16, seed=0):
    return torch.randint(3, 100, (B, S), generator=torch.Generator().manual_seed(seed))


def test_causal_lm_head_is_not_cut_to_labelled_positions():
    # BertLMHeadModel has BERT's MLM head but a shifted, causal loss: the labelled-rows hook
    # gave it another loss (4.624 -> 4.631) and [n_labelled, vocab] logits.
    from transformers import BertLMHeadModel
    torch.manual_seed(0)
    model = BertLMHeadModel(_cfg(is_decoder=True)).eval()
    ids = _ids()
    labels = ids.clone()
    labels[0, 10:] = -100
    ref = model(input_ids=ids, labels=labels)
    sparsebert.optimize(model)
    out = model(input_ids=ids, labels=labels)
    assert out.logits.shape == ref.logits.shape
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)


def test_labelled_head_selection_is_per_thread():
    # One model, two threads: thread A is held between the model's pre-hook (which chose its
    # rows) and the head while thread B runs a whole call. The selection was one attribute
    # shared by all calls, so A's head then ran on every row (a wrong loss, or a shape error).
    from transformers import BertForMaskedLM
    torch.manual_seed(0)
    model = BertForMaskedLM(_cfg()).eval()
    ids = _ids()
    la, lb = ids.clone(), ids.clone()
    la[:, ::2] = -100
    lb[:, 1:] = -100
    with torch.no_grad():
        want_a, want_b = model(input_ids=ids, labels=la).loss, model(input_ids=ids, labels=lb).loss
    sparsebert.optimize(model)
    a_paused, b_done = threading.Event(), threading.Event()

    def hold(module, args, output):
        if threading.current_thread().name == "A":
            a_paused.set()
            b_done.wait(30)
    model.bert.register_forward_hook(hold)
    got, errors = {}, []

    def run_a():
        try:
            with torch.no_grad():
                got["a"] = model(input_ids=ids, labels=la).loss
        except Exception as e:          # noqa: BLE001
            errors.append(e)
    t = threading.Thread(target=run_a, name="A")
    t.start()
    assert a_paused.wait(30)
    with torch.no_grad():
        got["b"] = model(input_ids=ids, labels=lb).loss
    b_done.set()
    t.join(30)
    assert not errors, errors
    torch.testing.assert_close(got["a"], want_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["b"], want_b, rtol=1e-5, atol=1e-5)


def test_a_head_put_in_after_optimize_gets_the_plain_loss_and_the_model_copies():
    # The model's pre-hook kept cutting labels to the labelled rows while the new head (no hook)
    # computed every row: a shape error. The kept hook handles broke deepcopy and torch.load.
    from transformers import BertForMaskedLM
    from transformers.models.bert.modeling_bert import BertOnlyMLMHead
    torch.manual_seed(0)
    cfg = _cfg()
    model = BertForMaskedLM(cfg).eval()
    sparsebert.optimize(model)
    model.cls = BertOnlyMLMHead(cfg)
    ids = _ids()
    labels = ids.clone()
    labels[:, ::3] = -100
    with torch.no_grad():
        got = model(input_ids=ids, labels=labels)
        twin = copy.deepcopy(model)
        sparsebert.unoptimize(model)
        want = model(input_ids=ids, labels=labels)
    assert got.logits.shape == want.logits.shape
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(twin(input_ids=ids, labels=labels).loss, want.loss, rtol=1e-6, atol=1e-6)
    assert not any(model._forward_pre_hooks) and not any(model._forward_hooks)


def test_deepcopy_and_unoptimize_of_an_optimized_masked_lm():
    from transformers import BertForMaskedLM
    torch.manual_seed(0)
    model = sparsebert.optimize(BertForMaskedLM(_cfg()).eval())
    twin = copy.deepcopy(model)
    ids = _ids()
    labels = ids.clone()
    labels[:, 1::2] = -100
    with torch.no_grad():
        a = twin(input_ids=ids, labels=labels)
        b = model(input_ids=ids, labels=labels)
    assert a.logits.shape[0] == int((labels != -100).sum()) == b.logits.shape[0]
    sparsebert.unoptimize(twin)
    assert not twin._forward_pre_hooks and not twin._forward_hooks and not twin.cls._forward_pre_hooks


def _with_output_class(model, cls):
    for layer in model.encoder.layer:
        new = cls(model.config)
        new.load_state_dict(layer.output.state_dict(), strict=False)
        layer.output = new


@pytest.mark.parametrize("grad", [False, True])
def test_a_customised_bert_output_keeps_its_forward(grad):
    # optimize swapped the class of any module *named* BertOutput for its fused add + LayerNorm,
    # dropping a customised forward (here an adapter): max-abs diff 0.26, in training too.
    from transformers import BertModel
    from transformers.models.bert import modeling_bert

    class BertOutput(modeling_bert.BertOutput):
        def __init__(self, config):
            super().__init__(config)
            self.adapter = nn.Linear(config.hidden_size, config.hidden_size)

        def forward(self, hidden_states, input_tensor):
            h = self.dropout(self.dense(hidden_states))
            return self.LayerNorm(h + self.adapter(h) + input_tensor)

    torch.manual_seed(0)
    model = BertModel(_cfg()).eval()
    _with_output_class(model, BertOutput)
    sparsebert.sparsify(model, 0.5, block=16)
    ref = copy.deepcopy(model)
    sparsebert.optimize(model)
    with torch.set_grad_enabled(grad):
        torch.testing.assert_close(model(_ids())[0], ref(_ids())[0], rtol=1e-5, atol=1e-5)


def test_bert_output_forward_patched_after_optimize_runs(monkeypatch):
    from transformers import BertModel
    from transformers.models.bert import modeling_bert
    torch.manual_seed(0)
    model = sparsebert.sparsify(BertModel(_cfg()).eval(), 0.5, block=16)
    ref = copy.deepcopy(model)
    sparsebert.optimize(model)
    orig = modeling_bert.BertOutput.forward
    monkeypatch.setattr(modeling_bert.BertOutput, "forward", lambda self, h, x: orig(self, h, x) * 0.5)
    with torch.no_grad():
        torch.testing.assert_close(model(_ids())[0], ref(_ids())[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("where", ["output", "attention.output"])
def test_a_hook_on_the_dense_before_add_norm_keeps_what_it_saw(where):
    # The fused add + LayerNorm overwrote dense's output in place: a forward hook that kept it
    # then held LayerNorm'd values (max-abs diff 3.3).
    from transformers import BertModel
    torch.manual_seed(0)
    model = sparsebert.sparsify(BertModel(_cfg()).eval(), 0.5, block=16)
    ref = copy.deepcopy(model)
    sparsebert.optimize(model)
    seen = {}
    for name, m in (("ref", ref), ("opt", model)):
        dense = m.encoder.layer[0].get_submodule(where).dense
        dense.register_forward_hook(lambda mod, a, out, name=name: seen.__setitem__(name, out))
    with torch.no_grad():
        torch.testing.assert_close(model(_ids())[0], ref(_ids())[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen["opt"], seen["ref"], rtol=1e-5, atol=1e-5)


def test_an_identity_dense_before_add_norm_does_not_overwrite_its_input():
    # dense = nn.Identity returns the attention context itself: the in-place pass overwrote the
    # context a hook on the self-attention had kept.
    from transformers import BertModel
    torch.manual_seed(0)
    model = BertModel(_cfg()).eval()
    for layer in model.encoder.layer:
        layer.attention.output.dense = nn.Identity()
    ref = copy.deepcopy(model)
    sparsebert.optimize(model)
    seen = {}
    for name, m in (("ref", ref), ("opt", model)):
        m.encoder.layer[0].attention.self.register_forward_hook(
            lambda mod, a, out, name=name: seen.__setitem__(name, out[0]))
    with torch.no_grad():
        torch.testing.assert_close(model(_ids())[0], ref(_ids())[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen["opt"], seen["ref"], rtol=1e-5, atol=1e-5)


def test_layernorm_and_dropout_subclasses_run_their_own_forward():
    # The fused add + LayerNorm accepted any nn.LayerNorm / nn.Dropout subclass and ran the plain
    # operations: a scaled LayerNorm was ignored (diff 2.6) and an always-on (MC) dropout too.
    from transformers import BertModel

    class ScaledLN(nn.LayerNorm):
        def forward(self, x):
            return 2.0 * super().forward(x)

    class MCDropout(nn.Dropout):
        def forward(self, x):
            return nn.functional.dropout(x, 0.5, training=True)

    torch.manual_seed(0)
    model = BertModel(_cfg()).eval()
    for layer in model.encoder.layer:
        ln = layer.output.LayerNorm
        new = ScaledLN(ln.normalized_shape, eps=ln.eps)
        new.load_state_dict(ln.state_dict())
        layer.output.LayerNorm = new
    ref = copy.deepcopy(model)
    sparsebert.optimize(model)
    with torch.no_grad():
        torch.testing.assert_close(model(_ids())[0], ref(_ids())[0], rtol=1e-5, atol=1e-5)
    for layer in model.encoder.layer:
        layer.attention.output.dropout = MCDropout(0.5)
    with torch.no_grad():
        assert not torch.equal(model(_ids())[0], model(_ids())[0])


def test_config_output_attentions_set_before_optimize_still_returns_them():
    # With config.output_attentions already True, transformers captures the probabilities from
    # the attention modules without passing output_attentions down: sparsebert's attention then
    # returned none and `attentions` came back empty.
    from transformers import BertModel
    cfg = _cfg(attn_implementation="eager")
    cfg.output_attentions = True
    torch.manual_seed(0)
    model = BertModel(cfg).eval()
    ids = _ids()
    with torch.no_grad():
        want = model(ids).attentions
        sparsebert.optimize(model)
        got = model(ids).attentions
    assert len(got) == len(want) == 2
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_optimize_switches_the_attention_of_a_bert_inside_a_users_module():
    # optimize switched the attention only when the model passed was a Hugging Face model: a
    # user's classifier around a BertModel kept "sdpa", so none of the fused paths ran.
    from transformers import BertModel

    from sparsebert import fused

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = BertModel(_cfg())
            self.head = nn.Linear(64, 3)

        def forward(self, ids):
            return self.head(self.bert(ids)[0][:, 0])

    torch.manual_seed(0)
    model = Classifier().eval()
    sparsebert.sparsify(model.bert, 0.5, block=16)
    ref = copy.deepcopy(model)
    before = model.bert.config._attn_implementation
    sparsebert.optimize(model)
    assert model.bert.config._attn_implementation == fused.ATTENTION_NAME
    assert ref.bert.config._attn_implementation == before    # the twin's config is its own
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()), ref(_ids()), rtol=1e-5, atol=1e-5)
    twin = copy.deepcopy(model)
    sparsebert.unoptimize(model)
    assert model.bert.config._attn_implementation == before
    sparsebert.unoptimize(twin)
    assert twin.bert.config._attn_implementation == before


def test_compiled_optimized_masked_lm_with_labels(recwarn):
    # The per-thread selection must stay traceable: torch.compile cannot trace threading.get_ident
    # (a graph break and a warning at every compile).
    from transformers import BertForMaskedLM
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = sparsebert.sparsify(BertForMaskedLM(_cfg()), 0.5, block=16)
    ref = copy.deepcopy(model)
    sparsebert.optimize(model)
    ids = _ids()
    labels = ids.clone()
    labels[:, ::2] = -100
    out = torch.compile(model)(input_ids=ids, labels=labels)
    want = ref(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-5, atol=1e-5)
    assert out.logits.shape == (int((labels != -100).sum()), 100)
    out.loss.backward()
    assert not [w for w in recwarn if "get_ident" in str(w.message)]


# ---- checkpoints and conversion (a probe of sparsify / save / load) --------------------------------
class _TiedBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(32, 32)
        self.c = nn.Linear(32, 32)
        self.c.bias = self.a.bias

    def forward(self, x):
        return self.c(torch.relu(self.a(x)))


@pytest.mark.parametrize("template", ["fresh", "sparse"])
def test_loading_a_block_checkpoint_keeps_a_bias_tie(tmp_path, template):
    # sparsify keeps a shared bias the same Parameter; load_sparse gave the block-sparse layer a
    # new one (and densify of a sparse template did too): one SGD step put them 3.3 apart.
    torch.manual_seed(0)
    net = sparsebert.sparsify(_TiedBias(), 0.5, block=16, targets=[r"^c$"])
    assert net.c.bias is net.a.bias
    sparsebert.save_sparse(net, tmp_path / "ck")
    got = sparsebert.load_sparse(tmp_path / "ck", model=_TiedBias() if template == "fresh" else net)
    assert got.c.bias is got.a.bias
    torch.testing.assert_close(got(torch.ones(2, 32)), net(torch.ones(2, 32)))


def test_densify_keeps_a_bias_tie_and_a_frozen_layer_frozen():
    torch.manual_seed(0)
    net = sparsebert.sparsify(_TiedBias(), 0.5, block=16, targets=[r"^c$"])
    net.c.values.requires_grad_(False)
    back = sparsebert.densify(net)
    assert back.c.bias is back.a.bias and not back.c.weight.requires_grad


@pytest.mark.parametrize("how", ["load_sparse", "from_pretrained"])
def test_a_frozen_template_layer_stays_frozen_after_loading(tmp_path, how):
    from transformers import BertForSequenceClassification
    torch.manual_seed(0)
    m = sparsebert.sparsify(BertForSequenceClassification(_cfg()), 0.5, block=16)
    if how == "load_sparse":
        sparsebert.save_sparse(m, tmp_path / "ck")
    else:
        m.save_pretrained(tmp_path / "ck")
    t = BertForSequenceClassification(_cfg())
    t.bert.encoder.layer[0].requires_grad_(False)
    got = getattr(sparsebert, how)(tmp_path / "ck", model=t)
    layer0, layer1 = got.bert.encoder.layer[0], got.bert.encoder.layer[1]
    assert not layer0.intermediate.dense.values.requires_grad and not layer0.intermediate.dense.bias.requires_grad
    assert layer1.intermediate.dense.values.requires_grad


def test_save_sparse_of_a_bare_layer_keeps_the_users_config_json(tmp_path):
    (tmp_path / "config.json").write_text('{"my": "notes"}')
    (tmp_path / "notes.txt").write_text("keep me")
    lin = sparsebert.sparsify(nn.Linear(64, 64), sparsity=0.5, block=16)
    sparsebert.save_sparse(lin, tmp_path)
    assert (tmp_path / "config.json").read_text() == '{"my": "notes"}'
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    torch.testing.assert_close(sparsebert.load_sparse(tmp_path, model=nn.Linear(64, 64)).values, lin.values)


@pytest.mark.parametrize("edit", ["layers_list", "layer_string", "bad_sparsity_config", "not_json", "json_list"])
def test_a_malformed_config_json_of_a_sparse_hf_folder_is_a_checkpoint_error(tmp_path, edit):
    import json

    from transformers import BertForMaskedLM
    torch.manual_seed(0)
    m = sparsebert.sparsify(BertForMaskedLM(_cfg()), 0.5, block=16)
    m.save_pretrained(tmp_path)
    f = tmp_path / "config.json"
    c = json.loads(f.read_text())
    if edit == "layers_list":
        c["sparsebert"]["layers"] = []
    elif edit == "layer_string":
        c["sparsebert"]["layers"]["bert.encoder.layer.0.intermediate.dense"] = "block"
    elif edit == "bad_sparsity_config":
        c["sparsebert"]["sparsity_config"]["mode"] = "weird"
    f.write_text({"not_json": "{oops", "json_list": "[]"}.get(edit) or json.dumps(c))
    template = BertForMaskedLM(_cfg()) if edit in ("not_json", "json_list") else None
    with pytest.raises(sparsebert.CheckpointError, match="config.json"):
        sparsebert.from_pretrained(tmp_path, model=template)


@pytest.mark.parametrize("score", ["magnitude", "random"])
def test_sparsify_of_a_model_on_the_meta_device_says_so(score):
    from transformers import BertForMaskedLM
    with torch.device("meta"):
        m = BertForMaskedLM(_cfg())
    with pytest.raises(ValueError, match="meta device"):
        sparsebert.sparsify(m, 0.5, block=16, mode="unstructured", score=score)


@pytest.mark.parametrize("make", [
    lambda: __import__("sparsebert.pruning", fromlist=["x"]).CubicSchedule(0.0, True, 0, 10, 1),
    lambda: __import__("sparsebert.pruning", fromlist=["x"]).CubicSchedule(0.0, "0.5", 0, 10, 1),
    lambda: __import__("sparsebert.pruning", fromlist=["x"]).CubicSchedule(0.0, 0.5, 0, 10, 2.5),
    lambda: __import__("sparsebert.pruning", fromlist=["x"]).OneShotSchedule(True),
])
def test_schedules_refuse_a_bool_a_string_or_a_fractional_step(make):
    # CubicSchedule(final_sparsity=True) read as 1.0 (prune everything); frequency 2.5 was kept
    with pytest.raises((TypeError, ValueError)):
        make()


def test_pruner_refuses_a_schedule_that_is_not_one():
    from sparsebert.pruning import Pruner
    m = sparsebert.sparsify(nn.Linear(32, 32), 0.0, block=16)
    with pytest.raises(TypeError, match="schedule must have"):       # was an AttributeError at step()
        Pruner(m, None)


def test_sparsify_checks_the_backend_name_in_unstructured_mode_too():
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        sparsebert.sparsify(nn.Sequential(nn.Linear(32, 32)), 0.5, mode="unstructured", backend="gpu")
