"""The HTTP service: answers as `predict` gives them, batching of concurrent requests, every limit a
clear 4xx, and a server that keeps answering after bad requests."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image
from torch import nn

from dualhead.cli import main
from dualhead.deploy.serve import Overloaded, QuestionBatcher, ServeLimits, create_app
from dualhead.vqa.data import AnswerVocab
from dualhead.vqa.model import Answer, DualHeadVQA
from tests.conftest import draw_shape, tiny_model_config

OPEN_ANSWERS = ["red", "green", "blue", "circle", "square"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("serve") / "run" / "best"
    DualHeadVQA(tiny_model_config(), AnswerVocab(OPEN_ANSWERS)).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "red_circle.png"
    draw_shape(path, "circle", "red", size=48)
    return path


def png_bytes(size=(40, 30), mode="RGB", image_format="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, image_format)
    return buffer.getvalue()


def noise_png_cut_short() -> bytes:
    """A PNG whose header is fine and whose pixel data stops half way."""
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 64).save(buffer, "PNG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


def ask(client, image: bytes, questions, name="image.png"):
    return client.post(
        "/v1/answer", files={"image": (name, image, "image/png")}, data={"question": questions}
    )


def route_everything_to(model: DualHeadVQA, head: str) -> None:
    """Make the router send every question to `head` (its logits are [open, binary])."""
    last = [module for module in model.router.modules() if isinstance(module, nn.Linear)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.0, 20.0] if head == "binary" else [20.0, 0.0]))


def count_forward_passes(model: DualHeadVQA) -> list[int]:
    """Patch `model` to record the number of questions of each forward pass."""
    sizes, forward = [], model.forward

    def counting(*args, **kwargs):
        output = forward(*args, **kwargs)
        sizes.append(output.open_logits.shape[0])
        return output

    model.forward = counting
    return sizes


def test_answers_are_the_ones_predict_gives_in_the_documented_format(checkpoint, image_file):
    questions = ["what color is the shape?", "is there a circle?"]
    with TestClient(create_app(checkpoint.parent)) as client:  # a run directory: its best checkpoint
        response = ask(client, image_file.read_bytes(), questions)
    assert response.status_code == 200, response.text
    answers = response.json()["answers"]
    expected = DualHeadVQA.from_pretrained(checkpoint).answer([image_file] * 2, questions)
    assert [a["question"] for a in answers] == questions
    for got, want in zip(answers, expected, strict=True):
        assert (got["answer"], got["head"]) == (want.answer, want.head)
        assert got["probability"] == pytest.approx(want.probability, abs=1e-5)
        assert [t["answer"] for t in got["top"]] == [name for name, _ in want.top]
        probabilities = [t["probability"] for t in got["top"]]
        assert (
            probabilities == sorted(probabilities, reverse=True) and got["top"][0]["answer"] == got["answer"]
        )
        assert 0 < got["probability"] <= 1 and len(got["top"]) == min(5, len(want.top))


def test_the_router_decides_which_head_answers(checkpoint, image_file):
    app = create_app(checkpoint)
    with TestClient(app) as client:
        route_everything_to(app.state.model, "binary")
        binary = ask(client, image_file.read_bytes(), ["what color is the shape?"]).json()["answers"][0]
        route_everything_to(app.state.model, "open")
        open_ = ask(client, image_file.read_bytes(), ["is there a circle?"]).json()["answers"][0]
    assert binary["head"] == "binary" and binary["answer"] in ("yes", "no") and len(binary["top"]) == 2
    assert open_["head"] == "open" and open_["answer"] in OPEN_ANSWERS and len(open_["top"]) == 5


def test_concurrent_requests_are_answered_in_shared_forward_passes(checkpoint, image_file):
    app = create_app(checkpoint, max_batch=8, batch_wait_ms=500)
    sizes = count_forward_passes(app.state.model)
    with TestClient(app) as client, ThreadPoolExecutor(6) as pool:
        responses = list(
            pool.map(lambda i: ask(client, image_file.read_bytes(), [f"is there a circle {i}?"]), range(6))
        )
        health = client.get("/healthz").json()
    assert [r.status_code for r in responses] == [200] * 6
    assert sum(sizes) == 6 and len(sizes) < 6 and max(sizes) > 1, sizes
    assert (health["questions"], health["batches"], health["max_batch"]) == (6, len(sizes), 8)


def test_max_batch_1_answers_one_question_per_forward_pass(checkpoint, image_file):
    app = create_app(checkpoint, max_batch=1, batch_wait_ms=500)
    sizes = count_forward_passes(app.state.model)
    with TestClient(app) as client, ThreadPoolExecutor(3) as pool:
        responses = list(
            pool.map(lambda i: ask(client, image_file.read_bytes(), ["is it red?", "what shape?"]), range(3))
        )
    assert [r.status_code for r in responses] == [200] * 3
    assert sizes == [1] * 6


def test_batcher_takes_at_most_max_batch_questions_and_keeps_their_order():
    seen = []

    def answer_batch(images, questions):
        seen.append(list(questions))
        return [Answer(answer=q, head="open", probability=1.0, top=[(q, 1.0)]) for q in questions]

    async def scenario():
        batcher = QuestionBatcher(answer_batch, max_batch=4, wait_s=0.05)
        batcher.start()
        try:
            return await asyncio.gather(*(batcher.answer(None, [f"q{i}a", f"q{i}b"]) for i in range(5)))
        finally:
            await batcher.stop()

    results = asyncio.run(scenario())
    assert [[a.answer for a in answers] for answers in results] == [[f"q{i}a", f"q{i}b"] for i in range(5)]
    assert [len(batch) for batch in seen] == [4, 4, 2]


def test_batcher_refuses_a_request_that_would_queue_more_than_max_queued():
    release = threading.Event()

    def answer_batch(images, questions):
        release.wait(5)  # the model is busy: what arrives meanwhile queues
        return [Answer(answer=q, head="open", probability=1.0, top=[(q, 1.0)]) for q in questions]

    async def scenario():
        batcher = QuestionBatcher(answer_batch, max_batch=1, wait_s=0, max_queued=3)
        batcher.start()
        try:
            first = asyncio.ensure_future(batcher.answer(None, ["a"]))
            await asyncio.sleep(0.05)  # "a" is being answered, nothing waits
            second = asyncio.ensure_future(batcher.answer(None, ["b", "c"]))
            await asyncio.sleep(0.05)
            with pytest.raises(Overloaded, match="2 questions are waiting .* adds 2; the limit is 3"):
                await batcher.answer(None, ["d", "e"])  # whole request refused, none of it queued
            assert batcher.queued == 2
            third = asyncio.ensure_future(batcher.answer(None, ["f"]))  # fits: 3 waiting
            await asyncio.sleep(0.05)
            release.set()
            return [[a.answer for a in answers] for answers in await asyncio.gather(first, second, third)]
        finally:
            release.set()
            await batcher.stop()

    assert asyncio.run(scenario()) == [["a"], ["b", "c"], ["f"]]
    with pytest.raises(ValueError, match="max_queued"):
        QuestionBatcher(answer_batch, max_batch=1, wait_s=0, max_queued=0)


def test_an_overloaded_server_answers_503_with_retry_after(checkpoint, image_file, monkeypatch):
    app = create_app(checkpoint, max_batch=2, batch_wait_ms=0, limits=ServeLimits(max_questions=2, max_queued=2))
    answer, busy, release = app.state.model.answer, threading.Event(), threading.Event()

    def slow_answer(*args, **kwargs):
        busy.set()
        release.wait(10)
        return answer(*args, **kwargs)

    monkeypatch.setattr(app.state.model, "answer", slow_answer)
    two = ["is it red?", "is it blue?"]
    with TestClient(app) as client, ThreadPoolExecutor(2) as pool:
        first = pool.submit(ask, client, image_file.read_bytes(), two)  # being answered
        assert busy.wait(10)
        second = pool.submit(ask, client, image_file.read_bytes(), two)  # waits: the queue is full
        deadline = time.monotonic() + 10
        while client.get("/healthz").json()["queued"] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        refused = ask(client, image_file.read_bytes(), ["is it round?"])
        release.set()
        served = [first.result(), second.result()]
        health = client.get("/healthz").json()
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "2 questions are waiting" in refused.json()["detail"] and "(max_queued)" in refused.json()["detail"]
    assert [r.status_code for r in served] == [200, 200]
    assert (health["queued"], health["max_queued"], health["questions"]) == (0, 2, 4)
    with pytest.raises(ValueError, match="max_queued .* at least max_questions"):
        ServeLimits(max_questions=4, max_queued=3)  # a full request could never be served


@pytest.fixture(scope="module")
def limited_client(checkpoint):
    limits = ServeLimits(max_upload_bytes=50_000, max_questions=16, max_question_chars=100)
    with TestClient(create_app(checkpoint, limits=limits, batch_wait_ms=1)) as client:
        yield client


def _chunks(data: bytes, boundary: str):
    yield f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n\r\n'.encode()
    for start in range(0, len(data), 16_384):
        yield data[start : start + 16_384]
    yield f"\r\n--{boundary}--\r\n".encode()


BAD_REQUESTS = {
    "body over the limit": (
        dict(files={"image": ("big.png", b"\0" * 400_000)}, data={"question": ["q"]}),
        413,
        "request body",
    ),
    "image file over the limit": (
        dict(files={"image": ("big.png", b"\0" * 50_001)}, data={"question": ["q"]}),
        413,
        "max_upload_bytes",
    ),
    "chunked body over the limit": (
        dict(
            content=_chunks(b"\0" * 400_000, "xyz"),
            headers={"content-type": "multipart/form-data; boundary=xyz"},
        ),
        413,
        "request body",
    ),
    "decompression bomb": (
        dict(files={"image": ("bomb.png", png_bytes((10_000, 10_000), "1"))}, data={"question": ["q"]}),
        413,
        "pixels, over the limit",
    ),
    "not an image": (
        dict(files={"image": ("notes.txt", b"just some text")}, data={"question": ["q"]}),
        415,
        "not an image",
    ),
    "unsupported format": (
        dict(files={"image": ("x.ppm", png_bytes(image_format="PPM"))}, data={"question": ["q"]}),
        415,
        "accepted format",
    ),
    "corrupt image": (
        dict(files={"image": ("cut.png", noise_png_cut_short())}, data={"question": ["q"]}),
        422,
        "cannot",
    ),
    "empty question": (
        dict(files={"image": ("a.png", png_bytes())}, data={"question": ["is it red?", "  "]}),
        422,
        "question 2 is empty",
    ),
    "100 questions": (
        dict(files={"image": ("a.png", png_bytes())}, data={"question": ["is it red?"] * 100}),
        422,
        "100 questions",
    ),
    "question too long": (
        dict(files={"image": ("a.png", png_bytes())}, data={"question": ["why " * 30]}),
        422,
        "characters",
    ),
    "question over max_length tokens": (
        dict(files={"image": ("a.png", png_bytes())}, data={"question": ["red " * 20]}),
        422,
        "tokens",
    ),
    "control character": (
        dict(files={"image": ("a.png", png_bytes())}, data={"question": ["is it\x00 red?"]}),
        422,
        "U+0000",
    ),
    "no question": (dict(files={"image": ("a.png", png_bytes())}), 422, "question"),
    "no image": (dict(data={"question": ["is it red?"]}), 422, "image"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_a_clear_4xx_json_answer_and_the_server_goes_on(limited_client, image_file, case):
    request, status, message = BAD_REQUESTS[case]
    response = limited_client.post("/v1/answer", **request)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert message in str(response.json()["detail"])
    good = ask(limited_client, image_file.read_bytes(), ["is there a circle?"])
    assert good.status_code == 200 and good.json()["answers"][0]["answer"] in ("yes", "no", *OPEN_ANSWERS)


def test_a_failing_batch_fails_its_requests_only(checkpoint, image_file, monkeypatch):
    app = create_app(checkpoint)
    answer = app.state.model.answer
    calls = []

    def fails_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return answer(*args, **kwargs)

    monkeypatch.setattr(app.state.model, "answer", fails_once)
    with TestClient(app, raise_server_exceptions=False) as client:
        assert ask(client, image_file.read_bytes(), ["is it red?"]).status_code == 500
        assert ask(client, image_file.read_bytes(), ["is it red?"]).status_code == 200


def test_health_openapi_docs_and_the_web_page(checkpoint):
    with TestClient(create_app(checkpoint)) as client:
        health = client.get("/healthz")
        schema = client.get("/openapi.json").json()
        docs = client.get("/docs")
        page = client.get("/")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    operation = schema["paths"]["/v1/answer"]["post"]
    assert "multipart/form-data" in operation["requestBody"]["content"]
    assert {"200", "413", "415", "422"} <= set(operation["responses"]) and "/healthz" in schema["paths"]
    assert docs.status_code == 200 and "openapi.json" in docs.text
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="question"' in page.text and 'fetch("v1/answer"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN: it works offline
    assert "default-src 'none'" in page.headers["content-security-policy"]


def test_without_its_model_thread_the_service_says_it_is_not_ready(checkpoint, image_file):
    client = TestClient(create_app(checkpoint))  # not entered: the lifespan that starts the model never ran
    assert client.get("/healthz").status_code == 503
    response = ask(client, image_file.read_bytes(), ["is it red?"])
    assert response.status_code == 503 and "not running" in response.json()["detail"]


def test_limits_are_checked_when_the_app_is_built(checkpoint):
    with pytest.raises(ValueError, match="max_questions"):
        ServeLimits(max_questions=0)
    with pytest.raises(ValueError, match="image_formats"):
        ServeLimits(image_formats=("NOPE",))
    with pytest.raises(ValueError, match="max_batch"):
        create_app(checkpoint, max_batch=0)


def test_serve_command_runs_uvicorn_with_the_options(checkpoint, monkeypatch):
    import uvicorn

    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: started.update(app=app, **options))
    result = CliRunner().invoke(
        main,
        [
            "serve",
            str(checkpoint.parent),
            "--port",
            "8123",
            "--max-batch",
            "1",
            "--batch-wait-ms",
            "2",
            "--max-questions",
            "3",
            "--max-upload-mb",
            "1",
            "--max-queued",
            "64",
        ],
    )
    assert result.exit_code == 0, result.output
    app = started["app"]
    assert (started["host"], started["port"]) == ("127.0.0.1", 8123)
    assert (app.state.batcher.max_batch, app.state.batcher.wait_s) == (1, 0.002)
    assert (app.state.limits.max_questions, app.state.limits.max_upload_bytes) == (3, 2**20)
    assert app.state.batcher.max_queued == app.state.limits.max_queued == 64


def test_serve_command_names_a_missing_checkpoint(tmp_path):
    result = CliRunner().invoke(main, ["serve", str(tmp_path)])
    assert result.exit_code != 0 and "neither a saved model" in result.output
