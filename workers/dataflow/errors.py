"""Errors of the operator API: part of the one error tree, and ``ValueError`` where DataFlow raises one."""

from __future__ import annotations

from producer.errors import ImageQAError


class DataFlowError(ImageQAError, ValueError):
    """Raised when the operator API is used wrongly: a missing input key, an output key that exists."""

    code = "dataflow_invalid"


class StorageError(DataFlowError):
    """Raised when a step file cannot be read or written, or a storage setting is not supported."""

    code = "storage_error"


class ClusterServingError(ImageQAError):
    """Raised when a cluster job cannot finish: Redis is gone, the wait timed out, results are missing."""

    code = "cluster_error"
