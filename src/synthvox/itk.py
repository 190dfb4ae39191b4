"""SimpleITK as the image readers and writers use it: imported only when a format needs it (else one
line saying how to install it), its exceptions as one line, its multi-line warnings silenced."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from synthvox.errors import InputError


def simpleitk(why: str):  # noqa: ANN201 - the module
    """SimpleITK, or a one-line :class:`InputError` saying how to install it."""
    try:
        import SimpleITK as sitk
    except ImportError:
        raise InputError(f"{why} needs SimpleITK: pip install 'synthvox[formats]' (or SimpleITK)") from None
    return sitk


def itk_error(exc: BaseException) -> str:
    """The useful line of an ITK exception (its text starts with the source file and line)."""
    lines = [s.strip() for s in str(exc).splitlines() if s.strip()]
    for line in lines:
        if line.lower().startswith("description:"):
            return line.split(":", 1)[1].strip()
    text = lines[-1] if lines else type(exc).__name__
    return text.removeprefix("sitk::ERROR:").strip()


@contextlib.contextmanager
def itk_quiet(sitk) -> Iterator[None]:  # noqa: ANN001 - the module
    """ITK's multi-line warnings off while reading (what matters is refused in one line instead)."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)
