"""Domain errors of the identity filter. Each names what went wrong and what to do."""


class FilterError(Exception):
    """Base of every error the filter raises on purpose."""


class ImageError(FilterError):
    """An input image cannot be decoded or breaks a limit."""


class ModelError(FilterError):
    """A model file is missing, corrupt or does not match its pinned hash."""


class IdentityIndexError(FilterError):
    """The identity index is missing, corrupt or built for another embedder."""


class IndexMismatchError(IdentityIndexError):
    """The index was built with settings that differ from the ones in use."""


class IndexCorruptError(IdentityIndexError):
    """An index file is truncated, altered or unreadable."""
