"""attention-map: class-activation maps of medical imaging models (BiomedCLIP with gScoreCAM, classifiers and
detectors with the Grad-CAM family) on chest X-rays, as a batch pipeline with a VQA manifest, and as a Python API:

    from attention_map import explain, EpochHeatmaps, Explainer
"""
__version__ = "0.1.0"
__all__ = ["explain", "EpochHeatmaps", "Explainer"]


def __getattr__(name: str):
    # imported on first use: the pipeline's worker processes import this package and must not load torch
    if name in __all__:
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'attention_map' has no attribute {name!r}")
