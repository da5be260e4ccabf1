"""Download a hub model and its text tokenizer/config into one self-contained folder for offline nodes: an open_clip
model (`hf-hub:<id>`) or a transformers VLM (`hf:<id>`, as the hub has it)."""
from __future__ import annotations

import json
from pathlib import Path

from ..config import VLM_PREFIX

WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# a VLM's config, processor, tokenizer, chat template and safetensors weights (not .bin copies of the same weights)
VLM_FILES = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"]
TEXT_FILES = ["config.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"]


def fetch_model(spec: str, folder: Path, snapshot_download=None, list_repo_files=None) -> Path:
    """Write `spec` (hf-hub:<id>) into `folder`: open_clip_config.json, the weights, and `text/` with the text
    tower's config and tokenizer, which the config then names by the relative path "text".

    `hf:<id>`: the VLM's files (VLM_FILES) as they are on the hub; `MODEL=<folder>` loads them as `hf:<id>` would.

    `snapshot_download` and `list_repo_files` default to huggingface_hub's.
    """
    if snapshot_download is None or list_repo_files is None:
        import huggingface_hub

        snapshot_download = snapshot_download or huggingface_hub.snapshot_download
        list_repo_files = list_repo_files or huggingface_hub.list_repo_files
    if spec.startswith(VLM_PREFIX):
        repo_id = spec.removeprefix(VLM_PREFIX)
        if not any(name.endswith(".safetensors") for name in list_repo_files(repo_id)):
            raise FileNotFoundError(f"{repo_id} has no .safetensors weights")
        snapshot_download(repo_id=repo_id, local_dir=str(folder), allow_patterns=VLM_FILES)
        return Path(folder)
    repo_id = spec.removeprefix("hf-hub:")
    folder = Path(folder)
    files = set(list_repo_files(repo_id))
    weights = next((name for name in WEIGHT_FILES if name in files), None)
    if "open_clip_config.json" not in files or weights is None:
        raise FileNotFoundError(f"{repo_id} has no open_clip_config.json with {' or '.join(WEIGHT_FILES)}")
    snapshot_download(repo_id=repo_id, local_dir=str(folder), allow_patterns=["open_clip_config.json", weights])
    config_path = folder / "open_clip_config.json"
    config = json.loads(config_path.read_text())
    text_cfg = config["model_cfg"]["text_cfg"]
    text_repos = {text_cfg.get("hf_model_name"), text_cfg.get("hf_tokenizer_name")} - {None, ""}
    if len(text_repos) > 1:
        raise ValueError(f"{repo_id}: text model and tokenizer come from different repositories: {text_repos}")
    if text_repos:
        snapshot_download(repo_id=text_repos.pop(), local_dir=str(folder / "text"), allow_patterns=TEXT_FILES)
        text_cfg["hf_model_name"] = text_cfg["hf_tokenizer_name"] = "text"
        config_path.write_text(json.dumps(config, indent=2) + "\n")
    return folder
