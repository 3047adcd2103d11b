"""The model's plain-number conventions that data and training code share, with no imports.

Importing this module loads neither torch nor transformers (`model/__init__.py` is lazy too), so
the data pipeline and config checks can use it without paying for the model.
"""

# labels / targets equal to this are not predicted and not counted (PyTorch's cross-entropy default).
IGNORE_INDEX = -100


def positions_per_segment(segment_size: int, num_mem_tokens: int) -> int:
    """Backbone positions of one segment step: [read memory (m) ; tokens (S) ; write memory (m)]."""
    return segment_size + 2 * num_mem_tokens
