"""More bugs found by probing the paths users take (optimize with Hugging Face options, dtypes,
checkpoints, schedules, ...): each test failed on the code before its fix."""
import os

import pytest
import torch

import sparsebert


def _tiny_config(**kw):
    from transformers import BertConfig
    return BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                      vocab_size=200, max_position_embeddings=64, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, **kw)


@pytest.mark.parametrize("dropout", ["fast", "torch"])
@pytest.mark.parametrize("grad", [False, True])
def test_optimize_keeps_output_attentions(dropout, grad):
    # optimize switched an eager model's attention to SDPA, which returns no probabilities:
    # output_attentions=True then gave an empty `attentions` tuple (with a warning about "sdpa").
    from transformers import BertForSequenceClassification
    torch.manual_seed(0)
    model = BertForSequenceClassification(_tiny_config(attn_implementation="eager")).eval()
    sparsebert.sparsify(model, 0.5, block=16)
    ids = torch.randint(0, 200, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.set_grad_enabled(grad):
        ref = model(ids, mask, output_attentions=True)
        sparsebert.optimize(model, dropout=dropout)
        out = model(ids, mask, output_attentions=True)
    assert len(out.attentions) == len(ref.attentions) == 2
    for a, b in zip(out.attentions, ref.attentions):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)


def _hub_style_model(tmp_path):
    # loaded with from_pretrained, as from the hub: its config.json then records `architectures`
    # and `dtype`, so save_sparse and save_pretrained write the same config.json
    from transformers import BertForSequenceClassification
    torch.manual_seed(0)
    BertForSequenceClassification(_tiny_config()).save_pretrained(tmp_path / "hub")
    model = BertForSequenceClassification.from_pretrained(tmp_path / "hub").eval()
    return sparsebert.sparsify(model, 0.5, block=16)


@pytest.mark.parametrize("first", ["save_sparse", "save_pretrained"])
def test_two_different_saves_in_one_folder_are_refused(tmp_path, first):
    # save_sparse(m, d) then m.save_pretrained(d) of later weights: load_sparse / from_pretrained
    # loaded the older save_sparse weights without a word (the manifest still matched).
    model = _hub_style_model(tmp_path)
    ck = tmp_path / "ck"
    save = {"save_sparse": lambda: sparsebert.save_sparse(model, ck),
            "save_pretrained": lambda: model.save_pretrained(ck)}
    save[first]()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    save["save_pretrained" if first == "save_sparse" else "save_sparse"]()
    for load in (sparsebert.load_sparse, sparsebert.from_pretrained):
        with pytest.raises(sparsebert.CheckpointError, match="two different checkpoints"):
            load(ck)


def test_both_saves_of_one_state_in_one_folder_load(tmp_path):
    model = _hub_style_model(tmp_path)
    ck = tmp_path / "ck"
    model.save_pretrained(ck)
    sparsebert.save_sparse(model, ck)
    ids = torch.randint(0, 200, (2, 8))
    with torch.no_grad():
        for load in (sparsebert.load_sparse, sparsebert.from_pretrained):
            torch.testing.assert_close(load(ck)(ids).logits, model(ids).logits, rtol=0, atol=0)


class _Pairs(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"input_ids": torch.randint(0, 200, (8,), generator=g), "labels": i % 2}


@pytest.mark.parametrize("end_step,warns", [(10, True), (2, False), (None, False)])
def test_pruning_callback_warns_when_the_schedule_outlasts_the_run(tmp_path, end_step, warns):
    # A schedule ending after max_steps left the model well below the config's sparsity (here
    # 0.0 instead of 0.75) without a word, while its checkpoints record sparsity=0.75.
    import warnings
    from transformers import BertForSequenceClassification, Trainer, TrainingArguments
    from sparsebert.hf import PruningCallback
    setup = sparsebert.SparsityConfig(sparsity=0.75, block=32, schedule={
        "initial_sparsity": 0.0, "start_step": 5 if end_step == 10 else 1, "end_step": end_step, "frequency": 1})
    trainer = Trainer(model=BertForSequenceClassification(_tiny_config()),
                      args=TrainingArguments(str(tmp_path), max_steps=2, save_strategy="no", report_to="none",
                                             per_device_train_batch_size=4, disable_tqdm=True),
                      train_dataset=_Pairs(), callbacks=[PruningCallback(setup)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    hits = [str(w.message) for w in caught if "PruningCallback: the schedule ends" in str(w.message)]
    if warns:
        assert len(hits) == 1 and "reaches sparsity about 0, not the config's 0.75" in hits[0]
    else:
        assert not hits


@pytest.mark.parametrize("template_mode", ["unstructured", "block"])
def test_load_sparse_into_a_template_sparsified_otherwise(tmp_path, template_mode):
    # load_sparse(model=template) kept the template's own sparse layers that the checkpoint does
    # not list: an unstructured template's masked word embeddings (refused: "missing
    # [...word_embeddings.mask_bits]"), and a template sparse where the checkpoint is dense.
    from transformers import BertForSequenceClassification
    torch.manual_seed(0)
    saved = sparsebert.sparsify(BertForSequenceClassification(_tiny_config()).eval(), 0.5, block=16,
                                targets=[r"attention\.self\.query$"])
    sparsebert.save_sparse(saved, tmp_path / "ck")
    template = sparsebert.sparsify(BertForSequenceClassification(_tiny_config()), 0.75, block=32,
                                   mode=template_mode)
    loaded = sparsebert.load_sparse(tmp_path / "ck", model=template)
    assert sorted(n for n, _ in sparsebert.hf.sparse_layers(loaded)) == \
        sorted(n for n, _ in sparsebert.hf.sparse_layers(saved))
    ids = torch.randint(0, 200, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, saved(ids).logits, rtol=0, atol=0)
    assert len(sparsebert.hf.sparse_layers(template)) > 2       # the template is left as it was


@pytest.mark.parametrize("cls", ["BertForMaskedLM", "BertForSequenceClassification"])
def test_resized_masked_embeddings_fail_with_a_clear_error(cls):
    # resize_token_embeddings swaps the weight's .data of a MaskedEmbedding (and of the tied
    # MaskedLinear decoder) and leaves the mask at the old vocabulary: the next forward failed
    # with "The size of tensor a (210) must match the size of tensor b (200)", or with an index
    # error in the mask lookup for a new token only, and densify likewise.
    import transformers
    model = getattr(transformers, cls)(_tiny_config())
    sparsebert.sparsify(model, 0.5, mode="unstructured")
    model.resize_token_embeddings(210, mean_resizing=False)
    with pytest.raises(RuntimeError, match=r"MaskedEmbedding: the weight is \(210, 64\) but its mask is \(200, 64\)"):
        model(torch.tensor([[1, 2, 205]]))
    with pytest.raises(RuntimeError, match="resized after sparsify"):
        sparsebert.densify(model)


def test_unoptimize_is_reachable_from_the_package():
    # `sparsebert.optimize` is the function, so its module's unoptimize (the documented undo)
    # was reachable only as `from sparsebert.optimize import unoptimize`:
    # `sparsebert.unoptimize(model)` raised AttributeError.
    from transformers import BertForSequenceClassification
    model = sparsebert.optimize(BertForSequenceClassification(_tiny_config()))
    assert sparsebert.is_optimized(model)
    assert sparsebert.unoptimize(model) is model and not sparsebert.is_optimized(model)


@pytest.mark.parametrize("mask_kind", ["bool", "float-inf"])
def test_attention_math_fully_masked_rows_are_zero_not_nan(mask_kind):
    # attention_math (optimize's CPU training attention with dropout) masked with -inf, so a row
    # with every key masked (an all-padding example) was NaN, and its gradient too; SDPA, which
    # the same model runs without dropout, gives 0 there.
    import torch.nn.functional as F
    from sparsebert.fused import attention_math
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 8, requires_grad=True) for _ in range(3))
    keep = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    keep[1] = False                   # the second example: every key masked
    keep[0, :, :, 3:] = False
    mask = keep if mask_kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    out = attention_math(q, k, v, mask, 8 ** -0.5, 0.0)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    assert (out[1] == 0).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    out, w = attention_math(q, k, v, mask, 8 ** -0.5, 0.2, return_weights=True)
    assert torch.isfinite(out).all() and (w[1] == 0).all()


def test_optimized_training_with_an_all_padding_example_has_a_finite_loss():
    from transformers import BertForSequenceClassification
    torch.manual_seed(0)
    config = _tiny_config()
    config.attention_probs_dropout_prob = 0.1
    model = sparsebert.optimize(sparsebert.sparsify(BertForSequenceClassification(config), 0.5, block=16)).train()
    ids = torch.randint(0, 200, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[2] = 0
    loss = model(ids, mask, labels=torch.tensor([0, 1, 0])).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_optimize_keeps_output_attentions_of_a_causal_decoder():
    # the causal case: SDPA gets no mask (is_causal), the probabilities must be the causal ones
    from transformers import BertLMHeadModel
    torch.manual_seed(0)
    model = BertLMHeadModel(_tiny_config(attn_implementation="eager", is_decoder=True)).eval()
    sparsebert.sparsify(model, 0.5, block=16)
    ids = torch.randint(0, 200, (2, 8))
    with torch.no_grad():
        ref = model(ids, output_attentions=True, use_cache=False)
        out = sparsebert.optimize(model)(ids, output_attentions=True, use_cache=False)
    assert len(out.attentions) == 2
    for a, b in zip(out.attentions, ref.attentions):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(out.logits, ref.logits)


@pytest.mark.parametrize("where", ["", ".", "..", "abs"])
def test_save_sparse_refuses_the_working_directory(tmp_path, monkeypatch, where):
    # The atomic save renames the target folder aside and a new one into place: saving to ""
    # (realpath: the working directory), "." or a folder above it left the process (and a shell
    # started there) in a deleted directory, where the next relative path failed.
    work = tmp_path / "work" / "sub"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    layer = sparsebert.sparsify(torch.nn.Linear(32, 32), 0.5, block=16)
    path = str(work) if where == "abs" else where
    with pytest.raises(sparsebert.CheckpointError, match="the path is empty" if where == "" else "working directory"):
        sparsebert.save_sparse(layer, path)
    assert os.getcwd() == str(work) and (work / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(work)) == ["notes.txt"]
    sparsebert.save_sparse(layer, "ck")            # a subfolder is fine
    assert sparsebert.load_sparse("ck", model=torch.nn.Linear(32, 32)).layout.nnz == layer.layout.nnz


def test_save_sparse_tensor_file_follows_the_umask(tmp_path):
    # safetensors writes 0600: the tensor file alone was unreadable to the group and others,
    # while the folder and the JSON files follow the umask
    old = os.umask(0o022)
    try:
        sparsebert.save_sparse(sparsebert.sparsify(torch.nn.Linear(32, 32), 0.5, block=16), tmp_path / "ck")
    finally:
        os.umask(old)
    for name in os.listdir(tmp_path / "ck"):
        assert os.stat(tmp_path / "ck" / name).st_mode & 0o777 == 0o644, name
