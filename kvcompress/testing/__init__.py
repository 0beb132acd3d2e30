"""The contract every storage, policy and layout keeps, as a public suite: run it on your own class.

    from kvcompress.testing import check_method

    def test_my_policy():
        check_method(policy={"_target_": "my_methods.vnorm.ValueNorm", "budget": 0.5})

An axis is given as an instance (copied for every cache built), a config node (a dict or OmegaConf node with
``_target_``, instantiated fresh) or the path of its YAML; an axis left out is the identity. ``check_method``
composes the given axes with a few built-in ones (``COMPANIONS``) on a tiny random Llama and checks, per
combination (``contract``): finite logits; ``kv_bytes`` equal to the real tensors' bytes and at most the
allocation; positions never renumbered; batch rows independent; a real setting on an axis holds fewer bytes and
allocates fewer than that axis's identity; a policy whose budget no store reaches equals no policy, bit for bit;
and a captured (static-capacity) form, where the combination has one, gives the eager cache's logits. What a
method is comes from what its class declares (``EvictionPolicy.captured``, ``uneven_heads``, ``rewrites_values``;
a storage's ``values_writable``, ``pads_heads``, ``static_form``), never from its name.
"""
from kvcompress.testing.contract import (
    COMPANIONS,
    Axes,
    build,
    check_combination,
    check_method,
    check_policy_identity,
    check_static_form,
    drive,
    refusal,
    tiny_model,
    tokens,
)

__all__ = ["COMPANIONS", "Axes", "build", "check_combination", "check_method", "check_policy_identity",
           "check_static_form", "drive", "refusal", "tiny_model", "tokens"]
