"""What every weight format provides: dequantization, packed tensors to save, and bit accounting."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class QuantizedWeight(ABC):
    """A quantized weight as plain tensors. `shape` is the original weight's shape; formats work on
    the weight flattened to (out_features, in_features * kh * kw)."""

    format: str = ""
    shape: tuple[int, ...]

    @abstractmethod
    def dequantize(self) -> torch.Tensor:
        """float32, in the original shape."""

    @abstractmethod
    def packed_state(self) -> dict[str, torch.Tensor]:
        """The tensors as stored on disk (codes bit-packed)."""

    spec: object  # the format's frozen spec dataclass

    def meta(self) -> dict:
        """JSON-able description needed, with packed_state, to rebuild the weight exactly."""
        return {"format": self.format, "shape": list(self.shape), "spec": self.spec.__dict__}

    @classmethod
    @abstractmethod
    def from_packed(cls, state: dict[str, torch.Tensor], meta: dict) -> QuantizedWeight: ...

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def stored_bits(self) -> int:
        """Every bit this weight occupies: codes, scales, zero points, centroids, codebooks.

        Counted from the packed tensors' own sizes, so the accounting cannot drift from what save
        writes (codes exactly b bits each; a partial trailing byte rounds up)."""
        return sum(t.numel() * t.element_size() * 8 for t in self.packed_state().values())

    def effective_bits(self) -> float:
        return self.stored_bits() / self.numel


def flat2d(w: torch.Tensor) -> torch.Tensor:
    return w.detach().reshape(w.shape[0], -1).float()


def check_group(name: str, in_flat: int, group_size: int | None) -> int:
    """The number of groups per row, or a clear error when the group size does not divide the row."""
    if group_size is None or group_size <= 0:
        return 1
    if in_flat % group_size:
        divisors = [d for d in range(2, min(in_flat, 256) + 1) if in_flat % d == 0]
        raise ValueError(
            f"group size {group_size} does not divide layer {name or '?'}'s {in_flat} inputs per output "
            f"channel. Fix: use a divisor of {in_flat} (e.g. {divisors[-3:] if divisors else [in_flat]}), "
            "per-channel quantization (group_size 0), or exclude the layer."
        )
    return in_flat // group_size
