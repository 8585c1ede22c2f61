"""Build tiny, randomly initialised BLIP-2 / InstructBLIP / BLIP captioners, saved with `save_pretrained`.

They have the real architectures (ViT, Q-Former, OPT or T5 language model) at a few tens of
thousands of parameters and a word-level tokenizer built here with `tokenizers`, so the whole
`from_pretrained` → processor → `generate` path of `sdtune caption` runs offline on a CPU in
a fraction of a second. Their captions are random words; only the plumbing is real.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipProcessor,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    OPTConfig,
    PreTrainedTokenizerFast,
    T5Config,
)
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

IMAGE_SIZE = 32  # 4 x 4 patches of 8 px
NUM_QUERY_TOKENS = 4
HIDDEN = 32

WORDS = """
a an the of on in at with and near under over behind beside between above below into from to by for
is are sitting standing lying walking running flying swimming jumping holding looking playing sleeping
red orange yellow green blue purple pink brown black white grey gray gold silver dark light bright pale
small large big tiny little tall short long round square flat old new young wooden metal glass plastic
circle square triangle star heart cross ring line dot stripe shape shapes pattern texture background
dog dogs cat cats bird birds horse cow sheep fish bear lion tiger elephant giraffe zebra monkey rabbit
man woman boy girl child children person people baby family couple group crowd player rider
car truck bus train bike bicycle motorcycle boat ship plane airplane road street bridge building house
tree trees flower flowers grass field forest mountain mountains hill river lake sea ocean beach sand
sky cloud clouds sun moon snow rain water rock rocks stone wall floor table chair bed sofa couch window
door room kitchen bathroom city town park garden farm desert island valley sunset night day morning
photo picture image painting drawing illustration sketch portrait landscape close up view shot art
food pizza cake bread fruit apple banana orange plate bowl cup bottle glass book phone computer screen
hat shirt dress jacket coat shoes bag umbrella clock sign light lamp toy ball kite guitar
one two three four five several many some top front side back middle center corner edge
""".split()


def word_tokenizer(
    specials: list[str], template: str, words: list[str] = WORDS, **special_tokens: str
) -> PreTrainedTokenizerFast:
    """A lower-casing, whitespace-split word-level tokenizer.

    Args:
        specials: Special tokens, given the first ids in this order.
        template: The `tokenizers` template for one sequence, e.g. ``"</s> $A"`` (OPT) or ``"$A </s>"`` (T5).
        words: The vocabulary after the special tokens (duplicates dropped).
        **special_tokens: Roles for transformers, e.g. ``bos_token="</s>"``, ``pad_token="<pad>"``.
    """
    vocab = {token: i for i, token in enumerate(specials)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=special_tokens.get("unk_token", specials[0])))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    used = [t for t in specials if t in template.split()]
    tokenizer.post_processor = processors.TemplateProcessing(single=template, special_tokens=[(t, vocab[t]) for t in used])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special_tokens)


def image_processor() -> BlipImageProcessorPil:
    """BLIP's image processor (resize, rescale, CLIP normalisation) at the tiny vision model's size."""
    return BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def _opt_tokenizer() -> PreTrainedTokenizerFast:
    # OPT starts every sequence with </s> (its BOS) and has no end template
    return word_tokenizer(["<pad>", "<unk>", "</s>"], "</s> $A", bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                          unk_token="<unk>")


def _t5_tokenizer() -> PreTrainedTokenizerFast:
    return word_tokenizer(["<pad>", "</s>", "<unk>"], "$A </s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def _bert_tokenizer() -> PreTrainedTokenizerFast:
    # BLIP's text decoder and the InstructBLIP Q-Former read BERT-style [CLS] text [SEP]; BLIP swaps [CLS] for [DEC]
    return word_tokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[DEC]"], "[CLS] $A [SEP]", pad_token="[PAD]",
                          unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", bos_token="[DEC]")


def _vision_config() -> dict:
    return dict(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=1, num_attention_heads=2,
                image_size=IMAGE_SIZE, patch_size=8)


def _qformer_config(vocab_size: int) -> dict:
    return dict(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=1, num_attention_heads=2,
                cross_attention_frequency=1, vocab_size=vocab_size, max_position_embeddings=64)


def _language_config(text_model: str, tokenizer: PreTrainedTokenizerFast) -> dict:
    vocab_size = len(tokenizer)  # includes <image> once a processor has added it
    # Larger-than-default init: at the default scale the random LM repeats one word whatever the image
    if text_model == "opt":
        return OPTConfig(vocab_size=vocab_size, hidden_size=HIDDEN, ffn_dim=2 * HIDDEN, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=128, word_embed_proj_dim=HIDDEN,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, init_std=0.2).to_dict()
    if text_model == "t5":
        return T5Config(vocab_size=vocab_size, d_model=HIDDEN, d_kv=HIDDEN // 2, d_ff=2 * HIDDEN, num_layers=1,
                        num_decoder_layers=1, num_heads=2, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, decoder_start_token_id=tokenizer.pad_token_id,
                        initializer_factor=3.0).to_dict()
    raise ValueError(f"text_model must be 'opt' or 't5', got {text_model!r}")


def build_tiny_blip2(
    output_dir: str | Path, text_model: Literal["opt", "t5"] = "opt", seed: int = 0, *, legacy: bool = False
) -> Path:
    """Save a tiny BLIP-2 model and its Blip2Processor to ``output_dir`` and return the path.

    The config's ``image_token_index`` is the tokenizer's ``<image>`` id and the processor's
    ``num_query_tokens`` equals the model's, as in current Hub snapshots of Salesforce/blip2-*.

    Args:
        output_dir: Folder to write (created if missing).
        text_model: ``opt`` (decoder-only, like blip2-opt-*) or ``t5`` (encoder-decoder, like blip2-flan-t5-*).
        seed: Seed of the random initialisation.
        legacy: Save like snapshots from before transformers 4.47: no ``<image>`` token in the
            vocabulary, ``image_token_index`` unset, no ``num_query_tokens`` for the processor.
    """
    tokenizer = _opt_tokenizer() if text_model == "opt" else _t5_tokenizer()
    if legacy:
        config = Blip2Config(vision_config=_vision_config(), qformer_config=_qformer_config(len(tokenizer)),
                             text_config=_language_config(text_model, tokenizer), num_query_tokens=NUM_QUERY_TOKENS)
        torch.manual_seed(seed)
        output_dir = _save(Blip2ForConditionalGeneration(config), tokenizer, output_dir)
        image_processor().save_pretrained(output_dir)
        return output_dir
    processor = Blip2Processor(image_processor(), tokenizer, num_query_tokens=NUM_QUERY_TOKENS)  # adds <image>
    config = Blip2Config(
        vision_config=_vision_config(), qformer_config=_qformer_config(len(tokenizer)),
        text_config=_language_config(text_model, tokenizer), num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    return _save(Blip2ForConditionalGeneration(config), processor, output_dir)


def build_tiny_instructblip(output_dir: str | Path, seed: int = 0) -> Path:
    """Save a tiny InstructBLIP model (OPT language model) and its InstructBlipProcessor; return the path."""
    tokenizer, qformer_tokenizer = _opt_tokenizer(), _bert_tokenizer()
    processor = InstructBlipProcessor(image_processor(), tokenizer, qformer_tokenizer, num_query_tokens=NUM_QUERY_TOKENS)
    config = InstructBlipConfig(
        vision_config=_vision_config(), qformer_config=_qformer_config(len(qformer_tokenizer)),
        text_config=_language_config("opt", tokenizer), num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    return _save(InstructBlipForConditionalGeneration(config), processor, output_dir)


def build_tiny_blip(output_dir: str | Path, seed: int = 0) -> Path:
    """Save a tiny BLIP (v1) captioner and its BlipProcessor to ``output_dir``; return the path."""
    tokenizer = _bert_tokenizer()
    text_config = dict(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.sep_token_id, sep_token_id=tokenizer.sep_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config = BlipConfig(text_config=text_config, vision_config=_vision_config(), projection_dim=HIDDEN)
    torch.manual_seed(seed)
    return _save(BlipForConditionalGeneration(config), BlipProcessor(image_processor(), tokenizer), output_dir)


def _save(model: torch.nn.Module, processor, output_dir: str | Path) -> Path:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir
