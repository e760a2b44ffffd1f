"""blip2: BLIP-2 end to end. ``blip2.load(source)`` is the entry point (see ``blip2.pipeline``)."""

__version__ = "0.1.0"
__all__ = ["Blip2Pipeline", "load", "__version__"]


def __getattr__(name: str):
    """Import the pipeline (torch, transformers) on first use, so ``import blip2.<submodule>`` stays light."""
    if name in ("Blip2Pipeline", "load"):
        from blip2 import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'blip2' has no attribute {name!r}")
