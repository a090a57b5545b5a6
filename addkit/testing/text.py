"""An offline CLIP tokenizer and tiny CLIP text encoders (random weights, seeded, eval mode)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from addkit.testing._build import POOLED_WIDTH, TEXT_WIDTH, optional_import, seeded

if TYPE_CHECKING:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


def tiny_clip_tokenizer(*, model_max_length: int = 16, pad_token: str = _EOS) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` over single characters, built in memory (no files, no download).

    The vocabulary is every byte of CLIP's byte-level alphabet, alone and word-final
    (``"a"``, ``"a</w>"``), plus the start and end tokens, with no merges: any caption
    tokenizes, one token per character, and decodes back (lowercased, as CLIP normalises).

    Args:
        model_max_length: sequence length the tokenizer pads and truncates to; the text
            encoders built from it take this many positions.
        pad_token: ``"<|endoftext|>"`` (SDXL's first tokenizer, the default) or ``"!"``
            (SDXL's ``tokenizer_2``); any token of the vocabulary works.

    Raises:
        ValueError: for ``model_max_length < 2`` or a pad token outside the vocabulary.
        ModuleNotFoundError: without transformers (``pip install 'addkit[diffusers]'``).

    Examples:
        >>> tok = tiny_clip_tokenizer(model_max_length=8, pad_token="!")
        >>> ids = tok("a cat", padding="max_length", max_length=8).input_ids
        >>> tok.convert_ids_to_tokens(ids)[:6], len(ids)
        (['<|startoftext|>', 'a</w>', 'c', 'a', 't</w>', '<|endoftext|>'], 8)
        >>> tok.decode(ids, skip_special_tokens=True)
        'a cat'
    """
    transformers = optional_import("transformers", "tiny_clip_tokenizer")
    byte_level = optional_import("tokenizers.pre_tokenizers", "tiny_clip_tokenizer").ByteLevel
    symbols = sorted(byte_level.alphabet())
    tokens = symbols + [s + "</w>" for s in symbols] + [_BOS, _EOS]
    if model_max_length < 2:
        raise ValueError(
            f"tiny_clip_tokenizer: model_max_length must be at least 2 (start and end tokens), "
            f"got {model_max_length}"
        )
    if pad_token not in tokens:
        raise ValueError(
            f"tiny_clip_tokenizer: pad_token must be a token of the vocabulary ({_EOS!r} for SDXL's "
            f"tokenizer, '!' for its tokenizer_2), got {pad_token!r}"
        )
    vocab = {token: i for i, token in enumerate(tokens)}
    return transformers.CLIPTokenizer(
        vocab=vocab, merges=[], pad_token=pad_token, model_max_length=model_max_length
    )


def tiny_clip_text_encoder(
    tokenizer: Any, *, with_projection: bool = False, seed: int = 0, **config: Any
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A two-layer CLIP text encoder of width 16 for ``tokenizer``'s vocabulary and length.

    ``with_projection=True`` builds ``CLIPTextModelWithProjection`` (SDXL's second encoder,
    whose ``text_embeds`` ``[B, 16]`` are the pooled embedding); otherwise ``CLIPTextModel``.
    Hidden states are ``[B, model_max_length, 16]``.

    Args:
        tokenizer: a CLIP tokenizer such as [`tiny_clip_tokenizer`][addkit.testing.text.tiny_clip_tokenizer];
            its length, ``model_max_length`` and special tokens size the config.
        with_projection: build ``CLIPTextModelWithProjection``.
        seed: seed of the random weights.
        **config: overrides of the tiny ``CLIPTextConfig``.

    Raises:
        ModuleNotFoundError: without transformers (``pip install 'addkit[diffusers]'``).

    Examples:
        >>> tok = tiny_clip_tokenizer()
        >>> encoder = tiny_clip_text_encoder(tok, with_projection=True)
        >>> encoder(**tok(["a cat"], padding="max_length", return_tensors="pt")).text_embeds.shape
        torch.Size([1, 16])
    """
    transformers = optional_import("transformers", "tiny_clip_text_encoder")
    tiny = {
        "vocab_size": len(tokenizer),
        "max_position_embeddings": tokenizer.model_max_length,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "hidden_size": TEXT_WIDTH,
        "intermediate_size": 2 * TEXT_WIDTH,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "projection_dim": POOLED_WIDTH,
    }
    cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    with seeded(seed):
        return cls(transformers.CLIPTextConfig(**{**tiny, **config})).eval()
