"""CAM methods by name. A new method is one module with a BaseCAM subclass and one entry here."""
from .base import BaseCAM, GridMap
from .gscorecam import GScoreCAM

CAM_METHODS: dict[str, type[BaseCAM]] = {GScoreCAM.name: GScoreCAM}

__all__ = ["BaseCAM", "GridMap", "GScoreCAM", "CAM_METHODS"]
