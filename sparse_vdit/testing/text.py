"""A tiny text encoder and a tokenizer written in code (no download), so a saved tiny pipeline can
encode text prompts like a real one: a word-level tokenizer over a small vocabulary and a 1-layer
UMT5 encoder (Wan's text encoder class) with random weights."""
from __future__ import annotations

import torch

WORDS = ("a red car on highway the cat dog runs jumps in snow city at night beach waves sunset forest "
         "river boat flying bird person walking rain street mountain "
         # the shapes world (testing.shapes); appended so earlier words keep their ids
         "circle square moves left right up down blue green yellow").split()


def tiny_tokenizer():
    """A ``PreTrainedTokenizerFast`` (word level, lowercased, whitespace split; unknown words -> [UNK])."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "</s>": 1, "[UNK]": 2, **{w: i + 3 for i, w in enumerate(dict.fromkeys(WORDS))}}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="</s>")


def tiny_text_encoder(width: int = 64, seed: int = 0):
    """A 1-layer ``UMT5EncoderModel`` whose hidden size is ``width`` (the transformer's text_dim)."""
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    cfg = UMT5Config(vocab_size=64, d_model=width, d_kv=16, d_ff=2 * width, num_layers=1, num_heads=4,
                     relative_attention_num_buckets=8, relative_attention_max_distance=32, pad_token_id=0,
                     eos_token_id=1, decoder_start_token_id=0)
    return UMT5EncoderModel(cfg).eval()
