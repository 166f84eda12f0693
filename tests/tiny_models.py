"""Tiny randomly initialised models of the 12 supported families, built in code (no downloads).

Sizes are small but keep each family's quirks: grouped key/value heads (LLaMA, Mistral, Qwen2),
multi-query attention (Gemma, Falcon), fused qkv layouts (GPT-2 Conv1D, GPT-NeoX, BLOOM, Falcon),
ALiBi (BLOOM), learned absolute positions (GPT-2, GPT-Neo, OPT).
"""

from __future__ import annotations

import torch
import transformers as T

VOCAB = 128
HIDDEN = 32
LAYERS = 2
HEADS = 4

_STD = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)
_GPT = dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)
_CONFIGS = {
    "llama": lambda: T.LlamaConfig(**_STD, num_key_value_heads=2, intermediate_size=64),
    "mistral": lambda: T.MistralConfig(**_STD, num_key_value_heads=2, intermediate_size=64, sliding_window=None),
    "qwen2": lambda: T.Qwen2Config(**_STD, num_key_value_heads=2, intermediate_size=64),
    "gemma": lambda: T.GemmaConfig(**_STD, num_key_value_heads=1, intermediate_size=64, head_dim=8),
    "phi": lambda: T.PhiConfig(**_STD, intermediate_size=64, partial_rotary_factor=0.5),
    "gpt2": lambda: T.GPT2Config(**_GPT, n_positions=64),
    "gptj": lambda: T.GPTJConfig(**_GPT, rotary_dim=4, n_positions=64),
    "gpt_neo": lambda: T.GPTNeoConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS,
                                      attention_types=[[["global", "local"], 1]], window_size=8,
                                      max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gpt_neox": lambda: T.GPTNeoXConfig(**_STD, intermediate_size=64, rotary_pct=0.5),
    "opt": lambda: T.OPTConfig(**_STD, ffn_dim=64, word_embed_proj_dim=HIDDEN, max_position_embeddings=64),
    "bloom": lambda: T.BloomConfig(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "falcon": lambda: T.FalconConfig(**_STD, multi_query=True, new_decoder_architecture=False,
                                     parallel_attn=True, alibi=False),
}
_KV = dict(_STD, num_key_value_heads=2, intermediate_size=64)
_EXPERTS = dict(_KV, num_experts_per_tok=2)
# Today's families: q/k norms (Qwen3, OLMo 2, Gemma 3), post-sub-layer norms (Gemma 2/3, OLMo 2),
# sliding-window and hybrid layers with soft-capping (Gemma 2/3, GPT-OSS: layer_types alternate),
# fused qkv and gate/up (Phi-3), LayerNorm with bias (StableLM, StarCoder2), scaled logits (Cohere,
# Granite), and fused 3-D expert weights (the MoE families, GPT-OSS stored [experts, in, out]).
_TODAY = {
    "qwen3": lambda: T.Qwen3Config(**_KV, head_dim=8),
    "gemma2": lambda: T.Gemma2Config(**_KV, head_dim=8, sliding_window=4, final_logit_softcapping=30.0,
                                     attn_logit_softcapping=50.0),
    "gemma3_text": lambda: T.Gemma3TextConfig(**_KV, head_dim=8, sliding_window=4, sliding_window_pattern=2),
    "phi3": lambda: T.Phi3Config(**_KV),
    "olmo2": lambda: T.Olmo2Config(**_KV),
    "smollm3": lambda: T.SmolLM3Config(**_KV),
    "stablelm": lambda: T.StableLmConfig(**_KV),
    "granite": lambda: T.GraniteConfig(**_KV, logits_scaling=2.0, residual_multiplier=0.5),
    "starcoder2": lambda: T.Starcoder2Config(**_KV),
    "cohere": lambda: T.CohereConfig(**_KV, logit_scale=0.5),
    "mixtral": lambda: T.MixtralConfig(**_EXPERTS, num_local_experts=4),
    "qwen2_moe": lambda: T.Qwen2MoeConfig(**_EXPERTS, num_experts=4, moe_intermediate_size=16,
                                          shared_expert_intermediate_size=32),
    "qwen3_moe": lambda: T.Qwen3MoeConfig(**_EXPERTS, num_experts=4, moe_intermediate_size=16, head_dim=8),
    "olmoe": lambda: T.OlmoeConfig(**_EXPERTS, num_experts=4),
    "gpt_oss": lambda: T.GptOssConfig(**_EXPERTS, num_local_experts=4, head_dim=8, sliding_window=4),
}
CLASSIC_FAMILIES = sorted(_CONFIGS)
TODAY_FAMILIES = sorted(_TODAY)
MOE_FAMILIES = ["gpt_oss", "mixtral", "olmoe", "qwen2_moe", "qwen3_moe"]
_CONFIGS.update(_TODAY)
FAMILIES = sorted(_CONFIGS)


def tiny_config(family: str):
    config = _CONFIGS[family]()
    config.initializer_range = 0.1  # livelier than 0.02: the tiny models' outputs depend on their inputs
    return config


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    model.eval()
    return model


def tiny_batch(seed: int = 1, batch: int = 2, length: int = 10) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def tiny_tokenizer():
    """A character-level tokenizer for the tiny models: <pad> 0, <s> 1, </s> 2, <unk> 3, then ASCII."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for code in range(32, 127):
        vocab[chr(code)] = len(vocab)
    vocab["\n"] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def save_tiny(family: str, folder, seed: int = 0):
    """Write a tiny model and its tokenizer as a Hugging Face folder; returns the folder."""
    tiny_model(family, seed).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@torch.no_grad()
def greedy_without_cache(adapted, ids, mask, steps):
    """Recompute the whole sequence at every step: the oracle cached generation must equal."""
    for _ in range(steps):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = adapted(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    return ids
