"""The HTTP service of a trained Dual-Head VQA model: ``dualhead serve RUN``.

- ``POST /v1/answer`` (multipart: one ``image`` file, one or more ``question`` fields): per question
  the answer, the head that gave it, its probability and the top 5;
- ``GET /healthz``: liveness, and how many questions and forward passes the batcher has run;
- ``GET /``: a web page to ask questions about an image; ``/docs`` and ``/openapi.json``: the API.

Concurrent requests are batched: one model thread answers whatever questions have queued, up to
`max_batch`, after waiting at most `batch_wait_ms` from the first one's arrival, in one forward pass
(`DualHeadVQA.answer`, the path ``dualhead predict`` takes, resizing included). Uploads are decoded
(by Pillow) on a small thread pool meanwhile, so the event loop never runs the model or a decoder, and
every torch operation runs on the model thread: torch's own threads then have the cores to
themselves, where a resize on another thread would compete with them.

Bad input gets a 4xx JSON answer ``{"detail": "..."}`` naming what is wrong: a body over the upload
limit (413), an image over the pixel limit (413, checked from the header, before decoding), a file
that is not an image of an accepted format (415), a corrupt image (422), an empty, unprintable or too
long question, or too many questions (422).
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations, which name
# closure variables.
import asyncio
import copy
import logging
import shutil
import tempfile
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, BinaryIO, Literal

from fastapi import FastAPI, File, Form, HTTPException, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from dualhead.core.runtime import autocast_context, resolve_device
from dualhead.vqa.data import DataError, load_rgb
from dualhead.vqa.data.images import MAX_PIXELS
from dualhead.vqa.data.records import UNSAFE_TEXT
from dualhead.vqa.evaluate import resolve_checkpoint
from dualhead.vqa.model import Answer, DualHeadVQA

log = logging.getLogger(__name__)

ANSWER_PATH = "/v1/answer"
TOP_K = 5
DEFAULT_MAX_BATCH = 32
DEFAULT_BATCH_WAIT_MS = 5.0
# Formats Pillow decodes that images of the supported datasets come in; the other decoders Pillow
# has (EPS, FITS, PSD, ...) are never reached by an upload.
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")
# Room for the multipart framing and the question fields beside the image, in the body limit.
FORM_OVERHEAD_BYTES = 64 * 1024
DECODE_THREADS = 2
PRECISIONS = ("fp32", "bf16")
# The web page loads nothing from elsewhere: its own inline script and style, the chosen image, the API.
PAGE_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src blob:; "
    "connect-src 'self'; base-uri 'none'; frame-ancestors 'none'"
)


@dataclass(frozen=True)
class ServeLimits:
    """What one request may hold; beyond it the service answers 4xx."""

    max_upload_bytes: int = 16 * 2**20  # the image file
    max_pixels: int = MAX_PIXELS  # the image, checked from its header before decoding
    max_questions: int = 16  # per request
    max_question_chars: int = 500  # and at most the model's `text.max_length` tokens
    # Questions of all requests waiting for the model; beyond it a request is refused with 503 and
    # Retry-After instead of queueing without bound (memory, and answers nobody waits for any more).
    max_queued: int = 512
    image_formats: tuple[str, ...] = IMAGE_FORMATS

    def __post_init__(self):
        for name in ("max_upload_bytes", "max_pixels", "max_questions", "max_question_chars", "max_queued"):
            if getattr(self, name) < 1:
                raise ValueError(f"serve limit {name} must be at least 1, got {getattr(self, name)}")
        if self.max_queued < self.max_questions:
            raise ValueError(
                f"serve limit max_queued ({self.max_queued}) must be at least max_questions "
                f"({self.max_questions}): a request of max_questions could never be served"
            )
        Image.init()
        unknown = [f for f in self.image_formats if f not in Image.OPEN]
        if unknown or not self.image_formats:
            known = ", ".join(sorted(Image.OPEN))
            raise ValueError(f"serve limit image_formats: {unknown or 'none given'}; Pillow reads {known}")

    @property
    def max_body_bytes(self) -> int:
        """The request body limit: the image, the questions (4 UTF-8 bytes a character at most) and the
        multipart framing."""
        return self.max_upload_bytes + FORM_OVERHEAD_BYTES + self.max_questions * 4 * self.max_question_chars


# -- response bodies (they document the API in /openapi.json) ------------------------------------


class RankedAnswer(BaseModel):
    answer: str
    probability: float


class QuestionAnswer(BaseModel):
    question: str
    answer: str
    head: Literal["binary", "open", "single"]  # binary: the yes/no head; open: the open-ended head
    probability: float
    top: list[RankedAnswer]  # the answering head's best answers, most probable first


class AnswerResponse(BaseModel):
    answers: list[QuestionAnswer]  # in the order of the questions


class ErrorResponse(BaseModel):
    detail: str


class Health(BaseModel):
    status: Literal["ok"]
    device: str
    max_batch: int
    batch_wait_ms: float
    questions: int  # answered since start
    batches: int  # forward passes that answered them
    queued: int  # questions waiting for the model now
    max_queued: int  # beyond it requests get 503


ERRORS = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in (
        (413, "the upload or the image is over a limit"),
        (415, "the file is not an image of an accepted format"),
        (422, "a corrupt image; an empty, unprintable or too long question; too many questions"),
        (503, "the model is not running (the server is starting or stopping), or too many questions are queued"),
    )
}


# -- batching -------------------------------------------------------------------------------------


class Overloaded(RuntimeError):
    """More questions are waiting for the model than the batcher's `max_queued`."""


@dataclass
class _Pending:
    image: Image.Image
    question: str
    future: asyncio.Future
    arrived: float  # the event loop's clock


class QuestionBatcher:
    """Gathers the questions of concurrent requests into batches answered on one model thread.

    A batch starts with the oldest waiting question and takes every question queued up to `max_batch`,
    waiting at most `wait_s` after that first one arrived for more (``max_batch=1``: no batching).
    A request whose questions would bring the waiting ones over `max_queued` is refused whole
    (`Overloaded`), so that a burst cannot grow the queue without bound.
    """

    def __init__(
        self,
        answer_batch: Callable[[list[Image.Image], list[str]], list[Answer]],
        max_batch: int,
        wait_s: float,
        max_queued: int | None = None,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if wait_s < 0:
            raise ValueError(f"the batch wait must not be negative, got {wait_s * 1000} ms")
        self.answer_batch = answer_batch
        self.max_batch = max_batch
        self.wait_s = wait_s
        if max_queued is not None and max_queued < 1:
            raise ValueError(f"max_queued must be at least 1, got {max_queued}")
        self.max_queued = max_queued
        self.questions = 0
        self.batches = 0
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def running(self) -> bool:
        return self._worker is not None and not self._worker.done()

    @property
    def queued(self) -> int:
        """Questions waiting for a batch (not those being answered)."""
        return self._queue.qsize() if self._queue is not None else 0

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="dualhead-model")
        self._worker = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._executor.shutdown(wait=True)
            self._worker = self._queue = self._executor = None

    async def answer(self, image: Image.Image, questions: list[str]) -> list[Answer]:
        """The answers to `questions` about `image`, once a batch holding them has run."""
        if not self.running:
            raise RuntimeError("the batcher is not running: start() it in the event loop first")
        if self.max_queued is not None and self.queued + len(questions) > self.max_queued:
            raise Overloaded(
                f"{self.queued} questions are waiting for the model and this request adds {len(questions)}; "
                f"the limit is {self.max_queued} (max_queued): retry shortly"
            )
        loop = asyncio.get_running_loop()
        pending = [_Pending(image, question, loop.create_future(), loop.time()) for question in questions]
        for item in pending:
            self._queue.put_nowait(item)
        return list(await asyncio.gather(*(item.future for item in pending)))

    async def _next_batch(self) -> list[_Pending]:
        batch = [await self._queue.get()]
        if self.max_batch > 1:
            try:
                async with asyncio.timeout_at(batch[0].arrived + self.wait_s):
                    while len(batch) < self.max_batch:
                        batch.append(await self._queue.get())
            except TimeoutError:
                while len(batch) < self.max_batch and not self._queue.empty():
                    batch.append(self._queue.get_nowait())
        return [item for item in batch if not item.future.done()]  # a client gone: its futures are cancelled

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            try:
                answers = await loop.run_in_executor(
                    self._executor,
                    self.answer_batch,
                    [item.image for item in batch],
                    [item.question for item in batch],
                )
            except Exception as error:  # the requests of this batch fail; the service goes on
                log.exception("a batch of %d questions failed", len(batch))
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(error)
                continue
            self.batches += 1
            self.questions += len(batch)
            for item, answer in zip(batch, answers, strict=True):
                if not item.future.done():
                    item.future.set_result(answer)


# -- input checks ---------------------------------------------------------------------------------


class BodySizeLimit:
    """Refuses a request body over `max_bytes` on `paths` with a JSON 413: at once when its
    Content-Length says so, otherwise as soon as the bytes read pass the limit (chunked uploads)."""

    def __init__(self, app: ASGIApp, max_bytes: int, paths: frozenset[str]):
        self.app = app
        self.max_bytes = max_bytes
        self.paths = paths

    def _message(self, size: str) -> str:
        return (
            f"the request body is {size} bytes, over the limit of {self.max_bytes:,} "
            "(an image of at most max_upload_bytes, and the questions)"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            refusal = JSONResponse({"detail": self._message(f"{int(declared):,}")}, status_code=413)
            await refusal(scope, receive, send)
            return
        received = 0

        async def receive_within_limit():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:  # FastAPI passes an HTTPException from the body reader on
                    raise HTTPException(413, self._message(f"more than {self.max_bytes:,}"))
            return message

        await self.app(scope, receive_within_limit, send)


class QuestionChecker:
    """Refuses empty, unprintable, too long and too many questions, with messages that say which."""

    def __init__(self, limits: ServeLimits, tokenizer, max_tokens: int):
        self.limits = limits
        # A copy for the event loop's thread: a Hugging Face tokenizer must not be used by two threads.
        self.tokenizer = copy.deepcopy(tokenizer)
        self.max_tokens = max_tokens

    def __call__(self, questions: list[str]) -> list[str]:
        """The questions, stripped; an HTTP 422 naming the first bad one."""
        most = self.limits.max_questions
        if len(questions) > most:
            raise HTTPException(
                422, f"{len(questions)} questions in one request; the limit is {most} (max_questions)"
            )
        return [
            self._check(question.strip(), f"question {number}")
            for number, question in enumerate(questions, 1)
        ]

    def _check(self, question: str, where: str) -> str:
        if not question:
            raise HTTPException(422, f"{where} is empty")
        most = self.limits.max_question_chars
        if len(question) > most:
            raise HTTPException(
                422, f"{where} has {len(question)} characters, over the limit of {most} (max_question_chars)"
            )
        unsafe = UNSAFE_TEXT.search(question)
        if unsafe:
            raise HTTPException(
                422, f"{where} has U+{ord(unsafe.group()):04X}, a control character or lone surrogate"
            )
        # Special tokens included, as the encoder sees them.
        tokens, most = len(self.tokenizer(question)["input_ids"]), self.max_tokens
        if tokens > most:
            raise HTTPException(
                422, f"{where} has {tokens} tokens, over the model's {most} (model.text.max_length)"
            )
        return question


def read_upload(file: BinaryIO, filename: str, limits: ServeLimits) -> Image.Image:
    """Decode an uploaded image to RGB as the data loaders do (`load_rgb`, which needs a file).

    The format and the pixel count are read from the header first: a file that is not an image of
    `limits.image_formats` is refused (415), and so is one over `limits.max_pixels` or Pillow's own
    limit (413), before any pixel is decoded.
    """
    name = repr(filename or "upload")
    with tempfile.NamedTemporaryFile(prefix="dualhead-upload-") as spooled:
        shutil.copyfileobj(file, spooled)
        spooled.flush()
        size = spooled.tell()
        if size > limits.max_upload_bytes:
            most = limits.max_upload_bytes
            raise HTTPException(
                413, f"image {name} is {size:,} bytes, over the limit of {most:,} (max_upload_bytes)"
            )
        accepted = ", ".join(limits.image_formats)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit is checked below
                with Image.open(spooled.name, formats=limits.image_formats) as header:
                    width, height = header.size
        except Image.DecompressionBombError as error:
            raise HTTPException(413, f"image {name} is over Pillow's pixel limit: {error}") from error
        except UnidentifiedImageError as error:
            raise HTTPException(415, f"{name} is not an image in an accepted format ({accepted})") from error
        except (OSError, ValueError, SyntaxError) as error:
            raise HTTPException(422, f"cannot read image {name}: {error}") from error
        pixels = width * height
        for limit, which in (
            (limits.max_pixels, "max_pixels"),
            (Image.MAX_IMAGE_PIXELS, "Pillow's MAX_IMAGE_PIXELS"),
        ):
            if limit is not None and pixels > limit:
                size = f"{width}x{height} = {pixels:,} pixels"
                raise HTTPException(413, f"image {name} has {size}, over the limit of {limit:,} ({which})")
        try:
            return load_rgb(spooled.name, max_pixels=limits.max_pixels)
        except DataError as error:
            raise HTTPException(422, str(error).replace(spooled.name, name)) from error


# -- the application ------------------------------------------------------------------------------


def create_app(
    model_or_checkpoint: DualHeadVQA | str | Path,
    *,
    max_batch: int = DEFAULT_MAX_BATCH,
    batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS,
    limits: ServeLimits | None = None,
    device: str = "auto",
    precision: str = "fp32",
) -> FastAPI:
    """The FastAPI application serving a model, or the checkpoint at a path (a run directory means its
    best checkpoint). `max_batch` questions at most per forward pass, gathered for at most
    `batch_wait_ms` milliseconds; `precision` ``bf16`` runs the model under bf16 autocast."""
    limits = limits or ServeLimits()
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    torch_device = resolve_device(device)
    if isinstance(model_or_checkpoint, DualHeadVQA):
        model = model_or_checkpoint
    else:
        model = DualHeadVQA.from_pretrained(resolve_checkpoint(model_or_checkpoint))
    model = model.to(torch_device).eval()

    def answer_batch(images: list[Image.Image], questions: list[str]) -> list[Answer]:
        with autocast_context(torch_device, precision):
            return model.answer(images, questions, top_k=TOP_K)

    batcher = QuestionBatcher(answer_batch, max_batch, batch_wait_ms / 1000, max_queued=limits.max_queued)
    check_questions = QuestionChecker(limits, model.text.tokenizer, model.text.max_length)
    page = resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")
    decode_pool: ThreadPoolExecutor | None = None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        nonlocal decode_pool
        decode_pool = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="dualhead-decode")
        batcher.start()
        try:
            yield
        finally:
            await batcher.stop()
            decode_pool.shutdown(wait=True)

    app = FastAPI(
        title="dualhead",
        summary="Answers questions about images with a trained Dual-Head VQA model.",
        lifespan=lifespan,
    )
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes, paths=frozenset({ANSWER_PATH}))
    app.state.model = model
    app.state.batcher = batcher
    app.state.limits = limits

    @app.post(ANSWER_PATH, response_model=AnswerResponse, responses=ERRORS)
    async def answer(
        image: Annotated[UploadFile, File(description=f"the image ({', '.join(limits.image_formats)})")],
        question: Annotated[
            list[str],
            Form(
                description=f"a question about it; repeat the field for more (at most {limits.max_questions})"
            ),
        ],
    ) -> AnswerResponse:
        """Answer each question about the image: the answer, the head that gave it (binary: yes/no,
        open: open-ended), its probability and the head's top 5."""
        questions = check_questions(question)
        if decode_pool is None or not batcher.running:
            raise HTTPException(503, "the model is not running (the server is starting or stopping)")
        loop = asyncio.get_running_loop()
        picture = await loop.run_in_executor(decode_pool, read_upload, image.file, image.filename, limits)
        try:
            answers = await batcher.answer(picture, questions)
        except Overloaded as error:
            raise HTTPException(503, str(error), headers={"Retry-After": "1"}) from error
        return AnswerResponse(
            answers=[
                QuestionAnswer(
                    question=text,
                    answer=result.answer,
                    head=result.head,
                    probability=result.probability,
                    top=[RankedAnswer(answer=name, probability=p) for name, p in result.top],
                )
                for text, result in zip(questions, answers, strict=True)
            ]
        )

    @app.get("/healthz", response_model=Health)
    async def healthz() -> Health:
        """The service is up; questions answered and forward passes run since it started."""
        if not batcher.running:
            raise HTTPException(503, "the model is not running (the server is starting or stopping)")
        return Health(
            status="ok",
            device=str(torch_device),
            max_batch=batcher.max_batch,
            batch_wait_ms=batcher.wait_s * 1000,
            questions=batcher.questions,
            batches=batcher.batches,
            queued=batcher.queued,
            max_queued=limits.max_queued,
        )

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_POLICY})

    return app
