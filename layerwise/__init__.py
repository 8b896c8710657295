"""layerwise: greedy layerwise training of CNNs (Belilovsky, Eickenberg, Oyallon, ICML 2019)."""

from layerwise._version import __version__

__all__ = ["__version__", "config_for", "fit"]


def __getattr__(name: str):
    if name in ("config_for", "fit"):  # loaded on first use: `import layerwise` stays light
        from layerwise import api

        return getattr(api, name)
    raise AttributeError(f"module 'layerwise' has no attribute {name!r}")
