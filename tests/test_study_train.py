"""Pre-training schedule wiring, mask fixity through fine-tuning, information deletion, pruning in fine-tuning."""
import pytest
import torch

import sparsebert
from sparsebert.study.data import TASKS, TaskData, build_vocab_tokenizer
from sparsebert.study.finetune import FinetuneConfig, finetune, metrics
from sparsebert.study.pretrain import PretrainConfig, pretrain, scratch_mlm, special_ids

WORDS = "good great fine bad poor dull film plot actor scene the a of and".split()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_vocab_tokenizer([" ".join(WORDS)], tmp_path_factory.mktemp("vocab"), 100)


def tiny(tok, seed=0):
    # hidden 64, 2 layers, intermediate 128: divisible by 32 for block mode
    return scratch_mlm(len(tok), hidden=64, layers=2, heads=2, intermediate=128, max_position=64, seed=seed)


def blocks(tok, n=64, L=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(5, len(tok), (n, L), generator=g)
    x[:, 0], x[:, -1] = tok.cls_token_id, tok.sep_token_id
    return x


def task(n=48, kind="classification", seed=0):
    import random
    r = random.Random(seed)
    ex = []
    for i in range(n):
        y = i % 2
        words = WORDS[:3] if y else WORDS[3:6]
        text = " ".join(r.choice(words + WORDS[6:]) for _ in range(8))
        ex.append((text, y if kind == "classification" else float(2 * y - 1) + r.random()))
    spec = TASKS["polarity"] if kind == "classification" else TASKS["movie-score"]
    return TaskData(spec, ex[: n - 16], ex[n - 16:])


@pytest.mark.parametrize("mode", ["unstructured", "block"])
def test_schedule_reaches_target_at_ramp_end_and_updates_every_k(tok, mode):
    cfg = PretrainConfig(mode=mode, sparsity=0.5, steps=50, batch_size=8, ramp_fraction=0.2, prune_every=2,
                         backend="reference" if mode == "block" else "auto")
    model = tiny(tok)
    res = pretrain(model, cfg, blocks(tok), blocks(tok, 8, seed=1), special_ids(tok), torch.device("cpu"), progress=False)
    steps = [s for s, _ in res["mask_updates"]]
    assert cfg.ramp_end() == 10
    # every 2 steps during the ramp (block mode may skip an update whose target rounds to the same block count)
    assert set(steps) <= {2, 4, 6, 8, 10} and steps[-1] == 10
    if mode == "unstructured":
        assert steps == [2, 4, 6, 8, 10]
    sp = [s for _, s in res["mask_updates"]]
    assert sp == sorted(sp)
    assert sp[-1] == pytest.approx(0.5, abs=0.02)
    assert res["sparsity"] == pytest.approx(0.5, abs=0.02)
    assert res["mask_updates"][0][1] < 0.5 - 0.05       # gradual, not one-shot
    layers = sparsebert.hf.sparse_layers(model)
    assert layers and all(abs(m.density - 0.5) < 0.05 for _, m in layers if hasattr(m, "layout") or m.weight.dim() == 2)
    assert res["dev_mlm_loss"] > 0 and res["seconds_per_step"] > 0


def test_unstructured_prunes_embeddings_and_tied_decoder(tok):
    model = tiny(tok)
    pretrain(model, PretrainConfig(mode="unstructured", sparsity=0.6, steps=10, batch_size=8, prune_every=1),
             blocks(tok), blocks(tok, 8), special_ids(tok), torch.device("cpu"), progress=False)
    emb = model.bert.embeddings.word_embeddings
    assert isinstance(emb, sparsebert.MaskedEmbedding)
    assert model.cls.predictions.decoder.mask is emb.mask


def _pretrained(tok, mode, sparsity=0.5):
    model = tiny(tok)
    pretrain(model, PretrainConfig(mode=mode, sparsity=sparsity, steps=10, batch_size=8, prune_every=1,
                                   backend="reference" if mode == "block" else "auto"),
             blocks(tok), blocks(tok, 8), special_ids(tok), torch.device("cpu"), progress=False)
    return model.bert


def test_mask_fixed_through_finetuning_unstructured(tok):
    enc = _pretrained(tok, "unstructured")
    before = {n: m.mask.clone() for n, m in sparsebert.hf.sparse_layers(enc)}
    w0 = {n: m.weight.detach().clone() for n, m in sparsebert.hf.sparse_layers(enc)}
    res = finetune(enc, FinetuneConfig(lr=1e-3, epochs=3, batch_size=8, max_len=16), task(), tok,
                   torch.device("cpu"), progress=False, return_model=True)
    model = res["model"]
    changed = 0
    for n, m in sparsebert.hf.sparse_layers(model.bert):
        assert torch.equal(m.mask, before[n]), n
        assert (m.weight[~m.mask] == 0).all(), f"{n}: pruned weights regrew"
        changed += int(not torch.equal(m.weight.detach(), w0[n]))
    assert changed > 0                     # the kept weights did train
    assert res["linear_zero_fraction"] >= 0.49
    # the input encoder is untouched (fine-tuning works on a copy)
    assert all(torch.equal(m.weight, w0[n]) for n, m in sparsebert.hf.sparse_layers(enc))


def test_mask_fixed_through_finetuning_block(tok):
    enc = _pretrained(tok, "block")
    before = {n: (m.layout, m.values.shape) for n, m in sparsebert.hf.sparse_layers(enc)}
    res = finetune(enc, FinetuneConfig(lr=1e-3, epochs=2, batch_size=8, max_len=16), task(), tok,
                   torch.device("cpu"), progress=False, return_model=True)
    for n, m in sparsebert.hf.sparse_layers(res["model"].bert):
        assert m.layout == before[n][0] and m.values.shape == before[n][1]
        w = m.dense_weight()
        assert (w[~m.layout.element_mask().bool()] == 0).all()


def test_information_deletion_lets_weights_regrow(tok):
    enc = _pretrained(tok, "unstructured")
    masks = {n: m.mask.clone() for n, m in sparsebert.hf.sparse_layers(enc) if "word_embeddings" not in n}
    res = finetune(enc, FinetuneConfig(lr=1e-3, epochs=2, batch_size=8, max_len=16, control="deletion"), task(),
                   tok, torch.device("cpu"), progress=False, return_model=True)
    model = res["model"]
    assert not sparsebert.hf.sparse_layers(model)
    regrown = 0
    for n, mask in masks.items():
        w = model.bert.get_submodule(n).weight
        regrown += int((w[~mask] != 0).sum())
    assert regrown > 0
    assert res["linear_zero_fraction"] < 0.4


@pytest.mark.parametrize("mode", ["unstructured", "block"])
def test_pruning_during_finetuning(tok, mode):
    enc = tiny(tok).bert
    res = finetune(enc, FinetuneConfig(lr=1e-3, epochs=3, batch_size=8, max_len=16, control="prune",
                                       prune_mode=mode, prune_sparsity=0.5, prune_every=1, backend="reference"),
                   task(), tok, torch.device("cpu"), progress=False)
    assert res["linear_zero_fraction"] == pytest.approx(0.5, abs=0.03)


def test_regression_task_and_metrics(tok):
    res = finetune(tiny(tok).bert, FinetuneConfig(lr=1e-3, epochs=2, batch_size=8, max_len=16), task(kind="regression"),
                   tok, torch.device("cpu"), progress=False)
    assert set(res["dev_metrics"]) == {"pearson", "spearman", "score"}
    m = metrics("regression", torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 2.0, 3.0, 5.0]))
    assert m["spearman"] == pytest.approx(100.0) and 95 < m["pearson"] < 100
    assert metrics("classification", torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([1, 1]))["score"] == 50.0


def _no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


@pytest.mark.parametrize("mode", ["unstructured", "block"])
def test_optimized_training_keeps_the_losses_and_saves_a_plain_model(tok, mode, monkeypatch):
    """pretrain and finetune with sparsebert.optimize (SDPA, fused GELU, labelled-rows head) give the
    unoptimized runs' losses, masks and scores (no dropout: the fast dropout draws other numbers),
    and hand back a model without optimize's hooks or attention setting (it is saved and reloaded)."""
    from sparsebert.optimize import is_optimized
    calls = []
    real = sparsebert.optimize
    monkeypatch.setattr(sparsebert, "optimize", lambda m, **k: calls.append(type(m).__name__) or real(m, **k))
    runs = {}
    for opt in (False, True):
        model = _no_dropout(tiny(tok))
        cfg = PretrainConfig(mode=mode, sparsity=0.5 if mode != "dense" else 0.0, steps=6, batch_size=8,
                             ramp_fraction=0.5, prune_every=1, optimize=opt,
                             backend="reference" if mode == "block" else "auto")
        res = pretrain(model, cfg, blocks(tok), blocks(tok, 8, seed=1), special_ids(tok), torch.device("cpu"),
                       progress=False)
        assert not is_optimized(model)
        assert model.config._attn_implementation == tiny(tok).config._attn_implementation
        fres = finetune(model.bert, FinetuneConfig(max_steps=4, batch_size=8, max_len=16, dropout=0.0, optimize=opt,
                                                   lr=1e-3), task(), tok, progress=False, return_model=True)
        assert not is_optimized(fres["model"].bert)
        runs[opt] = (res, fres, [p.detach().clone() for p in model.parameters()])
    assert calls == ["BertForMaskedLM", "BertModel"]      # the optimized runs only, pretrain then finetune
    (r0, f0, p0), (r1, f1, p1) = runs[False], runs[True]
    assert [l for _, l in r1["loss_curve"]] == pytest.approx([l for _, l in r0["loss_curve"]], rel=1e-4, abs=1e-4)
    assert r1["dev_mlm_loss"] == pytest.approx(r0["dev_mlm_loss"], rel=1e-5)
    assert r1["mask_updates"] == r0["mask_updates"]
    assert all(a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(p0, p1))
    assert [l for _, l in f1["loss_curve"]] == pytest.approx([l for _, l in f0["loss_curve"]], rel=1e-4, abs=1e-4)
    assert f1["dev_score"] == f0["dev_score"]


def test_mean_pooling_reads_only_real_tokens(tok):
    from sparsebert.study.finetune import SequenceModel
    torch.manual_seed(0)
    model = SequenceModel(tiny(tok).bert, 2, dropout=0.0, pooling="mean").eval()
    ids = blocks(tok, 2, 10)
    att = torch.ones_like(ids)
    att[1, 6:] = 0                                # the second sequence is 6 tokens + 4 pads
    padded = ids.clone()
    padded[1, 6:] = tok.pad_token_id
    with torch.no_grad():
        out = model(padded, att)
        alone = model(ids[1:, :6], att[1:, :6])   # the same 6 tokens without padding
        h = model.bert(input_ids=padded, attention_mask=att).last_hidden_state
        by_hand = model.classifier(h[0].mean(0))
    torch.testing.assert_close(out[1], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0], by_hand, atol=1e-6, rtol=1e-6)
    cls = SequenceModel(model.bert, 2, dropout=0.0, pooling="cls").eval()
    cls.classifier.load_state_dict(model.classifier.state_dict())
    with torch.no_grad():
        assert not torch.allclose(cls(padded, att), out)   # cls reads the pooler, not the mean


def test_pooling_is_validated_and_mean_pooled_finetuning_learns(tok):
    with pytest.raises(ValueError, match="pooling"):
        FinetuneConfig(pooling="max")
    enc = tiny(tok).bert
    res = finetune(enc, FinetuneConfig(lr=1e-3, epochs=6, batch_size=8, max_len=16, pooling="mean"), task(), tok,
                   torch.device("cpu"), progress=False)
    assert res["dev_score"] > 80.0 and res["train_loss"] < 0.65   # chance: 50, ln 2 = 0.693


def test_keep_freed_memory_sets_glibc_thresholds_in_a_subprocess():
    # mallopt changes the whole process: try it in a fresh one. On glibc every mallopt call must
    # be accepted (a refused one returns False).
    import platform
    import subprocess
    import sys
    code = "from sparsebert.study.training import keep_freed_memory as k; print(k(), k())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    expect = "True True" if platform.libc_ver()[0] == "glibc" else "False False"
    assert out.stdout.split()[-2:] == expect.split()


def test_start_model_head_is_the_same_whatever_the_global_rng(tmp_path):
    # MiniLM ships no MLM head: its random init must not depend on the caller's RNG state
    from transformers import BertConfig, BertModel
    from sparsebert.study.pretrain import load_minilm_mlm
    BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tmp_path)
    torch.manual_seed(1)
    a = load_minilm_mlm(tmp_path)
    torch.rand(1000)
    after = torch.rand(3)
    torch.manual_seed(2)
    b = load_minilm_mlm(tmp_path)
    for (n, p), q in zip(a.cls.named_parameters(), b.cls.parameters()):
        assert torch.equal(p, q), n
    torch.manual_seed(1)
    load_minilm_mlm(tmp_path)
    torch.rand(1000)
    assert torch.equal(torch.rand(3), after)          # the caller's RNG stream is untouched
