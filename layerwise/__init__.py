"""layerwise: greedy layerwise training of CNNs (Belilovsky, Eickenberg, Oyallon, ICML 2019)."""

__version__ = "0.1.0"
