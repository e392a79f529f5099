"""The sparsebert command (also: python -m sparsebert).

Conventions shared by every subcommand:
  sparsity   a fraction in [0, 1) (0.5) or a percent in (1, 100) (50, or 50%); a bare 1 is
             ambiguous and refused (write 0.01 or 1%); 100% is never allowed
  block      a block side in 16..256, a multiple of 16 (what the CPU kernels run; the GPU
             kernels take 16-128 (Triton) or 32/64 (CUDA)); it must divide every pruned weight
  errors     a wrong value or a file problem is one line, "sparsebert: error: ...", exit
             status 2 (3: study data unavailable); SPARSEBERT_TRACEBACK=1 shows the traceback
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import textwrap

PROG = "sparsebert"
MAX_BLOCK = 256
SPARSITY_RULE = "a fraction in [0, 1) or a percent in (1, 100), e.g. 0.5, 50 or 50%"
SPARSITY_HELP = SPARSITY_RULE.replace("%", "%%")      # argparse help strings are %-formatted


class UsageError(Exception):
    """A problem with what the user asked for: reported as one line, exit status 2."""


# ---- argument types (argparse ``type=``): a bad value is one line naming it and the range ------
def sparsity(text: str) -> float:
    """A sparsity: a fraction in [0, 1), or a percent in (1, 100) (``"50"`` or ``"50%"``)."""
    s = str(text).strip()
    percent = s.endswith("%")
    try:
        v = float(s[:-1] if percent else s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a sparsity: give {SPARSITY_RULE}") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"sparsity {text} is out of range: give {SPARSITY_RULE}")
    if not percent and v == 1:
        raise argparse.ArgumentTypeError("sparsity 1 is ambiguous: write 0.01 or 1% for one percent "
                                         "(100% is not allowed)")
    if percent or v > 1:
        if v >= 100:
            raise argparse.ArgumentTypeError(f"sparsity {text} is out of range: a percent must be below 100")
        return v / 100.0
    return v


def _number(text, kind, what):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def positive_int(text: str) -> int:
    v = _number(text, int, "a whole number")
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} is out of range: must be at least 1")
    return v


def positive_float(text: str) -> float:
    v = _number(text, float, "a number")
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"{text} is out of range: must be a number above 0")
    return v


def unit_fraction(text: str) -> float:
    v = _number(text, float, "a number")
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is out of range: must be in [0, 1]")
    return v


def block_size(text: str) -> int:
    v = _number(text, int, "a whole number")
    if not (16 <= v <= MAX_BLOCK and v % 16 == 0):
        raise argparse.ArgumentTypeError(f"block size {v} is not supported: use a multiple of 16 "
                                         f"from 16 to {MAX_BLOCK} (16, 32, 48, 64, ...)")
    return v


def device(text: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (whether it exists is checked when used)."""
    s = str(text).strip().lower()
    if s in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", s):
        return s
    raise argparse.ArgumentTypeError(f"unknown device {text!r}: choose auto, cpu, cuda or cuda:N")


def require_device(spec: str) -> str:
    """``spec`` if this machine has it; else a :class:`UsageError`."""
    if spec.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: no CUDA GPU is available here (use --device cpu or auto)")
        index = int(spec.split(":")[1]) if ":" in spec else 0
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return spec


# ---- output folders --------------------------------------------------------------------------------
def _nearest_existing(path: str) -> str:
    p = os.path.abspath(path)
    while not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p


def check_out_dir(path: str, option: str = "--out") -> str:
    """``path`` if it can be a folder written here: not a file, and writable (or creatable)."""
    if not path:        # "" would write into the working directory
        raise UsageError(f"{option} '': the path is empty")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{option} {path} is a file, not a folder")
    base = _nearest_existing(path)
    if not os.path.isdir(base):
        raise UsageError(f"{option} {path}: {base} is a file, not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: cannot write to {base} (permission denied)")
    return path


def oserror_text(e: OSError) -> str:
    if e.strerror:
        return e.strerror + (f": {e.filename}" if e.filename else "")
    return str(e)


# ---- commands ----------------------------------------------------------------------------------------
def _cmd_info(args) -> int:
    import platform

    import torch

    from .ops import backends

    print(f"sparsebert {__import__('sparsebert').__version__}")
    print(f"python {platform.python_version()}  torch {torch.__version__}  "
          f"cuda {'yes: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no'}")
    try:
        import triton
        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton not installed")
    try:
        import transformers
        print(f"transformers {transformers.__version__}")
    except ImportError:
        print("transformers not installed")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        print(f"\nbackends on {dev}:")
        for name, reason in backends.report(dev).items():
            detail = ""
            if name == "cpu" and reason is None:   # which compiled kernel set runs here
                detail = f" ({backends.get('cpu').isa()} kernels)"
            print(f"  {name:<10} {'available' + detail if reason is None else 'unavailable: ' + reason}")
    return 0


HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
# The Hub's owner-less ids are its old canonical models (bert-base-uncased, gpt2, roberta-base,
# t5-small): lower case, with a '-' or a digit. Any other bare word (tiny-bret is fetched, models
# or MyModel are not) is taken as a mistyped local folder.
LEGACY_HUB_ID = re.compile(r"(?=.*[-0-9])[a-z0-9]+([-.][a-z0-9]+)*")


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE set (as huggingface_hub reads them)."""
    return any(os.environ.get(k, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_cached(repo_id: str) -> bool:
    """Whether the local Hugging Face cache holds ``repo_id``'s config.json (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:                       # not a valid repo id, no huggingface_hub
        return False


def model_source(arg: str):
    """``(where, "local")`` for an existing folder, ``(arg, "hub")`` for a Hub id that is not a
    local path; anything else is a :class:`UsageError`, before any Hub request.

    A Hub id is ``org/name``, or a bare ``name`` of the form of the Hub's owner-less ids
    (:data:`LEGACY_HUB_ID`: ``bert-base-uncased``, ``gpt2``) or already in the local Hugging Face
    cache. With ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) set, only a cached id is taken."""
    path = os.path.expanduser(arg)
    if os.path.isdir(path):
        return path, "local"
    if os.path.exists(path):
        raise UsageError(f"cannot load a model from {arg}: it is a file; give a Hugging Face model folder "
                         "(with config.json) or a Hub id such as org/name")
    first = arg.split("/", 1)[0]
    if not (HUB_ID.fullmatch(arg) and ".." not in arg and not ("/" in arg and os.path.isdir(first))):
        raise UsageError(f"cannot load a model from {arg}: no such folder")
    cached = _hub_cached(arg)
    if _hub_offline() and not cached:
        raise UsageError(f"cannot load {arg}: no such folder, and the Hugging Face Hub is off (HF_HUB_OFFLINE) "
                         "and its local cache does not hold it")
    if "/" not in arg and not cached and not LEGACY_HUB_ID.fullmatch(arg):
        raise UsageError(f"cannot load a model from {arg}: no such folder (a Hugging Face Hub id is org/name, "
                         "e.g. google-bert/bert-base-uncased)")
    return arg, "hub"


def _load_hf_model(source: str, where: str, auto_model: bool):
    import logging

    import transformers

    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)          # no page of retry warnings: the error says it once
    if where == "hub":
        print(f"{source} is not a local folder: fetching it from the Hugging Face Hub", file=sys.stderr)
    try:
        if auto_model:
            return transformers.AutoModel.from_pretrained(source)
        config = transformers.AutoConfig.from_pretrained(source)
        arch = (config.architectures or ["AutoModel"])[0]
        cls = getattr(transformers, arch, transformers.AutoModel)
        return cls.from_pretrained(source)
    except Exception as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        if where == "hub":
            raise UsageError(f"cannot load {source}: not a local folder, and the Hugging Face Hub did not "
                             f"provide it ({msg})") from None
        raise UsageError(f"cannot load a Hugging Face model from {source}: {msg}") from None
    finally:
        hub_log.setLevel(level)


def _same_folder(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


# ---- prune's report: sizes, output drift, tokenizer ---------------------------------------------------
# A few plain sentences on unrelated topics: the drift check runs them through the model before and
# after pruning (tokenized with the model's own tokenizer; nothing is downloaded).
DRIFT_SENTENCES = (
    "The cat slept on the warm windowsill all afternoon.",
    "Interest rates rose again this quarter, and markets fell sharply.",
    "She plays the violin in the city orchestra every weekend.",
    "Heavy rain is expected across the north of the country tomorrow.",
    "The new vaccine reduced hospital admissions by half in the trial.",
    "He forgot his keys, so he waited outside until his sister came home.",
    "The team scored twice in the final ten minutes to win the cup.",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar.",
)
# The warning rule (README, "Command line"): the pruned model has drifted too far when the mean cosine
# between its mean-pooled sentence embeddings and the original's is below DRIFT_WARN_COSINE, or when
# its sentences collapse: their spread (1 - mean pairwise cosine between the sentences) has shrunk
# below COLLAPSE_WARN_SPREAD times the original model's spread.
DRIFT_WARN_COSINE = 0.9
COLLAPSE_WARN_SPREAD = 0.25
# what AutoTokenizer reads from a model folder: copied next to the checkpoint
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")
RANDOM_IDS = (8, 16)           # sequences x tokens when there is no tokenizer


def _quiet_hub():
    import contextlib
    import logging

    @contextlib.contextmanager
    def quiet():
        hub_log = logging.getLogger("huggingface_hub")
        level = hub_log.level
        hub_log.setLevel(logging.ERROR)
        try:
            yield
        finally:
            hub_log.setLevel(level)
    return quiet()


def _load_tokenizer(source: str, where: str):
    """``(tokenizer, None)``, or ``(None, why not)``."""
    if where == "local" and not any(os.path.isfile(os.path.join(source, n)) for n in TOKENIZER_FILES):
        return None, f"{source} holds no tokenizer files"
    import transformers
    try:
        with _quiet_hub():
            return transformers.AutoTokenizer.from_pretrained(source), None
    except Exception as e:
        return None, f"its tokenizer did not load ({' '.join(str(e).split()) or type(e).__name__})"


def _drift_batch(model, tok, why_not):
    """``(inputs, what they are)``: the built-in sentences through ``tok``, else random token ids."""
    import torch
    config = getattr(model, "config", None)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    limit = min(128, int(getattr(config, "max_position_embeddings", 0) or 128))
    if tok is not None:
        try:
            enc = dict(tok(list(DRIFT_SENTENCES), padding=True, truncation=True, max_length=limit,
                           return_tensors="pt"))
        except Exception as e:              # e.g. a tokenizer without a padding token
            why_not = f"its tokenizer could not encode them ({' '.join(str(e).split()) or type(e).__name__})"
        else:
            enc.setdefault("attention_mask", torch.ones_like(enc["input_ids"]))
            if not vocab or int(enc["input_ids"].max()) < vocab:
                return enc, f"{len(DRIFT_SENTENCES)} sentences tokenized with the model's tokenizer"
            why_not = (f"its tokenizer gives ids up to {int(enc['input_ids'].max())}, beyond the model's "
                       f"vocabulary of {vocab}")
    n, length = RANDOM_IDS[0], min(RANDOM_IDS[1], limit)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, max(2, min(vocab or 1000, 30000)), (n, length), generator=g)
    return ({"input_ids": ids, "attention_mask": torch.ones_like(ids)},
            f"{n} sequences of {length} random token ids ({why_not}: not real sentences)")


def _last_hidden(model, batch):
    """The base model's last hidden states [sentences, tokens, hidden] (float32) for ``batch``."""
    import inspect

    import torch
    base = getattr(model, "base_model", model)
    accepted = inspect.signature(base.forward).parameters
    kwargs = {k: v for k, v in batch.items() if k in accepted}
    with torch.no_grad():
        out = base(**kwargs)
    h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return h.float()


def drift_stats(before, after, mask) -> dict:
    """How far the pruned model's last hidden states ``after`` are from the original's ``before``
    (both [sentences, tokens, hidden]; ``mask`` [sentences, tokens] marks the real tokens):
    ``token_cosine`` (mean over real tokens), ``sentence_cosine`` (mean over sentences, of the
    mean-pooled embeddings), ``pairwise_before`` / ``pairwise_after`` (mean cosine between the
    sentences' embeddings: 1 when they have all collapsed onto one), and ``warn``, the reasons the
    drift is large (empty: none)."""
    import torch.nn.functional as F
    m = mask.bool()
    token = F.cosine_similarity(before[m], after[m], dim=-1).mean().item()
    w = m.unsqueeze(-1).float()
    e0, e1 = (before * w).sum(1) / w.sum(1), (after * w).sum(1) / w.sum(1)
    sentence = F.cosine_similarity(e0, e1, dim=-1).mean().item()

    def pairwise(e):
        n = e.shape[0]
        if n < 2:
            return float("nan")
        e = F.normalize(e, dim=-1)
        c = e @ e.T
        return ((c.sum() - c.diagonal().sum()) / (n * (n - 1))).item()
    p0, p1 = pairwise(e0), pairwise(e1)
    warn = []
    if not sentence >= DRIFT_WARN_COSINE:
        warn.append(f"sentence cosine to the original {sentence:.3f}, below {DRIFT_WARN_COSINE}")
    spread0, spread1 = 1 - p0, 1 - p1
    if spread0 > 0.01 and not spread1 >= COLLAPSE_WARN_SPREAD * spread0:
        warn.append(f"the sentences have collapsed onto nearly one embedding (mean pairwise cosine {p1:.3f}, "
                    f"the original's {p0:.3f})")
    return {"token_cosine": token, "sentence_cosine": sentence, "pairwise_before": p0, "pairwise_after": p1,
            "warn": warn}


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _human_count(n: int) -> str:
    return f"{n:,}" if n < 10_000_000 else f"{n / 1e6:.1f}M"


def size_table(model):
    """Per sparse layer of ``model``: ``(name, kind, shape, kept fraction, dense parameters, kept
    parameters, dense bytes, sparse bytes)``. Dense: the layer's weight and bias as a dense layer;
    kept/sparse: what the sparse checkpoint stores for it (kept weights or blocks, the mask, the
    bias). A layer tied to an earlier one (an MLM decoder sharing the word embeddings) counts its
    own bias only."""
    from .checkpoint import _collect
    from .hf import sparse_layers
    from .nn import BlockSparseLinear
    tensors, meta = _collect(model)
    tied = {e["name"] for e in meta["layers"] if "tied_to" in e}
    nbytes = lambda t: t.numel() * t.element_size()
    rows = []
    for name, m in sparse_layers(model):
        p = f"{name}." if name else ""
        bias = getattr(m, "bias", None)
        b_n, b_bytes = (bias.numel(), nbytes(bias)) if bias is not None else (0, 0)
        if isinstance(m, BlockSparseLinear):
            shape = tuple(m.layout.shape)
            numel, elsize = shape[0] * shape[1], m.values.element_size()
            kept_w = m.values.numel()
        else:
            shape = tuple(m.weight.shape)
            numel, elsize = m.weight.numel(), m.weight.element_size()
            kept_w = int(m.mask.sum())
        keys = [meta["aliases"].get(p + k, p + k) for k in ("values", "block_mask", "kept", "mask_bits", "bias")]
        stored = sum(nbytes(tensors[k]) for k in keys if k in tensors)
        if name in tied:
            numel = kept_w = 0
        rows.append((name, type(m).__name__ + (" (tied)" if name in tied else ""), shape, float(m.density),
                     numel + b_n, kept_w + b_n, numel * elsize + b_bytes, stored))
    return rows


def _copy_tokenizer(tok, source: str, where: str, out: str):
    """Put the tokenizer's files into ``out``: the model folder's own (copied as they are), or the
    ones ``save_pretrained`` writes (a Hub model). The names written."""
    import shutil
    if where == "local":
        names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(source, n))]
        for n in names:
            shutil.copy2(os.path.join(source, n), os.path.join(out, n))
        if names:
            return names
    return sorted({os.path.basename(f) for f in tok.save_pretrained(out)})


PRUNE_DESCRIPTION = "\n\n".join(textwrap.fill(" ".join(par.split()), 96) for par in f"""\
Prune a Hugging Face model once (no training) and save a sparse checkpoint, with the model's
tokenizer files, into --out. It prints, per pruned layer and in total, the kept fraction, the
parameters and the bytes before (dense) and after (what the checkpoint stores: kept weights or
blocks, masks, biases); and the output drift on {len(DRIFT_SENTENCES)} built-in sentences tokenized with the model's
own tokenizer (random token ids when the folder has none): the cosine of the last hidden states to
the original model's, per token and of the mean-pooled sentence embeddings, and the mean cosine
between the pruned model's sentences (1: all collapsed onto one embedding).

It warns when the sentence cosine is below {DRIFT_WARN_COSINE}, or the sentences' spread (1 - their mean
pairwise cosine) shrinks below {COLLAPSE_WARN_SPREAD} of the original's: one-shot pruning of a
pre-trained model without recovery training destroys its representations at that level. Prune
while training instead: sparsebert pretrain, or sparsebert.hf.PruningCallback in a Hugging Face
Trainer.
""".split("\n\n"))


def _cmd_prune(args) -> int:
    from .checkpoint import META, TENSORS, save_sparse
    from .hf import sparsify

    source, where = model_source(args.model_dir)
    out = check_out_dir(args.out)
    if where == "local" and os.path.isdir(out) and _same_folder(source, out):
        raise UsageError(f"--out {out} is the model folder itself: write the checkpoint somewhere else")
    if os.path.isdir(out) and os.listdir(out) and not args.force:
        what = "a sparsebert checkpoint" if os.path.isfile(os.path.join(out, META)) else "files"
        raise UsageError(f"--out {out} already holds {what}: pass --force to replace the checkpoint "
                         "there (other files in it are kept)")
    model = _load_hf_model(source, where, args.auto_model)
    model.eval()
    tok, no_tok = _load_tokenizer(source, where)
    batch, batch_text = _drift_batch(model, tok, no_tok)
    try:
        before, no_drift = _last_hidden(model, batch), None
    except Exception as e:                  # a model whose forward needs more than token ids
        before, no_drift = None, f"the model's forward failed on them: {' '.join(str(e).split()) or type(e).__name__}"
    dense_params = sum(p.numel() for p in model.parameters())
    dense_bytes = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in model.state_dict().values()
                                                             if hasattr(t, "data_ptr")}.values())
    try:
        sparsify(model, sparsity=args.sparsity, block=(args.block, args.block), mode=args.mode,
                 scope=args.scope, score=args.score)
    except ValueError as e:
        raise UsageError(f"cannot prune {args.model_dir}: {e}") from None
    drift = drift_stats(before, _last_hidden(model, batch), batch["attention_mask"]) if before is not None else None
    try:
        save_sparse(model, out)
        copied = _copy_tokenizer(tok, source, where, out) if tok is not None else []
    except OSError as e:
        raise UsageError(f"cannot write the checkpoint to {out}: {oserror_text(e)}") from None

    detail = f"{args.mode}, block {args.block}x{args.block}" if args.mode == "block" else args.mode
    print(f"pruned {args.model_dir} to sparsity {100 * args.sparsity:g}% ({detail}, {args.scope} scope)")
    rows = size_table(model)
    cols = [(name, kind, str(tuple(shape)), f"{kept:.3f}", _human_count(p0), _human_count(p1),
             _human_bytes(b0), _human_bytes(b1)) for name, kind, shape, kept, p0, p1, b0, b1 in rows]
    tot = [sum(r[i] for r in rows) for i in (4, 5, 6, 7)]
    weights = sum(r[2][0] * r[2][1] for r in rows if "tied" not in r[1])
    kept_w = sum(r[2][0] * r[2][1] * r[3] for r in rows if "tied" not in r[1])
    cols.append((f"total ({len(rows)} layers)", "", "", f"{kept_w / max(weights, 1):.3f}", _human_count(tot[0]),
                 _human_count(tot[1]), _human_bytes(tot[2]), _human_bytes(tot[3])))
    head = ("layer", "kind", "shape", "kept", "params dense", "params kept", "bytes dense", "bytes sparse")
    width = [max(len(c[i]) for c in cols + [head]) for i in range(len(head))]
    line = lambda c: "  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(c, width)))
    print(line(head))
    for c in cols[:-1]:
        print(line(c))
    print(line(cols[-1]))
    kept_params = dense_params - (tot[0] - tot[1])
    print(f"whole model: {_human_count(dense_params)} parameters, {_human_bytes(dense_bytes)} dense -> "
          f"{_human_count(kept_params)} kept, {_human_bytes(os.path.getsize(os.path.join(out, TENSORS)))} "
          f"in {TENSORS}")
    print(f"overall kept fraction of pruned layers: {kept_w / max(weights, 1):.3f}")
    if drift is None:
        print(f"output drift: not measured on {batch_text} ({no_drift})")
    else:
        print(f"output drift on {batch_text}, last hidden states vs the original model:")
        print(f"  token cosine     {drift['token_cosine']:.3f}  (mean over tokens; 1: unchanged)")
        print(f"  sentence cosine  {drift['sentence_cosine']:.3f}  (mean-pooled sentence embeddings; warning below "
              f"{DRIFT_WARN_COSINE})")
        print(f"  pairwise cosine  {drift['pairwise_after']:.3f}  between its sentences (original "
              f"{drift['pairwise_before']:.3f}; 1: all collapsed onto one embedding)")
    if copied:
        print(f"tokenizer: {', '.join(copied)} copied to {out}")
    else:
        print(f"tokenizer: none copied ({no_tok})")
    print(f"saved to {out}")
    if drift is not None and drift["warn"]:
        print(f"{PROG}: warning: the pruned model's outputs are far from the original's: "
              f"{'; '.join(drift['warn'])}. One-shot pruning of a pre-trained model without recovery training "
              f"destroys its representations at this level (sparsity {100 * args.sparsity:g}%). Prune gradually "
              "while training instead: sparsebert pretrain (continued MLM pre-training with gradual pruning, "
              "see sparsebert pretrain --help), or sparsebert.hf.PruningCallback in a Hugging Face Trainer on "
              "your own data.", file=sys.stderr)
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo
    try:
        run_demo(levels=args.levels, block=args.block, tokens=args.tokens)
    except ValueError as e:
        raise UsageError(f"demo: {e}") from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsebert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="versions and which backends are available here (and why not)")
    s.set_defaults(func=_cmd_info)

    s = sub.add_parser("prune", help="prune a Hugging Face model (a local folder, or a Hub id) and save a "
                                     "sparse checkpoint",
                       description=PRUNE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("model_dir", help="a local model folder (with config.json), or a Hugging Face Hub id: org/name, "
                                     "or an owner-less one such as bert-base-uncased or gpt2 (fetched only when no "
                                     "such local path exists; with HF_HUB_OFFLINE set, only from the local cache)")
    s.add_argument("--sparsity", type=sparsity, required=True,
                   help=f"required: fraction of the weights to remove, in each pruned layer (--scope layer) or "
                        f"over all of them (--scope global): {SPARSITY_HELP}")
    s.add_argument("--block", type=block_size, default=32,
                   help=f"block side in weights for --mode block: a multiple of 16 from 16 to {MAX_BLOCK} dividing "
                        "every pruned weight (default 32)")
    s.add_argument("--mode", choices=["block", "unstructured"], default="block",
                   help="block: whole --block x --block blocks are removed (BlockSparseLinear, the fast kernels); "
                        "unstructured: single weights are masked (MaskedLinear, and the word embeddings) "
                        "(default block)")
    s.add_argument("--scope", choices=["layer", "global"], default="layer",
                   help="layer: every pruned layer loses --sparsity of its weights; global: one threshold over "
                        "all pruned layers together (default layer)")
    s.add_argument("--score", choices=["magnitude", "random"], default="magnitude",
                   help="which weights or blocks go: magnitude (the smallest) or random (a control) "
                        "(default magnitude)")
    s.add_argument("--auto-model", action="store_true",
                   help="load with AutoModel: the encoder without a task head (default off: the class named "
                        "in config.json's architectures)")
    s.add_argument("--out", required=True,
                   help="required: the folder to write (the sparse checkpoint and the model's tokenizer files)")
    s.add_argument("--force", action="store_true",
                   help="replace a checkpoint already in --out; other files there are kept (default off: "
                        "refuse a folder that is not empty)")
    s.set_defaults(func=_cmd_prune)

    s = sub.add_parser("demo", help="prune a small BERT at several levels: kept fraction, drift, speed")
    s.add_argument("--levels", type=sparsity, nargs="+", default=[0.0, 0.5, 0.75, 0.9],
                   help=f"sparsity levels: each {SPARSITY_HELP} (default 0 0.5 0.75 0.9)")
    s.add_argument("--block", type=block_size, default=32,
                   help="block side in weights: a multiple of 16 dividing 384 and 1536 (default 32)")
    s.add_argument("--tokens", type=positive_int, default=2048,
                   help="tokens per timed forward pass, in sequences of 128 (default 2048)")
    s.set_defaults(func=_cmd_demo)

    try:
        from .study.cli import add_subcommands
    except ImportError:
        pass
    else:
        add_subcommands(sub)
    for choice in sub._choices_actions:         # each subcommand's --help opens with what it does
        parser = sub.choices[choice.dest]
        if parser.description is None:
            parser.description = choice.help[:1].upper() + choice.help[1:] + "."
    return p


def _user_errors():
    from .checkpoint import CheckpointError
    return (UsageError, CheckpointError, ValueError, OSError)


def run(parser: argparse.ArgumentParser, argv=None) -> int:
    """Parse ``argv`` and run the chosen command: the exit status, never a traceback for a user
    error (one line on stderr, status 2) unless ``SPARSEBERT_TRACEBACK`` is set."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:                   # argparse: --help (0) or a bad argument (2, said already)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as e:
        if os.environ.get("SPARSEBERT_TRACEBACK"):
            raise
        msg = oserror_text(e) if isinstance(e, OSError) else " ".join(str(e).split())
        print(f"{parser.prog}: error: {msg or type(e).__name__}", file=sys.stderr)
        return 2


def main(argv=None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
