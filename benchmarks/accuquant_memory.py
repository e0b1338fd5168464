"""AccuQuant calibration: peak memory and time per iteration against the group size M, exact
back-propagation through the M steps against the O(1) version, plus how close the O(1) gradient is.

Each (grad, M) runs in a fresh subprocess (peak RSS is per process): the zoo model is quantized with
RTN W4A8, one middle unit's trainable parameters are set up, and `--iters` AccuQuant iterations run
from random FP-trajectory starts (batch `--batch`, guided: two model calls' worth per step). Memory is
measured two ways: the peak of the bytes held by the autograd graph (every tensor saved for the
backward pass, counted once per storage while alive: what grows with M) and the process's peak
resident set (which also holds the model, the trajectories and what the setup left behind).
A second part compares, on the same batches, the O(1) gradient with the exact one (cosine
similarity, norm ratio) for both Jacobian stand-ins.

    python benchmarks/accuquant_memory.py --model mnist-unet --json benchmarks/results/accuquant-memory.json
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time
import weakref
from pathlib import Path

import torch


def _setup(model_name: str, batch: int):
    import diffquant as dq
    from diffquant.methods.accuquant import ReconConfig, fp_trajectories
    from diffquant.methods.recon import Trainable, unit_layers

    model, scheduler = dq.load(model_name)[:2]
    calib = dq.collect(model, scheduler, n=16, steps=20, batch_size=16, progress=False)
    q = dq.quantize_(copy.deepcopy(model), dq.get_recipe("w4a8"), calib=calib)
    for p in q.parameters():
        p.requires_grad_(False)
    traj = fp_trajectories(model, scheduler, ReconConfig(trajectories=max(batch, 16)))
    units = unit_layers(q)
    unit = list(units)[len(units) // 2]
    return q, model, scheduler, traj, Trainable(units[unit], model), unit


class GraphMeter:
    """Peak bytes of the tensors the autograd graph keeps for backward (unique storages)."""

    def __init__(self):
        self.live: dict[int, list] = {}
        self.bytes = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        entry = self.live[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.bytes -= entry[1]
            del self.live[key]

    def pack(self, t: torch.Tensor):
        key = t.untyped_storage().data_ptr()
        entry = self.live.setdefault(key, [0, t.untyped_storage().nbytes()])
        if entry[0] == 0:
            self.bytes += entry[1]
            self.peak = max(self.peak, self.bytes)
        entry[0] += 1
        box = _Box(t)
        weakref.finalize(box, self._free, key)
        return box

    @staticmethod
    def unpack(box):
        return box.t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class _Box:
    def __init__(self, t):
        self.t = t


def child(model_name: str, grad: str, m: int, iters: int, batch: int) -> dict:
    from diffquant.kernels import dispatch
    from diffquant.methods.accuquant import group_loss_and_grad, step_coefficients
    from diffquant.models import meta_of

    q, fp, scheduler, traj, tr, unit = _setup(model_name, batch)
    meta = meta_of(fp)
    coeffs = step_coefficients(scheduler, traj.timesteps, "x0")
    gen = torch.Generator().manual_seed(0)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    meter = GraphMeter()
    t0 = time.time()
    with dispatch.force("reference"), meter.hooks():
        for _ in range(iters):
            s = int(torch.randint(0, 20 - m + 1, (1,), generator=gen))
            idx = torch.randint(0, len(traj.labels), (batch,), generator=gen)
            group_loss_and_grad(q, scheduler, tr, traj.x[s][idx], traj.labels[idx], traj.x[s + m][idx],
                                traj.timesteps[s:s + m], meta.guidance_scale, meta.null_class, grad, coeffs[s:s + m])
    dt = (time.time() - t0) / iters
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"grad": grad, "M": m, "unit": unit, "batch": batch, "iters": iters, "s_per_iter": round(dt, 3),
            "graph_peak_mib": round(meter.peak / 2**20, 1),
            "peak_rss_mib": round(peak / 1024, 1), "peak_rss_above_start_mib": round((peak - base) / 1024, 1)}


def gradient_agreement(model_name: str, batch: int, starts: int) -> list[dict]:
    from diffquant.kernels import dispatch
    from diffquant.methods.accuquant import group_loss_and_grad, step_coefficients
    from diffquant.models import meta_of

    q, fp, scheduler, traj, tr, unit = _setup(model_name, batch)
    meta = meta_of(fp)
    params = tr.weight_params + tr.act_params
    rows = []
    for m in (2, 4, 8):
        for s in torch.linspace(0, 20 - m, starts).round().int().tolist():
            grads = {}
            for grad, jac in (("exact", "x0"), ("o1", "x0"), ("o1", "output")):
                for p in params:
                    p.grad = None
                co = step_coefficients(scheduler, traj.timesteps, jac)
                with dispatch.force("reference"):
                    group_loss_and_grad(q, scheduler, tr, traj.x[s][:batch], traj.labels[:batch],
                                        traj.x[s + m][:batch], traj.timesteps[s:s + m], meta.guidance_scale,
                                        meta.null_class, grad, co[s:s + m])
                grads[f"{grad}-{jac}"] = torch.cat([p.grad.reshape(-1) for p in params])
            ex = grads.pop("exact-x0")
            for k, g in grads.items():
                rows.append({"M": m, "start_step": s, "jacobian": k.split("-")[1], "unit": unit,
                             "cosine": round(float(torch.nn.functional.cosine_similarity(g, ex, dim=0)), 4),
                             "norm_ratio": round(float(g.norm() / ex.norm()), 3)})
                print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mnist-unet")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--ms", default="1,2,4,8")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", nargs=2, metavar=("GRAD", "M"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.model, args.child[0], int(args.child[1]), args.iters, args.batch)))
        return
    from diffquant.io_utils import write_json
    from diffquant.provenance import provenance

    t0, rows = time.time(), []
    for grad in ("exact", "o1"):
        for m in [int(v) for v in args.ms.split(",")]:
            out = subprocess.run([sys.executable, __file__, "--model", args.model, "--iters", str(args.iters),
                                  "--batch", str(args.batch), "--child", grad, str(m)],
                                 capture_output=True, text=True, check=True).stdout
            row = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
            rows.append(row)
            print(row, flush=True)
    agreement = gradient_agreement(args.model, min(args.batch, 8), 3)
    result = {"benchmark": "accuquant_memory", "model": args.model, "rows": rows, "gradient_agreement": agreement,
              "wall_time_s": round(time.time() - t0, 1), **provenance()}
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    else:
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
