"""CAM methods by the names CAM_VERSION takes. A new method is one module with a BaseCAM (or GradientCAM) subclass
and one entry here."""
from .attention import AttentionMap
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
    GScoreCAM, ScoreCAM, GradCAM, GradCAMPlusPlus, XGradCAM, HiResCAM, LayerCAM, EigenCAM, AttentionMap)}
# the methods that explain a score of the model's outputs: every model kind but a generative VLM, whose maps are its
# attention
SCORE_METHODS = {name: method for name, method in CAM_METHODS.items() if method is not AttentionMap}

__all__ = ["AttentionMap", "BaseCAM", "GradientCAM", "GridMap", "CAM_METHODS", "SCORE_METHODS", "EigenCAM", "GradCAM",
           "GradCAMPlusPlus", "GScoreCAM", "HiResCAM", "LayerCAM", "ScoreCAM", "XGradCAM"]
