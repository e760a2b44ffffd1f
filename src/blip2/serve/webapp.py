"""The "chat with your image" web app (Gradio Blocks), mounted at ``/`` of the API server. It calls the same engine
as the API (no second model): upload or paste an image, chat with streamed replies, caption it, ask a suggested
question, start again with a new image; a search tab when a search index is loaded. One column on a phone, two on a
laptop.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import os
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the app never calls home

import gradio as gr  # noqa: E402
from PIL import Image  # noqa: E402

from blip2.infer.decoding import GenerationOptions  # noqa: E402
from blip2.serve.engine import Delta, Engine, Failed, QueueFull  # noqa: E402
from blip2.serve.media import MediaError, decode  # noqa: E402
from blip2.serve.prompts import Message  # noqa: E402

SUGGESTIONS = ["What is in this picture?", "What colours do you see?", "How many objects are there?"]
CAPTION_TOKENS = 30
CSS = """
.suggestions button { font-size: 0.85rem; }
footer { display: none !important; }
"""


def build_blocks(engine: Engine, settings, index=None) -> gr.Blocks:
    """The app's Blocks; ``settings`` is the server's (image limits, model name)."""

    async def picture(path: str | None):
        if not path:
            raise gr.Error("Upload or paste an image first.")
        try:
            return await asyncio.to_thread(decode, Path(path).read_bytes(), "the image", settings.media)
        except MediaError as error:
            raise gr.Error(str(error))

    async def stream(messages: list[Message], prompt_format: str, options: GenerationOptions):
        """Text so far, growing as the reply streams."""
        try:
            handle = engine.submit(engine.prompt(messages, prompt_format), options)
        except QueueFull as error:
            raise gr.Error(f"The server is busy: try again in {error.retry_after} s.")
        except ValueError as error:
            raise gr.Error(str(error))
        text = ""
        try:
            async for event in handle.aevents():
                if isinstance(event, Delta):
                    text += event.text
                    yield text
                elif isinstance(event, Failed):
                    raise gr.Error(str(event.error))
        finally:
            handle.cancel()  # the page closed or Stop was pressed: free the row

    async def respond(text: str, history: list[dict], image_path: str | None, max_tokens: int, temperature: float,
                      prompt_format: str):  # fmt: skip
        text = (text or "").strip()
        if not text:
            yield gr.skip(), gr.skip()
            return
        image = await picture(image_path)
        messages = [Message(m["role"], _text(m["content"])) for m in history] + [Message("user", text)]
        messages[0] = Message("user", messages[0].text, (image,))
        history = history + [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]
        yield "", history
        options = GenerationOptions(max_new_tokens=int(max_tokens), do_sample=temperature > 0,
                                    temperature=temperature if temperature > 0 else 1.0)  # fmt: skip
        async for reply in stream(messages, prompt_format, options):
            history[-1] = {"role": "assistant", "content": reply}
            yield "", history

    async def caption(image_path: str | None):
        image = await picture(image_path)
        yield "…"
        async for text in stream([Message("user", "", (image,))], "vqa", GenerationOptions(CAPTION_TOKENS)):
            yield text

    with gr.Blocks(title=f"blip2 · {settings.model_name}") as blocks:
        gr.Markdown(f"### Chat with your image\nModel `{settings.model_name}`: upload or paste a picture, then ask.")
        with gr.Tab("Chat"):
            with gr.Row(equal_height=False):
                with gr.Column(scale=2, min_width=300):
                    image = gr.Image(type="filepath", sources=["upload", "clipboard"], label="Image", height=300,
                                     elem_id="image")  # fmt: skip
                    with gr.Row():
                        caption_button = gr.Button("Caption", elem_id="caption", size="sm")
                        new_button = gr.Button("New image", elem_id="new-image", size="sm")
                    caption_text = gr.Textbox(label="Caption", interactive=False, elem_id="caption-text", lines=2)
                with gr.Column(scale=3, min_width=300):
                    chatbot = gr.Chatbot(label="Conversation", height=380, elem_id="chatbot", buttons=["copy"],
                                         placeholder="Upload an image, then ask about it.")  # fmt: skip
                    box = gr.Textbox(placeholder="Ask about the image…", show_label=False, elem_id="question",
                                     submit_btn="Send", stop_btn="Stop", autofocus=True)  # fmt: skip
                    with gr.Row(elem_classes="suggestions"):
                        suggestions = [gr.Button(text, size="sm", variant="secondary") for text in SUGGESTIONS]
                    with gr.Accordion("Settings", open=False):
                        max_tokens = gr.Slider(1, 256, value=64, step=1, label="Max tokens")
                        temperature = gr.Slider(0, 2, value=0, step=0.05, label="Temperature (0: greedy)")
                        prompt_format = gr.Radio(["chat", "vqa"], value="chat", label="Prompt format",
                                                 info="chat: the LLM's chat template; vqa: BLIP-2's Question/Answer")
        settings_inputs = [image, max_tokens, temperature, prompt_format]
        asked = box.submit(respond, [box, chatbot, *settings_inputs], [box, chatbot], api_name="chat",
                           concurrency_limit=None)  # fmt: skip
        box.stop(None, None, None, cancels=[asked])
        for button in suggestions:
            button.click(respond, [gr.State(button.value), chatbot, *settings_inputs], [box, chatbot],
                         api_name=False, concurrency_limit=None)  # fmt: skip
        caption_button.click(caption, [image], [caption_text], api_name="caption", concurrency_limit=None)
        image.upload(lambda: ([], ""), None, [chatbot, caption_text], api_name=False)
        new_button.click(lambda: (None, [], "", ""), None, [image, chatbot, caption_text, box], api_name="new_image")
        if index is not None:
            _search_tab(engine, index)
    return blocks


def _text(content) -> str:
    """A chatbot message's text: Gradio hands messages back with their content as a list of parts."""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def _search_tab(engine: Engine, index) -> None:
    def found(text: str, k: int) -> list[tuple[Image.Image, str]]:
        hits = index.search(text, k=int(k))
        return [(Image.open(io.BytesIO(index.thumbnail(hit.image_id))), f"{hit.rank}. {Path(hit.path).name} "
                 f"({hit.score:.3f})") for hit in hits]  # fmt: skip

    async def search(text: str, k: int):
        if not (text or "").strip():
            raise gr.Error("Type what to look for.")
        try:
            return await asyncio.wrap_future(engine.call(lambda: found(text.strip(), k)))
        except ValueError as error:
            raise gr.Error(str(error))

    with gr.Tab("Search"):
        query = gr.Textbox(label="Find images by text", submit_btn="Search", elem_id="search-query")
        k = gr.Slider(1, 48, value=8, step=1, label="Results")
        gallery = gr.Gallery(label="Best matches", columns=4, height="auto", elem_id="search-results")
        query.submit(search, [query, k], [gallery], api_name="search", concurrency_limit=None)


def mount_app(app, engine: Engine, settings, index=None):
    """Mount the app at ``/`` of the FastAPI ``app`` (with an API key, the app asks for it as the password)."""
    blocks = build_blocks(engine, settings, index)
    blocks.queue(default_concurrency_limit=None)
    key = settings.api_key
    auth = (lambda _user, password: hmac.compare_digest(password, key)) if key else None
    return gr.mount_gradio_app(app, blocks, path="/", auth=auth, css=CSS, footer_links=[],
                               auth_message="Sign in with any user name and the server's API key as password.")
