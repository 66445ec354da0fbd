"""The reference's prompts (VLMEvalKit, whose runs produced the public numbers), typos and all:
the text before the video and the text after it, joined into one user message as Qwen2-VL's
wrapper in VLMEvalKit joins its content parts (no separator). Zero-shot, no subtitles.

Video-MME (`Video-MME_1fps`): "" | video | "\\nThese are the frames of a video. Select ... option.\\n"
  "Question: {question}\\n{options, one a line, with their 'A. ' prefix}\\nAnswer: ".
MLVU (`MLVU_MCQ`): the system text (a plain first text: the wrapper ignores roles) | video |
  "Question: {question}\\nOptions:\\n(A) ...\\n(B) ..." "\\nOnly give the best option.".
LongVideoBench: "" | video | "{question}\\nA. ...\\nB. ...\\nAnswer with the option's letter from the
  given choices directly.".
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_mmprolong.eval.video.data import LETTERS, VideoQuestion

VIDEOMME_INSTRUCTION = ("\nThese are the frames of a video. Select the best answer to the following multiple-choice "
                        "question based on the video. Respond with only the letter (A, B, C, or D) of the correct "
                        "option.\n")
MLVU_SYSTEM = ("Carefully watch this video and pay attention to every detail. Based on your observations, select the "
               "best option that accurately addresses the question.")
MLVU_SUFFIX = "\nOnly give the best option."
LVB_SUFFIX = "Answer with the option's letter from the given choices directly."


@dataclass(frozen=True)
class VideoPrompt:
    before: str  # text before the video
    after: str  # text after it

    def text(self, video: str = "<video>") -> str:
        return self.before + video + self.after


def build_prompt(question: VideoQuestion) -> VideoPrompt:
    if question.benchmark == "videomme":
        options = "\n".join(question.options)
        return VideoPrompt("", VIDEOMME_INSTRUCTION + f"Question: {question.question}\n{options}\nAnswer: ")
    if question.benchmark == "mlvu":
        options = "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(question.options))
        return VideoPrompt(MLVU_SYSTEM, f"Question: {question.question}\nOptions:\n{options}" + MLVU_SUFFIX)
    if question.benchmark == "lvb":
        options = "".join(f"{LETTERS[i]}. {c}\n" for i, c in enumerate(question.options))
        return VideoPrompt("", f"{question.question}\n{options}{LVB_SUFFIX}")
    raise ValueError(f"unknown benchmark {question.benchmark!r}")
