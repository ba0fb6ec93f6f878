"""`mm serve`: the JSON API (FastAPI's test client) and the page in a real browser (Debian's chromium driven by
playwright, pointed at the system browser), over the index of a run trained on the mini dataset."""

from __future__ import annotations

import io
import shutil
import socket
import threading
import time

import pytest

from tests.search.conftest import first_sample
from trimodal.search.server import create_app


@pytest.fixture(scope="module")
def client(searcher):
    from fastapi.testclient import TestClient

    return TestClient(create_app(*searcher))


def test_health_and_info(client, index):
    health = client.get("/api/health").json()
    assert health["status"] == "ok" and health["images"] == index[1]["images"]
    assert health["modalities"] == ["image", "text", "audio"]
    info = client.get("/api/info").json()
    assert info["recalls"]["mean_recall"] == index[1]["recalls"]["mean_recall"]
    assert info["queries"] == ["image", "text", "audio"] and info["captions"] is False


def test_a_text_search_answers_results_whose_media_are_the_shards_bytes(client, mini_shards):
    answer = client.post("/api/search", data={"text": "a green triangle", "k": "5"})
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert [r["rank"] for r in results] == [1, 2, 3, 4, 5] and answer.json()["in"] == "image"
    assert set(results[0]) == {"rank", "score", "key", "caption", "captions", "image_url", "audio_urls"}
    key, members = first_sample(mini_shards)
    image = client.get(f"/media/{key}/image")
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    assert image.content == members["jpg"]
    spoken = sorted(suffix for suffix in members if suffix.endswith(".wav"))
    audio = client.get(f"/media/{key}/audio/0")
    assert audio.status_code == 200 and audio.content == members[spoken[0]]


def test_image_and_audio_uploads_find_their_item(client, mini_shards):
    key, members = first_sample(mini_shards)
    by_image = client.post("/api/search", files={"image": ("q.jpg", members["jpg"], "image/jpeg")},
                           data={"in": "image", "k": "1"})
    assert by_image.status_code == 200, by_image.text
    assert by_image.json()["results"][0]["key"] == key and by_image.json()["results"][0]["score"] > 0.9999
    wav = next(suffix for suffix in members if suffix.endswith(".wav"))
    by_audio = client.post("/api/search", files={"audio": ("q.wav", members[wav], "audio/wav")},
                           data={"in": "audio", "k": "3"})
    assert by_audio.status_code == 200 and by_audio.json()["results"][0]["key"] == key


@pytest.mark.parametrize("request_kwargs, status, message", [
    ({"data": {"text": ""}}, 400, "empty query"),
    ({"data": {"text": "   "}}, 400, "blank"),
    ({"data": {"text": "x", "k": "0"}}, 422, "k must be between 1 and 100"),
    ({"data": {"text": "x", "k": "101"}}, 422, "k must be between 1 and 100"),
    ({"data": {"text": "x", "k": "many"}}, 422, "k must be a whole number"),
    ({"data": {"text": "x", "in": "video"}}, 422, "'in' must be one of"),
    ({"files": {"image": ("q.jpg", b"not an image at all", "image/jpeg")}}, 415, "not an image"),
    ({"files": {"audio": ("q.wav", b"RIFF....not audio", "audio/wav")}}, 415, "not audio"),
    ({"files": {"image": ("q.jpg", b"", "image/jpeg")}}, 400, "empty"),
    ({"data": {"text": "x"}, "files": {"image": ("q.jpg", b"\xff\xd8", "image/jpeg")}}, 400, "one query at a time"),
    ({"content": b'{"text": "x"}', "headers": {"content-type": "application/json"}}, 400, "malformed request"),
])
def test_bad_requests_are_4xx_with_one_line_and_the_server_keeps_serving(client, request_kwargs, status, message):
    answer = client.post("/api/search", **request_kwargs)
    assert answer.status_code == status, answer.text
    assert message in answer.json()["error"] and "\n" not in answer.json()["error"]
    assert client.get("/api/health").status_code == 200


def test_an_upload_over_the_limit_is_413(searcher):
    from fastapi.testclient import TestClient

    small = TestClient(create_app(*searcher, max_upload_bytes=1000))
    answer = small.post("/api/search", files={"image": ("big.jpg", b"\xff\xd8" + b"0" * 5000, "image/jpeg")})
    assert answer.status_code == 413 and "larger than 1,000 bytes" in answer.json()["error"]


@pytest.mark.parametrize("path", ["/media/..%2F..%2F..%2Fetc%2Fpasswd/image", "/media/../../etc/passwd",
                                  "/media/%2Fetc%2Fpasswd/image", "/media/nokey/image"])
def test_no_request_reaches_outside_the_indexed_items(client, path):
    answer = client.get(path)
    assert answer.status_code == 404
    assert b"root:" not in answer.content


def test_an_utterance_number_out_of_range_is_404(client, mini_shards):
    key, _ = first_sample(mini_shards)
    assert client.get(f"/media/{key}/audio/99").status_code == 404
    assert client.get(f"/media/{key}/audio/-1").status_code == 404


# --- the page in a real browser --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(searcher):
    """The app on 127.0.0.1 in a thread, as `mm serve` runs it."""
    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(*searcher), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on this machine (apt-get install chromium): the search page's browser test is skipped")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield browser
        browser.close()


def answered(page, count: int) -> None:
    """Wait until the page has the answer of its `count`-th search (results or an error)."""
    page.wait_for_function(f"document.querySelector('#results').dataset.answered === '{count}'")


def test_the_page_searches_by_text_image_and_speech(browser, served, mini_shards, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems = []
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.goto(served)
    page.wait_for_selector("#recalls table")
    assert "R@10" in page.inner_text("#recalls")

    page.fill("#query-text", "a red circle")
    page.fill("#k", "6")
    page.click("#search-button")
    answered(page, 1)
    page.wait_for_function("document.querySelectorAll('#results .result').length === 6")
    page.wait_for_function("[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)")
    assert page.locator("#results .result audio").count() >= 6  # each image's spoken captions
    page.screenshot(path=str(tmp_path / "search-page.png"), full_page=True)

    key, members = first_sample(mini_shards)
    (tmp_path / "query.jpg").write_bytes(members["jpg"])
    page.select_option("#search-in", "image")
    page.set_input_files("#query-image", str(tmp_path / "query.jpg"))
    page.click("#search-button")
    answered(page, 2)
    assert page.get_attribute("#results .result", "data-key") == key

    wav = next(suffix for suffix in members if suffix.endswith(".wav"))
    (tmp_path / "query.wav").write_bytes(members[wav])
    page.select_option("#search-in", "audio")
    page.set_input_files("#query-audio", str(tmp_path / "query.wav"))
    page.click("#search-button")
    answered(page, 3)
    assert page.get_attribute("#results .result", "data-key") == key

    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    page.set_input_files("#query-image", str(tmp_path / "bad.jpg"))
    page.click("#search-button")
    answered(page, 4)
    assert "not an image" in page.inner_text("#error")
    assert not problems, problems
    assert (tmp_path / "search-page.png").stat().st_size > 10_000
    page.close()
