"""Model folders with random weights, built offline, in the same format as a fetched model.

`biomedclip` is BiomedCLIP's exact architecture (timm ViT-B/16 trunk, BERT-base text tower with an MLP projection,
context 256) with a generated WordPiece vocabulary; `tiny` is a small open_clip ViT and `tiny-resnet` a small
open_clip ModifiedResNet (a CNN, 4 x 4 grid at layer4), both with open_clip's own text transformer and tokenizer, for
fast tests; the classifiers (CLASSIFIER_ARCHS) are one per library (timm, torchvision, torchxrayvision) and a six-zone
score model; the detectors (DETECTOR_ARCHS) one per torchvision family and the project's tiny FCOS; the generative VLMs
(`llava`, `llava-next`, `gemma3`) are in tiny_vlm.py. The same seed writes the same bytes.
"""
from __future__ import annotations

import json
import string
from pathlib import Path

import torch

from ..config import CLASSIFIER_CONFIG, DETECTOR_CONFIG
from ..synthetic import CHEST_ZONES
from .base import save_weights

BIOMEDCLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
BIOMEDCLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BERT_VOCAB_SIZE = 30522

ARCHS = {
    "biomedclip": {
        "model_cfg": {
            "embed_dim": 512,
            "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False,
                           "timm_pool": "", "timm_proj": "linear", "image_size": 224},
            "text_cfg": {"hf_model_name": "text", "hf_tokenizer_name": "text", "hf_proj_type": "mlp",
                         "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 256},
        },
        "preprocess_cfg": {"mean": list(BIOMEDCLIP_MEAN), "std": list(BIOMEDCLIP_STD)},
    },
    "tiny": {
        "model_cfg": {
            "embed_dim": 64,
            "vision_cfg": {"image_size": 96, "patch_size": 16, "width": 64, "layers": 2, "head_width": 32},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
        },
        "preprocess_cfg": {"mean": list(BIOMEDCLIP_MEAN), "std": list(BIOMEDCLIP_STD)},
    },
    "tiny-resnet": {
        "model_cfg": {
            "embed_dim": 64,
            "vision_cfg": {"image_size": 128, "layers": [1, 1, 1, 1], "width": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
        },
        "preprocess_cfg": {"mean": list(BIOMEDCLIP_MEAN), "std": list(BIOMEDCLIP_STD)},
    },
}

# Classifier folders (classifier_config.json, see models/classifier.py): one per library, and a six-zone score model
# ([batch, zones, 4 severity classes]) as the zone-score convention has it.
CLASSIFIER_ARCHS = {
    "timm-resnet": {"model": "timm:resnet10t", "model_kwargs": {"num_classes": 14}},
    "timm-vit": {"model": "timm:vit_tiny_patch16_224", "model_kwargs": {"num_classes": 14}},
    "torchvision-densenet": {"model": "torchvision:densenet121", "model_kwargs": {"num_classes": 14}},
    "xrv-densenet": {"model": "xrv:densenet121-res224-all"},
    "zone-resnet": {"model": "timm:resnet10t", "model_kwargs": {"num_classes": 24}, "output_shape": [6, 4],
                    "target_names": list(CHEST_ZONES)},
}

# Detector folders (detector_config.json, see models/detector.py): torchvision's detector families, and this project's
# tiny FCOS with the synthetic films' three lesions.
DETECTOR_ARCHS = {
    "fcos": {"model": "torchvision-det:fcos_resnet50_fpn", "model_kwargs": {"num_classes": 91}},
    "retinanet": {"model": "torchvision-det:retinanet_resnet50_fpn", "model_kwargs": {"num_classes": 91}},
    "fasterrcnn": {"model": "torchvision-det:fasterrcnn_mobilenet_v3_large_fpn", "model_kwargs": {"num_classes": 91}},
    "ssdlite": {"model": "torchvision-det:ssdlite320_mobilenet_v3_large", "model_kwargs": {"num_classes": 91}},
    "tiny-fcos": {"model": "torchvision-det:tiny_fcos", "model_kwargs": {"num_classes": 3},
                  "target_names": ["nodule", "opacity", "effusion"]},
    "yolo": {"model": "yolo:yolov8n.yaml", "model_kwargs": {"nc": 3}, "target_names": ["nodule", "opacity", "effusion"]},
}

# BiomedBERT's text config (BERT-base, uncased).
BERT_CONFIG = {
    "architectures": ["BertForMaskedLM"], "model_type": "bert", "vocab_size": BERT_VOCAB_SIZE, "hidden_size": 768,
    "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 512,
    "type_vocab_size": 2, "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": 0,
}

_WORDS = """the of and in a is there evidence this cxr chest film image x ray left right upper lower middle lung lungs
zone lobe base apex bilateral cardiac region heart cardiomegaly nodule mass opacity opacities pneumonia pneumothorax
effusion pleural atelectasis infiltrate consolidation edema emphysema fibrosis hernia thickening trachea spine svc
hemidiaphragm diaphragm mediastinum rib ribs clavicle costophrenic angle hilar hilum size severity location finding
abnormality disease no yes normal small large mild moderate severe with without where what which seen present""".split()


def wordpiece_vocab() -> list[str]:
    """A BERT-style uncased vocabulary of exactly 30522 entries with the special tokens at BERT's indices."""
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = string.ascii_lowercase + string.digits + string.punctuation
    vocab += list(chars) + ["##" + c for c in chars]
    vocab += [w for w in dict.fromkeys(_WORDS) if w not in vocab]
    vocab += [f"[unused{i}]" for i in range(99, 99 + BERT_VOCAB_SIZE - len(vocab))]
    assert len(vocab) == BERT_VOCAB_SIZE
    return vocab


def _write_text_tower(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(BERT_CONFIG, indent=2) + "\n")
    (folder / "vocab.txt").write_text("\n".join(wordpiece_vocab()) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512}, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
         "mask_token": "[MASK]"}, indent=2) + "\n")


def _made_by(arch: str, seed: int) -> str:
    return f"attention-map make-test-model --arch {arch} --seed {seed}"


def _make_classifier(folder: Path, arch: str, seed: int) -> Path:
    """A classifier or detector folder: its config and random weights (`model.safetensors`, also usable as
    MODEL_WEIGHTS)."""
    from . import classifier, detector

    detects = arch in DETECTOR_ARCHS
    config = dict((DETECTOR_ARCHS if detects else CLASSIFIER_ARCHS)[arch], weights="model.safetensors")
    torch.manual_seed(seed)
    # built empty (weights given), as for loading a weights file: the random init is the model
    build = detector.build if detects else classifier.build
    module = build(config["model"], config["model"], folder / config["weights"], config.get("model_kwargs", {}))[0]
    save_weights(module, folder / config["weights"], _made_by(arch, seed))
    (folder / (DETECTOR_CONFIG if detects else CLASSIFIER_CONFIG)).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def make_test_model(folder: Path, arch: str = "tiny", seed: int = 0) -> Path:
    """Write a model folder with random weights of `arch` into `folder`; return the folder."""
    import open_clip

    from .open_clip_model import go_offline

    from .tiny_vlm import TINY_VLM_ARCHS, make_tiny_vlm

    known = [*ARCHS, *CLASSIFIER_ARCHS, *DETECTOR_ARCHS, *TINY_VLM_ARCHS]
    if arch not in known:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(known)}")
    go_offline()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if arch in TINY_VLM_ARCHS:
        return make_tiny_vlm(folder, arch, seed)
    if arch in CLASSIFIER_ARCHS or arch in DETECTOR_ARCHS:
        return _make_classifier(folder, arch, seed)
    config = json.loads(json.dumps(ARCHS[arch]))
    if arch == "biomedclip":
        _write_text_tower(folder / "text")
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    model_cfg = json.loads(json.dumps(config["model_cfg"]))
    if "hf_model_name" in model_cfg["text_cfg"]:
        for key in ("hf_model_name", "hf_tokenizer_name"):
            model_cfg["text_cfg"][key] = str((folder / "text").resolve())
        model_cfg["text_cfg"]["hf_model_pretrained"] = False
        model_cfg["custom_text"] = True
    torch.manual_seed(seed)
    model_class = open_clip.CustomTextCLIP if model_cfg.pop("custom_text", False) else open_clip.CLIP
    model = model_class(**model_cfg)
    save_weights(model, folder / "open_clip_model.safetensors", _made_by(arch, seed))
    return folder
