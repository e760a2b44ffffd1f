"""Why chat trails VQA on a model whose Q-Former reads the question (llm.prompt_to_qformer).

Four evaluations of one model, nothing trained: VQA as trained (the Q-Former reads "Question: ... Answer:"),
VQA with the Q-Former reading no text (as chat and captions are encoded), chat as ChatSession holds it (the
image encoded once with no text), and chat with each turn's visual prompt encoded from that turn's question
(the whole conversation recomputed each turn, the Q-Former reading "Question: {q} Answer:").
usage: chat_probe.py MODEL DATA_ROOT LIMIT OUT.json (docs/training.md, "Why chat trails VQA, measured")
"""
import json
import sys

import torch

import blip2
from blip2.data.feature_cache import FeatureCache
from blip2.eval.run_chat import evaluate_chat
from blip2.eval.run_vqa import evaluate_vqa_task
from blip2.infer.chat import ChatSession
from blip2.pipeline import Blip2Pipeline

model, root, limit, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
torch.manual_seed(0)
pipe = blip2.load(model)
assert pipe.cfg.llm.prompt_to_qformer
features = FeatureCache(f"{root}/features")
reads_question = Blip2Pipeline.qformer_prompt_ids
results = {}


def summary(metrics):
    keep = {k: metrics[k] for k in ("overall", "per_question_type", "per_turn") if k in metrics}
    return keep


for split in ("test", "compositional"):
    results[f"vqa_{split}"] = summary(evaluate_vqa_task(pipe, f"{root}/{split}", limit=limit, features=features,
                                                        progress=False)["metrics"])
    Blip2Pipeline.qformer_prompt_ids = lambda self, prompts: self.tokenize_text([""] * len(prompts))
    results[f"vqa_no_text_{split}"] = summary(evaluate_vqa_task(pipe, f"{root}/{split}", limit=limit,
                                                                features=features, progress=False)["metrics"])
    Blip2Pipeline.qformer_prompt_ids = reads_question
    results[f"chat_{split}"] = summary(evaluate_chat(pipe, f"{root}/{split}", limit=limit // 3, progress=False)["metrics"])

    start, encode = ChatSession._start_turn, ChatSession._encode_image

    def start_turn(self, text, gen, streaming):
        self.cache, self._visual, self._question = False, None, text.strip()
        return start(self, text, gen, streaming)

    def encode_for_question(self):
        model = self.pipe.model
        feats = model.image_features(self.pipe.pixel_values([self.image]))  # [1, N, D]
        question = getattr(self, "_question", None)
        prompt = "" if question is None else f"Question: {question} Answer:"
        return model.soft_prompt(feats, *self.pipe.qformer_prompt_ids([prompt]))[0]

    ChatSession._start_turn, ChatSession._encode_image = start_turn, encode_for_question
    results[f"chat_per_turn_{split}"] = summary(evaluate_chat(pipe, f"{root}/{split}", limit=limit // 3,
                                                              progress=False)["metrics"])
    ChatSession._start_turn, ChatSession._encode_image = start, encode
    print(split, {k: v.get("overall") for k, v in results.items()}, flush=True)

json.dump(results, open(out, "w"), indent=1)
