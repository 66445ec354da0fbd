"""PDF work off the event loop: planning documents and rendering the pages of requests.

PDFium and MuPDF are not thread-safe, and rendering a segment's pages at 144 DPI takes about as
long as a served 72B model takes to answer, so the work runs in `workers` processes (each with its
own PDF library); with 0 it runs in this process, one call at a time. Pages are rendered at `dpi`
and sized and encoded as build-data stores them, so the generator sees the pixels the model is
trained on.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
from concurrent.futures import ProcessPoolExecutor

from megatron_mmprolong.data.images import ImageParams, prepare_image
from megatron_mmprolong.data.pdf import PdfError, open_pdf


def render_pages(pdf: str, pages: list[int], dpi: int, image: ImageParams, backend: str) -> list[bytes]:
    """Encoded images of `pages` (1-based), or PdfError naming the page that failed."""
    doc = open_pdf(pdf, backend)
    try:
        encoded = []
        for number in pages:
            try:
                encoded.append(prepare_image(doc.render(number - 1, dpi), image)[0])
            except Exception as err:  # renderer-specific failures on damaged pages, or ImageError
                raise PdfError(f"page {number} of {pdf} cannot be rendered ({err})") from None
        return encoded
    finally:
        doc.close()


class PdfWorkers:
    def __init__(self, workers: int):
        self._pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) if workers > 0 else None
        self._lock = threading.Lock()

    def call(self, fn, *args):
        """`fn(*args)` in a worker (blocking the calling thread only)."""
        if self._pool is not None:
            return self._pool.submit(fn, *args).result()
        with self._lock:
            return fn(*args)

    def map(self, fn, *iterables):
        if self._pool is not None:
            return self._pool.map(fn, *iterables, chunksize=4)
        return map(fn, *iterables)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)

    def __enter__(self) -> "PdfWorkers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
