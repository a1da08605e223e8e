"""Warnings that point at the user's line, wherever in the package they are raised.

A fixed ``stacklevel`` is right for one call path only: the same SMC warning is raised
from :func:`eki_infer.smc.run_smc` called directly and from ``EKIInference.run``, which
calls it through two more frames. :func:`warn` walks up to the first frame outside this
package instead, so that every warning names the caller's file and line.
"""

from __future__ import annotations

import os
import sys
import warnings

__all__ = ["warn"]

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` with the stack level of the first caller outside eki_infer."""
    frame, level = sys._getframe(1), 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
