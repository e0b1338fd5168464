"""Every AQ kernel equals dequantize-then-dense on fresh random inputs and odd shapes."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from torch.utils.cpp_extension import is_ninja_available

from diffquant.formats.additive import AdditiveSpec, AdditiveWeight
from diffquant.kernels import cpu, dispatch
from diffquant.kernels.reference import dequant_conv2d, dequant_linear
from diffquant.nn.layers import QuantConv2d, QuantLinear

# skipped only where there is no toolchain: with one, a kernel that fails to build fails these tests
# (cpu.available() would turn a compile error in aq_lut.cpp into silent skips)
_TOOLCHAIN = shutil.which(os.environ.get("CXX", "c++")) is not None and is_ninja_available()
needs_lut = pytest.mark.skipif(not _TOOLCHAIN, reason="no C++ compiler or ninja for the lookup-table kernel")


def _random_aq(out, in_flat, m, bits, g, gen):
    k = 1 << bits
    cb = torch.randn(m, k, g, generator=gen)
    codes = torch.randint(0, k, (out, in_flat // g, m), generator=gen)
    scale = torch.rand(out, generator=gen) + 0.5
    return cb, codes, scale


def _close(y, ref):
    # fp32 sums in a different order: relative to the output's scale
    assert (y - ref).abs().max().item() <= 1e-4 * ref.abs().max().item() + 1e-5


@needs_lut
@pytest.mark.parametrize("tokens", [1, 3, 4, 7, 16, 17, 100])
@pytest.mark.parametrize("out,in_flat,m,bits,g", [(37, 48, 2, 8, 8), (5, 72, 1, 4, 8), (129, 36, 3, 10, 9),
                                                  (64, 40, 2, 6, 5), (1, 16, 1, 1, 16), (33, 26, 1, 7, 2)])
def test_lut_linear_equals_reference(tokens, out, in_flat, m, bits, g):
    gen = torch.Generator().manual_seed(tokens * 1000 + out)
    cb, codes, scale = _random_aq(out, in_flat, m, bits, g, gen)
    bias = torch.randn(out, generator=gen) if out % 2 else None
    x = torch.randn(2, tokens, in_flat, generator=gen)  # leading dims are flattened and restored
    kcb, kcodes, kscale = cpu.cpu_layout(codes, cb.half(), scale.half(), bits)
    y = cpu.aq_linear(x, kcb, kcodes, kscale, bias)
    _close(y, dequant_linear(x, kcb, codes, kscale, bias))


@needs_lut
@pytest.mark.parametrize("tokens", [1, 2, 5, 13, 17, 100])
@pytest.mark.parametrize("in_flat", [72, 16])
def test_lut_linear_split_across_threads_equals_reference(tokens, in_flat):
    # the suite runs on one intra-op thread (conftest); the kernel's splits over several threads are
    # checked here, with a thread count that divides nothing evenly: of the groups (one token tile of
    # up to 16, 9 groups), of the output rows (2 tiles, or too few groups: 2) and of token tiles (100)
    gen = torch.Generator().manual_seed(tokens)
    cb, codes, scale = _random_aq(131, in_flat, 2, 8, 8, gen)
    bias = torch.randn(131, generator=gen)
    x = torch.randn(tokens, in_flat, generator=gen)
    kcb, kcodes, kscale = cpu.cpu_layout(codes, cb.half(), scale.half(), 8)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        y = cpu.aq_linear(x, kcb, kcodes, kscale, bias)
    finally:
        torch.set_num_threads(before)
    _close(y, dequant_linear(x, kcb, codes, kscale, bias))


@needs_lut
@pytest.mark.parametrize("block_columns", [1, 2, 5, 16, 1000])
@pytest.mark.parametrize("m", [1, 3])
def test_every_table_block_size_equals_reference(block_columns, m):
    # the table is built and gathered in blocks of block_columns // m groups: fewer columns than
    # codebooks (one group a block), blocks that leave a short last one (13 groups), more than all of
    # them; through a token tile (5) and tiles (40), with the conv loader too
    gen = torch.Generator().manual_seed(block_columns * 10 + m)
    cb, codes, scale = _random_aq(23, 13 * 8, m, 6, 8, gen)
    kcb, kcodes, kscale = cpu.cpu_layout(codes, cb, scale, 6)
    for tokens in (5, 40):
        x = torch.randn(tokens, 13 * 8, generator=gen)
        _close(cpu.aq_linear(x, kcb, kcodes, kscale, None, block_columns), dequant_linear(x, kcb, codes, kscale, None))
    ccb, ccodes, cscale = _random_aq(7, 13 * 9, m, 5, 9, gen)  # 13 input channels, 3x3
    kcb, kcodes, kscale = cpu.cpu_layout(ccodes, ccb, cscale, 5)
    x = torch.randn(2, 13, 5, 6, generator=gen)
    y = cpu.aq_conv2d(x, kcb, kcodes, kscale, None, (3, 3), (1, 1), (1, 1), (1, 1), block_columns)
    _close(y, dequant_conv2d(x, kcb, ccodes, kscale, None, (7, 13, 3, 3), 1, 1, 1))


_FEWER_THREADS_CASE = """
import torch
from diffquant.kernels import cpu
from diffquant.kernels.reference import dequant_linear
torch.set_num_threads(3)  # three parts of the groups; OMP_THREAD_LIMIT=1 gives the kernel's region one thread
gen = torch.Generator().manual_seed(0)
cb, codes = torch.randn(2, 256, 8, generator=gen), torch.randint(0, 256, (131, 9, 2), generator=gen)
scale = torch.rand(131) + 0.5
kcb, kcodes, kscale = cpu.cpu_layout(codes, cb.half(), scale.half(), 8)
for tokens in (2, 13):
    x = torch.randn(tokens, 72, generator=gen)
    y, ref = cpu.aq_linear(x, kcb, kcodes, kscale, None), dequant_linear(x, kcb, codes, kscale, None)
    assert (y - ref).abs().max() <= 1e-4 * ref.abs().max() + 1e-5, float((y - ref).abs().max())
print("ok")
"""


@needs_lut
def test_group_split_is_right_when_the_region_gets_fewer_threads_than_parts():
    """The group split sizes its parts by torch's thread count, but its OpenMP region can get fewer threads (a
    call nested in another parallel region, a thread limit): each thread then takes several parts. A fresh
    process, since the limit is read when OpenMP starts."""
    env = dict(os.environ, OMP_THREAD_LIMIT="1")
    r = subprocess.run([sys.executable, "-c", _FEWER_THREADS_CASE], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


@needs_lut
@pytest.mark.parametrize("out,in_flat,m,bits,g", [(37, 48, 2, 8, 8), (300, 1000, 2, 8, 8), (129, 549, 3, 10, 9),
                                                  (17, 1024, 1, 8, 8), (1, 16, 1, 1, 16), (45, 64, 2, 4, 8),
                                                  (19, 40, 1, 5, 8), (50, 48, 3, 6, 8), (33, 72, 2, 7, 9)])
def test_one_token_path_equals_reference(out, in_flat, m, bits, g):
    # a single token takes its own path, with every lookup this build runs (byte planes, float register
    # permutes, gathers, scalar): output counts that leave a partial vector of 16 or 64 rows, uint8 and
    # int16 codes, K = 2 .. 1024
    gen = torch.Generator().manual_seed(out + in_flat)
    cb, codes, scale = _random_aq(out, in_flat, m, bits, g, gen)
    bias = torch.randn(out, generator=gen)
    x = torch.randn(1, in_flat, generator=gen)
    kcb, kcodes, kscale = cpu.cpu_layout(codes, cb.half(), scale.half(), bits)
    y = cpu.aq_linear(x, kcb, kcodes, kscale, bias)
    _close(y, dequant_linear(x, kcb, codes, kscale, bias))
    ext = cpu.load_extension()
    xt = x.t().contiguous()
    _close(y, ext.aq_matmul_tokens(xt, kcb, kcodes, kscale, bias, cpu.BLOCK_COLUMNS, one_token=False).t())
    chosen, runs = cpu.one_token_lookups(1 << bits, kcodes.element_size())
    assert chosen in runs and "scalar" in runs
    for name in runs:
        forced = ext.aq_matmul_tokens(xt, kcb, kcodes, kscale, bias, cpu.BLOCK_COLUMNS, True, cpu.LOOKUPS.index(name))
        _close(y, forced.t())


@needs_lut
def test_a_lookup_this_build_cannot_run_is_refused_by_name():
    gen = torch.Generator().manual_seed(5)
    cb, codes, scale = _random_aq(16, 32, 1, 10, 8, gen)  # 1024 codewords: two-byte codes, no register lookup
    kcb, kcodes, kscale = cpu.cpu_layout(codes, cb, scale, 10)
    assert "float_permutes" not in cpu.one_token_lookups(1024, 2)[1]
    with pytest.raises(RuntimeError, match=r"lookup 1 \(float_permutes\) does not run for 1024 codewords"):
        cpu.load_extension().aq_matmul_tokens(torch.randn(32, 1), kcb, kcodes, kscale, None, cpu.BLOCK_COLUMNS, True,
                                              cpu.LOOKUPS.index("float_permutes"))


@needs_lut
@pytest.mark.parametrize("batch,cin,cout,hw,k,stride,pad,dil,bits",
                         [(1, 3, 5, 7, (3, 3), 1, 1, 1, 6), (3, 4, 17, 9, (3, 3), 2, 1, 1, 6),
                          (2, 6, 8, 5, (3, 3), 1, 0, 1, 6), (2, 5, 7, 6, (3, 3), 1, 2, 2, 6),
                          (1, 4, 9, 13, (3, 1), (2, 1), (1, 0), 1, 8), (2, 7, 33, 2, (3, 3), 1, 1, 1, 8),
                          (1, 8, 20, 3, (3, 3), 1, 1, 1, 10), (65, 8, 16, 4, (1, 1), 1, 0, 1, 8),
                          (1, 6, 10, 1, (3, 3), 1, 1, 1, 8)])
def test_lut_kaq_conv_equals_reference(batch, cin, cout, hw, k, stride, pad, dil, bits):
    # the kernel reads each patch from the image itself: strides, paddings, dilations, a 3x1 kernel, outputs
    # of 3, 8 and 15 pixels (one 4-, 8- or 16-token tile, the groups split between threads) up to 105 (several
    # tiles), 2-byte codes, a batch of 65
    gen = torch.Generator().manual_seed(cin * 31 + cout)
    pair = lambda v: v if isinstance(v, tuple) else (v, v)  # noqa: E731
    k, stride, pad, dil = pair(k), pair(stride), pair(pad), pair(dil)
    g = k[0] * k[1]
    cb, codes, scale = _random_aq(cout, cin * g, 2, bits, g, gen)
    bias = torch.randn(cout, generator=gen)
    x = torch.randn(batch, cin, hw, hw + 2, generator=gen)
    kcb, kcodes, kscale = cpu.cpu_layout(codes, cb, scale, bits)
    y = cpu.aq_conv2d(x, kcb, kcodes, kscale, bias, k, stride, pad, dil)
    ref = dequant_conv2d(x, kcb, codes, kscale, bias, (cout, cin, *k), stride, pad, dil)
    assert y.shape == ref.shape
    _close(y, ref)
    _close(cpu.aq_conv2d_unfolded(x, kcb, kcodes, kscale, bias, k, stride, pad, dil), ref)


@needs_lut
def test_lut_conv_names_a_patch_that_does_not_match_the_codes():
    gen = torch.Generator().manual_seed(3)
    cb, codes, scale = _random_aq(8, 4 * 9, 1, 8, 9, gen)
    kcb, kcodes, kscale = cpu.cpu_layout(codes, cb, scale, 8)
    with pytest.raises(RuntimeError, match="a patch has 5 x 3 x 3 = 45 inputs but the codes cover groups"):
        cpu.aq_conv2d(torch.randn(1, 5, 6, 6), kcb, kcodes, kscale, None, (3, 3), (1, 1), (1, 1), (1, 1))
    with pytest.raises(RuntimeError, match="smaller than the dilated kernel"):
        cpu.aq_conv2d(torch.randn(1, 4, 2, 2), kcb, kcodes, kscale, None, (3, 3), (1, 1), (0, 0), (1, 1))


def _modules(gen):
    cb, codes, scale = _random_aq(40, 64, 2, 8, 8, gen)
    lin = QuantLinear(AdditiveWeight(codes, cb, scale, (40, 64), AdditiveSpec(2, 8, 8)), torch.randn(40, generator=gen))
    cb, codes, scale = _random_aq(24, 8 * 9, 1, 8, 9, gen)
    conv = QuantConv2d(AdditiveWeight(codes, cb, scale, (24, 8, 3, 3), AdditiveSpec(1, 8, 9)),
                       torch.randn(24, generator=gen), nn.Conv2d(8, 24, 3, padding=1))
    return lin, conv


@needs_lut
def test_modules_dispatch_and_force():
    gen = torch.Generator().manual_seed(0)
    lin, conv = _modules(gen)
    x, img = torch.randn(5, 64, generator=gen), torch.randn(2, 8, 6, 6, generator=gen)
    with torch.no_grad():
        with dispatch.force("reference"):
            ref_l, ref_c = lin(x), conv(img)
        with dispatch.force("lut"):
            _close(lin(x), ref_l)
            _close(conv(img), ref_c)
            lin.free_dense()  # the kernel reads the codes only
            _close(lin(x), ref_l)
    with dispatch.force("reference"), torch.no_grad():
        _close(lin(x), ref_l)  # dense weight rebuilt on the fly after free_dense


def test_training_takes_the_dense_differentiable_path():
    gen = torch.Generator().manual_seed(1)
    lin, _ = _modules(gen)
    x = torch.randn(3, 64, generator=gen, requires_grad=True)
    with dispatch.force("lut"):
        lin(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_dispatch_rules(tmp_path, monkeypatch):
    from diffquant.kernels import tune

    # the shipped thresholds, whatever this user measured with tune-kernels
    monkeypatch.setattr(tune, "user_thresholds_path", lambda: tmp_path / "none.json")
    monkeypatch.setattr(dispatch, "_cache", {k: v for k, v in dispatch._cache.items() if k == "lut"})
    assert dispatch.flop_bound(3456, 1152, 2, 256, 8) == pytest.approx(2.51, rel=1e-3)
    assert dispatch.choose(torch.device("cpu"), 16, 16, 64, 2, 256, 8) == "reference"  # bound 0.06: dense wins
    # a high bound is not enough: a tiny layer (bound 10.7, 4096 weights) loses to per-call costs
    assert dispatch.flop_bound(64, 64, 1, 2, 16) > 10
    assert dispatch.choose(torch.device("cpu"), 16, 64, 64, 1, 2, 16) == "reference"
    if cpu.available():  # DiT-XL/2's fc1 at 1x8: the measured thresholds pick the lookup
        assert dispatch.choose(torch.device("cpu"), 16, 4608, 1152, 1, 256, 8) == "lut"
    with pytest.raises(ValueError, match="unknown AQ kernel"), dispatch.force("fast"):
        pass


@needs_lut
def test_lut_rejects_mismatched_input():
    gen = torch.Generator().manual_seed(2)
    cb, codes, scale = _random_aq(8, 32, 1, 4, 8, gen)
    kcb, kcodes, kscale = cpu.cpu_layout(codes, cb, scale, 4)
    with pytest.raises(RuntimeError, match="input features"):
        cpu.aq_linear(torch.randn(2, 24), kcb, kcodes, kscale, None)


_TRITON_CASES = """
import torch
from diffquant.kernels import triton_kernels as tk
from diffquant.kernels.cpu import kernel_layout
from diffquant.formats.additive import dequantize_additive
from diffquant.kernels.reference import dequant_linear
dev = torch.device(DEVICE)
g = torch.Generator().manual_seed(3)
cases = [(1, 48, 37, 2, 4, 8), (19, 45, 21, 3, 8, 9), (2, 16, 9, 1, 16, 8)] + EXTRA
for t, i, o, m, b, gs in cases:
    cb = torch.randn(m, 1 << b, gs, generator=g); s = torch.rand(o, generator=g); bias = torch.randn(o, generator=g)
    codes = torch.randint(0, 1 << b, (o, i // gs, m), generator=g)
    x = torch.randn(t, i, generator=g)
    r = dequant_linear(x, cb, codes, s, bias)
    kcb, kcodes, ks = (v.to(dev) for v in kernel_layout(codes, cb, s, b))
    for vec in (False, True) if gs & (gs - 1) == 0 else (False,):
        w = tk.aq_dequantize(kcb, kcodes, ks, vec=vec).cpu()
        assert (w - dequantize_additive(codes, cb, s)).abs().max() <= 1e-6 * w.abs().max()
        for path in ("gemv", "dequant", "matmul"):
            for blocks in BLOCKS:
                y = tk.aq_linear(x.to(dev), kcb, kcodes, ks, bias.to(dev), path=path, vec=vec, **blocks).cpu()
                err = (y - r).abs().max() / r.abs().max()
                assert err <= 1e-4, (t, i, o, m, b, gs, path, vec, blocks, float(err))
# a KAQ convolution holding codes only: the Triton rebuild of its kernel weight, then the dense conv
from torch import nn
from diffquant.formats.additive import AdditiveSpec, AdditiveWeight
from diffquant.kernels import dispatch
from diffquant.nn.layers import QuantConv2d
cb, codes, s = torch.randn(1, 256, 9, generator=g), torch.randint(0, 256, (6, 3, 1), generator=g), torch.rand(6)
conv = QuantConv2d(AdditiveWeight(codes, cb, s, (6, 3, 3, 3), AdditiveSpec(1, 8, 9)), torch.randn(6, generator=g),
                   nn.Conv2d(3, 6, 3, padding=1)).to(dev)
img = torch.randn(2, 3, 5, 7, generator=g).to(dev)
with torch.no_grad():
    ref = conv(img)
    conv.free_dense()
    with dispatch.force("triton"):
        y = conv(img)
assert (y - ref).abs().max() <= 1e-4 * ref.abs().max(), float((y - ref).abs().max())
print("ok")
"""


def _run_triton_cases(device: str, extra: str, blocks: str, interpret: bool) -> None:
    code = _TRITON_CASES.replace("DEVICE", repr(device)).replace("EXTRA", extra).replace("BLOCKS", blocks)
    env = dict(os.environ, TRITON_INTERPRET="1") if interpret else dict(os.environ)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    if "No module named" in r.stderr:
        pytest.skip(r.stderr.strip().splitlines()[-1])
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_triton_interpreter_equals_reference():
    """Every Triton path through Triton's CPU interpreter (a fresh process: the flag is read at import), on
    odd sizes, 4- to 16-bit codes (16-bit codes are stored as signed int16) and groups of 8 and 9, and a
    codes-only KAQ convolution."""
    pytest.importorskip("triton")
    _run_triton_cases("cpu", "[]", '[{"block_o": 32, "block_i": 32}]', interpret=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_gpu_equals_reference():
    """On a real GPU: autotuned and fixed blocks, batch 1 to 1000 tokens, real-model and odd widths."""
    pytest.importorskip("triton")
    extra = ("[(1, 1152, 3456, 1, 8, 8), (1000, 1152, 1152, 2, 8, 8), (257, 320, 333, 2, 8, 8),"
             " (3, 4608, 1152, 1, 8, 8)]")
    _run_triton_cases("cuda", extra, '[{"block_t": 16, "block_o": 32, "block_i": 32}]', interpret=False)
    # the autotuned blocks (every config is timed once per shape: slow, so one shape per path)
    _run_triton_cases("cuda", "[]", "[{}]", interpret=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_modules_on_gpu_take_the_triton_path():
    pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(4)
    lin, _ = _modules(gen)
    lin = lin.cuda()
    x = torch.randn(7, 64, generator=gen).cuda()
    with torch.no_grad():
        with dispatch.force("reference"):
            ref = lin(x)
        with dispatch.force("triton"):
            _close(lin(x).cpu(), ref.cpu())
            lin.free_dense()
            _close(lin(x).cpu(), ref.cpu())
        assert dispatch.choose(x.device, 1, 40, 64, 2, 256, 8, dense_cached=False) == "triton"
