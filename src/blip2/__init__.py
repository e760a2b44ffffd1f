"""blip2: BLIP-2 end to end. ``blip2.load(source)`` is the entry point (see ``blip2.api``)."""

__version__ = "0.1.0"
__all__ = ["build_model", "load", "__version__"]


def __getattr__(name: str):
    """Import the API (torch, transformers) on first use, so ``import blip2.<submodule>`` stays light."""
    if name in ("build_model", "load"):
        from blip2 import api

        return getattr(api, name)
    raise AttributeError(f"module 'blip2' has no attribute {name!r}")
