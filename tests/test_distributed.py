"""torchrun + DDP (gloo, CPU): `sparsebert pretrain` on 2 ranks equals 1 process over the same global
batch (masks exactly, values and AdamW state within fp tolerance), ranks verified identical after
every pruning event, rank-0 checkpoints that `sparsebert.load_sparse(DIR)` loads, resume after a
kill (on 2 ranks and on 1), a clear error, not a hang, for a rank whose layout differs, and (no
GPU needed) the CUDA/NCCL device and backend choice.

CI time: a run costs its start (every process imports torch and transformers: ~8 s of CPU), not
its 30 steps. So the 1-process runs are the same command run in this process
(``sparsebert.cli.main``, what ``python -m sparsebert`` calls), and the 2-rank checks share three
torchrun launches: one (DRIVER) runs both pretrain modes, the 2-rank finetune and the mismatch
checks; the killed run and its 2-rank resume are the literal ``torchrun -m sparsebert pretrain``."""
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


def _env(gpu=False):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    if gpu:
        env.pop("TRITON_INTERPRET", None)         # Triton compiles for the GPU
    else:
        env["TRITON_INTERPRET"] = "1"
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


def _run(cmd, timeout=300, gpu=False):
    p = subprocess.run(cmd, env=_env(gpu), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return p


def _in_process(args, capsys=None):
    """The single-process command, run here (what ``python -m sparsebert ARGS`` runs, without a
    fresh interpreter's start-up); its stdout when ``capsys`` is given."""
    from sparsebert.cli import main
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as m:
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            m.delenv(k, raising=False)
        if capsys is not None:
            capsys.readouterr()
        try:
            rc = main(args)
        finally:
            torch.set_num_threads(threads)      # --threads 1 would stay for the tests after this one
        out = capsys.readouterr() if capsys is not None else None
    assert rc == 0, out
    return out.out if out is not None else None


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_fixture_cache(tmp_path_factory.mktemp("cache"))


def _finetune_args(cache, ckpt, batch):
    return ["finetune", "--checkpoint", str(ckpt), "--cache-dir", str(cache), "--task", "polarity",
            "--max-steps", "6", "--max-len", "16", "--max-train", "40", "--max-dev", "16", "--dropout", "0",
            "--device", "cpu", "--no-progress", "--threads", "1", "--epochs", "1", "--batch-size", str(batch)]


DRIVER = textwrap.dedent("""
    # One torchrun launch, several checks (each launch costs every rank an interpreter start): the
    # commands in jobs.json, run as `python -m sparsebert ARGS` runs them (sparsebert.cli.main), each
    # rank's stdout to its own file, then the mismatch checks. They share one process group: a second
    # one in the same worker hangs in torchrun's store, so the commands' teardown waits for the end.
    import contextlib, json, os, sys, time
    import torch
    import sparsebert
    from sparsebert import distributed as D
    from sparsebert.cli import main
    from sparsebert.pruning import OneShotSchedule, Pruner
    from sparsebert.study.pretrain import scratch_mlm
    out, rank = sys.argv[1], int(os.environ["RANK"])
    teardown, D.teardown = D.teardown, lambda: None
    for name, argv in json.load(open(os.path.join(out, "jobs.json"))):
        with open(os.path.join(out, f"{name}.rank{rank}.out"), "w") as f, contextlib.redirect_stdout(f):
            rc = main(argv)
        if rc:
            sys.exit(f"rank {rank}: {name} exited with status {rc}")

    ctx = D.setup("cpu")
    # each rank reports to its own file: lines two processes print to one pipe can interleave
    log = open(os.path.join(out, f"mismatch.rank{ctx.rank}.txt"), "w", buffering=1)
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
    else:
        print("no error", file=log)
    log.close()
    D.barrier()                             # both have reported before either exits
    teardown()
""")


@pytest.fixture(scope="module")
def runs(cache, tmp_path_factory):
    """{mode: (single-process out, 2-rank out, folder of the 2-rank launch's per-rank reports)},
    global batch 8 in both; the launch also ran the 2-rank finetune and the mismatch checks."""
    base = tmp_path_factory.mktemp("runs")
    out, jobs = {}, []
    for mode in ("block", "unstructured"):
        one, two = base / f"{mode}-1", base / f"{mode}-2"
        _in_process(_args(cache, one, mode, 8))
        jobs.append((f"pretrain-{mode}", _args(cache, two, mode, 4)))
        out[mode] = (one, two, base)
    jobs.append(("finetune", _finetune_args(cache, out["block"][0], 4)))
    (base / "jobs.json").write_text(json.dumps(jobs))
    (base / "driver.py").write_text(DRIVER)
    _run([str(BIN / "torchrun"), "--standalone", "--nproc-per-node=2", str(base / "driver.py"), str(base)])
    return out


def _report(base, name, rank):
    return (base / f"{name}.rank{rank}.out").read_text()


_STATES = {}


def _state(out):
    """A finished run's model (``load_sparse`` of the --out folder itself), result, optimizer
    state and last training-state folder; read once per folder (loading builds a model)."""
    from safetensors.torch import load_file
    if str(out) not in _STATES:
        enc = sparsebert.load_sparse(out)
        res = json.loads((out / "pretrain.json").read_text())["result"]
        latest = (out / "resume" / "LATEST").read_text().strip()
        opt = load_file(str(out / "resume" / latest / "optimizer.safetensors"))
        _STATES[str(out)] = enc, res, opt, latest
    return _STATES[str(out)]


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
    one, two, base = runs[mode]
    # one checkpoint (rank 0's), the same kind as the single-process command writes
    for out in (one, two):
        assert sorted(p.name for p in out.iterdir()) == ["encoder", "pretrain.json", "resume", "tokenizer"]
        # load_sparse(out) reads out/encoder (assert_same_run loads the folders so)
        assert sparsebert.checkpoint.resolve(out) == ("sparse", str(out / "encoder"))
        assert not list(out.rglob("*.tmp*"))
    assert _report(base, f"pretrain-{mode}", 0).count("dev MLM loss") == 1     # rank 0 logs, alone
    assert _report(base, f"pretrain-{mode}", 1) == ""
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
    _in_process(_args(cache, other, "block", 8, "--resume"))                     # 1 rank, same global batch
    for out in (killed, other):
        res = json.loads((out / "pretrain.json").read_text())["result"]
        assert res["resumed_at"] == step
        assert_same_run(two, out)
        assert_same_run(one, out)
    # the resumed 2-rank run checked its ranks at the resume and at every later pruning event
    res = json.loads((killed / "pretrain.json").read_text())["result"]
    assert res["rank_checks"] == [step] + [s for s, _ in res["mask_updates"] if s > step] + [STEPS]


def test_mismatched_layout_is_a_clear_error(runs):
    base = runs["block"][2]
    out = [(base / f"mismatch.rank{r}.txt").read_text() for r in (0, 1)]
    lines = [line for text in out for line in text.splitlines() if "MISMATCH" in line]
    assert len(lines) == 2, "\n".join(out)                       # every rank raises, none hangs
    for line in lines:
        assert "rank 1 differs from rank 0 in layout bert.encoder.layer.0.intermediate.dense" in line
        assert float(line.split("after ")[1].split("s:")[0]) < 30     # an error, not gloo's 30-minute timeout
    values = [line for text in out for line in text.splitlines() if "VALUES" in line]
    assert len(values) == 2 and all("rank 1 differs from rank 0 in param" in v and "(values:" in v for v in values)


def test_finetune_two_ranks_equal_one_process(runs, cache, capsys):
    one = _in_process(_finetune_args(cache, runs["block"][0], 8), capsys)
    base = runs["block"][2]
    r1, r2 = json.loads(one), json.loads(_report(base, "finetune", 0))    # rank 0 prints, alone
    assert _report(base, "finetune", 1) == ""
    assert r1["world_size"] == 1 and r2["world_size"] == 2 and r1["steps"] == r2["steps"] == 5
    assert r2["train_loss"] == pytest.approx(r1["train_loss"], abs=1e-4)
    assert [l for _, l in r2["loss_curve"]] == pytest.approx([l for _, l in r1["loss_curve"]], abs=2e-4)
    assert r2["dev_metrics"] == pytest.approx(r1["dev_metrics"], abs=1e-6)


# ---- CUDA / NCCL selection, without a GPU (torch.cuda and torch.distributed monkeypatched) ---------
@pytest.mark.parametrize("device,cuda,count,nccl,want", [
    ("auto", False, 0, True, ("cpu", "gloo")),
    ("cpu", True, 2, True, ("cpu", "gloo")),          # --device cpu on a GPU node: gloo on CPUs
    ("auto", True, 2, True, ("cuda:1", "nccl")),
    ("cuda", True, 2, True, ("cuda:1", "nccl")),
    ("cuda:0", True, 2, True, ("cuda:1", "nccl")),    # the rank's GPU is LOCAL_RANK, whatever N says
    ("cuda", True, 2, False, ("cuda:1", "gloo")),     # a torch without NCCL: gloo reduces CUDA tensors
])
def test_device_and_backend_follow_local_rank(device, cuda, count, nccl, want):
    from sparsebert import distributed as D
    dev, backend = D.choose(device, 1, cuda, count, nccl)
    assert (str(dev), backend) == want


@pytest.mark.parametrize("device,cuda,count,match", [
    ("cuda", False, 0, "no CUDA GPU is available"),
    ("auto", True, 1, "LOCAL_RANK 1 has no GPU: this node has 1 .*--nproc-per-node 1"),
])
def test_a_rank_without_a_gpu_is_a_clear_error(device, cuda, count, match):
    from sparsebert import distributed as D
    with pytest.raises(D.DistributedSetupError, match=match):
        D.choose(device, 1, cuda, count, True)


def test_setup_and_wrap_on_a_gpu_node(monkeypatch):
    """What a rank of `torchrun --nnodes 2 --nproc-per-node 2` does on the second node (RANK 3,
    LOCAL_RANK 1): GPU 1 made current before the group exists, NCCL bound to it, DDP on that GPU,
    collectives' tensors on it."""
    import torch.distributed as dist
    import torch.nn.parallel
    from sparsebert import distributed as D

    calls = []
    monkeypatch.setattr(D, "_CTX", D.Context())
    for k, v in {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", str(d))))
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group",
                        lambda backend, **kw: calls.append(("init", backend, kw["rank"], kw["world_size"],
                                                            str(kw.get("device_id")))))

    class FakeDDP(torch.nn.Module):
        def __init__(self, module, device_ids=None, **kw):
            super().__init__()
            calls.append(("ddp", device_ids))
            self.module = module
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", FakeDDP)
    monkeypatch.setattr(D, "verify_identical", lambda *a, **k: 0)

    ctx = D.setup("auto")
    assert (ctx.rank, ctx.world, ctx.local_rank, str(ctx.device), ctx.backend) == (3, 4, 1, "cuda:1", "nccl")
    assert calls == [("set_device", "cuda:1"), ("init", "nccl", 3, 4, "cuda:1")]
    wrapped = D.wrap(torch.nn.Linear(2, 2))
    assert calls[-1] == ("ddp", [1]) and D.unwrap(wrapped).__class__ is torch.nn.Linear
    assert str(D._comm_device()) == "cuda:1"         # NCCL reduces CUDA tensors only


# ---- NCCL on a real GPU (-m gpu; benchmarks/gpu_check.sh runs it) ---------------------------------
ONE_GPU = textwrap.dedent("""
    # torchrun --nproc-per-node 1 on one GPU: the pretrain command on NCCL, then DDP, the broadcast
    # pruning decisions, the rewrap after a layout change and the all-gathered checks on NCCL. NCCL
    # cannot put two ranks on one GPU, and at world size 1 these paths are skipped, so they are
    # forced on (Context.enabled). One process group: the command's teardown waits for the end.
    import json, os, sys
    import torch, torch.distributed as dist
    import sparsebert
    from sparsebert import distributed as D
    from sparsebert.cli import main
    from sparsebert.pruning import OneShotSchedule, Pruner
    from sparsebert.study.pretrain import scratch_mlm
    out, argv, device = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    teardown, D.teardown = D.teardown, lambda: None
    assert main(argv) == 0
    ctx = D.setup(device)
    report = {"backend": dist.get_backend(), "device": str(ctx.device)}
    D.Context.enabled = property(lambda self: True)
    torch.manual_seed(0)
    model = scratch_mlm(64, hidden=64, layers=1, heads=2, intermediate=128, max_position=32)
    sparsebert.sparsify(model, 0.0, block=(32, 32), mode="block")
    model.to(ctx.device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pruner = Pruner(model, OneShotSchedule(0.5, 1), optimizer=opt)
    D.install(pruner)
    ids = torch.randint(0, 64, (4, 16), device=ctx.device)
    ddp = D.wrap(model, model, opt)
    report["device_ids"] = getattr(ddp, "device_ids", None)
    for step in range(2):
        ddp(input_ids=ids).logits.float().square().mean().backward()
        opt.step()
        opt.zero_grad()
        if step == 0:
            pruner.prune_to(0.5)                       # rank 0's masks, broadcast on NCCL
            ddp = D.rewrap(ddp, model, opt, "after pruning")
    lin = model.bert.encoder.layer[0].intermediate.dense
    report.update(density=lin.density, values_device=str(lin.values.device),
                  exp_avg=list(opt.state[lin.values]["exp_avg"].shape), values=list(lin.values.shape),
                  mean=D.all_mean(3.0), checked=D.verify_identical(model, opt, "at the end"))
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f)
    teardown()
""")


@pytest.mark.gpu
def test_nccl_on_one_gpu(tmp_path):
    """The GPU check for the code the CPU tests cannot reach: NCCL, cuda:LOCAL_RANK, DDP device_ids."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    cache = make_fixture_cache(tmp_path / "cache")
    args = _args(cache, tmp_path / "run", "block", 8)
    args[args.index("--device") + 1] = "cuda"
    (tmp_path / "one_gpu.py").write_text(ONE_GPU)
    _run([str(BIN / "torchrun"), "--standalone", "--nproc-per-node=1", str(tmp_path / "one_gpu.py"),
          str(tmp_path), json.dumps(args), "cuda"], timeout=240, gpu=True)
    res = json.loads((tmp_path / "run" / "pretrain.json").read_text())["result"]
    assert res["world_size"] == 1 and res["sparsity"] == pytest.approx(0.5, abs=0.02)
    assert sparsebert.load_sparse(tmp_path / "run") is not None
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["backend"] == "nccl" and rep["device"] == "cuda:0" and rep["device_ids"] == [0]
    assert rep["density"] == pytest.approx(0.5) and rep["values_device"] == "cuda:0"
    assert rep["exp_avg"] == rep["values"] and rep["mean"] == 3.0 and rep["checked"] > 0


def test_data_turns_put_each_nodes_first_rank_before_its_other_ranks():
    """rank 0 fills the cache first; on every other node its LOCAL_RANK 0 fills that node's cache
    once before the node's other ranks read it (they used to unpack into one folder at once)."""
    from sparsebert import distributed as D
    turns = {(r, lr): D.data_turn(D.Context(rank=r, world=8, local_rank=lr)) for r, lr in
             [(0, 0), (1, 1), (3, 3), (4, 0), (5, 1), (7, 3)]}
    assert turns == {(0, 0): 0, (1, 1): 2, (3, 3): 2, (4, 0): 1, (5, 1): 2, (7, 3): 2}
    assert set(turns.values()) <= set(range(D.DATA_TURNS))
