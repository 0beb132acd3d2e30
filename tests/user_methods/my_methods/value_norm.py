from kvcompress.cache.policy.base import EvictionPolicy


class ValueNorm(EvictionPolicy):
    """Keep the tokens whose values have the largest L2 norm (heads averaged unless per_head)."""

    captured = True  # the score reads the candidates alone: captured (graph) decode too

    def score(self, c):
        return c.values().float().norm(dim=-1)  # (B, Hkv, N)
