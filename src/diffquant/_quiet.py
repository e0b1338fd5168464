"""Silences import-time warnings of optional third-party integrations that say nothing about
diffquant's work: diffusers imports torchao when it is installed (the peers extra), and torchao then
reports its CUDA-only extensions missing on a CPU machine, on every command."""

from __future__ import annotations

import logging

for _name in ("torchao", "torch.utils._pytree", "diffusers.quantizers"):
    logging.getLogger(_name).setLevel(logging.ERROR)
