"""The web app at / with ``gradio_client``: chat about an uploaded image (streamed, equal to a ChatSession), caption
(equal to model.caption), a new image; and the search tab over a real index."""

from __future__ import annotations

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AuthenticationError

from blip2.serve.prompts import UserImage


def text(content) -> str:
    """A chatbot message's text (Gradio 6 returns content as a list of parts)."""
    return content if isinstance(content, str) else "".join(part["text"] for part in content)


@pytest.fixture
def image_file(tmp_path, pngs):
    path = tmp_path / "photo.png"
    path.write_bytes(pngs[0])
    return path


def test_chat_caption_and_new_image(serve, image_file, request):
    server, engine = serve("llama", web_app=True)
    client = Client(server.url + "/", verbose=False)
    request.addfinalizer(client.close)
    picture = UserImage.from_bytes(image_file.read_bytes(), 10**7).image
    session = engine.pipe.chat(picture)
    history, streamed = [], []
    for question in ["what is on the mat", "is the dog red"]:
        job = client.submit(question, history, handle_file(str(image_file)), 12, 0, "chat", api_name="/chat")
        box, history = job.result()
        updates = job.outputs()  # every streamed update of (textbox, chatbot)
        assert box == "" and [m["role"] for m in history[-2:]] == ["user", "assistant"]
        question_shown, reply = (text(m["content"]) for m in history[-2:])
        assert question_shown == question
        assert reply == session.ask(question, max_new_tokens=12)
        shown = [text(update[1][-1]["content"]) for update in updates]
        assert shown[0] == "" and shown[-1] == reply and all(reply.startswith(part) for part in shown)
        streamed.append(len(shown))
    assert streamed[0] >= 3  # the question at once, then the reply as it grows
    caption = client.predict(handle_file(str(image_file)), api_name="/caption")
    assert caption == engine.pipe.caption(picture, max_new_tokens=30)[0]
    assert engine.images.misses == 1  # the image was encoded once for the chat and the caption
    cleared = client.predict(api_name="/new_image")
    assert cleared[1:] == ([], "", "")
    with pytest.raises(Exception, match="Upload or paste an image first"):
        client.predict("hi", [], None, 12, 0, "chat", api_name="/chat")


def test_with_an_api_key_the_app_asks_for_it(serve, image_file, request):
    server, engine = serve("llama", web_app=True, api_key="sesame")
    with pytest.raises(AuthenticationError, match="credentials were not provided"):
        Client(server.url + "/", verbose=False)  # the app is behind the login page
    with pytest.raises(ValueError, match="Could not login"):
        Client(server.url + "/", auth=("anyone", "wrong"), verbose=False)
    client = Client(server.url + "/", auth=("anyone", "sesame"), verbose=False)
    request.addfinalizer(client.close)
    picture = UserImage.from_bytes(image_file.read_bytes(), 10**7).image
    assert client.predict(handle_file(str(image_file)), api_name="/caption") == engine.pipe.caption(
        picture, max_new_tokens=30)[0]
