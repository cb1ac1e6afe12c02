"""The stateful neural database: documents read once into a bounded model's
fixed-size state, saved under labels, queried later without re-reading.

``NeuralDatabase`` is the Python API, ``coda-db`` (:mod:`.cli`) the command
line and ``coda-db serve`` (:mod:`.web`) the web page.
"""

from .core import NeuralDatabase
from .documents import DocumentState
from .errors import NotFoundError, RefusedError
from .library import Entry, Library
from .query import Answer
from .settings import QuerySettings, Sampling

__all__ = ["Answer", "DocumentState", "Entry", "Library", "NeuralDatabase", "NotFoundError",
           "QuerySettings", "RefusedError", "Sampling"]
