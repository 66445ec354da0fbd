"""The prompt of a VTCBench-Wild sample and the chat request it becomes: every page image of the
context, then one text, the split's instruction followed by the question (`problem`), as one
user message; greedy, with the model's default system prompt.

`vlmevalkit` (the default: VLMEvalKit produced the public numbers; `image_vqa.py`,
`VTCBench.build_prompt`) sends the instructions below, its typo "memorizeit" included. `official`
sends the benchmark's `examples/run_wild.py` texts, which swap the Retrieval and Reasoning
instructions (Retrieval gets the "book snippet ... final answer" text) and spell "memorize it".
Greedy, at most 2048 new tokens as VLMEvalKit's Qwen2VLChat (near-greedy: top_k 1); the
benchmark's own runs stop at 192 (`--max-new-tokens 192`).
"""

from __future__ import annotations

from megatron_mmprolong.eval.vtcbench.data import Sample
from megatron_mmprolong.serving.chat import ChatRequest, image_mime, image_part, text_part
from megatron_mmprolong.serving.runner import UnbuildableJob

_BOOK = "Answer a question based on the above book snippet. "
_SHORT = ("Your answer should be short and based on either explicitly stated facts or strong, logical inferences. "
          "Return only the final answer with no additional explanation or reasoning. Question: ")
_MAGIC = ("Some special magic numbers are hidden within the following text. Make sure to {memorize}. "
          "I will quiz you about the numbers afterwards. Question: ")
_MEMORY = ("Based on the above context, write an answer in the form of a short phrase for the following question. "
           "Answer with exact words from the context whenever possible. Question: ")
INSTRUCTIONS = {
    "vlmevalkit": {"Retrieval": _BOOK + _MAGIC.format(memorize="memorizeit"), "Reasoning": _BOOK + _SHORT,
                   "Memory": _MEMORY},
    "official": {"Retrieval": _BOOK + _SHORT, "Reasoning": _BOOK + _MAGIC.format(memorize="memorize it"),
                 "Memory": _MEMORY},
}
DEFAULT_PROMPTS = "vlmevalkit"
MAX_NEW_TOKENS = 2048  # VLMEvalKit's Qwen2VLChat default (top_k 1: greedy); the benchmark's own runs: 192


def prompt_text(sample: Sample, prompts: str = DEFAULT_PROMPTS) -> str:
    return INSTRUCTIONS[prompts][sample.split] + sample.problem


def chat_request(sample: Sample, images: list[bytes], prompts: str = DEFAULT_PROMPTS,
                 max_new_tokens: int = MAX_NEW_TOKENS) -> ChatRequest:
    """The greedy request: the pages as data URLs (their own bytes and type), then the text."""
    content = []
    for number, data in enumerate(images, 1):
        try:
            content.append(image_part(data, image_mime(data)))
        except ValueError as err:
            raise UnbuildableJob(f"{sample.name}: image {number} cannot be sent ({err})") from None
    content.append(text_part(prompt_text(sample, prompts)))
    return ChatRequest([{"role": "user", "content": content}], max_tokens=max_new_tokens, temperature=0.0)
