"""Generative VLMs (LLaVA-style, Gemma-3-style): the attention maps are the model's own attention at the right image
tokens, placed right on the film, and a run writes them, the answers and P(yes) as it writes every other map."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from attention_map.cams import AttentionMap
from attention_map.cams.attention import GENERIC_PROMPT, combine, parse_layers
from attention_map.maps import grid_to_image
from attention_map.models import ModelLoadError, vlm

from test_cli import cli, read_manifest

ARCHS = ("llava", "llava-next", "gemma3")
GRIDS = {"llava": (24, 24), "gemma3": (16, 16), "llava-next": (24, 48)}   # llava-next: a 300 x 600 film, 2 tiles
QUESTION = "Is there a nodule in the left lung?"


@pytest.fixture(scope="session")
def tiny_vlms(tmp_path_factory) -> dict:
    from attention_map.models.random_models import make_test_model

    root = tmp_path_factory.mktemp("vlms")
    return {arch: make_test_model(root / arch, arch, seed=0) for arch in ARCHS}


def _load(tiny_vlms, arch):
    return vlm.load(str(tiny_vlms[arch]), torch.device("cpu"))


def _picture(model, seed=0):
    """A random picture as `prepare` gives it: of the model's input size, or 300 x 600 for a tiled model."""
    size = (300, 600) if model.pinpoints else model.image_size
    return torch.from_numpy(np.random.default_rng(seed).random((3, *size), dtype=np.float32))


def _recompute(attention, hidden, position_embeddings, queries, keys):
    """The attention rows of one layer from its input, its own q/k projections and norms and its modelling module's
    rotary embedding, with a causal (and, for a sliding layer, windowed) mask written here."""
    modelling = sys.modules[type(attention).__module__]
    batch, length, _ = hidden.shape
    q = attention.q_proj(hidden).view(batch, length, -1, attention.head_dim).transpose(1, 2)
    k = attention.k_proj(hidden).view(batch, length, -1, attention.head_dim).transpose(1, 2)
    if hasattr(attention, "q_norm"):
        q, k = attention.q_norm(q), attention.k_norm(k)
    q, k = modelling.apply_rotary_pos_emb(q, k, *position_embeddings)
    k = modelling.repeat_kv(k, attention.num_key_value_groups)
    scores = q @ k.transpose(2, 3) * attention.scaling
    allowed = torch.ones(length, length, dtype=torch.bool).tril()
    if getattr(attention, "sliding_window", None):
        allowed &= ~torch.ones(length, length, dtype=torch.bool).tril(-attention.sliding_window)
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return weights[:, :, queries][..., keys]


def _eager_attentions(model, inputs) -> tuple:
    """Every layer's attention weights as transformers' eager attention gives them (output_attentions=True)."""
    model.module.set_attn_implementation({"text_config": "eager"})
    try:
        with torch.no_grad():
            return model.module(**inputs, output_attentions=True).attentions
    finally:
        model.module.set_attn_implementation({"text_config": vlm.ATTENTION})


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_is_the_models_own_at_the_question_and_answer_tokens(tiny_vlms, arch):
    """The extracted rows equal the model's eager attention (output_attentions) and an independent recomputation
    from each layer's input, within 1e-5, for the question's and the generated answer's tokens."""
    model = _load(tiny_vlms, arch)
    image = _picture(model)
    layers = list(range(model.depth))
    inputs, question_positions = model.encode(image, QUESTION, 0)
    assert model.processor.tokenizer.decode(inputs["input_ids"][0, question_positions]) == QUESTION
    bos = model.processor.tokenizer.bos_token_id    # one BOS, whether the chat template writes it (Gemma) or not
    assert inputs["input_ids"][0, 0] == bos and (inputs["input_ids"][0] == bos).sum() == 1
    image_positions = (inputs["input_ids"][0] == model.image_token_id).nonzero()[:, 0]
    assert len(image_positions) == {"llava": 576, "gemma3": 256, "llava-next": 576 + 24 * 49}[arch]
    image_positions = model.map_tokens(inputs, image_positions)[0]

    reading = model.read(image, QUESTION, layers, "question", 0)
    assert reading.grid == GRIDS[arch]
    seen = {}
    hooks = [layer.register_forward_pre_hook(
        lambda module, args, kwargs, i=i: seen.__setitem__(i, (kwargs.get("hidden_states", args[0] if args else None),
                                                               kwargs["position_embeddings"])), with_kwargs=True)
             for i, layer in enumerate(model.attention_layers)]
    try:
        eager = _eager_attentions(model, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    with torch.no_grad():
        recomputed = torch.stack([_recompute(model.attention_layers[i], *seen[i], question_positions,
                                             image_positions)[0] for i in layers])
    expected = torch.stack([eager[i][0][:, question_positions][..., image_positions] for i in layers])
    assert reading.attention.shape == expected.shape
    assert torch.allclose(reading.attention, expected, atol=1e-5, rtol=0)
    assert torch.allclose(reading.attention, recomputed, atol=1e-5, rtol=0)
    assert reading.attention.amax() > 1e-4   # not trivially equal

    # the generated answer's tokens as queries: rows of the model's attention over the prompt and the answer
    answered = model.read(image, QUESTION, layers, "generated", 3)
    length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        made = model.module.generate(**inputs, max_new_tokens=3, do_sample=False)[0, length:]
    stops = (made == model.processor.tokenizer.eos_token_id).nonzero()[:, 0]
    made = made[:stops[0]] if len(stops) else made
    assert answered.answer == model.processor.tokenizer.decode(made, skip_special_tokens=True).strip()
    full = dict(inputs, input_ids=torch.cat([inputs["input_ids"], made[None]], 1))
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    if "token_type_ids" in full:
        full["token_type_ids"] = torch.cat([full["token_type_ids"], torch.zeros_like(made[None])], 1)
    eager = _eager_attentions(model, full)
    answer_positions = torch.arange(length, length + len(made))
    expected = torch.stack([eager[i][0][:, answer_positions][..., image_positions] for i in layers])
    assert len(made) >= 1 and torch.allclose(answered.attention, expected, atol=1e-5, rtol=0)
    assert 0 <= answered.p_yes <= 1


def _point_attention_at(model, patch: int, token: int):
    """Set the model's weights so that layer 0's attention from every text token falls on one image token, the
    `token`-th of the projector's output for image `patch` (a tile of a tiled model; 0 otherwise): every text token has
    one embedding e, the image features are 0 but there (a direction u orthogonal to e), rotary embeddings are
    switched off, and layer 0's q reads e and k reads u. Returns the hook to remove."""
    language = model.module.model.language_model
    size = language.embed_tokens.weight.shape[1]
    generator = torch.Generator().manual_seed(1)
    e = torch.randn(size, generator=generator)
    u = torch.randn(size, generator=generator)
    e, u = e / e.norm(), u - (u @ e) / (e @ e) * e
    u = u / u.norm()
    attention = model.attention_layers[0]
    with torch.no_grad():
        language.embed_tokens.weight[:] = e
        for name, buffer in language.named_buffers():
            if "inv_freq" in name:
                buffer.zero_()
        attention.q_proj.weight[:] = torch.outer(torch.ones(attention.q_proj.weight.shape[0]), e)
        attention.k_proj.weight[:] = torch.outer(torch.ones(attention.k_proj.weight.shape[0]), u)
        if hasattr(attention, "q_norm"):
            attention.q_norm.weight.fill_(3.0)
            attention.k_norm.weight.fill_(3.0)
        if getattr(model.module.model, "image_newline", None) is not None:
            model.module.model.image_newline.zero_()

    def features(module, args, output):
        placed = torch.zeros_like(output)
        placed[patch, token] = u.to(output.dtype) * 8
        return placed
    return model.module.model.multi_modal_projector.register_forward_hook(features)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_known_image_token_is_the_hot_cell_at_its_place_on_the_film(tiny_vlms, arch):
    """With weights that make the attention fall on one image token, that token is the map's peak, at its cell of
    the grid and of the film: an image-token span off by one token, or a grid read transposed, moves it."""
    model = _load(tiny_vlms, arch)
    rows, columns = GRIDS[arch]
    side = 24 if arch == "llava-next" else rows
    # wider than high (a transposed grid lands elsewhere); for the tiled model 1:2, two tiles side by side, no padding
    height, width = (300, 600) if arch == "llava-next" else (300, 400)
    film = np.zeros((height, width), np.float32)
    cam = AttentionMap(model, attention_layers="0", max_new_tokens=0)
    for row, column in ((0, 0), (0, 1), (1, 3), (rows - 1, columns - 2), (5, columns - 1)):
        patch = 1 + column // side if arch == "llava-next" else 0     # the tiles follow the overview image
        hook = _point_attention_at(model, patch, row * side + column % side)
        try:
            grid_map = cam.explain(model.prepare(film), [QUESTION])[0]
        finally:
            hook.remove()
        assert grid_map.cam.shape == (rows, columns)
        assert np.unravel_index(np.argmax(grid_map.cam), grid_map.cam.shape) == (row, column)
        assert grid_map.cam.max() > 0.5 * grid_map.cam.sum()    # the attention is on that one token
        heat = grid_to_image(grid_map.cam, (width, height))
        y, x = np.unravel_index(np.argmax(heat), heat.shape)
        assert int(y // (height / rows)) == row and int(x // (width / columns)) == column


def test_relative_normalisation_divides_by_the_generic_prompts_attention(tiny_vlms):
    model = _load(tiny_vlms, "llava")
    image = _picture(model, 3)
    raw = AttentionMap(model, max_new_tokens=0)
    relative = AttentionMap(model, normalize="relative", max_new_tokens=0)
    most = AttentionMap(model, heads="max", max_new_tokens=0)
    question = raw.explain(image[None], [QUESTION])[0].cam
    generic = combine(model.read(image, GENERIC_PROMPT, raw.layers, "question", 0).attention, "mean")
    assert np.allclose(relative.explain(image[None], [QUESTION])[0].cam, question / generic.view(24, 24).numpy(),
                       rtol=1e-5)
    assert (most.explain(image[None], [QUESTION])[0].cam >= question - 1e-7).all()
    assert raw.layers == [2, 3] and raw.target_layer == "language_model.layers[2,3]"


def test_attention_layers_are_parsed_against_the_depth():
    assert parse_layers("auto", 32) == list(range(16, 32))
    assert parse_layers("0,2-4,-1", 8) == [0, 2, 3, 4, 7]
    with pytest.raises(ModelLoadError, match="layers 0..7"):
        parse_layers("8", 8)


def _write_records(tmp_path, cxr, rows):
    data = tmp_path / "records.csv"
    data.write_text("image_path,question,answer_gt\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows))
    return data


@pytest.mark.parametrize("arch", ARCHS)
def test_a_run_on_real_films_writes_maps_answers_and_p_yes(tmp_path, tiny_vlms, cxr, arch):
    films = sorted(p.name for p in (cxr / "nih").glob("*.png"))[:2]
    long_question = "Is there " + "a very small nodule near the left hilum and " * 150 + "an effusion?"
    data = _write_records(tmp_path, cxr, [(films[0], "Is there cardiomegaly?", "yes"),
                                          (films[0], "Where is the nodule?", "left upper lobe"),
                                          (films[1], long_question, "no")])
    out = tmp_path / "out"
    args = ["run", f"DATA_FILE={data}", f"IMAGE_ROOT={cxr / 'nih'}", f"OUTPUT_DIR={out}",
            f"MODEL={tiny_vlms[arch]}", "CAM_VERSION=attention", "SAVE_RAW_CAM=true", "MAX_NEW_TOKENS=3"]
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    rows = read_manifest(out)
    assert [r["question"] for r in rows] == ["Is there cardiomegaly?", "Where is the nodule?", long_question]
    assert [r["answer"] for r in rows] == ["yes", "left upper lobe", "no"]
    assert all(r["cam_method"] == "attention" and (out / r["image_path"]).is_file() and (out / r["raw_map"]).is_file()
               for r in rows)
    assert rows[0]["p_yes"] and rows[2]["p_yes"] and not rows[1]["p_yes"]    # yes/no questions only
    assert 0 <= float(rows[0]["p_yes"]) <= 1
    assert -1 <= float(rows[0]["prompt_similarity"]) <= 1
    assert rows[0]["prompt_similarity"] == rows[1]["prompt_similarity"]      # two maps: each one's mean is the pair's
    assert rows[2]["prompt_similarity"] == ""         # the film's only question
    context = vlm.load(str(tiny_vlms[arch]), torch.device("cpu")).context
    assert rows[2]["warning"].count("question truncated to its first") == 1
    assert f"to fit the model's context of {context} tokens" in rows[2]["warning"]
    assert not rows[0]["warning"]
    mean = np.mean([float(rows[0]["prompt_similarity"]), float(rows[1]["prompt_similarity"])])
    assert f"the maps of a film's questions correlate {mean:.2f} (mean Spearman over 2 maps" in result.stdout
    before = (out / "vqa_manifest.csv").read_bytes()
    again = cli(*args)
    assert again.returncode == 0 and "0 heatmaps written, 0 failed, 3 already done" in again.stdout
    assert (out / "vqa_manifest.csv").read_bytes() == before


def test_a_model_without_image_tokens_is_refused_before_anything_is_written(tmp_path, cxr):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "text-only"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(folder)
    data = _write_records(tmp_path, cxr, [("00000001_000.png", "Is there a nodule?", "no")])
    result = cli("run", f"DATA_FILE={data}", f"IMAGE_ROOT={cxr / 'nih'}", f"OUTPUT_DIR={tmp_path / 'out'}",
                 f"MODEL={folder}", "CAM_VERSION=attention")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "has no image tokens" in line]
    assert len(errors) == 1 and "a llama model has no image tokens" in errors[0]
    assert not (tmp_path / "out").exists()


def test_methods_and_models_that_do_not_go_together_are_config_errors(tmp_path, tiny_vlms, tiny_model, cxr):
    data = _write_records(tmp_path, cxr, [("00000001_000.png", "Is there a nodule?", "no")])
    common = [f"DATA_FILE={data}", f"IMAGE_ROOT={cxr / 'nih'}", f"OUTPUT_DIR={tmp_path / 'out'}"]
    gradient = cli("run", *common, f"MODEL={tiny_vlms['llava']}", "CAM_VERSION=GradCAM")
    assert gradient.returncode == 2 and "is a generative VLM, whose maps are CAM_VERSION=attention" in gradient.stderr
    clip = cli("run", *common, f"MODEL={tiny_model}", "CAM_VERSION=attention")
    assert clip.returncode == 2 and "attention maps read a generative VLM" in clip.stderr
    layer = cli("run", *common, f"MODEL={tiny_vlms['llava']}", "CAM_VERSION=attention", "TARGET_LAYER=foo")
    assert layer.returncode == 2 and "read ATTENTION_LAYERS" in layer.stderr
    bad = cli("run", *common, f"MODEL={tiny_vlms['llava']}", "CAM_VERSION=attention", "ATTENTION_LAYERS=9")
    assert bad.returncode == 2 and "ATTENTION_LAYERS=9: the language model has layers 0..3" in bad.stderr
    assert not (tmp_path / "out").exists()


def test_fetch_model_copies_a_vlm_for_offline_nodes(tmp_path, tiny_vlms):
    """fetch-model hf:<id> against a stand-in hub holding the tiny LLaVA (and a .bin copy of its weights, which is
    left behind); the folder loads offline and reads as the original does."""
    import fnmatch
    import shutil

    from attention_map.models.fetch import fetch_model

    hub = tmp_path / "hub"
    shutil.copytree(tiny_vlms["llava"], hub)
    (hub / "pytorch_model.bin").write_bytes(b"weights again")

    def list_files(repo_id):
        assert repo_id == "org/tiny-llava"
        return [p.name for p in hub.iterdir()]

    def snapshot(repo_id, local_dir, allow_patterns):
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        for path in hub.iterdir():
            if any(fnmatch.fnmatch(path.name, pattern) for pattern in allow_patterns):
                shutil.copy(path, Path(local_dir) / path.name)

    folder = fetch_model("hf:org/tiny-llava", tmp_path / "fetched", snapshot, list_files)
    assert (folder / "model.safetensors").is_file() and (folder / "chat_template.jinja").is_file()
    assert not (folder / "pytorch_model.bin").exists()
    image = _picture(_load(tiny_vlms, "llava"))
    fetched = vlm.load(str(folder), torch.device("cpu"), offline=True)
    original = _load(tiny_vlms, "llava")
    assert torch.equal(fetched.read(image, QUESTION, [3], "last", 0).attention,
                       original.read(image, QUESTION, [3], "last", 0).attention)


def test_the_python_api_explains_a_vlm_with_questions_as_targets(tiny_vlms, cxr):
    from attention_map import explain
    from attention_map.images import read_film

    model = _load(tiny_vlms, "gemma3")
    film = read_film(cxr / "nih" / "00000001_000.png", 50_000_000).pixels
    questions = [QUESTION, "Where is the heart?"]
    maps = explain(model, [film], questions, method="attention")
    assert maps.shape == (1, 2, *film.shape) and maps.min() >= 0 and maps.max() == pytest.approx(1.0)
    cam = AttentionMap(model)
    expected = [grid_to_image(m.cam, film.shape[::-1]) for m in cam.explain(model.prepare(film), questions)]
    assert np.allclose(maps[0], expected, atol=1e-6)
