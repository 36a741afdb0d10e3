"""Model families. One file per family, each importing only torch (see docs/architecture.md).

Every family module exposes, per part it provides, a dataclass config and a builder:
``build(part, config) -> nn.Module`` and ``convert_state_dict(part, sd, config) -> sd`` (the one place
where upstream key layouts are renamed), plus ``CONFIGS``: part -> config dataclass.
"""
