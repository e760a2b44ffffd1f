"""POST /v1/search and the app's search tab over a real index (``blip2.search.Index``) built with the served model:
the same hits as the index gives in Python; bad queries are 400s; without an index there is no search route."""

from __future__ import annotations

import httpx
import pytest
from gradio_client import Client

from blip2.search import Index


@pytest.fixture
def index(tiny_model, pngs, tmp_path):
    model = tiny_model("llama")
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, data in enumerate(pngs):
        (photos / f"photo{i}.png").write_bytes(data)
    built, _ = Index.build([str(photos)], tmp_path / "index", model, progress=False)
    built.close()
    opened = Index.open(tmp_path / "index")
    opened.use_model(model)
    return model, opened


def test_search_by_text_and_by_image(serve, index, pngs, data_url, request):
    model, opened = index
    server, engine = serve(model=model, index=opened, web_app=True)
    expected = [hit.path for hit in opened.search("a red cat", k=3)]
    with httpx.Client(base_url=server.url) as http:
        by_text = http.post("/v1/search", json={"query": "a red cat", "k": 3, "thumbnails": True}).json()["data"]
        assert [hit["path"] for hit in by_text] == expected and len(expected) == 3
        assert by_text[0]["thumbnail"].startswith("data:image/jpeg;base64,") and by_text[0]["rank"] == 1
        by_image = http.post("/v1/search", json={"image_url": {"url": data_url(pngs[1])}, "k": 1}).json()["data"]
        assert by_image[0]["path"].endswith("photo1.png")  # an image finds itself first
        for body, words in [({"k": 2}, "one of the two"), ({"query": " "}, "empty"),
                            ({"image_url": {"url": data_url(pngs[1])}, "rerank": 2}, "text queries only")]:  # fmt: skip
            response = http.post("/v1/search", json=body)
            assert response.status_code == 400 and words in response.json()["error"]["message"], body
    client = Client(server.url + "/", verbose=False)
    request.addfinalizer(client.close)
    gallery = client.predict("a red cat", 3, api_name="/search")
    assert [item["caption"].split(". ")[1].split(" (")[0] for item in gallery] == [p.split("/")[-1] for p in expected]


def test_no_index_no_search_route(serve):
    server, _ = serve("llama")
    assert httpx.post(server.url + "/v1/search", json={"query": "cat"}).status_code == 404
