"""Tiny Hugging Face models built in code (no hub): the references for Megatron and vLLM tests."""
import torch

FAMILY_CONFIGS = {
    "llama": dict(model_type="llama", tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", tie_word_embeddings=False, head_dim=32),
    # vLLM's CPU experts kernel wants hidden and moe_intermediate_size multiples of 32 (docs/MOE.md)
    "qwen3_moe": dict(model_type="qwen3_moe", tie_word_embeddings=False, head_dim=32, num_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=32, norm_topk_prob=True, router_aux_loss_coef=0.01),
}


def hf_config(family: str, vocab_size: int = 200, layers: int = 2, **overrides):
    import transformers

    cfg = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0,
               max_position_embeddings=256, **FAMILY_CONFIGS[family])
    cfg.update(overrides)
    return transformers.AutoConfig.for_model(**cfg)


def hf_model(family: str, seed: int = 0, **overrides):
    """A randomly initialised HF causal LM, with non-trivial norms and biases so mappings matter."""
    import transformers

    torch.manual_seed(seed)
    # float64 references: transformers' default experts kernel refuses float64, its eager one does not
    extra = {"experts_implementation": "eager"} if family.endswith("_moe") else {}
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family, **overrides), dtype=torch.float32, **extra).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model
