"""PDF rendering behind one small interface, with two backends:

- "pymupdf" (PyMuPDF, AGPL-3.0): what the MMProLong paper used;
- "pypdfium2" (PDFium, Apache-2.0 / BSD-3-Clause).

Neither is a core dependency (`pip install megatron-mmprolong[pdf]` brings pypdfium2). "auto"
prefers PyMuPDF when installed. Both give page sizes without rendering, so the builder can plan
token counts before it renders anything.
"""

from __future__ import annotations

from typing import Protocol

from PIL import Image


class PdfError(ValueError):
    """A PDF that cannot be used; the message is the reject reason."""


class PdfDocument(Protocol):
    page_count: int

    def page_size(self, index: int) -> tuple[float, float]:
        """(width, height) in points (1/72 in)."""

    def render(self, index: int, dpi: int) -> Image.Image: ...

    def text(self, index: int) -> str: ...

    def outline(self) -> list[tuple[int, str, int]]:
        """The table of contents as (level from 1, title, 1-based page); entries without a page
        are left out, and a damaged outline reads as none."""

    def close(self) -> None: ...


class _PyMuPdf:
    def __init__(self, path: str):
        import pymupdf

        try:
            self._doc = pymupdf.open(path)
        except Exception as err:  # pymupdf raises its own FileDataError, RuntimeError, ...
            raise PdfError(f"PDF {path} cannot be opened ({err})") from None
        if self._doc.needs_pass:
            raise PdfError(f"PDF {path} is password-protected")
        self.page_count = self._doc.page_count

    def page_size(self, index):
        rect = self._doc[index].rect
        return rect.width, rect.height

    def render(self, index, dpi):
        pixmap = self._doc[index].get_pixmap(dpi=dpi, alpha=False)
        return Image.frombytes("RGB", (pixmap.width, pixmap.height), pixmap.samples)

    def text(self, index):
        return self._doc[index].get_text()

    def outline(self):
        try:
            entries = self._doc.get_toc(simple=True)
        except Exception:  # a damaged outline is no outline
            return []
        return [(level, title, page) for level, title, page in entries if page >= 1]

    def close(self):
        self._doc.close()


class _Pdfium:
    def __init__(self, path: str):
        import pypdfium2 as pdfium

        try:
            self._doc = pdfium.PdfDocument(path)
        except pdfium.PdfiumError as err:
            if "password" in str(err).lower():
                raise PdfError(f"PDF {path} is password-protected") from None
            raise PdfError(f"PDF {path} cannot be opened ({err})") from None
        self.page_count = len(self._doc)

    def page_size(self, index):
        return tuple(self._doc[index].get_size())

    def render(self, index, dpi):
        return self._doc[index].render(scale=dpi / 72).to_pil().convert("RGB")

    def text(self, index):
        return self._doc[index].get_textpage().get_text_range()

    def outline(self):
        entries = []
        try:
            for item in self._doc.get_toc():
                dest = item.get_dest()
                index = dest.get_index() if dest is not None else None
                if index is not None:
                    entries.append((item.level + 1, item.get_title(), index + 1))
        except Exception:  # a damaged or cyclic outline is no outline
            return []
        return entries

    def close(self):
        self._doc.close()


_BACKENDS = {"pymupdf": _PyMuPdf, "pypdfium2": _Pdfium}


def available_backends() -> list[str]:
    """Installed backends, without importing them (PyMuPDF takes seconds to import)."""
    import importlib.util

    return [name for name in _BACKENDS if importlib.util.find_spec(name) is not None]


def resolve_backend(name: str = "auto") -> str:
    found = available_backends()
    if name == "auto":
        if not found:
            raise PdfError("no PDF renderer installed: pip install pypdfium2 (or pymupdf)")
        return found[0]
    if name not in _BACKENDS:
        raise ValueError(f"unknown PDF backend {name!r}; choose pymupdf, pypdfium2 or auto")
    if name not in found:
        raise PdfError(f"PDF backend {name} is not installed (pip install {name})")
    return name


def open_pdf(path: str, backend: str = "auto") -> PdfDocument:
    """Open for rendering; PdfError for missing, empty, truncated, encrypted or page-less files."""
    import os

    if not os.path.isfile(path):
        raise PdfError(f"PDF {path} does not exist")
    if os.path.getsize(path) == 0:
        raise PdfError(f"PDF {path} is empty (0 bytes)")
    doc = _BACKENDS[resolve_backend(backend)](path)
    if doc.page_count == 0:
        doc.close()
        raise PdfError(f"PDF {path} has no pages")
    return doc
