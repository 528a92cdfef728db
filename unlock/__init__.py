"""UNLOCK: extract a capability direction from a source model and carry it into a target model."""

__version__ = "0.1.0"
