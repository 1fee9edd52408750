"""The profiler's user-facing error: what `vllm-alloc profile` prints without a traceback."""

from __future__ import annotations


class ProfileError(ValueError):
    """A problem the user can fix (model, arguments); printed without a traceback."""
