"""open_clip models (BiomedCLIP and friends), from the Hugging Face hub or a self-contained local folder.

A local model folder holds `open_clip_config.json`, the weights (`open_clip_model.safetensors` or
`open_clip_pytorch_model.bin`) and, for a Hugging Face text tower, a text subfolder with the BERT `config.json` and
tokenizer files; `text_cfg.hf_model_name` and `hf_tokenizer_name` name that subfolder by a path relative to the folder.
open_clip's own tokenizer may read its byte-pair merges from the folder too (`text_cfg.tokenizer_kwargs.bpe_path`,
relative to the folder; the toy model's restricted vocabulary).
"""
from __future__ import annotations

import copy
import json
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F

from .base import ModelAdapter, ModelLoadError, Targets

HUB_PREFIX = "hf-hub:"


def go_offline() -> None:
    """Make huggingface_hub and transformers read only local files from now on (no retries on a dead network)."""
    import huggingface_hub.constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    huggingface_hub.constants.HF_HUB_OFFLINE = True


def _hub_reachable(timeout: float = 4.0) -> bool:
    """Whether the hub's host answers a TCP connection within `timeout` (name lookup included)."""
    import huggingface_hub.constants

    url = urlparse(huggingface_hub.constants.ENDPOINT)
    result = []

    def probe():
        try:
            socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result)


def _hub_is_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "open_clip_config.json")
    return isinstance(found, str)


def resolve_local_config(folder: Path) -> dict:
    """The folder's open_clip config with its text-tower paths made absolute (they are relative to the folder)."""
    config = json.loads((folder / "open_clip_config.json").read_text())
    text_cfg = config.get("model_cfg", {}).get("text_cfg", {})
    for key in ("hf_model_name", "hf_tokenizer_name"):
        name = text_cfg.get(key)
        if name and not Path(name).is_absolute() and (folder / name).is_dir():
            text_cfg[key] = str((folder / name).resolve())
    merges = text_cfg.get("tokenizer_kwargs", {}).get("bpe_path")
    if merges and not Path(merges).is_absolute():
        text_cfg["tokenizer_kwargs"]["bpe_path"] = str((folder / merges).resolve())
    return config


def _create_from_folder(folder: Path, device: torch.device):
    import open_clip
    from open_clip.tokenizer import HFTokenizer

    go_offline()
    config = resolve_local_config(folder)
    model_cfg = config["model_cfg"]
    text_cfg = copy.deepcopy(model_cfg["text_cfg"])
    kwargs = {}
    if "hf_model_name" in text_cfg:
        name = text_cfg["hf_model_name"]
        if not Path(name).is_dir():
            raise ModelLoadError(f"MODEL={folder}: text tower folder {name!r} is missing; "
                                 f"re-create the folder with `attention-map fetch-model`")
        text_cfg["hf_model_pretrained"] = False  # the CLIP checkpoint holds the text weights
        kwargs["text_cfg"] = text_cfg
    model = open_clip.create_model(f"local-dir:{folder}", device=device, pretrained_image=False,
                                   pretrained_text=False, **kwargs)
    context_length = text_cfg.get("context_length", 77)
    if text_cfg.get("hf_tokenizer_name"):
        tokenizer = HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=context_length,
                                **text_cfg.get("tokenizer_kwargs", {}))
    else:
        tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}", **text_cfg.get("tokenizer_kwargs", {}))
    return model, tokenizer, config.get("preprocess_cfg", {}), model_cfg


def _create_from_hub(spec: str, device: torch.device):
    import open_clip

    repo_id = spec[len(HUB_PREFIX):]
    if _hub_is_cached(repo_id):
        go_offline()
    elif os.environ.get("HF_HUB_OFFLINE") or not _hub_reachable():
        raise ModelLoadError(
            f"MODEL={spec} is not in the local Hugging Face cache and the hub cannot be reached. "
            f"On a machine with internet run `python -m attention_map fetch-model {spec} DIR`, "
            f"copy DIR to this machine and set MODEL=DIR")
    from huggingface_hub import hf_hub_download

    model = open_clip.create_model(spec, device=device)
    tokenizer = open_clip.get_tokenizer(spec)
    hf_config = json.loads(Path(hf_hub_download(repo_id, "open_clip_config.json")).read_text())
    return model, tokenizer, hf_config.get("preprocess_cfg", {}), hf_config["model_cfg"]


class OpenCLIPModel(ModelAdapter):
    """A CLIP-like model: a map explains a prompt, scored as logit_scale * cos(image, text)."""

    def __init__(self, model: torch.nn.Module, tokenizer, preprocess_cfg: dict, model_cfg: dict, name: str):
        self.module = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        size = preprocess_cfg.get("size") or model_cfg["vision_cfg"].get("image_size", 224)
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        self.mean = tuple(preprocess_cfg.get("mean") or (0.48145466, 0.4578275, 0.40821073))
        self.std = tuple(preprocess_cfg.get("std") or (0.26862954, 0.26130258, 0.27577711))
        self.context_length = int(getattr(tokenizer, "context_length", 77))
        self._text_cache: dict[str, torch.Tensor] = {}

    def encode_image(self, pixels):
        return F.normalize(self.module.encode_image(pixels), dim=-1)

    def encode_text(self, prompts):
        tokens = self.tokenizer(list(prompts)).to(self.device)
        return F.normalize(self.module.encode_text(tokens), dim=-1)

    def forward(self, pixels):
        return self.encode_image(pixels)

    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """(Q, D) embeddings in fp32; each distinct prompt is encoded once for the whole run.

        Prompts are encoded one at a time: an embedding then does not depend on which other prompts shared its
        batch, so a resumed run reproduces an uninterrupted one bit for bit. Text is cheap next to k image forwards.
        """
        for prompt in dict.fromkeys(prompts):
            if prompt not in self._text_cache:
                with torch.inference_mode():
                    self._text_cache[prompt] = self.encode_text([prompt]).float()[0]
        return torch.stack([self._text_cache[p] for p in prompts])

    def targets(self, names, outputs):
        text = self.text_embeddings(names)
        return Targets(list(names), lambda embeddings: self.logit_scale * embeddings.float() @ text.T)

    def count_tokens(self, prompt: str) -> int:
        """Tokens the prompt takes, special tokens included, before truncation to `context_length`."""
        inner = getattr(self.tokenizer, "tokenizer", None)   # HFTokenizer wraps a transformers tokenizer
        if inner is not None:
            return len(inner(self.tokenizer.clean_fn(prompt))["input_ids"])
        return len(self.tokenizer.encode(prompt)) + 2        # open_clip BPE: start and end tokens around the text

    def check_target(self, name):
        return "" if name.strip() else "a CLIP-like model explains a prompt: give its text as the target"

    def note(self, name):
        tokens = self.count_tokens(name)
        if tokens <= self.context_length:
            return ""
        return (f"prompt truncated to the model's {self.context_length} tokens "
                f"({tokens - self.context_length} dropped)")

    @property
    def logit_scale(self) -> torch.Tensor:
        """The learned temperature, already exponentiated: score = logit_scale * cos(image, text)."""
        return self.module.logit_scale.exp()


def load(spec: str, device: torch.device) -> OpenCLIPModel:
    """An open_clip model from `hf-hub:<id>` or a local folder (optionally written `local-dir:<folder>`)."""
    if spec.startswith(HUB_PREFIX):
        model, tokenizer, preprocess_cfg, model_cfg = _create_from_hub(spec, device)
    else:
        folder = Path(spec.removeprefix("local-dir:")).expanduser()
        if not folder.is_dir():
            raise ModelLoadError(f"MODEL={spec}: no such folder (MODEL is a model folder, or an id such as hf-hub:<id> "
                                 f"or timm:<name>)")
        if not (folder / "open_clip_config.json").is_file():
            raise ModelLoadError(f"MODEL={spec}: no open_clip_config.json in that folder")
        model, tokenizer, preprocess_cfg, model_cfg = _create_from_folder(folder, device)
    return OpenCLIPModel(model, tokenizer, preprocess_cfg, model_cfg, spec)
