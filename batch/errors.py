"""Errors a batch raises on purpose: the run stops, says why, and keeps what it recorded.
Not `filter.errors.FilterError`: they are about inputs, the manifest and the run, not
the filter's judgement (the CLI reports both the same way, exit 2)."""

from __future__ import annotations


class BatchError(Exception):
    """A batch run cannot go on; the message names the input, the OUT folder or the cause."""


class BatchInputError(BatchError):
    """An input the run cannot list: named, with the problem (exit 2, nothing processed)."""


class ManifestError(BatchError):
    """OUT's manifest is unreadable, from another facegate, or made under other rules."""
