"""The full cache: every token, as computed. The exact baseline every strategy is measured against."""
from kvcompress.cache.layered import LayeredCache


class FullCache(LayeredCache):
    """Keeps every key (rotated) and value in the model's dtype. Logits equal one full forward pass."""

    def __init__(self) -> None:
        super().__init__(storage="dense", keys="post_rope")
