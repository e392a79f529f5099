"""save_sparse / load_sparse: dtypes, eval mode, atomic saves, malformed and tampered files, and
the study's encoder cache (safetensors, never unpickled)."""
import copy
import json
import os

import pytest
import torch
from torch import nn
from transformers import BertForMaskedLM, BertModel

import sparsebert
from sparsebert import CheckpointError
from sparsebert import checkpoint as C


def _ids(n=2, s=12):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 200, (n, s), generator=g)


def _model(cfg, mode="block", cls=BertModel, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = cls(cfg).to(dtype)
    return sparsebert.sparsify(model, sparsity=0.5, block=(32, 32), mode=mode).eval()


def _out(model, ids=None):
    with torch.no_grad():
        out = model(input_ids=_ids() if ids is None else ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _rehash(ck):
    """Record the files' current SHA-256 in the manifest: what a writer bug (rather than an edit)
    would leave, so the structural checks are what is tested."""
    man = ck / "manifest.json"
    if man.exists():
        m = json.loads(man.read_text())
        m["sha256"] = {name: C.sha256_file(ck / name) for name in m["sha256"]}
        man.write_text(json.dumps(m))


def _edit_meta(ck, fn, rehash=True):
    meta = json.loads((ck / "sparsebert.json").read_text())
    meta = fn(meta) or meta
    (ck / "sparsebert.json").write_text(json.dumps(meta))
    if rehash:
        _rehash(ck)


# ---- dtypes and mode ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["block", "unstructured"])
def test_round_trip_keeps_every_dtype_and_the_outputs(tmp_path, tiny_bert_config, mode, dtype):
    model = _model(tiny_bert_config, mode, BertForMaskedLM, dtype)
    sparsebert.save_sparse(model, tmp_path / "ck")
    loaded = sparsebert.load_sparse(tmp_path / "ck")
    want, got = model.state_dict(), loaded.state_dict()
    assert list(want) == list(got)
    for k, v in want.items():
        if torch.is_tensor(v):
            assert got[k].dtype == v.dtype, k
            assert torch.equal(got[k], v), k
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    assert torch.equal(_out(loaded), _out(model))
    assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight


def test_half_checkpoint_into_a_float32_template_comes_back_half(tmp_path, tiny_bert_config):
    model = _model(tiny_bert_config, "block", dtype=torch.float16)
    sparsebert.save_sparse(model, tmp_path / "ck")
    template = BertModel(tiny_bert_config)
    loaded = sparsebert.load_sparse(tmp_path / "ck", model=template)
    assert {p.dtype for p in loaded.parameters()} == {torch.float16}
    assert {p.dtype for p in template.parameters()} == {torch.float32}      # left untouched
    assert torch.equal(_out(loaded), _out(model))


@pytest.mark.parametrize("with_model", [False, True])
def test_load_returns_the_model_in_eval_mode(tmp_path, tiny_bert_config, with_model):
    model = _model(tiny_bert_config).train()
    sparsebert.save_sparse(model, tmp_path / "ck")
    template = BertModel(tiny_bert_config).train() if with_model else None
    loaded = sparsebert.load_sparse(tmp_path / "ck", model=template)
    assert not loaded.training and not any(m.training for m in loaded.modules())


# ---- atomic saves -------------------------------------------------------------------------------
def _fail_config_save(monkeypatch, model):
    def boom(self, *a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(type(model.config), "save_pretrained", boom)


def _fail_hashing(monkeypatch, model):
    def boom(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(C, "sha256_file", boom)


def _fail_rename_into_place(monkeypatch, model):
    real, calls = os.rename, []

    def rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:                    # the old one is aside; the new one fails to move in
            raise OSError(5, "Input/output error")
        return real(src, dst)
    monkeypatch.setattr(C.os, "rename", rename)


@pytest.mark.parametrize("fail", [_fail_config_save, _fail_hashing, _fail_rename_into_place])
def test_a_failed_save_leaves_the_previous_checkpoint_as_it_was(tmp_path, tiny_bert_config, monkeypatch, fail):
    old = _model(tiny_bert_config, seed=0)
    new = _model(tiny_bert_config, seed=1)
    ck = tmp_path / "ck"
    sparsebert.save_sparse(old, ck)
    (ck / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in ck.iterdir()}
    with monkeypatch.context() as m:
        fail(m, new)
        with pytest.raises(OSError):
            sparsebert.save_sparse(new, ck)
    assert {p.name: p.read_bytes() for p in ck.iterdir()} == before
    assert torch.equal(_out(sparsebert.load_sparse(ck)), _out(old))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]         # no temporary folder left


def test_saving_over_a_folder_keeps_its_other_files(tmp_path, tiny_bert_config):
    ck = tmp_path / "ck"
    (ck / "tokenizer").mkdir(parents=True)
    (ck / "tokenizer" / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    (ck / "notes.txt").write_text("mine")
    os.symlink("notes.txt", ck / "link")
    first, second = _model(tiny_bert_config, seed=0), _model(tiny_bert_config, "unstructured", seed=1)
    sparsebert.save_sparse(first, ck)
    sparsebert.save_sparse(second, ck)
    assert (ck / "tokenizer" / "vocab.txt").read_text() == "[PAD]\n[UNK]\n"
    assert (ck / "notes.txt").read_text() == "mine" and os.readlink(ck / "link") == "notes.txt"
    assert torch.equal(_out(sparsebert.load_sparse(ck)), _out(second))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_saving_onto_a_file_is_refused(tmp_path, tiny_bert_config):
    f = tmp_path / "model.bin"
    f.write_bytes(b"precious")
    with pytest.raises(CheckpointError, match="not a folder"):
        sparsebert.save_sparse(_model(tiny_bert_config), f)
    assert f.read_bytes() == b"precious"


def test_loading_a_file_or_nothing_says_so(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        sparsebert.load_sparse(tmp_path / "f")
    with pytest.raises(CheckpointError, match="folder is missing"):
        sparsebert.load_sparse(tmp_path / "nowhere")


# ---- a `sparsebert pretrain --out` folder ----------------------------------------------------------
def _pretrain_out(root, model):
    """What `sparsebert pretrain --out root` writes: encoder/ (a sparse checkpoint of the BertModel),
    tokenizer/, pretrain.json (the real command is run in tests/test_distributed.py)."""
    sparsebert.save_sparse(model, root / "encoder")
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    (root / "pretrain.json").write_text(json.dumps({"config": {}, "result": {}}))
    return root


@pytest.mark.parametrize("mode", ["block", "unstructured"])
@pytest.mark.parametrize("loader", ["load_sparse", "from_pretrained"])
def test_a_pretrain_output_folder_loads_its_encoder(tmp_path, tiny_bert_config, mode, loader):
    model = _model(tiny_bert_config, mode)
    out = _pretrain_out(tmp_path / "run", model)
    load = getattr(sparsebert, loader)
    got = load(out)
    assert type(got) is BertModel and not got.training
    assert torch.equal(_out(got), _out(model))
    assert torch.equal(_out(load(out, model=BertModel(tiny_bert_config))), _out(model))
    assert C.resolve(out) == ("sparse", os.fspath(out / "encoder"))
    (out / "encoder" / "config.json").write_text("{}")            # still verified against the manifest
    with pytest.raises(CheckpointError, match="config.json does not match"):
        load(out)


@pytest.mark.parametrize("loader", ["load_sparse", "from_pretrained"])
def test_a_folder_of_no_known_kind_is_an_error_naming_it(tmp_path, loader):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError) as e:
        getattr(sparsebert, loader)(tmp_path)
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path} is not a sparsebert checkpoint") and "\n" not in msg
    assert "sparsebert.json" in msg and "save_pretrained" in msg and "encoder/" in msg


# ---- malformed metadata -------------------------------------------------------------------------
def _set(path, value):
    def edit(meta):
        obj = meta
        for k in path[:-1]:
            obj = obj[k]
        obj[path[-1]] = value
    return edit


def _del(path):
    def edit(meta):
        obj = meta
        for k in path[:-1]:
            obj = obj[k]
        del obj[path[-1]]
    return edit


MALFORMED = [
    ("block", _del(["aliases"]), "'aliases' is missing"),
    ("block", _del(["layers"]), "'layers' is missing"),
    ("block", _del(["model_class"]), "'model_class' is missing"),
    ("block", _set(["layers"], {}), "'layers' must be a list, got an object"),
    ("block", _set(["aliases"], []), "'aliases' must be an object, got a list"),
    ("block", _set(["model_class"], 5), "'model_class' must be a string"),
    ("block", lambda m: [m], "expected a JSON object, got a list"),
    ("block", _set(["layers", 0], ["query"]), r"layers\[0\] must be an object"),
    ("block", _del(["layers", 0, "name"]), r"layers\[0\]: 'name' is missing"),
    ("block", _set(["layers", 0, "kind"], "conv"), "unknown kind 'conv'"),
    ("block", _set(["layers", 0, "shape"], "64x64"), "'shape' must be a list of two positive integers"),
    ("block", _set(["layers", 0, "shape"], [64]), "'shape' must be a list of two positive integers"),
    ("block", _set(["layers", 0, "shape"], [64, True]), "'shape' must be a list of two positive integers"),
    ("block", _del(["layers", 0, "block"]), "'block' must be a list of two positive integers"),
    ("block", _set(["layers", 0, "block"], ["32", 32]), "'block' must be a list of two positive integers"),
    ("block", _set(["layers", 0, "nnz"], "2"), "'nnz' must be a non-negative integer"),
    ("block", _set(["layers", 0, "bias"], "yes"), "'bias' must be true or false"),
    ("block", _set(["layers", 0, "activation"], "relu"), "unknown activation 'relu'"),
    ("block", _set(["layers", 0, "backend"], 5), "'backend' must be a string, got an integer"),
    ("block", lambda m: m["layers"].append(dict(m["layers"][0])), "listed twice"),
    ("block", _set(["version"], "2"), "version '2' is not supported"),
    ("block", _set(["version"], 3), "version 3 is not supported"),
    ("block", _set(["model_class"], "logging"), "not a transformers model class"),
    ("unstructured", _set(["aliases", "cls.predictions.decoder.bias"], 7), "must name a tensor"),
    ("unstructured", _set(["aliases", "cls.predictions.bias"], "cls.predictions.bias"), "is also stored"),
    ("unstructured", _set(["aliases", "x.weight"], "nowhere"), "names a missing tensor"),
    ("unstructured", lambda m: next(e for e in m["layers"] if "tied_to" in e).update(tied_to="nowhere"),
     "'tied_to' 'nowhere' does not name an earlier masked layer"),
]


@pytest.mark.parametrize("mode,edit,match", MALFORMED)
def test_malformed_metadata_is_a_checkpoint_error_naming_the_problem(tmp_path, tiny_bert_config, mode, edit, match):
    cls = BertModel if mode == "block" else BertForMaskedLM
    ck = tmp_path / "ck"
    sparsebert.save_sparse(_model(tiny_bert_config, mode, cls), ck)
    _edit_meta(ck, edit)
    with pytest.raises(CheckpointError, match=match):
        sparsebert.load_sparse(ck)


def test_a_backend_this_version_lacks_loads_as_auto_with_a_warning(tmp_path, tiny_bert_config):
    # the backend only picks how the product is computed: a checkpoint naming one that is gone
    # (or a plan string) must still load, never be refused as malformed
    ck = tmp_path / "ck"
    model = _model(tiny_bert_config)
    sparsebert.save_sparse(model, ck)
    _edit_meta(ck, _set(["layers", 0, "backend"], "cpu,reference,cpu"))
    with pytest.warns(UserWarning, match="saved with backend 'cpu,reference,cpu'.*using 'auto'"):
        loaded = sparsebert.load_sparse(ck)
    name = json.loads((ck / C.META).read_text())["layers"][0]["name"]
    assert loaded.get_submodule(name).backend == "auto"


def test_a_missing_or_wrong_tensor_is_a_checkpoint_error(tmp_path, tiny_bert_config):
    from safetensors.torch import load_file, save_file
    ck = tmp_path / "ck"
    sparsebert.save_sparse(_model(tiny_bert_config), ck)
    tensors = load_file(ck / "sparse_model.safetensors")
    key = "encoder.layer.0.attention.self.query.values"
    save_file({k: v for k, v in tensors.items() if k != key}, ck / "sparse_model.safetensors")
    _rehash(ck)
    with pytest.raises(CheckpointError, match=f"tensor {key} is missing"):
        sparsebert.load_sparse(ck)
    save_file(dict(tensors, **{key: tensors[key].flatten()}), ck / "sparse_model.safetensors")
    _rehash(ck)
    with pytest.raises(CheckpointError, match=f"tensor {key} has dtype"):
        sparsebert.load_sparse(ck)


# ---- tampered files -----------------------------------------------------------------------------
def _edit_json(name, fn):
    def edit(ck):
        d = json.loads((ck / name).read_text())
        fn(d)
        (ck / name).write_text(json.dumps(d, indent=2))
    return edit


TAMPERED = [
    ("config-hidden_act", _edit_json("config.json", lambda d: d.update(hidden_act="relu")), "config.json does not match"),
    ("config-layer_norm_eps", _edit_json("config.json", lambda d: d.update(layer_norm_eps=1e-3)), "config.json does not match"),
    ("meta-backend", _edit_json("sparsebert.json", lambda d: d["layers"][0].update(backend="reference")),
     "sparsebert.json does not match"),
    ("manifest-digest", _edit_json("manifest.json", lambda d: d["sha256"].update({"config.json": "0" * 64})),
     "config.json does not match"),
    ("manifest-entry", _edit_json("manifest.json", lambda d: d["sha256"].pop("config.json")), "not covered by manifest.json"),
    ("manifest-gone", lambda ck: (ck / "manifest.json").unlink(), "manifest.json is missing"),
    ("config-gone", lambda ck: (ck / "config.json").unlink(), "config.json is missing"),
    ("manifest-path", _edit_json("manifest.json", lambda d: d["sha256"].update({"../x": "0" * 64})), "not a file of"),
]


@pytest.mark.parametrize("name,tamper,match", TAMPERED, ids=[t[0] for t in TAMPERED])
def test_every_file_the_loader_reads_is_checked(tmp_path, tiny_bert_config, name, tamper, match):
    ck = tmp_path / "ck"
    # unstructured for the config edits: no fused GELU whose check would catch a new hidden_act
    sparsebert.save_sparse(_model(tiny_bert_config, "block" if name.startswith("meta") else "unstructured"), ck)
    tamper(ck)
    with pytest.raises(CheckpointError, match=match):
        sparsebert.load_sparse(ck)


def test_an_alias_pointed_at_another_tensor_is_refused(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32))
    net[2].weight = net[0].weight                            # tied: stored once, as an alias
    ck = tmp_path / "ck"
    sparsebert.save_sparse(net, ck)
    assert json.loads((ck / "sparsebert.json").read_text())["aliases"] == {"2.weight": "0.weight"}
    loaded = sparsebert.load_sparse(ck, model=net)
    assert torch.equal(loaded[2].weight, net[0].weight)
    _edit_meta(ck, _set(["aliases", "2.weight"], "1.weight"), rehash=False)   # same shape, other tensor
    with pytest.raises(CheckpointError, match="sparsebert.json does not match"):
        sparsebert.load_sparse(ck, model=net)


def _as_format_1(ck):
    (ck / "manifest.json").unlink()
    _edit_meta(ck, lambda m: m.update(version=1, sha256=C.sha256_file(ck / "sparse_model.safetensors")),
               rehash=False)


def test_format_1_checkpoints_still_load(tmp_path, tiny_bert_config):
    model = _model(tiny_bert_config, "unstructured", BertForMaskedLM)
    ck = tmp_path / "ck"
    sparsebert.save_sparse(model, ck)
    _as_format_1(ck)
    with pytest.warns(UserWarning, match="format-1"):
        loaded = sparsebert.load_sparse(ck)
    assert torch.equal(_out(loaded), _out(model))
    (ck / "sparse_model.safetensors").write_bytes((ck / "sparse_model.safetensors").read_bytes()[:-3] + b"xyz")
    with pytest.raises(CheckpointError, match="SHA-256"):
        sparsebert.load_sparse(ck)
    _edit_meta(ck, _del(["layers"]), rehash=False)
    with pytest.raises(CheckpointError, match="'layers' is missing"):
        sparsebert.load_sparse(ck)


def test_an_unreadable_config_is_a_checkpoint_error(tmp_path, tiny_bert_config):
    ck = tmp_path / "ck"
    sparsebert.save_sparse(_model(tiny_bert_config), ck)
    (ck / "config.json").write_text('{"model_type": "bert", "hidden_size": "wide"')
    _rehash(ck)
    with pytest.raises(CheckpointError, match="config.json"):
        sparsebert.load_sparse(ck)


# ---- the study's encoder cache --------------------------------------------------------------------
class _Payload:
    """Unpickling this creates a file: proof that a loader ran code from the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _encoders(cfg):
    from sparsebert.study.pretrain import attach_pooler
    torch.manual_seed(0)
    warm = attach_pooler(BertForMaskedLM(cfg)).eval()         # the warm-up's cached model
    block = sparsebert.sparsify(BertModel(cfg), 0.5, block=(32, 32)).eval()
    unstr = sparsebert.sparsify(BertForMaskedLM(cfg), 0.5, mode="unstructured").bert.eval()
    return {"warmup": warm, "block": block, "unstructured": unstr}


def test_run_store_keeps_encoders_as_safetensors_checkpoints(tmp_path, tiny_bert_config):
    from sparsebert.study.runner import RunStore
    store = RunStore(tmp_path / "runs")
    for kind, enc in _encoders(tiny_bert_config).items():
        store.save_model(kind, "k", enc)
        got = store.load_model(kind, "k")
        assert type(got) is type(enc)
        assert [type(m) for m in got.modules()] == [type(m) for m in enc.modules()]
        assert torch.equal(_out(got.eval()), _out(enc))
        if kind == "warmup":
            assert got.bert.pooler is not None
            assert got.cls.predictions.decoder.weight is got.bert.embeddings.word_embeddings.weight
    assert store.load_model("pretrain", "absent") is None
    assert not list((tmp_path / "runs").rglob("*.pt"))


def test_run_store_never_unpickles(tmp_path, tiny_bert_config):
    from sparsebert.study.runner import RunStore
    store = RunStore(tmp_path / "runs")
    marker = tmp_path / "pwned"
    legacy = tmp_path / "runs" / "pretrain-k.pt"            # where an older sparsebert kept it
    torch.save(_Payload(marker), legacy)
    with pytest.warns(UserWarning, match="not loaded"):
        assert store.load_model("pretrain", "k") is None    # a cache miss: the run is redone
    assert not marker.exists() and legacy.exists()          # not run, and not deleted either
    store.save_model("pretrain", "k", _encoders(tiny_bert_config)["block"])
    assert store.load_model("pretrain", "k") is not None and not marker.exists()


def test_run_store_reruns_a_corrupt_cached_encoder(tmp_path, tiny_bert_config):
    from sparsebert.study.runner import RunStore
    store = RunStore(tmp_path / "runs")
    store.save_model("pretrain", "k", _encoders(tiny_bert_config)["block"])
    t = store.ckpt_path("pretrain", "k") / "sparse_model.safetensors"
    t.write_bytes(t.read_bytes()[:100])
    with pytest.warns(UserWarning, match="corrupt"):
        assert store.load_model("pretrain", "k") is None
