"""The harness's prompts, character for character (EdinburghNLP/MMLongBench `data.py`:
`load_doc_qa`, `load_mm_niah_text`, `load_mm_niah_image_count`, `load_mm_niah_image_mc`), and the
chat request they become.

Document QA: the instruction, then every page as "Document {doc_id:.15}: <image>" (v1.1, the
default: the version the paper used and the harness's current code) or, with `--page-labels v1.0`,
"Document {doc_id:.15} (page {page_id}): <image>" (its first release), joined by blank lines, then
the question after "Based on Document {doc_id:.15}, answer the following question. ". MM-NIAH:
the interleaved paragraphs joined by blank lines, choices as "\\nA. <image>" lines after the
question of the image retrieval and reasoning tasks. The user message is the text cut at every
<image>; the assistant turn is prefilled with "Answer:" and the reply continues it, as the
harness's transformers runner does (`continue_final_message`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from megatron_mmprolong.eval.mmlongbench.data import DataRoot, Sample, image_paths
from megatron_mmprolong.serving.chat import ChatRequest, image_mime, image_part, text_part
from megatron_mmprolong.serving.runner import UnbuildableJob

_ANSWER_FORMAT = "Write your answer in the following format:\nAnswer: [answer]\n\n{context}\n\nQuestion: {question}"
DOC_TEMPLATE = ("You are given a document with text and images, and a question. Answer the question as concisely as "
                "you can, using a single phrase or sentence if possible. If the question cannot be answered based on "
                "the information in the article, write 'Not answerable.' " + _ANSWER_FORMAT)
NIAH_TEMPLATE = ("You are given interleaved text and images. Please answer the question based on the given text and "
                 "images. " + _ANSWER_FORMAT)
NIAH_CHOICE_TEMPLATE = ("You are given interleaved text and images. Please answer the question with the option's "
                        "letter (A, B, etc.) based on the given text and images. " + _ANSWER_FORMAT)
# the harness's data.py, load_doc_qa's item_template: v1.1 at HEAD (22b9f27; "(page N)" removed in
# ceedb4c), v1.0 at its first commit 26197d2
PAGE_LABELS = {"v1.0": "Document {doc_id:.15} (page {page_id}): <image>", "v1.1": "Document {doc_id:.15}: <image>"}
DEFAULT_PAGE_LABELS = "v1.1"
QUESTION_PREFIX = "Based on Document {doc_id:.15}, answer the following question. "
PREFILL = "Answer:"  # the harness's system_template: the assistant turn starts with it
IMAGE = "<image>"
MAX_NEW_TOKENS = 128  # generation_max_length of every doc-QA and MM-NIAH config


@dataclass(frozen=True)
class Prompt:
    text: str  # the user message, images as <image>
    images: list[str]  # relative to the image root, one per <image>
    question: str  # the question as the prompt asks it (the judge sees this one)


def page_document(path: str) -> str:
    """A page's document id: the folder its image is in (negative pages carry their own)."""
    return path.split("/")[-2]


def page_label(path: str, version: str = DEFAULT_PAGE_LABELS) -> str:
    return PAGE_LABELS[version].format(doc_id=page_document(path), page_id=path.split("page")[-1].split(".")[0])


def build_prompt(sample: Sample, page_labels: str = DEFAULT_PAGE_LABELS) -> Prompt:
    record = sample.record
    if sample.category == "docqa":
        context = "\n\n".join(page_label(p, page_labels) for p in record["page_list"])
        question = QUESTION_PREFIX.format(doc_id=str(record["doc_name"])) + record["question"]
        return Prompt(DOC_TEMPLATE.format(context=context, question=question), image_paths(sample), question)
    context = "\n\n".join(c["text"] for c in record["ctxs"])
    question, template = record["question"], NIAH_TEMPLATE
    if sample.dataset in ("retrieval-image", "reasoning-image"):
        question += "".join(f"\n{chr(ord('A') + i)}. {IMAGE}" for i in range(len(record["choices_image"])))
        template = NIAH_CHOICE_TEMPLATE
    return Prompt(template.format(context=context, question=question), image_paths(sample), question)


def chat_request(prompt: Prompt, root: DataRoot, max_new_tokens: int = MAX_NEW_TOKENS) -> ChatRequest:
    """The greedy request: the text cut at each <image>, every image the file's own bytes as a
    data URL; an unreadable image raises UnbuildableJob naming it (the sample is counted, not sent)."""
    pieces = re.split(f"({re.escape(IMAGE)})", prompt.text)
    images = iter(prompt.images)
    content = []
    for piece in pieces:
        if piece == IMAGE:
            content.append(_image(root.image(next(images))))
        elif piece:
            content.append(text_part(piece))
    return ChatRequest([{"role": "user", "content": content}, {"role": "assistant", "content": PREFILL}],
                       max_tokens=max_new_tokens, temperature=0.0,
                       extra={"continue_final_message": True, "add_generation_prompt": False})


def _image(path: Path) -> dict:
    try:
        data = path.read_bytes()
        return image_part(data, image_mime(data))
    except (OSError, ValueError) as err:
        raise UnbuildableJob(f"image {path} cannot be sent ({err})") from None
