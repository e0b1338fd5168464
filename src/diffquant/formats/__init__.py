"""Weight formats as plain tensors, and the registry that save/load uses to rebuild them."""

from diffquant.formats.additive import AdditiveSpec, AdditiveWeight
from diffquant.formats.base import QuantizedWeight
from diffquant.formats.kmeans import KMeansSpec, KMeansWeight
from diffquant.formats.uniform import UniformSpec, UniformWeight

FORMATS: dict[str, type[QuantizedWeight]] = {"uniform": UniformWeight, "kmeans": KMeansWeight,
                                              "additive": AdditiveWeight}

__all__ = ["FORMATS", "AdditiveSpec", "AdditiveWeight", "KMeansSpec", "KMeansWeight", "QuantizedWeight",
           "UniformSpec", "UniformWeight"]
