"""Errors of the data side; their messages name the field or file and what would be valid."""


class DataSourceError(ValueError):
    """A source cannot be read as configured (missing file, missing text field, no documents)."""


class DataStateError(ValueError):
    """A saved data state does not fit this pipeline (other world size, corpus or format)."""
