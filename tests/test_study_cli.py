"""`sparsebert study` flags (--seeds, --blocks, --workers) and the study under torchrun (gloo, CPU)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sparsebert.study import runner as R
from sparsebert.study.cli import main

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture
def captured(monkeypatch):
    """Run ``main(["study", ...])`` up to the Study: the preset it was given, nothing trained."""
    seen = {}

    def fake_run(self, parallel=True):
        seen["preset"] = self.p
        return []
    monkeypatch.setattr(R.Study, "run", fake_run)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    return seen


def test_seeds_blocks_workers_override_the_preset(tmp_path, captured):
    assert main(["study", "--out", str(tmp_path / "o"), "--threads", "1", "--no-progress"]) == 0
    p = captured["preset"]
    assert (p.seeds, p.blocks) == (R.PRESETS["cpu-demo"].seeds, R.PRESETS["cpu-demo"].blocks)
    assert main(["study", "--out", str(tmp_path / "o"), "--threads", "1", "--no-progress", "--seeds", "3", "0", "7",
                 "--blocks", "32", "16", "--workers", "3", "--modes", "block", "--controls", "none"]) == 0
    p = captured["preset"]
    assert p.seeds == (3, 0, 7) and p.blocks == (32, 16) and p.workers == 3 and p.modes == ("block",)
    # the plan follows: dense + 2 block sizes x 3 levels, each for 3 seeds
    st = R.Study(p, tmp_path / "o2", tmp_path / "cache", progress=False, log=lambda m: None)
    plan = st.encoder_plan()
    assert len(plan) == 3 * (1 + 2 * 3) and {s.seed for s in plan} == {0, 3, 7}
    assert {s.block for s in plan} == {0, 16, 32}


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "-1"], "argument --seeds: -1 is out of range"),
    (["--seeds", "x"], "argument --seeds: 'x' is not a whole number"),
    (["--seeds", "1", "1"], "argument --seeds: 1 given twice"),
    (["--modes", "block", "block"], "argument --modes: block given twice"),
    (["--tasks", "polarity", "polarity"], "argument --tasks: polarity given twice"),
    (["--lrs", "1e-4", "0.0001"], "argument --lrs: 0.0001 given twice"),
    (["--blocks", "24"], "argument --blocks: block size 24 is not supported"),
    (["--blocks", "16", "--modes", "unstructured"], "argument --blocks: block sizes apply to mode block"),
    (["--workers", "0"], "argument --workers: 0 is out of range"),
])
def test_bad_flags_are_one_line_errors(tmp_path, captured, capsys, argv, message):
    assert main(["study", "--out", str(tmp_path / "o")] + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "preset" not in captured


def test_help_shows_the_flags_and_their_defaults(capsys):
    assert main(["study", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in (("--seeds", "cpu-demo 0 1"), ("--blocks", "cpu-demo 16"), ("--workers", "cpu-demo 2")):
        assert flag in text and default in text
    demo = R.PRESETS["cpu-demo"]
    assert demo.seeds == (0, 1) and demo.blocks == (16,) and demo.workers == 2


def test_torchrun_refuses_workers(tmp_path, captured, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["study", "--out", str(tmp_path / "o"), "--workers", "4"]) == 2
    assert "--workers 4 under torchrun" in capsys.readouterr().err


def test_study_on_two_torchrun_ranks_equals_one_process(tmp_path):
    """2 gloo ranks share the encoder jobs (each run once, by one rank) and rank 0 reports the same
    numbers as the study in one process."""
    from study_fixtures import make_fixture_cache, tiny_study_preset
    cache = make_fixture_cache(tmp_path / "cache", n_sentences=60, n_articles=6)
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        from study_fixtures import tiny_study_preset
        from sparsebert.study.cli import run_study_ranks
        sys.exit(run_study_ranks(tiny_study_preset(), {str(tmp_path / 'ranks')!r}, {str(cache)!r}, "cpu", 1,
                                 progress=False))
    """))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    p = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc-per-node=2", str(script)], env=env,
                       cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    assert "rank 0 of 2: 2 of the 3 encoders" in p.stdout
    ranks = json.loads((tmp_path / "ranks" / "results.json").read_text())
    # rank 0 trained its 2 encoders (jobs 0 and 2) before the meeting; reporting, it found all 3 cached
    c = ranks["meta"]["counts"]
    assert (c["pretrain_trained"], c["pretrain_cached"], c["finetune_trained"]) == (2, 3, 2)
    assert len(list((tmp_path / "ranks" / "runs").glob("pretrain-*.json"))) == 3

    import torch
    torch.set_num_threads(1)
    rows = R.Study(tiny_study_preset(), tmp_path / "one", cache, progress=False, log=lambda m: None).run()
    key = lambda r: (r["mode"], r["block"], r["sparsity"], r["control"], r["task"])  # noqa: E731
    one = {key(r): r for r in rows}
    assert {key(r) for r in ranks["rows"]} == set(one)
    for r in ranks["rows"]:
        for f in ("mean", "probe_mean", "train_loss", "pretrain_dev_loss"):
            a, b = r[f], one[key(r)][f]
            assert (a is None and b is None) or a == pytest.approx(b, rel=1e-5, abs=1e-6), (key(r), f)


def test_out_holding_other_files_is_refused_but_a_study_folder_resumes(tmp_path, captured, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.csv").write_text("my results")
    assert main(["study", "--out", str(mine), "--threads", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds files" in err[0] and "--force" in err[0] and "preset" not in captured
    assert sorted(p.name for p in mine.iterdir()) == ["results.csv"]
    assert main(["study", "--out", str(mine), "--threads", "1", "--no-progress", "--force"]) == 0
    # a study's own folder (its run cache, runs/) is resumed without --force
    study = tmp_path / "study"
    assert main(["study", "--out", str(study), "--threads", "1", "--no-progress"]) == 0
    assert (study / "runs").is_dir()
    (study / "results.csv").write_text("the last report")
    assert main(["study", "--out", str(study), "--threads", "1", "--no-progress"]) == 0
