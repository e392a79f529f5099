"""The benchmark scripts run their real code paths here on small inputs (numbers not checked)."""
import json
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)


def test_bench_bert_masked_head_gives_the_same_loss(tmp_path):
    """bench_bert's masked-only MLM head (the study's mlm_loss) must compute Hugging Face's loss:
    after the same steps from the same start, both heads report the same loss."""
    pytest.importorskip("transformers")
    import bench_bert
    bench_bert.main(["--device", "cpu", "--tiny", "--batch", "4", "--seq", "16", "--steps", "1",
                     "--warmup", "1", "--levels", "0.5", "--block", "32", "--out", str(tmp_path)])
    rows = json.load(open(tmp_path / "bench_bert.json"))["rows"]
    assert {(r["model"], r["head"]) for r in rows} == {
        ("dense", "full"), ("dense", "masked"), ("block32 50%", "full"), ("block32 50%", "masked")}
    loss = {(r["model"], r["head"]): r["loss"] for r in rows}
    for model in ("dense", "block32 50%"):
        assert loss[(model, "full")] == pytest.approx(loss[(model, "masked")], rel=1e-4)
    assert all(r["tokens_per_s"] > 0 for r in rows)


def test_cpu_table_runs_a_quick_grid(capsys):
    import bench_cpu
    import cpu_table
    case = bench_cpu.Case(64, 128, 32, 0.5, M=48)
    for provider in ("dense", "cpu", "reference"):
        for mode in ("fwd", "fwd_bwd"):
            fn = bench_cpu.build(provider, mode, case)
            if isinstance(fn, str):
                pytest.skip(fn)
            fn()
    cpu_table.kernel_table(1, ["dense", "cpu"], [(64, 128)], [32], [0.5], ["fwd"])
    out = capsys.readouterr().out
    assert "| 64→128 | 32 | 50% | fwd | cpu |" in out
