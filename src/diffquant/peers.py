"""Other quantization libraries applied to the same denoisers, so the benchmark compares them side
by side (optional extras: `pip install -c constraints.txt optimum-quanto hqq torchao`).

  quanto-int{8,4,2}     optimum-quanto weights (Linear and Conv2d), quantize() then freeze()
  hqq-{8,4,3,2}         HQQ, group 64: HQQLinear for Linear layers; HQQ's own Quantizer on the
                        flattened weight of Conv2d layers (HQQ ships no conv module)
  torchao-int{8,4,3,2}  torchao IntxWeightOnlyConfig, per group of 32 (Linear layers only)

The first and last layer get the same library's 8-bit setting, as in diffquant's recipes. Effective
bits are counted from the tensors each library really stores (its tensor subclasses unpacked), so
an unpacked int8 container for 2-bit values counts as 8 bits; layers a library cannot take stay
fp32 and are listed.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from diffquant.nn.swap import io_layer_names, quantizable_layers, set_module

PEERS = [f"quanto-int{b}" for b in (8, 4, 2)] + [f"hqq-{b}" for b in (8, 4, 3, 2)] + \
        [f"torchao-int{b}" for b in (8, 4, 3, 2)]


class PeerUnavailable(RuntimeError):
    pass


def _tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of what a tensor really stores, looking through tensor subclasses."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def _module_weight_bytes(mod: nn.Module) -> int:
    if hasattr(mod, "peer_stored_bytes"):
        return mod.peer_stored_bytes
    total = 0
    for k, v in mod.state_dict(keep_vars=True).items():
        if k.split(".")[-1] != "bias" and isinstance(v, torch.Tensor):
            total += _tensor_bytes(v)
    for k, v in vars(mod).items():  # HQQ keeps scale/zero in a plain dict
        if k == "meta" and isinstance(v, dict):
            total += sum(_tensor_bytes(x) for x in v.values() if isinstance(x, torch.Tensor))
    return total


def apply_peer(model: nn.Module, name: str) -> dict:
    """Quantizes `model` in place with a peer library; returns bit accounting."""
    if name not in PEERS:
        raise KeyError(f"unknown peer {name!r}; known: {', '.join(PEERS)}")
    lib, _, b = name.partition("-")
    bits = int(b.replace("int", ""))
    layers = quantizable_layers(model)
    io = io_layer_names(model)
    numel = {k: m.weight.numel() for k, m in layers.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        done = {"quanto": _quanto, "hqq": _hqq, "torchao": _torchao}[lib](model, layers, io, bits)
    q_bytes = 0
    for k in done:
        q_bytes += _module_weight_bytes(model.get_submodule(k))
    q_weights = sum(numel[k] for k in done)
    other = sum(p.numel() * 4 for n, p in model.named_parameters() if n.rsplit(".", 1)[0] not in done)
    other += sum(model.get_submodule(k).bias.numel() * 4 for k in done
                 if getattr(model.get_submodule(k), "bias", None) is not None)
    return {"effective_bits": 8 * q_bytes / q_weights, "checkpoint_bytes": int(q_bytes + other),
            "unquantized_weight_layers": sorted(set(layers) - set(done)),
            "peer_quantized_fraction": q_weights / sum(numel.values())}


def _quanto(model, layers, io, bits) -> list[str]:
    try:
        from optimum.quanto import freeze, qint2, qint4, qint8, quantize
    except ImportError as e:
        raise PeerUnavailable("optimum-quanto is not installed (pip install -c constraints.txt optimum-quanto)") from e
    qt = {8: qint8, 4: qint4, 2: qint2}[bits]
    quantize(model, weights=qint8, include=sorted(io))
    quantize(model, weights=qt, exclude=sorted(io))
    freeze(model)
    return list(layers)


def _hqq(model, layers, io, bits) -> list[str]:
    try:
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear, Quantizer
    except ImportError as e:
        raise PeerUnavailable("hqq is not installed (pip install -c constraints.txt hqq)") from e
    done = []
    for k, m in layers.items():
        if m.weight.numel() % 64:
            continue
        cfg = BaseQuantizeConfig(nbits=8 if k in io else bits, group_size=64)
        if isinstance(m, nn.Linear):
            set_module(model, k, HQQLinear(m, cfg, compute_dtype=torch.float32, device="cpu"))
        else:  # HQQ ships no conv module: its quantizer on the flattened weight, kept dequantized
            wq, meta = Quantizer.quantize(m.weight.detach().reshape(m.weight.shape[0], -1), device="cpu",
                                          compute_dtype=torch.float32, **cfg["weight_quant_params"])
            m.weight.data = Quantizer.dequantize(wq, meta).reshape(m.weight.shape).float()
            m.peer_stored_bytes = _tensor_bytes(wq) + sum(
                _tensor_bytes(v) for v in meta.values() if isinstance(v, torch.Tensor))
        done.append(k)
    return done


def _torchao(model, layers, io, bits) -> list[str]:
    try:
        from torchao.quantization import IntxWeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerGroup
    except ImportError as e:
        raise PeerUnavailable("torchao is not installed (pip install -c constraints.txt torchao)") from e
    dtype = {8: torch.int8, 4: torch.int4, 3: torch.int3, 2: torch.int2}
    done = []
    for k, m in layers.items():
        if not isinstance(m, nn.Linear) or m.in_features % 32:
            continue
        cfg = IntxWeightOnlyConfig(weight_dtype=dtype[8 if k in io else bits], granularity=PerGroup(32))
        quantize_(m, cfg, filter_fn=lambda mod, fqn: isinstance(mod, nn.Linear))
        done.append(k)
    return done
