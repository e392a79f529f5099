import os

import pytest  # noqa: E402
import torch  # noqa: E402

# Triton reads this when @triton.jit decorates a kernel: it must be set before any kernel
# module is imported, so Triton kernels run (slowly) on the CPU in tests and CI. On a machine
# with a GPU the kernels run for real (the `-m gpu` tests).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def tiny_bert_config():
    from transformers import BertConfig
    return BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                      vocab_size=200, max_position_embeddings=64, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)


def random_layout(R, C, density, block, seed=0):
    from sparsebert import BlockLayout
    g = torch.Generator().manual_seed(seed)
    return BlockLayout.from_mask(torch.rand(R, C, generator=g) < density, block)


def skip_unavailable(backend):
    """Skip the test when the named backend cannot run on this machine's CPU ("auto" always can)."""
    import pytest
    from sparsebert.ops import backends
    if backend != "auto" and backends.unavailable_reason(backend, "cpu") is not None:
        pytest.skip(backends.unavailable_reason(backend, "cpu"))
