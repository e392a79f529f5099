"""torchrun + DDP (gloo, CPU): `sparsebert pretrain` on 2 ranks equals 1 process over the same global
batch (masks exactly, values and AdamW state within fp tolerance), ranks verified identical after
every pruning event, rank-0 checkpoints, resume after a kill (on 2 ranks and on 1), and a clear
error, not a hang, for a rank whose layout differs."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import sparsebert

from study_fixtures import make_fixture_cache

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STEPS = 30


def _env():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    return env


def _args(cache, out, mode, batch, *extra):
    return ["pretrain", "--from-scratch", "--mode", mode, "--sparsity", "0.5", "--steps", str(STEPS),
            "--device", "cpu", "--out", str(out), "--cache-dir", str(cache), "--seq-len", "16",
            "--max-blocks", "64", "--ramp-fraction", "0.5", "--prune-every", "5", "--dropout", "0",
            "--save-every", "10", "--batch-size", str(batch), "--no-progress", "--threads", "1", *extra]


def _torchrun(n=2):
    return [str(BIN / "torchrun"), "--standalone", f"--nproc-per-node={n}", "-m", "sparsebert"]


def _single():
    return [sys.executable, "-m", "sparsebert"]


def _run(cmd, timeout=300):
    p = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return p


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_fixture_cache(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def runs(cache, tmp_path_factory):
    """{mode: (single-process out, 2-rank out)}, global batch 8 in both."""
    base = tmp_path_factory.mktemp("runs")
    out = {}
    for mode in ("block", "unstructured"):
        one, two = base / f"{mode}-1", base / f"{mode}-2"
        _run(_single() + _args(cache, one, mode, 8))
        p = _run(_torchrun() + _args(cache, two, mode, 4))
        out[mode] = (one, two, p)
    return out


def _state(out):
    from safetensors.torch import load_file
    enc = sparsebert.load_sparse(out / "encoder")
    res = json.loads((out / "pretrain.json").read_text())["result"]
    latest = (out / "resume" / "LATEST").read_text().strip()
    opt = load_file(str(out / "resume" / latest / "optimizer.safetensors"))
    return enc, res, opt, latest


def assert_same_run(a, b, tol=1e-5):
    ea, ra, oa, la = _state(a)
    eb, rb, ob, lb = _state(b)
    assert la == lb == f"step-{STEPS:06d}"
    sa, sb = ea.state_dict(), eb.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if sa[k].dtype == torch.bool or k.endswith("mask") or k.endswith("mask_bits"):
            assert torch.equal(sa[k], sb[k]), f"mask {k} differs"
        else:
            assert sa[k].shape == sb[k].shape, k
            torch.testing.assert_close(sa[k], sb[k], rtol=tol, atol=tol, msg=k)
    for name, m in ea.named_modules():                     # same layouts: same kept blocks
        if isinstance(m, sparsebert.BlockSparseLinear):
            assert m.layout == eb.get_submodule(name).layout, name
    assert oa.keys() == ob.keys()
    for k in oa:
        assert oa[k].shape == ob[k].shape, k
        torch.testing.assert_close(oa[k], ob[k], rtol=tol, atol=tol, msg=k)
    assert ra["mask_updates"] == rb["mask_updates"]
    assert abs(ra["dev_mlm_loss"] - rb["dev_mlm_loss"]) < 1e-4


@pytest.mark.parametrize("mode", ["block", "unstructured"])
def test_two_ranks_equal_one_process(runs, mode):
    one, two, proc = runs[mode]
    # one checkpoint (rank 0's), the same kind as the single-process command writes
    for out in (one, two):
        assert sorted(p.name for p in out.iterdir()) == ["encoder", "pretrain.json", "resume", "tokenizer"]
        assert sparsebert.load_sparse(out / "encoder") is not None
        assert not list(out.rglob("*.tmp*"))
    assert proc.stdout.count("dev MLM loss") == 1                 # rank 0 logs only
    res = json.loads((two / "pretrain.json").read_text())["result"]
    assert res["world_size"] == 2 and res["global_batch_size"] == 8
    assert json.loads((one / "pretrain.json").read_text())["result"]["world_size"] == 1
    # all-gathered layouts + checksums compared at the start, after every pruning event, at the end
    assert res["rank_checks"] == [0] + [s for s, _ in res["mask_updates"]] + [STEPS]
    assert len(res["mask_updates"]) >= 3 and res["sparsity"] == pytest.approx(0.5, abs=0.02)
    assert_same_run(one, two)


def _descendants(pid):
    """Every process below ``pid`` (torchrun's workers run in their own process groups)."""
    children = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def test_killed_run_resumes_to_same_result(runs, cache, tmp_path, capsys):
    one, two, _ = runs["block"]
    killed = tmp_path / "killed"
    p = subprocess.Popen(_torchrun() + _args(cache, killed, "block", 4), env=_env(), cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = killed / "resume" / "LATEST"
    try:
        deadline = time.time() + 240
        while not latest.exists() and p.poll() is None and time.time() < deadline:
            time.sleep(0.02)
    finally:
        for pid in [p.pid] + _descendants(p.pid):    # the whole job: torchrun and its workers
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait()
    time.sleep(1)
    assert latest.exists(), "no training state written before the kill"
    step = int(latest.read_text().split("-")[1])
    assert step < STEPS and not (killed / "pretrain.json").exists(), "the run finished before the kill"
    other = tmp_path / "killed-1rank"
    shutil.copytree(killed, other)
    from sparsebert.cli import main
    assert main(_args(cache, killed, "block", 4)) == 2                           # refused without --resume
    assert "--resume" in capsys.readouterr().err
    _run(_torchrun() + _args(cache, killed, "block", 4, "--resume"))             # 2 ranks again
    _run(_single() + _args(cache, other, "block", 8, "--resume"))                # 1 rank, same global batch
    for out in (killed, other):
        assert json.loads((out / "pretrain.json").read_text())["result"]["resumed_at"] == step
        assert_same_run(two, out)
        assert_same_run(one, out)


MISMATCH = textwrap.dedent("""
    import sys, time, torch
    import sparsebert
    from sparsebert import distributed as D
    from sparsebert.study.pretrain import scratch_mlm
    from sparsebert.pruning import OneShotSchedule, Pruner
    ctx = D.setup("cpu")
    # each rank reports to its own file: lines two processes print to one pipe can interleave
    log = open(f"{sys.argv[1]}/rank{ctx.rank}.txt", "w", buffering=1)
    # 1. pruning decisions come from rank 0: rank 1's weights differ, its masks are still rank 0's
    model = scratch_mlm(64, hidden=64, layers=1, heads=2, intermediate=128, max_position=32)
    sparsebert.sparsify(model, 0.0, block=(32, 32), mode="block")
    if ctx.rank == 1:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(torch.rand_like(p))
    pruner = Pruner(model, OneShotSchedule(0.5, 1))
    D.install(pruner)
    pruner.prune_to(0.5)
    masks = [m.layout.block_mask for _, m in pruner.layers]
    got = [None] * ctx.world
    torch.distributed.all_gather_object(got, masks)
    assert all(torch.equal(a, b) for a, b in zip(got[0], got[1])), "masks differ"
    try:
        D.verify_identical(model)
    except D.DistributedMismatchError as e:
        print(f"rank {ctx.rank} VALUES {e}", file=log)
    # 2. a rank whose layout differs: a clear error on every rank, not a hang in DDP
    model = scratch_mlm(64, hidden=64, layers=1, heads=2, intermediate=128, max_position=32)
    sparsebert.sparsify(model, 0.5, block=(32, 32), mode="block")
    if ctx.rank == 1:                       # this rank drops one more block than rank 0
        lin = model.bert.encoder.layer[0].intermediate.dense
        mask = lin.layout.block_mask.clone()
        mask[mask.nonzero()[0].tolist()[0], mask.nonzero()[0].tolist()[1]] = False
        lin.set_layout(sparsebert.BlockLayout.from_mask(mask, lin.layout.block, lin.layout.shape))
    t0 = time.time()
    try:
        D.wrap(model)
    except D.DistributedMismatchError as e:
        print(f"rank {ctx.rank} MISMATCH after {time.time() - t0:.2f}s: {e}", file=log)
        log.close()
        D.barrier()                         # both have printed before either exits
        D.teardown()
        sys.exit(17)
    print("no error", file=log)
""")


def test_mismatched_layout_is_a_clear_error(tmp_path):
    script = tmp_path / "mismatch.py"
    script.write_text(MISMATCH)
    p = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc-per-node=2", str(script), str(tmp_path)],
                       env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    out = [(tmp_path / f"rank{r}.txt").read_text() if (tmp_path / f"rank{r}.txt").exists() else "" for r in (0, 1)]
    lines = [line for text in out for line in text.splitlines() if "MISMATCH" in line]
    assert len(lines) == 2, "\n".join(out) + p.stdout + p.stderr[-3000:]     # every rank raises, none hangs
    for line in lines:
        assert "rank 1 differs from rank 0 in layout bert.encoder.layer.0.intermediate.dense" in line
        assert float(line.split("after ")[1].split("s:")[0]) < 30     # an error, not gloo's 30-minute timeout
    values = [line for text in out for line in text.splitlines() if "VALUES" in line]
    assert len(values) == 2 and all("rank 1 differs from rank 0 in param" in v and "(values:" in v for v in values)


def test_finetune_two_ranks_equal_one_process(runs, cache):
    ckpt = runs["block"][0]
    ft = ["finetune", "--checkpoint", str(ckpt), "--cache-dir", str(cache), "--task", "polarity",
          "--max-steps", "6", "--max-len", "16", "--max-train", "40", "--max-dev", "16", "--dropout", "0",
          "--device", "cpu", "--no-progress", "--threads", "1", "--epochs", "1"]
    one = _run(_single() + ft + ["--batch-size", "8"])
    two = _run(_torchrun() + ft + ["--batch-size", "4"])
    r1, r2 = json.loads(one.stdout), json.loads(two.stdout)       # rank 0 prints, alone
    assert r1["world_size"] == 1 and r2["world_size"] == 2 and r1["steps"] == r2["steps"] == 5
    assert r2["train_loss"] == pytest.approx(r1["train_loss"], abs=1e-4)
    assert [l for _, l in r2["loss_curve"]] == pytest.approx([l for _, l in r1["loss_curve"]], abs=2e-4)
    assert r2["dev_metrics"] == pytest.approx(r1["dev_metrics"], abs=1e-6)
