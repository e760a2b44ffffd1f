"""BLIP-2's re-rank of a text query's top K images: ITM "match" logit + ITC, as evaluation scores it
(``blip2.eval.retrieval.rerank_topk``, here in the text-to-image direction only)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from blip2.eval.retrieval_metrics import rerank_topk
from blip2.search import model_api


class Reranker:
    """Scores (image, text) pairs with the ITM head; keeps the frozen encoder's features of the last
    ``cache_size`` images, so re-ranking many queries over one collection encodes each image once."""

    def __init__(self, model: Any, read_image: Callable[[int], Image.Image], batch_size: int = 32,
                 cache_size: int = 1024):
        self.model, self.read_image, self.batch_size, self.cache_size = model, read_image, batch_size, cache_size
        self.cache: OrderedDict[int, torch.Tensor] = OrderedDict()

    def features(self, image_ids: list[int]) -> torch.Tensor:
        """Frozen features of the images [P, N, D] (computed once per image while cached)."""
        missing = list(dict.fromkeys(i for i in image_ids if i not in self.cache))
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start:start + self.batch_size]
            for image_id, features in zip(chunk, model_api.image_features(self.model, [self.read_image(i) for i in chunk])):
                self.cache[image_id] = features
        for image_id in image_ids:
            self.cache.move_to_end(image_id)
        stacked = torch.stack([self.cache[i] for i in image_ids])
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return stacked

    def scores(self, text: str, image_ids: np.ndarray, itc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ITM + ITC for each image (``image_ids`` [K], ``itc`` [K] their ITC scores) -> (ITM + ITC [K], ITM [K])."""
        itm = np.zeros(len(image_ids))

        def itm_scores(image_rows: torch.Tensor, _text_rows: torch.Tensor) -> torch.Tensor:
            rows = image_rows.tolist()
            logits = model_api.itm_match_logits(self.model, self.features([int(image_ids[r]) for r in rows]), text)
            itm[rows] = logits.numpy()
            return logits

        itc_matrix = torch.as_tensor(itc, dtype=torch.float32)[:, None]  # [K, 1]: one text, all K re-scored
        _, t2i = rerank_topk(itc_matrix, itm_scores, k=len(image_ids), batch_size=self.batch_size)  # [1, K]
        return t2i[0].double().numpy(), itm
