"""Tiny random models and a locally trained tokenizer, saved as real Hugging Face directories; the small data sets
and the plain-forward references that tests share."""

from __future__ import annotations

from pathlib import Path

import torch

from steering.datasets import PreferenceExample

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Steering vectors change what a language model says without fine-tuning.",
    "Integrated gradients attribute a prediction to the input tokens.",
    "What is the capital of France? The capital of France is Paris.",
    "Paris, Berlin, Rome and Madrid are European capitals.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20.",
    "I love this movie, it is wonderful and happy. I hate this film, it is awful and sad.",
    "Q: Can you see the Great Wall of China from space? A: No, it is too narrow.",
    "Hello world! How are you today? I am fine, thank you. Ünïcödé café naïve 東京 😀",
] * 8


def build_tokenizer(path: Path):
    """A byte-level BPE tokenizer trained here, with special tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<pad>", unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def build_model(path: Path, arch: str = "llama", seed: int = 0, layers: int = 4, hidden: int = 64) -> Path:
    """Save a random model of ``arch`` with the tiny tokenizer into ``path``; return ``path``."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(path)
    vocab = len(tok)
    common = dict(vocab_size=vocab, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    if arch == "llama":
        cfg = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          initializer_range=0.2, tie_word_embeddings=False, **common)
    elif arch == "qwen2":
        cfg = Qwen2Config(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          initializer_range=0.2, tie_word_embeddings=True, **common)
    elif arch == "qwen2-sliding":  # layers 1.. use an 8-token sliding window
        cfg = Qwen2Config(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          use_sliding_window=True, sliding_window=8, max_window_layers=1,
                          initializer_range=0.2, tie_word_embeddings=True, **common)
    elif arch == "mistral":  # every layer uses an 8-token sliding window
        from transformers import MistralConfig

        cfg = MistralConfig(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                            sliding_window=8, initializer_range=0.2, tie_word_embeddings=False, **common)
    elif arch == "gpt2":
        cfg = GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=512, initializer_range=0.2,
                         **common)
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    return path


EXAMPLES = [
    PreferenceExample("What is the capital of France?", "Paris", "Berlin"),
    PreferenceExample("I love this movie, it is", "wonderful and happy", "awful and sad"),
    PreferenceExample("The quick brown fox", "jumps over the lazy dog", "is sad"),
    PreferenceExample("Can you see the Great Wall of China from space?", "No, it is too narrow", "Yes"),
    PreferenceExample("Numbers: 0 1 2 3", "4 5 6", "9 9 9"),
]
"""Preference examples (prompt, preferred, dispreferred) for builders and sweeps."""

SENTIMENT = [
    PreferenceExample("I love this movie, it is", "wonderful and happy", "awful and sad"),
    PreferenceExample("The day was", "bright and good", "dark and bad"),
    PreferenceExample("My friend is", "kind and happy", "cruel and sad"),
]
"""A tiny sentiment set: the positive answer preferred."""

TRUTHFULQA_CSV = (
    "Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n"
    'Adversarial,Misc,Is the sky green?,No it is blue,"No it is blue; It is not green","Yes; It is always green",x\n'
    'Adversarial,Misc,What do cats eat?,Cats eat meat,"Cats eat meat","Cats eat rocks; Cats eat nothing; Glass",x\n'
    'Adversarial,Misc,Can pigs fly?,No,"No; Pigs cannot fly; They walk","Yes; Pigs fly south",x\n'
    'Adversarial,Misc,The quick brown fox,jumps over the dog,"jumps over the dog","is sad",x\n'
)
"""Four questions in the TruthfulQA CSV format."""


def plain_logprob(lm, prompt: list[int], answer: list[int], embeds=None) -> torch.Tensor:
    """Reference: summed log P(answer | prompt) from one plain forward of the unpacked sequence."""
    if embeds is None:
        out = lm.model(input_ids=torch.tensor([prompt + answer]))
    else:
        out = lm.model(inputs_embeds=embeds.unsqueeze(0))
    lp = out.logits[0].double().log_softmax(-1)
    P = len(prompt)
    return lp[P - 1: P - 1 + len(answer)].gather(-1, torch.tensor(answer).unsqueeze(-1)).sum()


VLM_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}IMAGE{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""The tiny chat template, with content parts; IMAGE stands for the family's image placeholder."""

VLM_FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl", "gemma3")


def build_vlm(path: Path, family: str = "llava", seed: int = 0, layers: int = 4, hidden: int = 64) -> Path:
    """Save a random vision-language model of ``family`` (a small vision tower, the tiny tokenizer with the family's
    image tokens, its image processor and chat template) into ``path``; return ``path``."""
    from transformers import LlamaConfig

    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(path)
    text = dict(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if family == "llava":
        from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
        cfg = LlavaConfig(
            vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=32, patch_size=8, projection_dim=32),
            text_config=LlamaConfig(vocab_size=len(tok), **text),
            image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
            vision_feature_layer=-1)
        processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        placeholder, model_cls = "<image>", LlavaForConditionalGeneration
    elif family in ("qwen2_vl", "qwen2_5_vl"):
        from transformers import (
            Qwen2_5_VLConfig,
            Qwen2_5_VLForConditionalGeneration,
            Qwen2VLConfig,
            Qwen2VLForConditionalGeneration,
        )
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        marks = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
        tok.add_special_tokens({"additional_special_tokens": marks})
        ids = dict(zip(marks, tok.convert_tokens_to_ids(marks), strict=True))
        common = dict(patch_size=8, spatial_merge_size=2, temporal_patch_size=2, in_channels=3, num_heads=4, depth=2)
        vision = (dict(embed_dim=32, hidden_size=hidden, mlp_ratio=2, **common) if family == "qwen2_vl" else
                  dict(hidden_size=32, out_hidden_size=hidden, intermediate_size=64, window_size=16,
                       fullatt_block_indexes=[1], **common))
        config_cls = Qwen2VLConfig if family == "qwen2_vl" else Qwen2_5_VLConfig
        cfg = config_cls(
            vision_config=vision,
            text_config=dict(vocab_size=len(tok), rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                                   "rope_theta": 10000.0}, **text),
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
        processor = Qwen2VLImageProcessorPil(min_pixels=16 * 16, max_pixels=48 * 48, patch_size=8, merge_size=2,
                                             temporal_patch_size=2)
        placeholder = "<|vision_start|><|image_pad|><|vision_end|>"
        model_cls = Qwen2VLForConditionalGeneration if family == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration
    elif family == "gemma3":
        from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

        marks = ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]
        tok.add_special_tokens({"additional_special_tokens": marks})
        ids = dict(zip(marks, tok.convert_tokens_to_ids(marks), strict=True))
        cfg = Gemma3Config(
            vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, image_size=32, patch_size=8),
            text_config=Gemma3TextConfig(vocab_size=len(tok), head_dim=16, sliding_window=64, **text),
            mm_tokens_per_image=4, boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
            image_token_index=ids["<image_soft_token>"])
        processor = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
        placeholder, model_cls = "<start_of_image>", Gemma3ForConditionalGeneration
    else:
        raise ValueError(family)
    tok.save_pretrained(path)
    torch.manual_seed(seed)
    model = model_cls(cfg)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    (path / "chat_template.jinja").write_text(VLM_CHAT_TEMPLATE.replace("IMAGE", placeholder))
    return path


def random_image(seed: int = 0, size: tuple[int, int] = (40, 30), fmt: str = "PNG") -> bytes:
    """A random RGB image, encoded."""
    import io

    import numpy as np
    from PIL import Image

    pixels = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    import base64

    return f"data:{mime};base64,{base64.b64encode(data).decode()}"
