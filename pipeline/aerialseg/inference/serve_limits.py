"""serve's defences against hostile or slow clients (the app itself: inference/server.py).

- ``ApiError``: an error answered as ``{"success": false, "error": {code, message}}`` with an HTTP status.
- ``too_large``: a ``core.limits`` size check as 413 IMAGE_TOO_LARGE (the CLI's rules, the API's answer).
- ``decode_checked``: uploads are opened through ``geo.raster.open_encoded``, the CLI's validated reader
  (a truncated or corrupt image is 400 INVALID_IMAGE, never pixels of garbage).
- ``read_body_within``: the body is read under a deadline (408 BODY_TIMEOUT) and a size cap (413), before the
  request takes an admission slot: a client trickling its body holds no slot.
- ``ClientSlots``: at most ``per_client`` request bodies of one client address being read at once; more get
  429, so one client cannot hold an unbounded number of slow uploads (each bounded in time and size).
- ``cancel_on_disconnect``: a client that goes away has its queued work cancelled and its running work stopped
  at the next tile (the prediction checks the event), freeing its slot.
- ``check_api_key``: a key must be non-blank printable ASCII (a header can carry nothing else), checked at start.
"""

import asyncio
import string
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import rasterio
from fastapi import Request

from aerialseg.core.errors import AerialsegError
from aerialseg.core.limits import TooLarge
from aerialseg.geo.raster import open_encoded

PRINTABLE = frozenset(string.printable) - frozenset("\t\n\r\x0b\x0c")


class ApiError(Exception):
    """An error answered as ``{"success": false, "error": {code, message}}`` with an HTTP status."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _what(exc: AerialsegError, shown: str) -> str:
    """The message of a one-line error, without the file name (the client's own image) and the fix."""
    return str(exc).split(" — fix:")[0].removeprefix(f"{shown}: ")


def too_large(check: Callable[..., None], *args: Any) -> None:
    """Run a ``core.limits`` check; TooLarge becomes 413 IMAGE_TOO_LARGE."""
    try:
        check(*args)
    except TooLarge as exc:
        raise ApiError(413, "IMAGE_TOO_LARGE", _what(exc, "image")) from None


@contextmanager
def decode_checked(raw: bytes, drivers: list[str]) -> Iterator[rasterio.DatasetReader]:
    """The upload opened with the CLI's checks; a truncated or unreadable image is 400 INVALID_IMAGE."""
    with ExitStack() as stack:
        try:
            ds = stack.enter_context(open_encoded(raw, "image", drivers))
        except AerialsegError as exc:
            raise ApiError(400, "INVALID_IMAGE", _what(exc, "image")) from None
        yield ds


async def read_body_within(request: Request, limit: int, seconds: float) -> bytes:
    """The request body: at most ``limit`` bytes (413 as soon as more is known) within ``seconds`` (408)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "BODY_TOO_LARGE", f"request body is {int(declared) / 2**20:.1f} MiB; "
                                              f"the limit is {limit / 2**20:g} MiB")

    async def collect() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "BODY_TOO_LARGE", f"request body exceeds the limit of {limit / 2**20:g} MiB")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(collect(), timeout=seconds)
    except TimeoutError:
        raise ApiError(408, "BODY_TIMEOUT", f"the request body was not received within {seconds:g} s") from None


class ClientSlots:
    """Requests per client address in one phase (body reads); ``enter`` refuses (429) one already at
    ``per_client``."""

    def __init__(self, per_client: int):
        self.per_client, self.active = per_client, Counter()
        self.lock = threading.Lock()

    def enter(self, client: str) -> None:
        with self.lock:
            if self.active[client] >= self.per_client:
                raise ApiError(429, "TOO_MANY_REQUESTS", f"{self.active[client]} uploads of this client are in "
                                                         "progress; wait for one to finish")
            self.active[client] += 1

    def leave(self, client: str) -> None:
        with self.lock:
            self.active[client] -= 1
            if self.active[client] <= 0:
                del self.active[client]


def client_of(request: Request) -> str:
    """The client's address (one slot budget per host)."""
    return request.client.host if request.client else "unknown"


async def cancel_on_disconnect(request: Request, future: asyncio.Future, cancelled: threading.Event) -> None:
    """Wait for the client to go away; then stop its work: cancel it while queued, flag it while running."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            cancelled.set()
            future.cancel()
            return


def check_api_key(key: str, source: str) -> str:
    """A usable API key: non-blank, printable ASCII without surrounding whitespace trouble (else one-line error)."""
    if not key.strip():
        raise AerialsegError("the API key is blank", source, "set a key of printable ASCII characters, or unset it")
    bad = sorted({c for c in key if c not in PRINTABLE})
    if bad:
        shown = ", ".join(f"U+{ord(c):04X}" for c in bad[:5])
        raise AerialsegError(f"the API key holds characters a 'Token' header cannot carry ({shown})", source,
                             "use printable ASCII characters only (letters, digits, punctuation)")
    return key
