"""blip2: BLIP-2 end to end."""

__version__ = "0.1.0"
