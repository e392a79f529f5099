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


def test_bench_kernels_dry_run_on_the_cpu(tmp_path):
    """The whole script on the CPU (Triton interpreted): every provider is built or says why not,
    every mode of the backends is timed, the roofline / per-block efficiency columns, the summary,
    JSON, text and PNG come out. Catches breakage of the GPU benchmark in CI."""
    import bench_kernels as bk
    bk.run(str(tmp_path), dry_run=True, grid=dict(shapes=[(64, 128)], blocks=[32], sparsities=[0.0, 0.5]))
    data = json.loads((tmp_path / "bench_kernels.json").read_text())
    assert not data["partial"] and data["info"]["bandwidth_GBps"] > 0
    rows = {(r["provider"], r["sparsity"]): r for r in data["rows"]}
    assert {p for p, _ in rows} == set(bk.PROVIDERS)
    for sp in (0.0, 0.5):
        dense = rows[("dense", sp)]
        for mode in bk.MODES:
            assert dense[f"{mode}_s"] > 0 and dense[f"{mode}_speedup"] == 1.0
            assert 0 < dense[f"ideal_{mode}_s"]
        for name in ("triton",):
            r = rows[(name, sp)]
            assert "note" not in r, r.get("note")
            for mode in bk.MODES:
                assert r[f"{mode}_s"] > 0 and r[f"{mode}_frac_ideal"] > 0 and r[f"{mode}_block_eff"] > 0
        assert rows[("auto", sp)]["fwd_s"] > 0 and rows[("auto", sp)]["fwd_bwd_s"] > 0
        assert "CUDA" in rows[("cuda", sp)]["note"]
    assert "2:4 is 50% only" in rows[("semi_structured_2:4", 0.0)]["note"]
    # per-block efficiency at 0% is the speedup over dense there
    r0 = rows[("triton", 0.0)]
    assert abs(r0["fwd_block_eff"] - r0["fwd_speedup"]) < 1e-9
    summ = {(s["provider"], s["block"]): s for s in data["summary"]}
    assert summ[("dense", 32)]["block_eff_0"] == 1.0
    assert (tmp_path / "bench_kernels.png").stat().st_size > 0
    assert "summary" in (tmp_path / "bench_kernels.txt").read_text()


# ---- benchmarks/gpu_check.sh, with stand-ins for python3 and nvidia-smi ---------------------------
_STUB = r"""#!/usr/bin/env bash
# stand-in for python3: logs each call (with the compiler env), sleeps where STUB_SLEEP names the script
echo "CALL CC=${CC:-} CXX=${CXX:-} SKIP_CPU=${SPARSEBERT_SKIP_CPU:-} INTERP=${TRITON_INTERPRET:-} $*" >> "$STUB_LOG"
case " $* " in *" ${STUB_SLEEP:-none} "*) sleep 30 ;; esac
case " $* " in *" pytest "*) echo "3 passed in 0.1s" ;; esac
exit 0
"""


def _gpu_check_tree(tmp_path):
    import shutil
    import stat
    root = tmp_path / "repo"
    (root / "benchmarks").mkdir(parents=True)
    (root / "tests").mkdir()
    for f in ("gpu_check.sh", "gpu_env.sh"):
        shutil.copy(os.path.join(BENCH, f), root / "benchmarks" / f)
    for f in ("bench_kernels.py", "bench_bert.py", "tune_triton.py"):
        (root / "benchmarks" / f).write_text("")
    for f in ("test_backend_harness.py", "test_cuda_bsr.py", "test_other.py"):
        (root / "tests" / f).write_text("import pytest\n\n@pytest.mark.gpu\ndef test_x():\n    pass\n")
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for name, text in (("python-stub", _STUB), ("nvidia-smi", "#!/bin/sh\necho 'NVIDIA H200, 143771 MiB'\n")):
        (bin_ / name).write_text(text)
        (bin_ / name).chmod((bin_ / name).stat().st_mode | stat.S_IEXEC)
    return root, bin_


def _run_gpu_check(tmp_path, **env):
    import subprocess
    root, bin_ = _gpu_check_tree(tmp_path)
    log = tmp_path / "calls.log"
    e = dict(os.environ, PATH=f"{bin_}{os.pathsep}{os.environ['PATH']}", PYTHON=str(bin_ / "python-stub"),
             STUB_LOG=str(log), TRITON_INTERPRET="1", **env)
    r = subprocess.run(["bash", str(root / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out")],
                       env=e, capture_output=True, text=True, timeout=120)
    calls = log.read_text().splitlines() if log.exists() else []
    return r, calls, tmp_path / "out"


def test_gpu_check_runs_every_step_within_its_budget(tmp_path):
    r, calls, out = _run_gpu_check(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    worst = int(r.stdout.split("worst case ")[1].split(" s")[0])
    assert worst <= 480, f"gpu_check.sh's default step budgets add up to {worst} s > 8 minutes"
    joined = "\n".join(calls)
    build = next(c for c in calls if "setup.py" in c)
    assert "CC=gcc CXX=g++" in build and "build_ext --inplace" in build and "SKIP_CPU=1" in build
    assert all("INTERP= " in c for c in calls), "TRITON_INTERPRET must be unset on the GPU machine"
    tests = [c.split()[-1] for c in calls if "pytest -m gpu" in c]
    assert tests == ["tests/test_backend_harness.py", "tests/test_cuda_bsr.py", "tests/test_other.py"]
    assert "benchmarks/tune_triton.py --budget-s" in joined
    assert "benchmarks/bench_kernels.py --out" in joined and "--budget-s 60 --rep-ms 25" in joined
    assert "benchmarks/bench_bert.py --device cuda" in joined
    summary = (out / "summary.txt").read_text()
    for name in ("machine", "build sparsebert._C", "sparsebert info", "pytest -m gpu test_cuda_bsr",
                 "tune_triton.py", "kernel grid", "end-to-end BERT"):
        assert name in summary, summary
    assert (out / "gpu_check.tgz").stat().st_size > 0


def test_gpu_check_cuts_a_step_at_its_limit_and_refuses_budgets_over_8_minutes(tmp_path):
    r, calls, out = _run_gpu_check(tmp_path / "a", STUB_SLEEP="benchmarks/bench_kernels.py", T_BENCH="2",
                                   KILL_S="1")
    assert r.returncode == 1, r.stdout + r.stderr
    line = next(ln for ln in (out / "summary.txt").read_text().splitlines() if ln.startswith("kernel grid"))
    assert "exit 124" in line and "cut at its limit" in line, line
    assert any("bench_bert.py" in c for c in calls), "the steps after a cut step still run"
    r, calls, _ = _run_gpu_check(tmp_path / "b", T_BENCH="400")
    assert r.returncode == 2 and "T_MAX=480" in r.stdout and calls == []


def test_with_baseline_runs_the_baseline_forward_after_the_first_call(monkeypatch):
    """bench_cpu.with_baseline swaps the cpu backend's ops for the baseline build's; forward()
    keeps the op it resolved, so the swap must cover that too (it once timed the current build
    as the "baseline" from the second call on)."""
    import types
    import torch
    import bench_cpu
    from sparsebert.layout import BlockLayout
    from sparsebert.ops import cpu_bsr
    if cpu_bsr.unavailable_reason() is not None:
        pytest.skip(cpu_bsr.unavailable_reason())
    calls = []
    fake = types.SimpleNamespace(forward=types.SimpleNamespace(default=lambda *a: calls.append(a) or "baseline"))
    monkeypatch.setattr(torch.ops, bench_cpu.BASELINE_NS, fake, raising=False)
    lt = BlockLayout.from_mask(torch.ones(2, 2, dtype=torch.bool), (16, 16), (32, 32)).tensors("cpu")
    x, v = torch.randn(3, 32), torch.randn(4, 16, 16)
    current = lambda: cpu_bsr.forward(x, v, None, lt)
    assert torch.is_tensor(current())                      # resolves the current build's op first
    base = bench_cpu.with_baseline(current)
    assert base() == "baseline" and base() == "baseline" and len(calls) == 2
    assert torch.is_tensor(current())                      # and the current one is back afterwards


def test_bench_bert_breakdown_counts_the_layer_op(tmp_path, monkeypatch):
    """--infer-breakdown times optimize's whole-layer op as one part: a 90%-sparse model's layers
    run there, not in "rest", and the parts add up to the total."""
    pytest.importorskip("transformers")
    # the cpu backend named: auto's timed choice for the tiny layers can be dense on a busy
    # machine, and the layer op runs only where all six layers are on the cpu backend
    monkeypatch.setenv("SPARSEBERT_BACKEND", "cpu")
    from sparsebert.ops import cpu_bsr
    if cpu_bsr.layer_op() is None:
        pytest.skip("sparsebert._C has no bert_layer op here")
    import bench_bert
    bench_bert.main(["--device", "cpu", "--tiny", "--no-train", "--levels", "0.9", "--block", "16",
                     "--head", "masked", "--infer-batches", "2", "--infer-rounds", "2", "--infer-breakdown",
                     "--out", str(tmp_path)])
    rows = {r["model"]: r for r in json.load(open(tmp_path / "bench_bert.json"))["inference_breakdown_ms"]}
    parts = rows["block16 90%"]
    assert parts["layer op (whole layers)"] > 0
    dense_opt = rows["dense + optimize"]         # its linears run F.linear from optimize's Python path
    assert dense_opt.get("nn.Linear", 0) > 0              # (was 0: all in "rest")
    assert sum(v for k, v in parts.items() if k not in ("model", "block", "batch", "total")) == \
        pytest.approx(parts["total"])
