"""layerwise: greedy layerwise training of CNNs (Belilovsky, Eickenberg, Oyallon, ICML 2019)."""

__version__ = "0.1.0"

__all__ = ["config_for", "fit"]


def __getattr__(name: str):
    if name in __all__:  # loaded on first use: `import layerwise` stays light
        from layerwise import api

        return getattr(api, name)
    raise AttributeError(f"module 'layerwise' has no attribute {name!r}")
