"""A 1,024-token byte-level BPE tokenizer with Qwen2.5-VL's special tokens, built offline.

For CPU runs of the whole pipeline (demo, tests): with the `tiny-1k` model preset the output
layer has 1K rows instead of 152K, so a training step takes a fraction of a second. The special
tokens sit at the top of the vocabulary, at the ids the preset's config names.
"""

from __future__ import annotations

from pathlib import Path

from megatron_mmprolong.config import VLConfig

# id offsets from vocab_size - 8, matching the tiny-1k preset's token ids
SPECIAL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|im_start|>", "<|image_pad|>", "<|video_pad|>",
                  "<|endoftext|>", "<|im_end|>", "<|vision_pad|>")


def _corpus() -> list[str]:
    from megatron_mmprolong.data.synth import ANIMALS, COLORS, WORDS

    lines = [" ".join(WORDS), " ".join(COLORS), " ".join(ANIMALS)]
    lines += [" ".join(w.capitalize() for w in WORDS[i:i + 7]) + "." for i in range(0, len(WORDS), 7)]
    lines += ["What is the access code of the archive? The shipment weighs 731 kg. Page 12: Section 3",
              "According to page 5, which shipment is heavier? Answer in that order, separated by commas.",
              "Transcribe the text of every page of this document. You are a helpful assistant.",
              "0123456789 ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz -,.:?!'\"()"]
    return lines * 4


def write_tiny_tokenizer(out_dir: str | Path, vocab_size: int = 1024) -> Path:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    regular = vocab_size - len(SPECIAL_TOKENS)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=regular, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(_corpus(), trainer)
    filler = [f"<|reserved_{i}|>" for i in range(regular - tokenizer.get_vocab_size())]
    tokenizer.add_tokens(filler)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>")
    out = Path(out_dir)
    hf.save_pretrained(out)
    config = VLConfig.preset("tiny-1k")
    ids = {"<|vision_start|>": config.tokens.vision_start, "<|image_pad|>": config.tokens.image,
           "<|video_pad|>": config.tokens.video, "<|vision_end|>": config.tokens.vision_end}
    wrong = {t: i for t, i in ids.items() if hf.convert_tokens_to_ids(t) != i}
    if vocab_size == config.text.vocab_size and wrong:
        raise RuntimeError(f"tiny tokenizer ids {wrong} do not match the tiny-1k preset")
    return out
