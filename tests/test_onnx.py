"""Export for serving: torch.onnx.export (dynamo and TorchScript exporters) of sparsified BERTs
run by ONNX Runtime, and torch.jit.trace. Block-sparse layers export as their dense equivalent."""
import numpy as np
import pytest
import torch
from transformers import BertForMaskedLM

import sparsebert

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def _ids(n=2, s=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 200, (n, s), generator=g)


def _model(cfg, mode):
    torch.manual_seed(0)
    return sparsebert.sparsify(BertForMaskedLM(cfg), 0.5, block=32, mode=mode).eval()


def _run(path, ids, mask):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    return sess.run(None, {k: feed[k] for k in names})[0]


@pytest.mark.parametrize("mode", ["block", "unstructured"])
def test_dynamo_onnx_export_runs_in_onnx_runtime_with_the_same_outputs(tmp_path, tiny_bert_config, mode):
    model = _model(tiny_bert_config, mode)
    if mode == "block":
        assert any(m.activation == "gelu" for _, m in sparsebert.hf.sparse_layers(model))
    ids, mask = _ids(), torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=64)
    program = torch.onnx.export(model, (ids,), kwargs={"attention_mask": mask}, dynamo=True,
                                dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}})
    program.save(str(tmp_path / "model.onnx"))
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits.numpy()
    np.testing.assert_allclose(_run(tmp_path / "model.onnx", ids, mask), want, atol=1e-5, rtol=1e-4)
    ids2 = _ids(3, 20, seed=1)                              # other shapes, same graph
    mask2 = torch.ones_like(ids2)
    with torch.no_grad():
        want2 = model(input_ids=ids2, attention_mask=mask2).logits.numpy()
    np.testing.assert_allclose(_run(tmp_path / "model.onnx", ids2, mask2), want2, atol=1e-5, rtol=1e-4)
    # the model still runs its sparse kernels afterwards
    assert not sparsebert.nn._exporting()


@pytest.mark.parametrize("mode", ["block", "unstructured"])
def test_torchscript_onnx_export_and_jit_trace(tmp_path, tiny_bert_config, mode):
    model = _model(tiny_bert_config, mode)
    ids, mask = _ids(), torch.ones(2, 12, dtype=torch.long)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    traced = torch.jit.trace(model, (ids, mask), strict=False)
    assert torch.allclose(traced(ids, mask)["logits"], want, atol=1e-5, rtol=1e-4)
    torch.onnx.export(model, (ids, mask), str(tmp_path / "ts.onnx"), dynamo=False,
                      input_names=["input_ids", "attention_mask"])
    np.testing.assert_allclose(_run(tmp_path / "ts.onnx", ids, mask), want.numpy(), atol=1e-5, rtol=1e-4)


def test_export_of_a_model_never_run_eagerly(tmp_path, tiny_bert_config):
    """A model straight from from_pretrained (layout index not built yet) exports, and runs
    eagerly afterwards (no traced tensor left in the layout's cache)."""
    _model(tiny_bert_config, "block").save_pretrained(tmp_path / "m")
    model = sparsebert.from_pretrained(tmp_path / "m")
    for _, m in sparsebert.hf.sparse_layers(model):
        m.layout._cache.clear()
    ids, mask = _ids(), torch.ones(2, 12, dtype=torch.long)
    batch = torch.export.Dim("batch")
    program = torch.onnx.export(model, (ids,), kwargs={"attention_mask": mask}, dynamo=True,
                                dynamic_shapes={"input_ids": {0: batch}, "attention_mask": {0: batch}})
    program.save(str(tmp_path / "model.onnx"))
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits.numpy()
    np.testing.assert_allclose(_run(tmp_path / "model.onnx", ids, mask), want, atol=1e-5, rtol=1e-4)
