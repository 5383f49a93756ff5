"""A gate in front of Gradio's upload route: uploads are capped in size and in total.

Gradio stores whatever is posted to `/gradio_api/upload` in its cache, before any event
and without a session: the browser and gradio_client send neither a session id nor a
cookie with an upload (Gradio 6.31), so an upload cannot be tied to a session, and a
refusal by session would also refuse every API user's control image. What Gradio offers
is a per-file cap (`launch(max_file_size=...)`) and expiry (`gr.Blocks(delete_cache=...)`).
This middleware adds what those leave open, before a byte is written:

- a multipart request must say its size (`Content-Length`): one request may carry at most
  one file of the cap (Gradio's cap is per file, and one request may hold 1000 files);
- no upload is taken while Gradio's cache holds more than its budget (it drains as
  `delete_cache` expires files), so a flood fills a bounded folder, not the disk.

Plain ASGI, so it sits under Gradio's own middleware through `launch(app_kwargs=...)`.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from pipelines.errors import megabytes
from pipelines.storage import folder_bytes

# Room for the multipart boundaries and part headers around one file.
MULTIPART_OVERHEAD = 64 * 1024


class UploadGuard:
    def __init__(
        self,
        app,
        *,
        cache_dir: Path,
        max_file_bytes: int,
        max_cache_bytes: int,
        recount_s: float = 5.0,
    ):
        self.app = app
        self.cache_dir = Path(cache_dir)
        self.max_file_bytes = max_file_bytes
        self.max_cache_bytes = max_cache_bytes
        self.recount_s = recount_s
        self._counted = 0  # the cache's bytes at the last count, plus uploads let in since
        self._counted_at = float("-inf")
        self._lock = asyncio.Lock()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        is_upload = scope["path"].rstrip("/").endswith("/upload")
        if not is_upload and not headers.get(b"content-type", b"").startswith(b"multipart/"):
            return await self.app(scope, receive, send)
        refusal = await self._refusal(headers.get(b"content-length"), is_upload)
        if refusal is not None:
            status, message = refusal
            return await _respond(send, status, message)
        return await self.app(scope, receive, send)

    async def _refusal(self, length_header: bytes | None, is_upload: bool):
        """(status, message) if the request must be refused, else None."""
        try:
            length = int(length_header) if length_header is not None else None
        except ValueError:
            length = None
        if length is None or length < 0:
            return 411, "an upload must state its size (Content-Length)"
        if length > self.max_file_bytes + MULTIPART_OVERHEAD:
            return 413, (
                f"the upload is {megabytes(length)}; one file of at most"
                f" {megabytes(self.max_file_bytes)} may be sent at a time"
            )
        if not is_upload:
            return None
        async with self._lock:
            now = time.monotonic()
            if now - self._counted_at > self.recount_s:
                self._counted = await asyncio.to_thread(folder_bytes, self.cache_dir)
                self._counted_at = now
            if self._counted + length > self.max_cache_bytes:
                return 507, (
                    "the server's upload space is full (uploads expire after a while);"
                    " try again in a few minutes"
                )
            self._counted += length
        return None


async def _respond(send, status: int, message: str) -> None:
    body = message.encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
