"""Linear probe: how well the asked object's position (top, bottom, left, right, center) can be read from a model's
query outputs (the Q-Former reading the question, as stage 2 reads it) and, for a stage-2 model, its visual prompt.
Fits a logistic regression on the first 3,000 training position questions and scores the first 400 test ones
(docs/training.md, "Why position is the weak type").

usage: python position_probe.py MODEL DATA_ROOT"""
import json
import sys

import torch

import blip2
from blip2.data.feature_cache import FeatureCache

model_dir, root = sys.argv[1], sys.argv[2]
pipe = blip2.load(model_dir)
model = pipe.model.eval()
cache = FeatureCache(f"{root}/features")


def rows(split: str, limit: int):
    """{"queries": [N, Q*H], "prompt": [N, V*H_llm] (stage 2)}, answers."""
    questions = [q for q in json.load(open(f"{root}/{split}/vqa.json")) if q["question_type"] == "position"][:limit]
    out = {"queries": [], "prompt": []}
    with torch.no_grad():
        for i in range(0, len(questions), 64):
            batch = questions[i : i + 64]
            features = torch.stack([cache[q["image_id"]] for q in batch]).float()  # [B, N, D]
            queries = model.joint_queries(features, *pipe.tokenize_text([q["question"] for q in batch]))  # [B, Q, H]
            out["queries"].append(queries.flatten(1))
            if model.llm is not None:
                out["prompt"].append(model.llm_proj(queries).float().flatten(1))
    return {k: torch.cat(v) for k, v in out.items() if v}, [q["answers"][0] for q in questions]


def accuracy(x_train, y_train, x_test, y_test) -> tuple[float, float]:
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    torch.manual_seed(0)
    probe = torch.nn.Linear(x_train.shape[1], 5)
    opt = torch.optim.Adam(probe.parameters(), lr=1e-3, weight_decay=1e-3)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(probe(x_train), y_train).backward()
        opt.step()
    with torch.no_grad():
        return tuple(round((probe(x).argmax(1) == y).float().mean().item(), 3)
                     for x, y in ((x_train, y_train), (x_test, y_test)))


train, train_answers = rows("train", 3000)
test, test_answers = rows("test", 400)
names = sorted(set(train_answers))
y_train, y_test = (torch.tensor([names.index(a) for a in answers]) for answers in (train_answers, test_answers))
for kind in train:
    print(model_dir, kind, "probe accuracy train / test:", accuracy(train[kind], y_train, test[kind], y_test))
