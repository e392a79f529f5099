"""The command line: one sparsity convention, one-line errors with exit status 2 (never a
traceback), prune's local-vs-Hub rule and --force, and pretrain/finetune never unpickling."""
import json
import re
import os
import shutil

import pytest
import torch

import sparsebert
from sparsebert import cli
from sparsebert import checkpoint as C


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A tiny local Hugging Face model folder."""
    from transformers import BertConfig, BertForSequenceClassification
    cfg = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                     vocab_size=200, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("hf") / "model"
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(path)
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    from sparsebert.study import data as D
    from study_fixtures import make_fixture_cache

    def refuse(*a, **k):
        raise AssertionError("tests must not download")
    monkeypatch.setattr(D.subprocess, "run", refuse)
    make_fixture_cache(tmp_path / "cache", n_sentences=60, n_articles=6)
    return tmp_path / "cache"


def _run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line_error(rc, err, *needles):
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if "error:" in l]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# ---- the sparsity convention ----------------------------------------------------------------------
@pytest.mark.parametrize("text,value", [("0", 0.0), ("0.5", 0.5), ("0.999", 0.999), ("50", 0.5), ("50%", 0.5),
                                        ("1.5", 0.015), ("1%", 0.01), ("99.5", 0.995), ("0.5%", 0.005)])
def test_sparsity_is_a_fraction_below_1_or_a_percent_above(text, value):
    assert cli.sparsity(text) == pytest.approx(value)


@pytest.mark.parametrize("text,match", [("1", "ambiguous"), ("1.0", "ambiguous"), ("100", "below 100"),
                                        ("150", "below 100"), ("100%", "below 100"), ("-10", "out of range"),
                                        ("-0.1", "out of range"), ("nan", "out of range"), ("inf", "out of range"),
                                        ("half", "not a sparsity")])
def test_a_sparsity_outside_the_convention_is_refused(text, match):
    import argparse
    with pytest.raises(argparse.ArgumentTypeError, match=match):
        cli.sparsity(text)


def test_help_states_the_convention(capsys):
    rc, out, _ = _run(capsys, "--help")
    assert rc == 0 and "a fraction in [0, 1)" in out and "percent in (1, 100)" in out
    rc, out, _ = _run(capsys, "prune", "--help")
    out = " ".join(out.split())                   # argparse wraps help to the terminal's width
    assert rc == 0 and "percent in (1, 100)" in out and "--force" in out


# ---- bad values: one line, exit status 2 -----------------------------------------------------------
BAD_ARGS = [
    (["prune", "{src}", "--sparsity", "150", "--out", "{out}"], ["--sparsity", "150", "below 100"]),
    (["prune", "{src}", "--sparsity", "1", "--out", "{out}"], ["--sparsity", "ambiguous"]),
    (["prune", "{src}", "--sparsity", "-0.2", "--out", "{out}"], ["--sparsity", "-0.2"]),
    (["prune", "{src}", "--sparsity", "0.5", "--block", "20", "--out", "{out}"], ["--block", "20", "multiple of 16"]),
    (["prune", "{src}", "--sparsity", "0.5", "--block", "0", "--out", "{out}"], ["--block", "0"]),
    (["prune", "{src}", "--sparsity", "0.5", "--block", "512", "--out", "{out}"], ["--block", "512", "256"]),
    (["prune", "{src}", "--sparsity", "0.5", "--block", "48", "--out", "{out}"], ["(48, 48) does not divide", "(64, 64)"]),
    (["study", "--levels", "150", "--out", "{out}"], ["--levels", "150", "below 100"]),
    (["study", "--levels", "50", "-10", "--out", "{out}"], ["--levels", "-10", "out of range"]),
    (["study", "--threads", "0", "--out", "{out}"], ["--threads", "0", "at least 1"]),
    (["study", "--device", "tpu", "--out", "{out}"], ["--device", "tpu", "auto, cpu, cuda"]),
    (["study", "--tasks", "poetry", "--out", "{out}"], ["--tasks", "poetry"]),
    (["pretrain", "--sparsity", "150", "--out", "{out}"], ["--sparsity", "150"]),
    (["pretrain", "--steps", "0", "--out", "{out}"], ["--steps", "0"]),
    (["pretrain", "--ramp-fraction", "2", "--out", "{out}"], ["--ramp-fraction", "[0, 1]"]),
    (["pretrain", "--backend", "tpu", "--out", "{out}"], ["--backend", "tpu"]),
    (["pretrain", "--lr", "-1", "--out", "{out}"], ["--lr", "-1"]),
    (["pretrain", "--seq-len", "1", "--out", "{out}"], ["--seq-len", "1", "at least 3"]),
    (["pretrain", "--seq-len", "2", "--out", "{out}"], ["--seq-len", "2", "at least 3"]),
    (["pretrain", "--threads", "100000", "--out", "{out}"], ["--threads", "100000", "at most"]),
    (["pretrain", "--threads", "99999999999", "--out", "{out}"], ["--threads", "99999999999", "at most"]),
    (["study", "--threads", "100000", "--out", "{out}"], ["--threads", "100000", "at most"]),
    (["finetune", "--checkpoint", "{out}", "--task", "polarity", "--threads", "100000"], ["--threads", "at most"]),
    (["pretrain", "--out", ""], ["--out ''", "the path is empty"]),
    (["prune", "{src}", "--sparsity", "0.5", "--out", ""], ["--out ''", "the path is empty"]),
    (["finetune", "--checkpoint", "{out}", "--task", "polarity", "--sparsity", "100"], ["--sparsity", "100"]),
    (["finetune", "--checkpoint", "{out}", "--task", "polarity", "--batch-size", "0"], ["--batch-size", "0"]),
    (["demo", "--levels", "0.5", "150"], ["--levels", "150"]),
    (["demo", "--tokens", "0"], ["--tokens", "0"]),
]


@pytest.mark.parametrize("argv,needles", BAD_ARGS, ids=[" ".join(a[:1] + a[2:] if "{src}" in a else a).replace("{out}", "")
                                                        for a, _ in BAD_ARGS])
def test_bad_values_are_one_line_errors_with_status_2(tmp_path, src, capsys, argv, needles):
    argv = [a.format(src=src, out=tmp_path / "out") for a in argv]
    rc, _, err = _run(capsys, *argv)
    _one_line_error(rc, err, *needles)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("cmd", [["study"], ["pretrain"], ["finetune", "--checkpoint", "x", "--task", "polarity"]])
def test_a_missing_gpu_is_a_one_line_error(tmp_path, capsys, cmd):
    rc, _, err = _run(capsys, *cmd, "--device", "cuda", *(["--out", tmp_path / "o"] if cmd[0] != "finetune" else []))
    _one_line_error(rc, err, "--device cuda", "no CUDA GPU")


@pytest.mark.parametrize("cmd", [["study"], ["pretrain"]])
def test_out_naming_a_file_is_refused(tmp_path, capsys, cmd):
    f = tmp_path / "file"
    f.write_text("mine")
    rc, _, err = _run(capsys, *cmd, "--out", f)
    _one_line_error(rc, err, "--out", "is a file")
    assert f.read_text() == "mine"


# ---- prune -----------------------------------------------------------------------------------------
def test_prune_accepts_a_percent_and_a_fraction_alike(tmp_path, src, capsys):
    for s, out in (("50", "pct"), ("0.5", "frac"), ("50%", "sign")):
        rc, stdout, err = _run(capsys, "prune", src, "--sparsity", s, "--out", tmp_path / out)
        assert rc == 0, err
        assert "sparsity 50%" in stdout and "0.500" in stdout
    digest = lambda d: C.sha256_file(tmp_path / d / C.TENSORS)
    assert digest("pct") == digest("frac") == digest("sign")


def test_prune_refuses_to_overwrite_without_force(tmp_path, src, capsys):
    out = tmp_path / "out"
    assert _run(capsys, "prune", src, "--sparsity", "0.5", "--out", out)[0] == 0
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    rc, _, err = _run(capsys, "prune", src, "--sparsity", "0.75", "--out", out)
    _one_line_error(rc, err, str(out), "already holds a sparsebert checkpoint", "--force")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    rc, _, err = _run(capsys, "prune", src, "--sparsity", "0.75", "--out", out, "--force")
    assert rc == 0, err
    loaded = sparsebert.load_sparse(out)
    assert loaded.bert.encoder.layer[0].attention.self.query.density == 0.25
    assert (out / "notes.txt").read_text() == "mine"


def test_prune_refuses_a_non_empty_folder_and_the_model_folder(tmp_path, src, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "data.csv").write_text("1,2\n")
    rc, _, err = _run(capsys, "prune", src, "--sparsity", "0.5", "--out", busy)
    _one_line_error(rc, err, "already holds files", "--force")
    rc, _, err = _run(capsys, "prune", src, "--sparsity", "0.5", "--out", src, "--force")
    _one_line_error(rc, err, "is the model folder itself")
    assert sorted(p.name for p in src.iterdir()) == ["config.json", "model.safetensors"]


def test_prune_out_naming_a_file_is_refused(tmp_path, src, capsys):
    f = tmp_path / "ck"
    f.write_text("mine")
    rc, _, err = _run(capsys, "prune", src, "--sparsity", "0.5", "--out", f)
    _one_line_error(rc, err, "--out", "is a file")
    assert f.read_text() == "mine"


def test_prune_reports_an_unwritable_output_in_one_line(tmp_path, src, capsys, monkeypatch):
    def denied(model, path):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(C, "save_sparse", denied)
    rc, _, err = _run(capsys, "prune", src, "--sparsity", "0.5", "--out", tmp_path / "ro" / "ck")
    _one_line_error(rc, err, "Permission denied", str(tmp_path / "ro" / "ck"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_prune_into_a_read_only_folder_is_refused_before_any_work(tmp_path, src, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        rc, _, err = _run(capsys, "prune", src, "--sparsity", "0.5", "--out", ro / "ck")
    finally:
        ro.chmod(0o700)
    _one_line_error(rc, err, "permission denied")


@pytest.fixture
def no_hub(monkeypatch):
    import transformers
    calls = []
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):       # the machine's setting must not decide
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(cli, "_hub_cached", lambda repo_id: False)   # nor its Hugging Face cache

    def offline(name, *a, **k):
        calls.append(name)
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find "
                      "them in the cached files.\nCheck your internet connection or see how to run the library "
                      "in offline mode at 'https://huggingface.co/docs/transformers/installation#offline-mode'.")
    for cls in (transformers.AutoConfig, transformers.AutoModel):
        monkeypatch.setattr(cls, "from_pretrained", offline)
    return calls


@pytest.mark.parametrize("arg", ["{tmp}/nothing", "./no-such-model-dir", "~/no-such-model-dir", "models/bert/base",
                                 "../no-such-model-dir", "C:\\models\\bert"])
def test_prune_on_a_missing_local_path_never_asks_the_hub(tmp_path, capsys, no_hub, arg):
    arg = arg.format(tmp=tmp_path)
    rc, _, err = _run(capsys, "prune", arg, "--sparsity", "0.5", "--out", tmp_path / "out")
    _one_line_error(rc, err, "cannot load", arg, "no such folder")
    assert no_hub == []


@pytest.mark.parametrize("auto", [False, True])
def test_prune_of_a_hub_id_offline_is_one_line(tmp_path, capsys, no_hub, auto):
    rc, _, err = _run(capsys, "prune", "someorg/somemodel", "--sparsity", "0.5", "--out", tmp_path / "out",
                      *(["--auto-model"] if auto else []))
    _one_line_error(rc, err, "someorg/somemodel", "Hugging Face Hub", "couldn't connect")
    assert no_hub == ["someorg/somemodel"]


@pytest.mark.parametrize("arg", ["mymodel", "Models", "my_model", "checkpoint.best"])
def test_prune_of_a_bare_word_that_is_no_hub_id_never_asks_the_hub(tmp_path, capsys, no_hub, arg):
    rc, _, err = _run(capsys, "prune", arg, "--sparsity", "0.5", "--out", tmp_path / "out")
    assert "fetching" not in err
    _one_line_error(rc, err, f"cannot load a model from {arg}: no such folder", "org/name")
    assert no_hub == []


@pytest.mark.parametrize("arg", ["bert-base-uncased", "gpt2", "tiny-bret"])
def test_a_bare_name_shaped_like_an_owner_less_hub_id_is_fetched(tmp_path, capsys, no_hub, arg):
    rc, _, err = _run(capsys, "prune", arg, "--sparsity", "0.5", "--out", tmp_path / "out")
    _one_line_error(rc, err, arg, "Hugging Face Hub did not provide it")
    assert no_hub == [arg]


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
@pytest.mark.parametrize("arg", ["someorg/somemodel", "bert-base-uncased", "mymodel"])
def test_offline_an_uncached_name_is_one_line_without_a_hub_attempt(tmp_path, capsys, no_hub, monkeypatch,
                                                                     var, arg):
    monkeypatch.setenv(var, "1")
    rc, _, err = _run(capsys, "prune", arg, "--sparsity", "0.5", "--out", tmp_path / "out")
    assert "fetching" not in err
    _one_line_error(rc, err, f"cannot load {arg}: no such folder", "HF_HUB_OFFLINE", "cache")
    assert no_hub == []


def test_offline_a_cached_hub_id_is_loaded_from_the_cache(tmp_path, capsys, no_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(cli, "_hub_cached", lambda repo_id: repo_id == "mymodel")
    rc, _, err = _run(capsys, "prune", "mymodel", "--sparsity", "0.5", "--out", tmp_path / "out")
    assert rc == 2 and no_hub == ["mymodel"]           # handed to transformers (which reads its cache)


def test_a_relative_org_name_that_is_a_local_folder_stays_local(tmp_path, capsys, no_hub, monkeypatch):
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    rc, _, err = _run(capsys, "prune", "models/missing", "--sparsity", "0.5", "--out", tmp_path / "out")
    _one_line_error(rc, err, "no such folder")
    assert no_hub == []


@pytest.mark.parametrize("exc,needle", [
    (C.CheckpointError("corrupt checkpoint: x does not match its recorded SHA-256"), "corrupt checkpoint: x"),
    (FileNotFoundError(2, "No such file or directory", "/data/x"), "No such file or directory: /data/x"),
    (PermissionError(13, "Permission denied", "/ro/y"), "Permission denied: /ro/y"),
    (ValueError("a value\nover two lines"), "a value over two lines"),
])
def test_user_errors_raised_by_a_command_are_one_line(capsys, exc, needle):
    import argparse

    def fail(args):
        raise exc
    p = argparse.ArgumentParser(prog="sparsebert")
    p.set_defaults(func=fail)
    rc = cli.run(p, [])
    assert _one_line_error(rc, capsys.readouterr().err, needle).startswith("sparsebert: error: ")


def test_a_bug_still_shows_its_traceback():
    import argparse

    def bug(args):
        raise RuntimeError("a bug")
    p = argparse.ArgumentParser(prog="sparsebert")
    p.set_defaults(func=bug)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.run(p, [])


# ---- pretrain / finetune: encoders as safetensors, pickles refused ---------------------------------
class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pretrain(capsys, cache, out, *extra):
    return _run(capsys, "pretrain", "--from-scratch", "--mode", "block", "--sparsity", "50", "--steps", "2",
                "--batch-size", "4", "--seq-len", "16", "--max-blocks", "20", "--ramp-fraction", "0.5",
                "--prune-every", "1", "--out", out, "--cache-dir", cache, "--no-progress", "--threads", "1", *extra)


FT = ["--task", "polarity", "--max-steps", "1", "--batch-size", "4", "--max-len", "16", "--max-train", "8",
      "--max-dev", "8", "--no-progress", "--threads", "1"]


def test_pretrain_writes_no_pickle_and_finetune_reads_it(tmp_path, cache, capsys):
    out = tmp_path / "run"
    rc, _, err = _pretrain(capsys, cache, out)
    assert rc == 0, err
    assert not list(out.rglob("*.pt")) and (out / "encoder" / C.MANIFEST).is_file()
    rc, stdout, err = _run(capsys, "finetune", "--checkpoint", out, "--cache-dir", cache, *FT)
    assert rc == 0, err
    assert json.loads(stdout[stdout.rindex('{\n "dev_score"'):])["linear_zero_fraction"] >= 0.49


def test_finetune_never_unpickles_an_encoder(tmp_path, cache, capsys):
    out = tmp_path / "run"
    assert _pretrain(capsys, cache, out)[0] == 0
    legacy, marker = tmp_path / "legacy", tmp_path / "pwned"
    legacy.mkdir()
    shutil.copytree(out / "tokenizer", legacy / "tokenizer")
    torch.save(_Payload(marker), legacy / "encoder.pt")        # what an older pretrain wrote, crafted
    try:
        rc, _, err = _run(capsys, "finetune", "--checkpoint", legacy, "--cache-dir", cache, *FT)
    finally:
        assert not marker.exists(), "the pickle was loaded: its code ran"
    _one_line_error(rc, err, "encoder.pt", "pickle", "not loaded")
    assert (legacy / "encoder.pt").exists()

    if (out / "encoder").is_dir():                               # a pickle where the tensors belong
        torch.save(_Payload(marker), out / "encoder" / C.TENSORS)
        rc, _, err = _run(capsys, "finetune", "--checkpoint", out, "--cache-dir", cache, *FT)
        _one_line_error(rc, err, "corrupt checkpoint", "SHA-256")
        assert not marker.exists()


def test_pretrain_refuses_to_overwrite_a_run_without_force(tmp_path, cache, capsys):
    out = tmp_path / "run"
    assert _pretrain(capsys, cache, out)[0] == 0
    before = (out / "pretrain.json").read_bytes()
    rc, _, err = _pretrain(capsys, cache, out)
    _one_line_error(rc, err, "already holds a pretrain run", "--force")
    assert (out / "pretrain.json").read_bytes() == before
    rc, _, err = _pretrain(capsys, cache, out, "--force")
    assert rc == 0, err


def test_pretrain_force_clears_the_replaced_runs_resume_state(tmp_path, cache, capsys):
    out = tmp_path / "run"
    assert _pretrain(capsys, cache, out, "--steps", "4", "--save-every", "2")[0] == 0
    rc, _, err = _pretrain(capsys, cache, out, "--steps", "3", "--lr", "1e-3", "--force")
    assert rc == 0, err
    assert not (out / "resume").exists()
    encoder = (out / "encoder" / C.TENSORS).read_bytes()
    # nothing of the old run is left to resume, so the new run's encoder stays
    rc, _, err = _pretrain(capsys, cache, out, "--steps", "3", "--lr", "1e-3", "--resume")
    _one_line_error(rc, err, "holds no training state")
    assert (out / "encoder" / C.TENSORS).read_bytes() == encoder
    assert json.loads((out / "pretrain.json").read_text())["config"]["steps"] == 3


def test_pretrain_resume_refuses_an_unrecorded_state_beside_a_finished_run(tmp_path, cache, capsys):
    """A resume state from an older sparsebert records no settings: beside a finished run it may be
    the stale state of a run that --force replaced, so it is not continued over that run."""
    out = tmp_path / "run"
    assert _pretrain(capsys, cache, out, "--steps", "4", "--save-every", "2")[0] == 0
    state = out / "resume" / (out / "resume" / "LATEST").read_text().strip() / "state.json"
    meta = json.loads(state.read_text())
    del meta["run"]
    state.write_text(json.dumps(meta))
    encoder = (out / "encoder" / C.TENSORS).read_bytes()
    rc, _, err = _pretrain(capsys, cache, out, "--steps", "4", "--resume")
    _one_line_error(rc, err, "records no settings", "--force")
    assert (out / "encoder" / C.TENSORS).read_bytes() == encoder


@pytest.mark.parametrize("extra, needles", [
    (["--mode", "unstructured"], ["--mode unstructured (saved run: block)"]),
    (["--sparsity", "20", "--block", "16"], ["--sparsity 0.2 (saved run: 0.5)", "--block 16 (saved run: 32)"]),
    (["--steps", "2"], ["--steps 2 (saved run: 4)"]),
])
def test_pretrain_resume_refuses_other_settings_than_the_saved_runs(tmp_path, cache, capsys, extra, needles):
    out = tmp_path / "run"
    assert _pretrain(capsys, cache, out, "--steps", "4", "--save-every", "2")[0] == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    rc, _, err = _pretrain(capsys, cache, out, "--steps", "4", "--resume", *extra)
    _one_line_error(rc, err, "--resume", *needles)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # the same settings (another batch size is allowed: another number of ranks) resume it
    rc, _, err = _pretrain(capsys, cache, out, "--steps", "4", "--resume", "--batch-size", "2")
    assert rc == 0, err
    assert json.loads((out / "pretrain.json").read_text())["result"]["resumed_at"] == 4


def test_pretrain_time_limit_stops_stepping_saves_the_state_and_resume_finishes(tmp_path, cache, capsys, monkeypatch):
    import time
    import types
    from sparsebert.study import pretrain as P
    straight = tmp_path / "straight"
    assert _pretrain(capsys, cache, straight, "--steps", "4")[0] == 0
    calls = []

    def clock():            # the limit passes after 2 steps' checks
        calls.append(1)
        return time.time() + (0 if len(calls) <= 2 else 1e6)
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(P, "time", types.SimpleNamespace(time=clock, perf_counter=time.perf_counter,
                                                   process_time=time.process_time))
        rc, stdout, err = _pretrain(capsys, cache, out, "--steps", "4", "--time-limit", "1000")
    assert rc == 0, err
    assert "stopped after step 2 of 4" in stdout and "--resume" in stdout
    assert not (out / "encoder").exists() and (out / "resume" / "LATEST").read_text() == "step-000002"
    rc, _, err = _pretrain(capsys, cache, out, "--steps", "4", "--resume")
    assert rc == 0, err
    a, b = (json.loads((d / "pretrain.json").read_text())["result"] for d in (out, straight))
    assert a["resumed_at"] == 2 and a["dev_mlm_loss"] == pytest.approx(b["dev_mlm_loss"], rel=1e-5)


def test_finetune_messages_name_the_problem_not_internals(tmp_path, cache, capsys):
    out = tmp_path / "run"
    assert _pretrain(capsys, cache, out)[0] == 0
    rc, _, err = _run(capsys, "finetune", "--checkpoint", out, "--cache-dir", cache, "--control", "finetune-prune",
                      *FT)
    line = _one_line_error(rc, err, "--control finetune-prune", "sparse", "dense")
    assert "Pruner" not in line and "densify" not in line
    empty = tmp_path / "empty"
    shutil.copytree(out, empty)
    for f in (empty / "tokenizer").iterdir():
        f.unlink()
    rc, _, err = _run(capsys, "finetune", "--checkpoint", empty, "--cache-dir", cache, *FT)
    line = _one_line_error(rc, err, str(empty / "tokenizer"), "holds no tokenizer")
    assert "vocab_dir" not in line
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    (bad / "tokenizer" / "tokenizer.json").write_text("{bad")
    rc, _, err = _run(capsys, "finetune", "--checkpoint", bad, "--cache-dir", cache, *FT)
    _one_line_error(rc, err, str(bad / "tokenizer" / "tokenizer.json"), "not valid JSON")


def test_finetune_without_a_checkpoint_is_one_line(tmp_path, capsys):
    rc, _, err = _run(capsys, "finetune", "--checkpoint", tmp_path / "nope", "--task", "polarity")
    _one_line_error(rc, err, "not found", "sparsebert pretrain --out")


# ---- prune says what it did: sizes, drift on real sentences, the tokenizer, a warning ---------------
def _tiny_bert_with_tokenizer(path, init):
    """A tiny BertModel folder with a word-level BERT tokenizer covering the built-in sentences."""
    import re
    from transformers import BertConfig, BertModel, BertTokenizerFast
    words = sorted({w.lower() for s in cli.DRIFT_SENTENCES for w in re.findall(r"\w+|[^\w\s]", s)})
    path.mkdir(parents=True)
    vocab = path.parent / f"{path.name}-vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    cfg = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                     vocab_size=200, max_position_embeddings=64, initializer_range=init)
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(path)
    BertTokenizerFast(str(vocab)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def robust(tmp_path_factory):
    """Small initial weights: the residual stream dominates, pruning barely moves the outputs."""
    return _tiny_bert_with_tokenizer(tmp_path_factory.mktemp("hf") / "robust", 0.02)


@pytest.fixture(scope="module")
def fragile(tmp_path_factory):
    """Larger weights: pruning half of them changes the outputs a lot (like a pre-trained model)."""
    return _tiny_bert_with_tokenizer(tmp_path_factory.mktemp("hf") / "fragile", 0.2)


def _row(stdout, name):
    lines = [l.split() for l in stdout.splitlines() if l.startswith(name + " ")]
    assert len(lines) == 1, stdout
    return lines[0]


def test_prune_reports_parameters_bytes_drift_and_copies_the_tokenizer(tmp_path, robust, capsys):
    from transformers import AutoTokenizer
    out = tmp_path / "out"
    rc, stdout, err = _run(capsys, "prune", robust, "--sparsity", "0.5", "--block", "16", "--out", out)
    assert rc == 0, err
    head = [l for l in stdout.splitlines() if l.startswith("layer ")][0]
    assert head.split() == ["layer", "kind", "shape", "kept", "params", "dense", "params", "kept", "bytes", "dense",
                            "bytes", "sparse"]
    # 64x64 weight + 64 bias, half the 16x16 blocks kept: fp32 values 8 KiB + 16 mask bytes + bias
    assert _row(stdout, "encoder.layer.0.attention.self.query")[1:] == [
        "BlockSparseLinear", "(64,", "64)", "0.500", "4,160", "2,112", "16.2", "KiB", "8.3", "KiB"]
    assert _row(stdout, "total")[3:] == ["0.500", "70,592", "35,776", "275.8", "KiB", "140.0", "KiB"]
    assert "whole model: 88,256 parameters" in stdout and "53,440 kept" in stdout
    assert "8 sentences tokenized with the model's tokenizer" in stdout
    for what in ("token cosine", "sentence cosine", "pairwise cosine"):
        assert float(_row(stdout, "  " + what)[2]) > 0.9
    assert "tokenizer: tokenizer.json, tokenizer_config.json copied to" in stdout
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (robust / name).read_bytes()
    assert AutoTokenizer.from_pretrained(out)("the cat slept")["input_ids"] == \
        AutoTokenizer.from_pretrained(robust)("the cat slept")["input_ids"]
    assert sparsebert.load_sparse(out).encoder.layer[0].attention.self.query.density == 0.5
    assert "warning" not in err


def test_prune_warns_plainly_when_the_outputs_drift_far(tmp_path, fragile, capsys):
    rc, stdout, err = _run(capsys, "prune", fragile, "--sparsity", "0.5", "--block", "16", "--out", tmp_path / "o")
    assert rc == 0, err
    assert float(_row(stdout, "  sentence cosine")[2]) < cli.DRIFT_WARN_COSINE
    warning = [l for l in err.splitlines() if "warning:" in l]
    assert len(warning) == 1, err
    for needle in ("sentence cosine to the original", "One-shot pruning of a pre-trained model without recovery "
                   "training destroys its representations", "sparsebert pretrain", "sparsebert.hf.PruningCallback"):
        assert needle in warning[0]
    rc, _, err = _run(capsys, "prune", fragile, "--sparsity", "0", "--block", "16", "--out", tmp_path / "o0")
    assert rc == 0 and "warning" not in err


def test_prune_without_a_tokenizer_says_so_and_uses_random_ids(tmp_path, src, capsys):
    out = tmp_path / "out"
    rc, stdout, err = _run(capsys, "prune", src, "--sparsity", "0.5", "--out", out)
    assert rc == 0, err
    assert "random token ids" in stdout and "not real sentences" in stdout
    assert f"tokenizer: none copied ({src} holds no tokenizer files)" in stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(C.CHECKPOINT_FILES)


def test_prune_of_a_hub_model_saves_its_tokenizer(tmp_path, robust, capsys, monkeypatch):
    from transformers import AutoTokenizer
    monkeypatch.setattr(cli, "model_source", lambda arg: (str(robust), "hub"))   # as if fetched from the Hub
    out = tmp_path / "out"
    rc, stdout, err = _run(capsys, "prune", "org/robust", "--sparsity", "0.5", "--block", "16", "--out", out)
    assert rc == 0, err
    assert "8 sentences tokenized with the model's tokenizer" in stdout
    line = [l for l in stdout.splitlines() if l.startswith("tokenizer: ")][0]
    assert "tokenizer.json" in line and "tokenizer_config.json" in line and "copied to" in line
    assert AutoTokenizer.from_pretrained(out)("the cat slept")["input_ids"] == \
        AutoTokenizer.from_pretrained(robust)("the cat slept")["input_ids"]


def test_prune_still_saves_when_the_drift_cannot_be_measured(tmp_path, robust, capsys, monkeypatch):
    def fails(model, batch):
        raise RuntimeError("this model needs pixel_values")
    monkeypatch.setattr(cli, "_last_hidden", fails)
    rc, stdout, err = _run(capsys, "prune", robust, "--sparsity", "0.5", "--block", "16", "--out", tmp_path / "o")
    assert rc == 0, err
    assert "output drift: not measured on 8 sentences" in stdout and "needs pixel_values" in stdout
    assert "warning" not in err and (tmp_path / "o" / "tokenizer.json").is_file()
    sparsebert.load_sparse(tmp_path / "o")


def test_a_tokenizer_that_cannot_encode_falls_back_to_random_ids_and_says_why(robust):
    from transformers import BertModel

    class NoPadding:
        def __call__(self, *a, **k):
            raise ValueError("Asking to pad but the tokenizer does not have a padding token.")
    batch, what = cli._drift_batch(BertModel.from_pretrained(robust), NoPadding(), None)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (8, 16)
    assert "random token ids" in what and "could not encode them" in what and "padding token" in what


def test_drift_stats_measure_cosines_and_collapse():
    torch.manual_seed(0)
    mask = torch.ones(8, 5)
    mask[0, 3:] = 0
    h = torch.randn(8, 5, 32)
    same = cli.drift_stats(h, h.clone(), mask)
    assert same["token_cosine"] == pytest.approx(1) and same["sentence_cosine"] == pytest.approx(1)
    assert same["pairwise_before"] == pytest.approx(same["pairwise_after"]) and same["warn"] == []
    assert cli.drift_stats(h, -h, mask)["warn"][0].startswith("sentence cosine to the original -1.000")
    # sentences spread around a common direction, then all mapped onto it: close to each original, collapsed
    center = torch.randn(32) * 3
    spread = center + torch.randn(8, 1, 32) + 0.1 * torch.randn(8, 5, 32)
    collapsed = cli.drift_stats(spread, center.expand(8, 5, 32).clone(), mask)
    assert collapsed["sentence_cosine"] >= cli.DRIFT_WARN_COSINE
    assert collapsed["pairwise_after"] == pytest.approx(1) and collapsed["pairwise_before"] < 0.99
    assert len(collapsed["warn"]) == 1 and "collapsed onto nearly one embedding" in collapsed["warn"][0]


def test_size_table_counts_what_the_checkpoint_stores(tmp_path):
    from transformers import BertConfig, BertForMaskedLM
    cfg = BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
                     vocab_size=200, max_position_embeddings=64)
    model = sparsebert.sparsify(BertForMaskedLM(cfg), sparsity=0.5, mode="unstructured")
    rows = {r[0]: r for r in cli.size_table(model)}
    q = rows["bert.encoder.layer.0.attention.self.query"]
    assert q[4:] == (4160, 2048 + 64, 4160 * 4, 2048 * 4 + 4096 // 8 + 64 * 4)
    dec = rows["cls.predictions.decoder"]               # tied to the word embeddings: its bias only
    assert dec[1] == "MaskedLinear (tied)" and dec[4:] == (200, 200, 800, 800)
    C.save_sparse(model, tmp_path / "ck")
    assert sum(r[7] for r in rows.values()) < os.path.getsize(tmp_path / "ck" / C.TENSORS)


# ---- help: every option says what it is, its default and unit; plain text ----------------------------
def _subparsers(parser):
    import argparse
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def _rendered_help(parser, action):
    return parser._get_formatter()._expand_help(action)


def test_every_option_of_every_subcommand_has_help_with_its_default():
    import argparse
    import re
    missing = []
    for name, sp in _subparsers(cli.build_parser()).items():
        for a in sp._actions:
            if isinstance(a, argparse._HelpAction) or not a.option_strings:
                continue
            opt = f"{name} {a.option_strings[0]}"
            text = _rendered_help(sp, a) if a.help not in (None, argparse.SUPPRESS) else ""
            if not text.strip():
                missing.append(f"{opt}: no help")
            elif a.required:
                if "required" not in text:
                    missing.append(f"{opt}: does not say it is required")
            elif "default" not in text:
                missing.append(f"{opt}: no default in {text!r}")
            elif a.default not in (None, False):
                said = text[text.index("default"):]
                values = a.default if isinstance(a.default, (list, tuple)) else [a.default]
                for v in values:
                    if isinstance(v, str):
                        ok = v in said
                    else:
                        nums = [float(x) for x in re.findall(r"\d+(?:\.\d+)?(?:e-?\d+)?", said)]
                        ok = any(abs(n - v) <= 1e-12 or abs(n / 100 - v) <= 1e-12 for n in nums)
                    if not ok:
                        missing.append(f"{opt}: default {v!r} not stated in {said!r}")
    assert not missing, "\n".join(missing)


def test_help_texts_are_plain_text():
    parser = cli.build_parser()
    texts = {"sparsebert": parser.description}
    for name, sp in _subparsers(parser).items():
        assert sp.description, f"sparsebert {name} --help has no description"
        texts[name] = sp.description
        for a in sp._actions:
            if a.help:
                texts[f"{name} {'/'.join(a.option_strings) or a.dest}"] = _rendered_help(sp, a)
    marked = {k: v for k, v in texts.items() if re.search(r"`|:(func|class|meth|mod):|\*\*|^\.\. ", v, re.M)}
    assert not marked, marked
