"""The Triton kernels compiled for sm_90a by Triton's real compiler, without a GPU: one subprocess
(the interpreter off) runs ``python -m sparsebert.ops.triton.inspect --grid ci`` and the tests
read its table and JSON — wgmma in the forward, input-gradient and weight-gradient kernels, TMA
where a config asks for it (exact fp32 dots have none to use), no ptxas spills, shared memory within the H200's 227 KB and within
the launcher's own estimate (which decides what fits)."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from sparsebert.ops.triton import common, dsd, sdd  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("sm90") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "sparsebert.ops.triton.inspect", "--grid", "ci",
                           "--jobs", "2", "--json", str(out)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if not out.exists():
        pytest.fail(f"inspect wrote nothing (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc, json.loads(out.read_text())


def test_inspect_prints_the_table(compiled):
    proc, rows = compiled
    head = proc.stdout.splitlines()[0].split()
    assert head == ["kernel", "dtype", "block", "#", "config", "wgmma", "TMA", "regs", "spills", "shared"]
    assert f"{len(rows)} kernels compiled for sm_90a" in proc.stdout
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_every_op_and_config_compiled(compiled):
    _, rows = compiled
    errors = [r for r in rows if "error" in r]
    assert not errors, errors
    got = {(r["op"], r["config_index"]) for r in rows if r["dtype"] == "bf16" and r["block"] == "64x64"}
    want = ({(op, i) for op in ("forward", "grad_input") for i in range(len(dsd.CONFIGS))}
            | {("grad_weight", i) for i in range(len(sdd.CONFIGS))})
    assert got == want
    assert {r["dtype"] for r in rows} == {"bf16", "fp16", "tf32", "fp32"}
    assert {r["block"] for r in rows} == {f"{b}x{b}" for b in common.SUPPORTED_BLOCKS}


def test_wgmma_tma_no_spills_shared_memory(compiled):
    _, rows = compiled
    for r in rows:
        tag = f"{r['op']} {r['dtype']} {r['block']} config {r['config_index']} {r['config']}"
        assert r["target"] == "sm_90a", tag
        # exact fp32 (torch does not allow TF32) has no tensor-core instruction to use
        assert r["wgmma"] == (r["dtype"] != "fp32"), f"{tag}: wgmma {r['wgmma']}"
        assert r["tma"] == bool(r["config"]["TMA"]), f"{tag}: TMA {r['tma']}"
        assert r["spill_bytes"] == 0, f"{tag}: {r['spill_bytes']} bytes of spills"
        assert r["registers"] and r["registers"] <= 255, tag
        assert r["shared"] <= common.SMEM_BUDGET, f"{tag}: {r['shared']} bytes of shared memory"
        b = int(r["block"].split("x")[0])
        elem = {"bf16": 2, "fp16": 2, "tf32": 4, "fp32": 4}[r["dtype"]]
        est = (sdd.smem_bytes(r["config"], elem, b, b) if r["op"] == "grad_weight"
               else dsd.smem_bytes(r["config"], elem, b, b))
        assert r["shared"] <= est, f"{tag}: compiled {r['shared']} > estimate {est}"
