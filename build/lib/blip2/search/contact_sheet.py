"""A contact sheet of search results: one self-contained HTML file (thumbnails inline as base64 JPEG)."""

from __future__ import annotations

import base64
import html
from collections.abc import Callable, Sequence
from pathlib import Path

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; background: #fafafa; }
h1 { font-size: 20px; margin: 0 0 4px; } p.meta { color: #666; margin: 0 0 16px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(200px, 1fr)); gap: 14px; }
figure { margin: 0; background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 8px; }
figure img { width: 100%; height: 184px; object-fit: contain; background: #eee; border-radius: 4px; }
figcaption { margin-top: 6px; font-size: 12px; word-break: break-all; }
.score { font-weight: 600; font-size: 13px; } .rank { color: #888; } .caption { color: #444; font-style: italic; }
.missing { display: flex; align-items: center; justify-content: center; height: 184px; background: #eee; color: #a00; }
"""


def write_contact_sheet(path: str | Path, title: str, subtitle: str, hits: Sequence, thumbnail: Callable[[int], bytes]) -> Path:
    """Write ``hits`` (``Hit`` objects, best first) as a grid of thumbnails with rank, scores, path and caption.

    ``thumbnail(image_id)`` returns JPEG bytes; an image that cannot be read any more is shown as missing.
    """
    cards = []
    for hit in hits:
        try:
            picture = f'<img alt="" src="data:image/jpeg;base64,{base64.b64encode(thumbnail(hit.image_id)).decode()}">'
        except (OSError, ValueError) as error:
            picture = f'<div class="missing">unreadable: {html.escape(str(error))}</div>'
        scores = f"score {hit.score:.4f}"
        if hit.itm is not None:
            scores += f" = ITM {hit.itm:.3f} + ITC {hit.itc:.4f}"
        caption = f'<br><span class="caption">{html.escape(hit.caption)}</span>' if hit.caption else ""
        duplicates = f"<br>+{len(hit.duplicates)} duplicate(s)" if hit.duplicates else ""
        cards.append(
            f'<figure>{picture}<figcaption><span class="rank">#{hit.rank}</span> <span class="score">{scores}</span>'
            f'<br><span title="{html.escape(hit.path)}">{html.escape(Path(hit.path).name)}</span>{caption}'
            f"{duplicates}</figcaption></figure>"
        )
    page = (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{STYLE}</style>'
        f'</head><body><h1>{html.escape(title)}</h1><p class="meta">{html.escape(subtitle)}</p>'
        f'<div class="grid">{"".join(cards)}</div></body></html>\n'
    )
    out = Path(path)
    out.write_text(page, encoding="utf-8")
    return out
