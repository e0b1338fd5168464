"""FP's own noise: how far a metric moves when only the sampling noise changes.

"Within noise of FP" needs a noise level. FP sampled at k seeds (same labels, other noise) gives each
metric a mean and a standard deviation s; the band is the 95% prediction interval of one further FP
run, mean +- t(0.975, k-1) * s * sqrt(1 + 1/k). With few seeds s is itself uncertain and the t factor
widens the band accordingly (k=2: +-15.6 s; k=5: +-3.0 s), so two seeds that happen to agree do not
make a band narrower than the noise. A quantized model sampled from seed 0's noise is within noise on
a metric when it falls inside that band: FP rerun with other noise could have scored it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from scipy.stats import t as student_t

# the protocol's metrics against the real data (FID-to-FP, PSNR, SSIM are against FP itself)
NOISE_METRICS = ("fid", "sfid", "is", "precision", "recall", "class_accuracy")


@dataclass(frozen=True)
class SeedBand:
    """One metric of FP over k seeds."""

    n_seeds: int
    mean: float
    std: float
    lo: float  # the smallest value seen
    hi: float  # the largest value seen
    level: float = 0.95

    @property
    def half_width(self) -> float:
        """Half-width of the prediction interval of one further FP run."""
        k = self.n_seeds
        return float(student_t.ppf((1 + self.level) / 2, k - 1)) * self.std * math.sqrt(1 + 1 / k)

    def judge(self, value: float) -> dict:
        """Where `value` sits: z (FP standard deviations from FP's mean), inside the prediction
        band, and inside the range of FP values actually seen."""
        d = value - self.mean
        z = d / self.std if self.std > 0 else (0.0 if d == 0 else math.copysign(math.inf, d))
        return {"value": value, "z": z, "within_band": abs(d) <= self.half_width,
                "within_range": self.lo <= value <= self.hi}

    def to_dict(self) -> dict:
        return {**asdict(self), "band": [self.mean - self.half_width, self.mean + self.half_width]}


def seed_band(values: list[float], level: float = 0.95, min_std: float = 0.0) -> SeedBand:
    """The band of one metric from its values at several FP seeds (at least 2). `min_std` is a
    spread known from theory that the seeds can only confirm, not shrink: class accuracy over n
    samples moves by at least the binomial sqrt(p(1-p)/n), even when two seeds happen to tie."""
    if len(values) < 2:
        raise ValueError(f"a noise band needs FP at 2 or more seeds, got {len(values)}: run "
                         "`benchmarks/quality.py --methods fp --seed S` for more seeds")
    mean = sum(values) / len(values)
    std = max(min_std, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)))
    return SeedBand(len(values), mean, std, min(values), max(values), level)
