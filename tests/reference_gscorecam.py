"""A plain per-prompt gScoreCAM written from the reference steps, independent of the package's engine.

It follows the reference literally: one (image, prompt) at a time, fp32, masked images in batches of 64 with the
text re-encoded in each batch, softmax over all channels, ReLU, normalise, cv2 bilinear resize, clip, normalise.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F


def reference_gscorecam(model, pixels, prompt, topk, size, batch_size=64, layer_path=None, times=None):
    """The final map (H, W) in [0, 1] for one prompt; `model` is an OpenCLIPModel, `size` = (width, height).

    `times`: an attention_map.timing.StageTimes to charge the gradient pass and the masked forwards to."""
    import contextlib

    def stage(name):
        return times(name) if times is not None else contextlib.nullcontext()

    net, tokens = model.module, model.tokenizer([prompt]).to(pixels.device)
    layer = model.find_module(layer_path or model.default_target_layer())
    store = {}
    handle = layer.register_forward_hook(lambda module, args, output: store.__setitem__("a", output))
    try:
        with torch.enable_grad(), stage("gradient pass"):
            x = pixels.detach().clone().requires_grad_(True)
            image = F.normalize(net.encode_image(x), dim=-1)
            text = F.normalize(net.encode_text(tokens), dim=-1)
            score = net.logit_scale.exp() * (image * text).sum()
            gradient = torch.autograd.grad(score, store["a"])[0]
    finally:
        handle.remove()
    tokens_a, tokens_g = store["a"].detach()[0], gradient[0]        # (N, C)
    side = int((tokens_a.shape[0] - 1) ** 0.5)                      # one CLS token, square grid
    A = tokens_a[1:].T.reshape(-1, side, side)
    G = tokens_g[1:].T.reshape(-1, side, side)
    channels = A.shape[0]
    k = min(topk, channels)
    kept = torch.argsort(G.mean(dim=(1, 2)), descending=True)[:k]
    scores = []
    with torch.no_grad(), stage("masked forwards"):
        for start in range(0, k, batch_size):
            grids = A[kept[start:start + batch_size]][:, None]
            masks = F.interpolate(grids, size=pixels.shape[-2:], mode="bilinear", align_corners=True)
            flat = masks.reshape(len(masks), -1)
            low = flat.min(dim=1).values.view(-1, 1, 1, 1)
            high = flat.max(dim=1).values.view(-1, 1, 1, 1)
            masks = (masks - low) / (high - low + 1e-6)
            embedding = F.normalize(net.encode_image(pixels * masks), dim=-1)
            text = F.normalize(net.encode_text(tokens), dim=-1)
            scores.append(net.logit_scale.exp() * embedding @ text.T)
    all_scores = torch.zeros(channels, device=pixels.device)
    all_scores[kept] = torch.nan_to_num(torch.cat(scores)[:, 0], nan=0.0)
    weights = torch.softmax(all_scores, dim=0)
    cam = torch.relu((weights[:, None, None] * A).sum(dim=0)).cpu().numpy()
    cam = cam - cam.min()
    cam = cam / (cam.max() + 1e-8)
    cam = cv2.resize(cam, size, interpolation=cv2.INTER_LINEAR)
    cam = np.maximum(cam, 0)
    cam = cam - cam.min()
    return cam / (cam.max() + 1e-8), set(kept.tolist())
