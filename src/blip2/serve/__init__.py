"""Serving a model: one engine (continuous batching, image and prefix caches) behind an OpenAI-compatible HTTP API
and a web app (``blip2 serve``; docs/serving.md).

    engine.py   the scheduler and batched decode; prompts.py (rendered by blip2.data.conversation), replies.py,
                caches.py and kv.py are its parts
    http.py     FastAPI: /v1/chat/completions, /v1/models, /v1/embeddings, /v1/search, /health, /metrics
    protocol.py the OpenAI request and response shapes; media.py: image URLs and their limits
    webapp.py   the Gradio app at /

    from blip2.infer.decoding import GenerationOptions
    from blip2.serve.engine import Engine
    from blip2.serve.prompts import Message, UserImage
    engine = Engine(blip2.load("default"))  # a Blip2Pipeline
    image = UserImage.from_bytes(open("cat.png", "rb").read(), max_pixels=50_000_000)
    handle = engine.submit(engine.prompt([Message("user", "What is this?", (image,))]), GenerationOptions())
    engine.start()                      # or engine.step() until not engine.busy
    print(handle.result().text)
"""
