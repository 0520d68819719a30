"""Import every growth op, so each registers its recipe replay and its entry in :data:`growth.OPS`."""

from growth import branch, deeper, kernel, skip, wider  # noqa: F401
