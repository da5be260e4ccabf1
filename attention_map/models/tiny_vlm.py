"""Tiny generative vision-language models with random weights, built offline as hub-format folders (config.json,
model.safetensors, the processor and its tokenizer), of the architectures the `attention` maps read:

- `llava`: `LlavaForConditionalGeneration`, a CLIP vision tower at 336 px with 14-px patches (a 24 x 24 grid of
  image tokens, CLS dropped, as llava-hf's LLaVA-1.5) and a Llama language model with grouped-query attention;
- `llava-next`: `LlavaNextForConditionalGeneration`, the same towers reading "anyres" tiles: the film at its own
  aspect ratio in 336-px tiles on LLaVA-NeXT's grid pinpoints, after one overview of the whole film;
- `gemma3`: `Gemma3ForConditionalGeneration`, a SigLIP tower whose 32 x 32 patches are pooled to Gemma 3's 16 x 16
  image tokens, and a Gemma 3 language model with sliding and full attention layers and q/k norms.

The processors are transformers' own (`LlavaProcessor`, `LlavaNextProcessor`, `Gemma3Processor`), so the image
placeholder of the chat template is expanded into the image tokens exactly as for the real models. The tokenizer is a
byte-level BPE trained here on a fixed text, so any question can be tokenised. The same seed writes the same bytes.
"""
from __future__ import annotations

from pathlib import Path

import torch

# The text the tokenizer's merges are learnt from: the words of chest X-ray questions and answers.
CORPUS = (
    "Is there a pleural effusion in the left lung? Yes. No. Is there a nodule in the right upper lobe? Where is the "
    "mass? Is the heart enlarged? Cardiomegaly, atelectasis, consolidation, pneumothorax, edema, emphysema, fibrosis, "
    "infiltration, pneumonia, hernia, pleural thickening, opacity, lesion, fracture, catheter, tube, device. Does the "
    "film show an abnormality? Which side is affected? Describe the findings of this chest X-ray. Write a general "
    "description of the image. The lungs are clear. There is no acute cardiopulmonary process. yes no yes no "
    "left right upper middle lower lobe base apex hilum mediastinum diaphragm costophrenic angle trachea spine rib"
)
LLAVA_TEMPLATE = ("{% for m in messages %}{{ 'USER: ' if m['role'] == 'user' else 'ASSISTANT: ' }}"
                  "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}"
                  "{% endif %}{% endfor %}{{ ' ' if m['role'] == 'user' else '</s>' }}{% endfor %}"
                  "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
GEMMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>"
                   "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{% for c in m['content'] %}"
                   "{% if c['type'] == 'image' %}<start_of_image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
                   "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
TINY_VLM_ARCHS = ("llava", "llava-next", "gemma3")
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]   # LLaVA-NeXT's, (height, width)


def _tokenizer(specials: list[str], named: dict[str, str], **roles):
    """A byte-level BPE tokenizer (transformers' PreTrainedTokenizerFast) with `specials` as its first tokens, adding
    the BOS token as the real models' tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([CORPUS] * 4, trainer)
    bos = roles["bos_token"]   # the BOS token opens every text, as Llama's and Gemma's tokenizers do
    bpe.post_processor = processors.TemplateProcessing(single=f"{bos} $A",
                                                       special_tokens=[(bos, bpe.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, extra_special_tokens=named, **roles)


def _llava(seed: int, text: dict, tiled: bool = False):
    """LLaVA-1.5, or with `tiled` LLaVA-NeXT (its image processor and model read the film in tiles)."""
    import transformers
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig

    tokenizer = _tokenizer(["<s>", "</s>", "<pad>", "<image>"], {"image_token": "<image>"}, bos_token="<s>",
                           eos_token="</s>", pad_token="<pad>")
    kind = "LlavaNext" if tiled else "Llava"
    sizes = dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    image_processor = (transformers.LlavaNextImageProcessor(**sizes, image_grid_pinpoints=PINPOINTS) if tiled
                       else CLIPImageProcessor(**sizes))
    processor = getattr(transformers, f"{kind}Processor")(
        image_processor, tokenizer, patch_size=14, vision_feature_select_strategy="default",
        chat_template=LLAVA_TEMPLATE, num_additional_image_tokens=1)
    config = getattr(transformers, f"{kind}Config")(
        vision_config=CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=2, projection_dim=32),
        text_config=LlamaConfig(**{**dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=4096 if tiled else 1024,
                                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                          pad_token_id=tokenizer.pad_token_id), **text}),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default", **({"image_grid_pinpoints": PINPOINTS} if tiled else {}))
    torch.manual_seed(seed)
    return getattr(transformers, f"{kind}ForConditionalGeneration")(config), processor


def _gemma3(seed: int, text: dict):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor

    named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tokenizer = _tokenizer(["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", *named.values()], named,
                           bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    image_processor = Gemma3ImageProcessor(size={"height": 256, "width": 256}, image_mean=[0.5] * 3,
                                           image_std=[0.5] * 3)
    processor = Gemma3Processor(image_processor, tokenizer, chat_template=GEMMA3_TEMPLATE, image_seq_length=256)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in named.items()}
    config = Gemma3Config(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                         sliding_window=512, layer_types=["sliding_attention", "full_attention"] * 2,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id) | text,
        vision_config=dict(image_size=256, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2),
        mm_tokens_per_image=256, image_token_id=ids["image_token"], boi_token_id=ids["boi_token"],
        eoi_token_id=ids["eoi_token"], bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return Gemma3ForConditionalGeneration(config), processor


def build_vlm(arch: str, seed: int = 0, **text):
    """(model, processor) of `arch` (one of TINY_VLM_ARCHS) with random weights; `text` replaces keys of the language
    model's config (a deeper or wider model for the benchmark)."""
    model, processor = {"llava": _llava, "llava-next": lambda seed, text: _llava(seed, text, tiled=True),
                         "gemma3": _gemma3}[arch](seed, text)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return model.eval(), processor


def make_tiny_vlm(folder: Path, arch: str, seed: int = 0) -> Path:
    """Write a tiny `arch` (one of TINY_VLM_ARCHS) with random weights (`seed`) into `folder`, as `save_pretrained`
    writes a hub model: `MODEL=<folder>` loads it as it would `hf:<id>`."""
    model, processor = build_vlm(arch, seed)
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
