"""attention-map: gScoreCAM heatmaps of BiomedCLIP on chest X-rays, with a VQA manifest."""
__version__ = "0.1.0"
