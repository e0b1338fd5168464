"""AQ products: reference (dequantize + dense), CPU lookup-table kernel (C++), Triton GPU kernel, dispatch."""

from diffquant.kernels.dispatch import IMPLS, choose, flop_bound, force

__all__ = ["IMPLS", "choose", "flop_bound", "force"]
