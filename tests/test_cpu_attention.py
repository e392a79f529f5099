"""Fused CPU attention (sparsebert.ops.cpu_attention, csrc/cpu/attention*.cpp) against an fp64
reference, with torch's own SDPA error as the yardstick."""
import copy

import pytest
import torch
import torch.nn.functional as F

from sparsebert.ops import cpu_attention as ca

pytestmark = pytest.mark.skipif(not ca.available(), reason="sparsebert._C without the attention op")


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return set(f.read().split())
    except OSError:
        return set()


_FLAGS = _cpu_flags()
ISAS = ["generic"]  # every kernel set this CPU runs (SPARSEBERT_CPU_ISA is read at each call)
if {"avx2", "fma"} <= _FLAGS:
    ISAS.append("avx2")
if {"avx512f", "avx512vl", "avx512bw", "avx512dq", "fma"} <= _FLAGS:
    ISAS.append("avx512")


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv("SPARSEBERT_CPU_ISA", request.param)
    assert ca.isa() == request.param
    return request.param


def hf_qkv(B, H, Sq, Skv, D, gen):
    """q, k, v as BERT makes them: [B, S, H * D] projections viewed as [B, H, S, D]."""
    def make(S):
        return torch.randn(B, S, H * D, generator=gen).view(B, S, H, D).transpose(1, 2)
    return make(Sq), make(Skv), make(Skv)


def reference(q, k, v, mask, scale):
    """fp64; a row with every key masked gives 0 (as torch's CPU SDPA, checked below)."""
    s = q.double() @ k.double().transpose(-1, -2) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    p = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)
    return (p @ v.double()).transpose(1, 2)


def make_mask(kind, B, H, Sq, Skv, gen):
    if kind == "none":
        return None
    if kind == "padding":  # what transformers' sdpa_mask builds: [B, 1, Sq, Skv], rows equal
        lens = torch.randint(1, Skv + 1, (B,), generator=gen)
        keep = torch.arange(Skv)[None, :] < lens[:, None]
        return keep[:, None, None, :].expand(B, 1, Sq, Skv).contiguous()
    if kind == "padding_expanded":  # the same as a stride-0 view
        keep = torch.rand(B, Skv, generator=gen) > 0.3
        keep[:, 0] = True
        return keep[:, None, None, :].expand(B, 1, Sq, Skv)
    if kind == "bool_general":  # differs per query; some rows fully masked
        m = torch.rand(B, 1, Sq, Skv, generator=gen) > 0.4
        m[0, 0, 0, :] = False
        return m
    if kind == "float_broadcast":  # additive, per head and key
        return torch.randn(1, H, 1, Skv, generator=gen)
    if kind == "float_general":  # 2-D [Sq, Skv] with -inf entries and a fully masked row
        m = torch.randn(Sq, Skv, generator=gen)
        m[torch.rand(Sq, Skv, generator=gen) > 0.7] = float("-inf")
        m[-1, :] = float("-inf")
        return m
    raise AssertionError(kind)


MASKS = ["none", "padding", "padding_expanded", "bool_general", "float_broadcast", "float_general"]
SHAPES = [  # (B, H, Sq, Skv): every Sq x Skv of {1, 7, 128, 129}, B and H alternating
    (b, h, sq, skv)
    for i, (sq, skv) in enumerate((sq, skv) for sq in (1, 7, 128, 129) for skv in (1, 7, 128, 129))
    for b, h in [((1, 12), (3, 1), (3, 12), (1, 1))[i % 4]]
]


def check_close(out, q, k, v, mask, scale):
    ref = reference(q, k, v, mask, scale)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(1, 2)
    err = (out.double() - ref).abs().max().item()
    err_sdpa = (sdpa.double() - ref).abs().max().item()
    assert err <= 2 * err_sdpa + 1e-6, (err, err_sdpa)


@pytest.mark.parametrize("D", [8, 32, 64, 80])
def test_matches_fp64(isa, D):
    gen = torch.Generator().manual_seed(D)
    for B, H, Sq, Skv in SHAPES:
        q, k, v = hf_qkv(B, H, Sq, Skv, D, gen)
        for kind in MASKS:
            mask = make_mask(kind, B, H, Sq, Skv, gen)
            with torch.no_grad():
                out = ca.attention(q, k, v, mask)
            assert out.shape == (B, Sq, H, D) and out.is_contiguous()
            check_close(out, q, k, v, mask, D ** -0.5)


def test_odd_sizes_and_long_sequences(isa):
    gen = torch.Generator().manual_seed(1)
    for B, H, Sq, Skv, D in [(1, 2, 3, 600, 24), (2, 1, 513, 77, 1), (1, 1, 40, 1000, 100)]:
        q, k, v = hf_qkv(B, H, Sq, Skv, D, gen)
        for kind in ("none", "padding", "bool_general", "float_general"):
            mask = make_mask(kind, B, H, Sq, Skv, gen)
            check_close(ca.attention(q, k, v, mask, scaling=0.3), q, k, v, mask, 0.3)


def test_contiguous_and_strided_inputs_agree(isa):
    gen = torch.Generator().manual_seed(2)
    q, k, v = hf_qkv(2, 4, 33, 20, 32, gen)
    mask = make_mask("padding", 2, 4, 33, 20, gen)
    a = ca.attention(q, k, v, mask)
    b = ca.attention(q.contiguous(), k.contiguous(), v.contiguous(), mask.contiguous())
    assert torch.equal(a, b)


def test_fully_masked_rows_are_zero_like_sdpa():
    gen = torch.Generator().manual_seed(3)
    q, k, v = hf_qkv(2, 3, 9, 16, 32, gen)
    bool_mask = torch.ones(2, 1, 9, 16, dtype=torch.bool)
    bool_mask[1, 0, 4, :] = False
    float_mask = torch.zeros(2, 1, 9, 16).masked_fill(~bool_mask, float("-inf"))
    all_masked = torch.zeros(2, 1, 1, 16, dtype=torch.bool)  # every query of every head
    for mask in (bool_mask, float_mask, all_masked):
        sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
        out = ca.attention(q, k, v, mask)
        rows = out[1, 4] if mask is not all_masked else out
        assert torch.equal(rows, torch.zeros_like(rows))
        sdpa_rows = sdpa[1, 4] if mask is not all_masked else sdpa
        assert torch.equal(sdpa_rows, torch.zeros_like(sdpa_rows))  # torch 2.13 CPU SDPA: 0
        assert torch.isfinite(out).all()
    # finfo.min instead of -inf masks nothing away: a uniform average, in SDPA and here
    fmin = torch.zeros(2, 1, 9, 16).masked_fill(~bool_mask, torch.finfo(torch.float32).min)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=fmin).transpose(1, 2)
    out = ca.attention(q, k, v, fmin)
    torch.testing.assert_close(out[1, 4], v[1, :, :, :].mean(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, sdpa, rtol=1e-5, atol=1e-6)


def test_threads_give_identical_results(isa):
    gen = torch.Generator().manual_seed(4)
    before = torch.get_num_threads()
    try:
        for B, H, Sq, Skv, D in [(1, 1, 600, 130, 32), (3, 12, 129, 128, 64)]:
            q, k, v = hf_qkv(B, H, Sq, Skv, D, gen)
            for kind in ("none", "padding", "bool_general"):
                mask = make_mask(kind, B, H, Sq, Skv, gen)
                torch.set_num_threads(1)
                one = ca.attention(q, k, v, mask)
                torch.set_num_threads(2)
                two = ca.attention(q, k, v, mask)
                assert torch.equal(one, two)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2])
def test_next_item_prefetch_changes_nothing(isa, monkeypatch, threads):
    # The software prefetch of the next (batch, head)'s q, k, v rows (on by default only for
    # large inputs) is forced on here at small, odd and broadcast shapes: the same bits as off,
    # and no read past the inputs (the last item of each thread has no next).
    gen = torch.Generator().manual_seed(5)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cases = [hf_qkv(3, 5, 17, 9, 24, gen), hf_qkv(1, 1, 2, 130, 1, gen), hf_qkv(2, 12, 128, 128, 32, gen)]
        q, k, v = hf_qkv(4, 3, 11, 6, 16, gen)        # k and v shared by every batch (stride 0)
        cases.append((q, k[:1].expand(4, -1, -1, -1), v[:1].expand(4, -1, -1, -1)))
        for q, k, v in cases:
            B, H, Sq, D = q.shape
            mask = make_mask("padding", B, H, Sq, k.shape[2], gen)
            for m in (None, mask):
                monkeypatch.setenv("SPARSEBERT_CPU_ATTN_PREFETCH", "0")
                off = ca.attention(q, k, v, m)
                monkeypatch.setenv("SPARSEBERT_CPU_ATTN_PREFETCH", "1")
                on = ca.attention(q, k, v, m)
                assert torch.equal(on, off)
                check_close(on, q, k, v, m, D ** -0.5)
    finally:
        torch.set_num_threads(before)


def test_inputs_not_modified():
    gen = torch.Generator().manual_seed(5)
    q, k, v = hf_qkv(2, 2, 7, 7, 16, gen)
    mask = make_mask("padding", 2, 2, 7, 7, gen)
    copies = [t.clone() for t in (q, k, v, mask)]
    ca.attention(q, k, v, mask)
    assert all(torch.equal(a, b) for a, b in zip((q, k, v, mask), copies))


def test_unsupported_reasons():
    gen = torch.Generator().manual_seed(6)
    q, k, v = hf_qkv(2, 3, 5, 6, 8, gen)
    mask = make_mask("padding", 2, 3, 5, 6, gen)
    assert ca.unsupported_reason(q, k, v) is None
    assert ca.unsupported_reason(q, k, v, mask) is None
    assert ca.unsupported_reason(q, k, v, mask.float()) is None
    qg = q.clone().requires_grad_()
    assert "grad" in ca.unsupported_reason(qg, k, v)
    with torch.no_grad():
        assert ca.unsupported_reason(qg, k, v) is None
    cases = {
        "float64": (q.double(), k.double(), v.double(), None, 0.0),
        "bfloat16": (q.bfloat16(), k.bfloat16(), v.bfloat16(), None, 0.0),
        "dropout": (q, k, v, None, 0.1),
        "4-D": (q[0], k[0], v[0], None, 0.0),
        "do not match": (q, k[:, :2], v[:, :2], None, 0.0),
        "key and value": (q, k, v[:, :, :3], None, 0.0),
        "contiguous last": (torch.randn(2, 3, 8, 5).transpose(2, 3), k, v, None, 0.0),
        "no positions": (q, k[:, :, :0], v[:, :, :0], None, 0.0),
        "bool or float32": (q, k, v, mask.long(), 0.0),
        "bool or float32 ": (q, k, v, mask.double(), 0.0),
        "broadcast": (q, k, v, mask[..., :4], 0.0),
        "meta": (q.to("meta"), k.to("meta"), v.to("meta"), None, 0.0),
    }
    for want, (a, b, c, m, p) in cases.items():
        reason = ca.unsupported_reason(a, b, c, m, dropout=p)
        assert reason is not None and want.strip() in reason, (want, reason)


def test_bad_direct_calls_raise_one_line_value_errors():
    gen = torch.Generator().manual_seed(7)
    q, k, v = hf_qkv(1, 2, 4, 4, 8, gen)
    bad = [
        (q.double(), k, v, None),
        (q[0], k[0], v[0], None),
        (q, k[:, :1], v[:, :1], None),
        (q, k, v, torch.ones(1, 1, 4, 3, dtype=torch.bool)),
        (q, k, v, torch.ones(1, 1, 4, 4, dtype=torch.int64)),
        (q.detach().requires_grad_(), k, v, None),
        ("q", k, v, None),
    ]
    for a, b, c, m in bad:
        with pytest.raises(ValueError) as e:
            ca.attention(a, b, c, m)
        assert "\n" not in str(e.value) and str(e.value).startswith("cpu_attention: ")


def test_through_bert_model():
    pytest.importorskip("transformers")
    from transformers import AttentionInterface, AttentionMaskInterface, BertConfig, BertModel
    from transformers.masking_utils import sdpa_mask

    name = "sparsebert_cpu_attention_test"
    AttentionInterface.register(name, ca.attention_forward)
    # Without a mask function under the same name, transformers passes no mask at all for a
    # padded batch (masking_utils._preprocess_mask_arguments): padding would be attended.
    AttentionMaskInterface.register(name, sdpa_mask)
    try:
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=50, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=96, max_position_embeddings=64)
        # _from_config sets the implementation on the config it is given: one copy each
        ref = BertModel._from_config(copy.deepcopy(cfg), attn_implementation="sdpa").eval()
        ours = BertModel._from_config(copy.deepcopy(cfg), attn_implementation=name).eval()
        ours.load_state_dict(ref.state_dict())
        ids = torch.randint(0, 50, (3, 19))
        padded = torch.ones(3, 19, dtype=torch.long)
        padded[1, 11:] = 0
        padded[2, 3:] = 0
        calls = []
        orig = ca.attention

        def counting(*a, **kw):
            calls.append(a[3] is None)
            return orig(*a, **kw)

        ca.attention = counting
        try:
            with torch.no_grad():
                for mask in (None, torch.ones(3, 19, dtype=torch.long), padded):
                    a = ref(ids, attention_mask=mask).last_hidden_state
                    b = ours(ids, attention_mask=mask).last_hidden_state
                    torch.testing.assert_close(b, a, rtol=1e-5, atol=2e-5)
        finally:
            ca.attention = orig
        assert calls == [True] * 4 + [False] * 2  # fused every layer; a mask only when padded
    finally:
        AttentionInterface._global_mapping.pop(name, None)
        AttentionMaskInterface._global_mapping.pop(name, None)
