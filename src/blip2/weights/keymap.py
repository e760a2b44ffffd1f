"""Explicit key maps with ``{}`` layer templates, shared by the converters and their tests."""

from __future__ import annotations


class KeyMapError(KeyError):
    """A checkpoint's keys or shapes do not fit the expected layout."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def expand(template: dict[str, str], num_layers: int) -> dict[str, str]:
    """Expand ``{}`` layer placeholders into one entry per layer."""
    out = {}
    for src, dst in template.items():
        if "{}" in src:
            for i in range(num_layers):
                out[src.format(i)] = dst.format(i)
        else:
            out[src] = dst
    return out
