"""Study orchestration: resume from the per-run cache, report files, CLI registration."""
import argparse
import csv
import json
from dataclasses import replace

import pytest

from sparsebert.study import data as D
from sparsebert.study import runner as R
from study_fixtures import make_fixture_cache, tiny_study_preset
from sparsebert.study.report import markdown_table, write_report


def tiny_preset(**kw):
    """The fixtures' tiny study with a second task (movie-score) unless ``kw`` says otherwise."""
    return tiny_study_preset(**{"tasks": ("polarity", "movie-score"), **kw})


@pytest.fixture
def cache(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("tests must not download")
    monkeypatch.setattr(D, "_fetch", refuse)
    make_fixture_cache(tmp_path / "cache", n_sentences=60, n_articles=6)
    return tmp_path / "cache"


def counting(monkeypatch):
    calls = {"pretrain": 0, "finetune": 0}
    real_p, real_f = R.pretrain, R.finetune

    def p(*a, **k):
        calls["pretrain"] += 1
        return real_p(*a, **k)

    def f(*a, **k):
        calls["finetune"] += 1
        return real_f(*a, **k)
    monkeypatch.setattr(R, "pretrain", p)
    monkeypatch.setattr(R, "finetune", f)
    return calls


def test_study_runs_then_resumes_from_cache(tmp_path, cache, monkeypatch):
    calls = counting(monkeypatch)
    out = tmp_path / "out"
    logs = []
    rows = R.Study(tiny_preset(), out, cache, progress=False, log=logs.append).run()
    # dense + 2 modes x 1 level = 3 pretrain calls; 3 encoders x 2 tasks = 6 fine-tunings
    assert calls == {"pretrain": 3, "finetune": 6}
    keys = [(r["mode"], r["block"], r["sparsity"], r["task"]) for r in rows]
    assert keys == [("dense", 0, 0.0, "movie-score"), ("dense", 0, 0.0, "polarity"), ("dense", 0, 0.0, "average"),
                    ("unstructured", 0, 0.5, "movie-score"), ("unstructured", 0, 0.5, "polarity"),
                    ("unstructured", 0, 0.5, "average"),
                    ("block", 32, 0.5, "movie-score"), ("block", 32, 0.5, "polarity"), ("block", 32, 0.5, "average")]
    assert any("SMALL-SCALE" in l for l in logs)
    # interrupted study: drop one fine-tuning result, run again -> only that one is redone
    ft = sorted((out / "runs").glob("finetune-*.json"))
    assert len(ft) == 6
    ft[0].unlink()
    rows2 = R.Study(tiny_preset(), out, cache, progress=False, log=logs.append).run()
    assert calls == {"pretrain": 3, "finetune": 7}
    # a complete study: nothing retrained, same numbers
    rows3 = R.Study(tiny_preset(), out, cache, progress=False, log=logs.append).run()
    assert calls == {"pretrain": 3, "finetune": 7}
    assert json.dumps(rows3, sort_keys=True) == json.dumps(rows2, sort_keys=True)
    # a changed setting is a new run
    R.Study(tiny_preset(lrs=(1e-3, 2e-3)), out, cache, progress=False, log=logs.append).run()
    assert calls == {"pretrain": 3, "finetune": 13}


def test_controls_plan(tmp_path, cache, monkeypatch):
    calls = counting(monkeypatch)
    p = tiny_preset(modes=("unstructured",), tasks=("polarity",),
                    controls=("scratch", "random", "deletion", "finetune-prune"))
    rows = R.Study(p, tmp_path / "out", cache, progress=False, log=lambda m: None).run()
    got = {(r["mode"], r["control"]) for r in rows}
    assert got == {("dense", "none"), ("dense", "scratch"), ("unstructured", "none"), ("unstructured", "random"),
                   ("unstructured", "deletion"), ("unstructured", "finetune-prune")}
    # dense, magnitude 50%, random 50% (the scratch encoder is not pre-trained)
    assert calls["pretrain"] == 3
    fp = [r for r in rows if r["control"] == "finetune-prune"][0]
    assert fp["achieved_sparsity"] == pytest.approx(0.5, abs=0.05)
    scratch = [r for r in rows if r["control"] == "scratch"][0]
    assert scratch["pretrain_dev_loss"] is None and scratch["probe_mean"] is not None
    dele = [r for r in rows if r["control"] == "deletion"][0]
    mag = [r for r in rows if r["control"] == "none" and r["mode"] == "unstructured"][0]
    assert dele["probe_mean"] == mag["probe_mean"]          # the probe reads the same pruned encoder


def test_report_files_hold_the_numbers(tmp_path):
    from sparsebert.study.aggregate import aggregate
    recs = []
    for seed, (d0, d6, b6) in enumerate([(80.0, 71.5, 66.25), (82.0, 70.5, 64.25)]):
        for mode, blk, sp, dev, pl in (("dense", 0, 0.0, d0, 2.5), ("unstructured", 0, 0.6, d6, 3.25),
                                       ("block", 16, 0.6, b6, 4.125)):
            recs.append({"mode": mode, "block": blk, "sparsity": sp, "control": "none", "task": "polarity",
                         "seed": seed, "lr": 1e-4, "dev_score": dev, "train_loss": 0.3 + sp / 2,
                         "finetune_s_per_step": 0.2, "probe": dev - 5, "pretrain_dev_loss": pl + seed,
                         "pretrain_s_per_step": 0.1, "achieved_sparsity": sp})
    rows = aggregate(recs, ["polarity"], {"polarity": "accuracy"})
    meta = {"preset": "x", "chance": {"polarity": 50.0}, "n_dev": {"polarity": 300}}
    paths = write_report(rows, ["polarity"], tmp_path, meta, records=recs)
    for p in paths.values():
        assert p.exists() and p.stat().st_size > 0
    for k in ("plot_dev", "plot_pretrain", "plot_train", "plot_time"):
        assert paths[k].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    j = json.loads(paths["json"].read_text())
    assert j["rows"][2]["mean"] == 65.25 and len(j["records"]) == 6
    c = list(csv.DictReader(open(paths["csv"])))
    assert [float(r["pretrain_dev_loss"]) for r in c] == [3.0, 3.75, 4.625]
    assert float(c[1]["mean"]) == 71.0 and c[2]["block"] == "16" and c[2]["n_seeds"] == "2"
    md = paths["md"].read_text()
    assert "| unstructured | – | 60% | none | polarity | 71.0 ± 0.7 |" in md
    assert "| block | 16x16 | 60% |" in md and "Beside the paper" in md and "resolves" in md
    assert markdown_table(rows).count("\n") == 5


def test_cli_registers_subcommands():
    from sparsebert.study.cli import add_subcommands
    parser = argparse.ArgumentParser()
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    a = parser.parse_args(["study", "--preset", "cpu-demo", "--levels", "40", "0.7", "--modes", "block",
                           "--tasks", "polarity", "--out", "x"])
    assert callable(a.func) and a.levels == ["40", "0.7"] and a.modes == ["block"]
    a = parser.parse_args(["pretrain", "--mode", "block", "--sparsity", "70", "--out", "d"])
    assert a.sparsity == 0.7 and callable(a.func)
    a = parser.parse_args(["finetune", "--checkpoint", "d", "--task", "polarity", "--control", "deletion"])
    assert callable(a.func)
    assert set(R.PRESETS) >= {"cpu-demo", "gpu"}
    assert R.PRESETS["gpu"].levels == tuple(i / 10 for i in range(10))


def test_cli_pretrain_then_finetune(tmp_path, cache, capsys):
    from sparsebert.study.cli import main
    out = tmp_path / "ckpt"
    common = ["--cache-dir", str(cache), "--no-progress", "--threads", "1"]
    assert main(["pretrain", "--from-scratch", "--mode", "block", "--sparsity", "50", "--steps", "4",
                 "--batch-size", "4", "--seq-len", "16", "--max-blocks", "20", "--ramp-fraction", "0.5",
                 "--prune-every", "1", "--out", str(out)] + common) == 0
    rec = json.loads((out / "pretrain.json").read_text())
    assert rec["result"]["sparsity"] == pytest.approx(0.5, abs=0.02)
    assert main(["finetune", "--checkpoint", str(out), "--task", "polarity", "--max-steps", "2",
                 "--batch-size", "4", "--max-len", "16", "--max-train", "8", "--max-dev", "8"] + common) == 0
    printed = capsys.readouterr().out
    res = json.loads(printed[printed.rindex('{\n "dev_score"'):])
    assert 0 <= res["dev_score"] <= 100 and res["linear_zero_fraction"] >= 0.49
    assert main(["finetune", "--checkpoint", str(tmp_path / "nope"), "--task", "polarity"] + common) == 2


def test_no_download_guard_leaves_other_subprocesses_alone(cache):
    # matplotlib builds its font cache with a subprocess on first import (a fresh HOME): the guard
    # must forbid fetches only, not every subprocess (it once replaced subprocess.run globally).
    import subprocess
    import sys
    assert subprocess.run([sys.executable, "-c", "print('ok')"], capture_output=True,
                          text=True).stdout.strip() == "ok"
    with pytest.raises(AssertionError, match="must not download"):
        D._fetch(["pip", "download", "x"], cache, 1)


def test_comparison_table_puts_our_controls_beside_the_papers_and_md_has_the_phases(tmp_path):
    from sparsebert.study.aggregate import aggregate
    from sparsebert.study.report import comparison_table
    recs = []
    for seed in (0, 1):
        for mode, sp, control, dev in (("dense", 0.0, "none", 80.0), ("unstructured", 0.6, "none", 70.0),
                                       ("unstructured", 0.6, "random", 60.0), ("unstructured", 0.6, "deletion", 76.0)):
            recs.append({"mode": mode, "block": 0, "sparsity": sp, "control": control, "task": "polarity",
                         "seed": seed, "lr": 1e-4, "dev_score": dev + seed, "train_loss": 0.5,
                         "finetune_s_per_step": 0.2, "probe": None, "pretrain_dev_loss": None,
                         "pretrain_s_per_step": None, "achieved_sparsity": sp})
    rows = aggregate(recs, ["polarity"], {"polarity": "accuracy"})
    lines = comparison_table(rows).splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    row60 = dict(zip(head, [c.strip() for c in lines[-1].strip("|").split("|")]))
    # 80.5 dense: deletion 76.5 is -5.0%, random 60.5 is -24.8%; the paper's columns stay
    assert row60["unstr. deletion: dev Δ%"] == "-5.0" and row60["unstr. random: dev Δ%"] == "-24.8"
    assert row60["paper: random Δ%"] == "-13.3" and row60["unstr.: dev Δ%"] == "-12.4"
    meta = {"elapsed_s": 12.0, "loadavg_1min": 3.5, "phases": {"pretrain": {"runs": 3, "wall_s": 9.0, "cpu_s": 8.0}}}
    md = write_report(rows, ["polarity"], tmp_path, meta)["md"].read_text()
    assert "load average 3.5" in md and "pretrain 3 runs, 9 s wall, 8 s CPU" in md


def test_control_levels_limit_random_and_deletion_to_their_levels(tmp_path):
    p = tiny_preset(levels=(0.0, 0.3, 0.6, 0.9), modes=("unstructured", "block"), tasks=("polarity",),
                    seeds=(0, 1), controls=("random", "deletion"), control_levels={"random": (0.6,), "deletion": (0.9,)})
    st = R.Study(p, tmp_path / "out", tmp_path / "cache", progress=False, log=lambda m: None)
    plan = st.encoder_plan()
    random = [(s.mode, s.sparsity, s.seed) for s in plan if s.control == "random"]
    assert random == [("unstructured", 0.6, 0), ("unstructured", 0.6, 1)]     # only the control modes
    deletion = [(rk[0], rk[2]) for s in plan for rk, f in st.finetune_plan(s) if f.control == "deletion"]
    assert deletion == [("unstructured", 0.9), ("unstructured", 0.9)]
    # a control not named runs at every level
    st = R.Study(replace(p, control_levels={"deletion": (0.9,)}), tmp_path / "o2", tmp_path / "cache",
                 progress=False, log=lambda m: None)
    assert sorted({s.sparsity for s in st.encoder_plan() if s.control == "random"}) == [0.3, 0.6, 0.9]
    assert R.PRESETS["cpu-demo"].control_levels == {"random": (0.6,), "deletion": (0.9,)}


def test_a_block_size_that_does_not_divide_the_model_is_refused_before_pre_training(tmp_path, cache, monkeypatch):
    calls = counting(monkeypatch)
    p = tiny_preset(modes=("block",), blocks=(48,), tasks=("polarity",))     # hidden 64, intermediate 128
    with pytest.raises(ValueError, match="block size 48 does not divide the model's hidden size 64 and "
                                         "intermediate size 128: use one of 16, 32, 64"):
        R.Study(p, tmp_path / "out", cache, progress=False, log=lambda m: None).run()
    assert calls["pretrain"] == 0


def test_a_control_whose_levels_are_not_studied_is_said(tmp_path, monkeypatch):
    p = tiny_preset(levels=(0.0, 0.3), controls=("random",), control_levels={"random": (0.6,)})
    logs = []

    def stop(self):
        raise KeyboardInterrupt
    monkeypatch.setattr(R.Study, "base_model", stop)
    with pytest.raises(KeyboardInterrupt):
        R.Study(p, tmp_path / "out", tmp_path / "cache", progress=False, log=logs.append).run()
    assert "control random: none of its levels (60%) is among the study's levels: not run" in logs


def test_every_download_happens_before_the_workers_start(tmp_path, monkeypatch):
    """Workers (and torchrun ranks) share one data cache: the main process fetches everything first
    (a task's archive was once fetched by both workers at once, first needed in their fine-tuning)."""
    from study_fixtures import make_fixture_cache, tiny_study_preset
    cache = make_fixture_cache(tmp_path / "cache", n_sentences=60, n_articles=6)
    seen = {}

    def stop(self, plan):
        seen["tasks"] = sorted(self._tasks)
        raise KeyboardInterrupt
    monkeypatch.setattr(R.Study, "_parallel", stop)
    p = tiny_preset(workers=2, tasks=("polarity", "movie-score"))
    with pytest.raises(KeyboardInterrupt):
        R.Study(p, tmp_path / "out", cache, progress=False, log=lambda m: None).run()
    assert seen["tasks"] == ["movie-score", "polarity"]


def test_a_time_limit_starts_no_new_encoder_and_the_report_names_those_left_out(tmp_path, cache, monkeypatch):
    import time
    calls = counting(monkeypatch)
    out, logs = tmp_path / "out", []
    st = R.Study(tiny_preset(tasks=("polarity",)), out, cache, progress=False, log=logs.append,
                 deadline=time.time() + 3600)
    counted = R.pretrain

    def limit_passes_during_the_first(*a, **k):
        st.deadline = time.time() - 1.0          # the limit passes while the dense encoder pre-trains
        return counted(*a, **k)
    monkeypatch.setattr(R, "pretrain", limit_passes_during_the_first)
    rows = st.run(parallel=False)
    # the encoder that was running finished (its fine-tuning included); the other two never started
    assert calls == {"pretrain": 1, "finetune": 1}
    assert {r["mode"] for r in rows} == {"dense"}
    assert any("2 of 3 encoders not run" in l for l in logs)
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert meta["left_out"] == ["unstructured 50% seed 0", "block 32x32 50% seed 0"]
    assert "Partial study" in (out / "results.md").read_text()
    # the same study without a limit resumes: only the two missing encoders run
    monkeypatch.setattr(R, "pretrain", counted)
    rows = R.Study(tiny_preset(tasks=("polarity",)), out, cache, progress=False, log=logs.append).run(parallel=False)
    assert calls == {"pretrain": 3, "finetune": 3}
    assert {r["mode"] for r in rows} == {"dense", "unstructured", "block"}
    assert "Partial study" not in (out / "results.md").read_text()


def test_study_cli_time_limit_must_be_positive():
    from sparsebert.cli import build_parser
    with pytest.raises(SystemExit):
        build_parser().parse_args(["study", "--time-limit", "0"])
    assert build_parser().parse_args(["study", "--time-limit", "300"]).time_limit == 300.0
