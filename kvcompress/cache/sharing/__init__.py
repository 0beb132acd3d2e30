"""Cross-layer sharing: which layers own storage (CLA-style groups, MiniCache-style merging)."""
