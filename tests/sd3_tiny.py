"""A randomly initialised tiny SD3 pipeline for the tests (and benchmarks/sd3_step.py): not part of the
package. The tests import it as `sd3_tiny` (pytest puts tests/ on sys.path); the benchmark, run as
`python -m benchmarks.sd3_step` from the repository root, as `tests.sd3_tiny`.

Needs the sd3 extra (diffusers, transformers): the tests that use it skip without it."""
from __future__ import annotations

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel
from tokenizers import pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel

from flowopd.backends.sd3 import SD3Backend


def tiny_sd3_components(seed: int = 0, *, num_layers: int = 2, dual_attention_layers=(0,), t5: bool = True,
                        latent_channels: int = 4):
    """Random tiny SD3.5-shaped components, built from configs offline (for tests and benchmarks):
    (transformer, vae, (clip_l, clip_g, t5), (tok, tok, tok)). The transformer has `num_layers`
    MMDiT blocks (the last one context_pre_only, as in SD3; 2 layers so that to_add_out exists)
    with SD3.5's dual attention and RMS qk-norm; the VAE downsamples by 2; the text encoders are
    2-layer CLIPs (width 16, projection 8) and a 1-layer T5 (width 32); the tokenizer is a
    byte-level CLIP BPE with no merges (one token per character). Same seed, same weights."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    for suffix in ("", "</w>"):
        for c in alphabet:
            vocab.setdefault(c + suffix, len(vocab))
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)

    torch.manual_seed(seed)
    clip_cfg = dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=2, max_position_embeddings=77, projection_dim=8, bos_token_id=0,
                    eos_token_id=1, pad_token_id=1, hidden_act="gelu")
    clip_l = CLIPTextModelWithProjection(CLIPTextConfig(**clip_cfg)).eval()
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**clip_cfg)).eval()
    t5_model = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                       num_heads=2, relative_attention_num_buckets=8, dropout_rate=0.0,
                                       pad_token_id=1, eos_token_id=1, decoder_start_token_id=0)).eval() if t5 else None
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=latent_channels, out_channels=latent_channels,
        num_layers=num_layers, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
        caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=16,
        dual_attention_layers=tuple(dual_attention_layers), qk_norm="rms_norm")
    with torch.no_grad():  # the output projection starts at zero in diffusers: make velocity non-trivial
        for p in transformer.proj_out.parameters():
            p.normal_(0, 0.1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                        latent_channels=latent_channels, layers_per_block=1, norm_num_groups=4, sample_size=32,
                        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                        use_post_quant_conv=False).eval()
    return transformer.eval(), vae, (clip_l, clip_g, t5_model), (tok, tok, tok if t5 else None)


def tiny_sd3_backend(seed: int = 0, resolution: int = 32, **kwargs) -> SD3Backend:
    """An SD3Backend over `tiny_sd3_components(seed)` (CPU, float32 unless told), T5 length 16."""
    build = {k: kwargs.pop(k) for k in ("num_layers", "dual_attention_layers", "t5", "latent_channels") if k in kwargs}
    tr, vae, tes, toks = tiny_sd3_components(seed, **build)
    kwargs.setdefault("max_sequence_length", 16)
    return SD3Backend(tr, vae, tes, toks, resolution=resolution, model_id=f"tiny-sd3:{seed}", **kwargs)
