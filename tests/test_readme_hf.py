"""README's "Use with Hugging Face" section: its code blocks run as written, in order, in one
namespace (in a temporary folder)."""
import os
import re

import pytest
import torch

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def _blocks():
    text = open(README, encoding="utf-8").read()
    section = text.split("## Use with Hugging Face", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def _autocast_supported() -> bool:
    import importlib
    return hasattr(importlib.import_module("sparsebert.ops.bsr_linear"), "_autocast_cast")


def test_the_hugging_face_section_runs_as_written(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    blocks = _blocks()
    assert len(blocks) >= 5 and any("PruningCallback" in b for b in blocks)
    monkeypatch.chdir(tmp_path)
    ns = {}
    for code in blocks:
        if "torch.autocast" in code and not _autocast_supported():
            continue      # needs the op layer's autocast support
        exec(compile(code, "README.md", "exec"), ns)
    assert ns["trainer"].state.log_history[-1]["sparsity"] == pytest.approx(0.75, abs=0.01)
    assert (tmp_path / "run" / "checkpoint-4" / "model.safetensors").is_file()
    assert torch.allclose(torch.as_tensor(ns["logits"]),
                          ns["same"](input_ids=ns["ids"]).logits.detach(), atol=1e-5)


def test_the_use_section_optimize_example_runs_as_written(tmp_path, monkeypatch):
    text = open(README, encoding="utf-8").read()
    use = text.split("## Use\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", use, flags=re.S)
    example = [b for b in blocks if "sparsebert.optimize(model)" in b]
    assert len(example) == 1
    monkeypatch.chdir(tmp_path)
    ns = {}
    exec(compile(blocks[0], "README.md", "exec"), ns)
    exec(compile(example[0], "README.md", "exec"), ns)
    labelled = int((ns["ids"] != -100).sum())
    assert tuple(ns["out"].logits.shape) == (labelled, ns["model"].config.vocab_size)
    assert ns["sparsebert"].is_optimized(ns["model"]) and ns["hidden"].shape[:2] == ns["ids"].shape
