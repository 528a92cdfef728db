"""UNLOCK: extract a capability direction from a source model and carry it into a target model."""

from unlock._version import __version__
from unlock.artifacts import ArtifactError, Capability, TargetInfo
from unlock.validation import Limits

__all__ = ["ArtifactError", "Capability", "Limits", "TargetInfo", "__version__"]
