"""CAM methods by the names CAM_VERSION takes. A new method is one module with a BaseCAM (or GradientCAM) subclass
and one entry here."""
from .base import BaseCAM, GradientCAM, GridMap
from .eigencam import EigenCAM
from .gradcam import GradCAM
from .gradcampp import GradCAMPlusPlus
from .gscorecam import GScoreCAM
from .hirescam import HiResCAM
from .layercam import LayerCAM
from .scorecam import ScoreCAM
from .xgradcam import XGradCAM

CAM_METHODS: dict[str, type[BaseCAM]] = {method.name: method for method in (
    GScoreCAM, ScoreCAM, GradCAM, GradCAMPlusPlus, XGradCAM, HiResCAM, LayerCAM, EigenCAM)}

__all__ = ["BaseCAM", "GradientCAM", "GridMap", "CAM_METHODS", "EigenCAM", "GradCAM", "GradCAMPlusPlus", "GScoreCAM",
           "HiResCAM", "LayerCAM", "ScoreCAM", "XGradCAM"]
