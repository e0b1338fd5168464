"""Qua²SeDiMo: per-layer quantization options, random mixed configurations labelled by quality,
the denoiser as a graph, a GNN that predicts a configuration's quality, and the explanations and
mixed-precision recipes derived from it. One module per step: space, sample, graph, predictor,
explain."""
