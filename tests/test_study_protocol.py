"""The study's protocol: MLM head fitting, the deterministic probe, seed aggregation, the block-size
axis, and resuming an interrupted multi-seed study."""
import csv
import json
from dataclasses import replace

import pytest
import torch

import sparsebert
from sparsebert.study import data as D
from sparsebert.study import runner as R
from sparsebert.study.aggregate import aggregate, mean_sd
from sparsebert.study.head import HeadConfig, fit_head
from sparsebert.study.probe import ProbeConfig, probe
from sparsebert.study.pretrain import PretrainConfig, mlm_dev_loss, pretrain, scratch_mlm, special_ids
from sparsebert.study.report import CSV_COLUMNS, write_report
from study_fixtures import make_fixture_cache


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    make_fixture_cache(root, n_sentences=80, n_articles=8)
    return root


@pytest.fixture(autouse=True)
def no_download(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("tests must not download")
    monkeypatch.setattr(D, "_fetch", refuse)


@pytest.fixture(scope="module")
def corpus(cache, tmp_path_factory):
    c = D.DataCache(cache, log=lambda m: None)
    train_docs, dev_docs = D.load_mlm_text(c)
    tok = D.build_vocab_tokenizer(train_docs, tmp_path_factory.mktemp("vocab"), 400)
    return c, tok, D.mlm_blocks(train_docs, tok, 32), D.mlm_blocks(dev_docs, tok, 32)


def tiny(tok, seed=0):
    return scratch_mlm(len(tok), hidden=64, layers=2, heads=2, intermediate=128, max_position=64, seed=seed)


def test_head_fit_converges_and_leaves_the_embeddings_alone(corpus):
    c, tok, train, dev = corpus
    model = tiny(tok)
    ids = special_ids(tok)
    emb = model.bert.embeddings.word_embeddings.weight.detach().clone()
    enc = {k: v.clone() for k, v in model.bert.state_dict().items()}
    before = mlm_dev_loss(model, dev, ids, torch.device("cpu"))
    res = fit_head(model, HeadConfig(blocks=len(train), max_steps=300, batch_size=256, lr=1e-2, eval_every=10,
                                     tol=1e-3), train, ids, torch.device("cpu"), progress=False)
    assert res["converged"] and res["steps"] < 300
    # below the best context-free (unigram) predictor, and far below the untrained head
    assert res["heldout_loss"] < res["unigram_loss"] and res["heldout_loss"] < res["heldout_loss_start"]
    after = mlm_dev_loss(model, dev, ids, torch.device("cpu"))
    assert after < before - 0.3
    # the encoder and the (tied, frozen) decoder = word embeddings are exactly as they were
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, emb)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert all(torch.equal(v, enc[k]) for k, v in model.bert.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def _task(c, name="polarity"):
    return D.load_task(name, c).subset(48, 24)


def test_probe_is_deterministic(corpus):
    c, tok, _, _ = corpus
    enc = tiny(tok).bert
    for task in ("polarity", "movie-score"):
        a = probe(enc, ProbeConfig(max_len=32), _task(c, task), tok, torch.device("cpu"))
        b = probe(tiny(tok).bert, ProbeConfig(max_len=32, batch_tokens=97), _task(c, task), tok, torch.device("cpu"))
        assert a["dev_score"] == pytest.approx(b["dev_score"], abs=1e-6)      # batching does not matter
        again = probe(enc, ProbeConfig(max_len=32), _task(c, task), tok, torch.device("cpu"))
        assert again["dev_score"] == a["dev_score"] and again["dev_metrics"] == a["dev_metrics"]
    # the fixture polarity sentences differ in their words: even a random encoder's probe fits them well above chance
    assert probe(enc, ProbeConfig(max_len=32), _task(c), tok, torch.device("cpu"))["train_score"] > 75


def test_seed_aggregation_mean_sd_n_and_csv_columns(tmp_path):
    assert mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0, 3)
    assert mean_sd([5.0, None]) == (5.0, None, 1)
    recs = []
    for seed, (a, b) in enumerate([(70.0, 60.0), (74.0, 64.0), (72.0, 68.0)]):
        for lr, bonus in ((1e-4, 0.0), (2e-4, -10.0)):          # lr 1e-4 is better on average
            for task, score in (("polarity", a + bonus), ("uncertainty", b + bonus)):
                recs.append({"mode": "block", "block": 16, "sparsity": 0.3, "control": "none", "task": task,
                             "seed": seed, "lr": lr, "dev_score": score, "train_loss": 0.1 * (seed + 1),
                             "finetune_s_per_step": 0.5, "probe": score - 1 if lr == 1e-4 else -1.0,
                             "pretrain_dev_loss": 3.0 + seed, "pretrain_s_per_step": 0.2, "achieved_sparsity": 0.3})
    # the probe is per seed (encoder), whichever LR record carries it: the first one seen counts
    rows = aggregate(recs, ["polarity", "uncertainty"], {"polarity": "accuracy", "uncertainty": "accuracy"})
    by = {r["task"]: r for r in rows}
    assert set(by) == {"polarity", "uncertainty", "average"}
    p = by["polarity"]
    assert p["lr"] == 1e-4 and p["n_seeds"] == 3 and p["mean"] == pytest.approx(72.0) and p["sd"] == pytest.approx(2.0)
    assert p["probe_mean"] == pytest.approx(71.0) and p["probe_sd"] == pytest.approx(2.0)
    assert p["pretrain_dev_loss"] == pytest.approx(4.0) and p["pretrain_dev_loss_sd"] == pytest.approx(1.0)
    assert p["train_loss"] == pytest.approx(0.2)
    avg = by["average"]
    assert avg["scores"] == [65.0, 69.0, 70.0] and avg["mean"] == pytest.approx(68.0)
    assert avg["n_seeds"] == 3 and avg["sd"] == pytest.approx(mean_sd([65.0, 69.0, 70.0])[1])
    paths = write_report(rows, ["polarity", "uncertainty"], tmp_path, {"preset": "t"}, records=recs)
    with open(paths["csv"]) as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == CSV_COLUMNS
        got = list(reader)
    required = ["mode", "block", "sparsity", "control", "task", "metric", "mean", "sd", "n_seeds", "probe_mean",
                "probe_sd", "train_loss", "pretrain_dev_loss", "s_per_step_pretrain"]
    assert all(k in CSV_COLUMNS for k in required)
    assert len(got) == 3 and {r["task"] for r in got} == {"polarity", "uncertainty", "average"}
    assert float(next(r for r in got if r["task"] == "polarity")["sd"]) == pytest.approx(2.0)


@pytest.mark.parametrize("blk", [16, 32])
def test_block_size_axis_reaches_the_layers(corpus, blk):
    c, tok, train, dev = corpus
    model = tiny(tok)
    cfg = PretrainConfig(mode="block", sparsity=0.5, block=blk, steps=4, batch_size=4, ramp_fraction=0.5,
                         prune_every=1, backend="reference")
    pretrain(model, cfg, train, dev, special_ids(tok), torch.device("cpu"), progress=False)
    layers = sparsebert.hf.sparse_layers(model)
    assert layers and all(m.layout.block == (blk, blk) for _, m in layers)
    # and the study plans one encoder per block size, keyed apart
    p = R.Preset(name="t", description="t", levels=(0.0, 0.5), modes=("block",), blocks=(16, 32), tasks=("polarity",))
    st = R.Study(p, "unused", data=object(), device="cpu")
    plan = st.encoder_plan()
    assert [(s.mode, s.block) for s in plan] == [("dense", 0), ("block", 16), ("block", 32)]
    assert plan[1].cfg.block == 16 and plan[2].cfg.block == 32


def tiny_preset(**kw):
    p = R.Preset(name="test", description="test", levels=(0.0, 0.5), modes=("unstructured", "block"), blocks=(16,),
                 tasks=("polarity",), seeds=(0, 1), model="scratch",
                 scratch=dict(hidden=64, layers=2, heads=2, intermediate=128, max_position=64),
                 seq_len=16, mlm_train_blocks=40, mlm_dev_blocks=4,
                 head=dict(blocks=40, max_steps=3, batch_size=64, eval_every=1),
                 pretrain=dict(steps=4, batch_size=8, prune_every=1, ramp_fraction=0.5, backend="reference"),
                 finetune=dict(epochs=1, max_steps=3, batch_size=8, token_budget=64, max_len=16),
                 probe=dict(max_len=16), lrs=(1e-3,), max_train=24, max_dev=12, demo=True)
    return replace(p, **kw)


def test_interrupted_multi_seed_study_resumes(tmp_path, cache, monkeypatch):
    calls = {"pretrain": 0, "finetune": 0, "probe": 0}
    for name in calls:
        real = getattr(R, name)

        def wrapped(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)
        monkeypatch.setattr(R, name, wrapped)
    out = tmp_path / "out"

    # interrupt the first run in the middle of seed 1
    class Stop(Exception):
        pass
    real_ft = R.finetune
    n = {"ft": 0}

    def dying(*a, **k):
        n["ft"] += 1
        if n["ft"] == 5:
            raise Stop()
        return real_ft(*a, **k)
    monkeypatch.setattr(R, "finetune", dying)
    with pytest.raises(Stop):
        R.Study(tiny_preset(), out, cache, progress=False, log=lambda m: None).run()
    done = {k: v for k, v in calls.items()}
    assert done["pretrain"] == 5 and done["probe"] == 5 and n["ft"] == 5     # 3 encoders of seed 0, 2 of seed 1
    monkeypatch.setattr(R, "finetune", real_ft)
    before = dict(calls)
    rows = R.Study(tiny_preset(), out, cache, progress=False, log=lambda m: None).run()
    # only seed 1's last encoder is pre-trained again; its probe and the 2 missing fine-tunings run
    assert calls["pretrain"] - before["pretrain"] == 1 and calls["probe"] - before["probe"] == 1
    assert len(list((out / "runs").glob("finetune-*.json"))) == 6
    assert {(r["mode"], r["n_seeds"]) for r in rows} == {("dense", 2), ("unstructured", 2), ("block", 2)}
    j = json.loads((out / "results.json").read_text())
    assert sorted({r["seed"] for r in j["records"]}) == [0, 1]
    # a resumed study gives the numbers a straight one would
    fresh = R.Study(tiny_preset(), tmp_path / "fresh", cache, progress=False, log=lambda m: None).run()
    strip = lambda rs: [{k: v for k, v in r.items() if "s_per_step" not in k} for r in rs]  # noqa: E731
    assert json.dumps(strip(fresh), sort_keys=True) == json.dumps(strip(rows), sort_keys=True)


def test_worker_processes_fill_the_cache_and_timing_pass(tmp_path, cache):
    p = tiny_preset(seeds=(0,), modes=("block",), levels=(0.0, 0.5))
    seq = R.Study(p, tmp_path / "seq", cache, progress=False, log=lambda m: None).run()
    logs = []
    par = R.Study(replace(p, workers=2, time_steps=2), tmp_path / "par", cache, progress=False, log=logs.append)
    rows = par.run()
    # the main process found every run cached by the workers
    assert par.counts["pretrain_trained"] == 0 and par.counts["finetune_trained"] == 0
    assert par.counts["workers_pretrain_trained"] == 2 and par.counts["workers_finetune_trained"] == 2
    # the same numbers (to float noise: the workers run with their own thread count)
    def strip(rs):
        rnd = lambda v: round(v, 3) if isinstance(v, float) else ([rnd(x) for x in v] if isinstance(v, list) else v)  # noqa: E731
        return [{k: rnd(v) for k, v in r.items() if "s_per_step" not in k} for r in rs]
    assert json.dumps(strip(rows), sort_keys=True) == json.dumps(strip(seq), sort_keys=True)
    assert all(r["s_per_step_pretrain"] > 0 for r in rows)
