"""The LLM judge of Memory replies, as the benchmark's `examples/llm_judge.py` grades them: its
prompt (below, character for character; VLMEvalKit's copy in `utils/verifier.py` lacks the
newline before each <... Begin>/<... End> marker), the gold answers joined by ", ", the reply
after its </think> (the whole reply stripped when it has none), temperature 0, at most 10 tokens;
the verdict is the stripped reply, "A" (correct: 1), "B" (incorrect) or "C" (invalid). Any other
reply counts as the benchmark counts it after its retries, "C" (0), and is counted apart
("unreadable"); greedy retries would get the same reply, so none are made.

VLMEvalKit instead formats the gold list as Python's list repr, judges at temperature 1 and keeps
<think> in the reply. Every verdict is journaled (OUT/judge.jsonl): a rerun or `eval
vtcbench-score` asks only for new cases. A judge request that fails after the endpoint's retries
leaves its case without a verdict, not journaled (a rerun asks again).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from string import Template

from megatron_mmprolong.eval.dataset_qa import EvalError
from megatron_mmprolong.serving.chat import ChatReply, ChatRequest, request_key
from megatron_mmprolong.serving.journal import Journal
from megatron_mmprolong.serving.runner import Job, run_jobs

JUDGE_MAX_TOKENS = 10  # llm_judge.py's max_tokens
VERDICTS = {"A": 1.0, "B": 0.0, "C": 0.0}
PLACEHOLDERS = ("question", "gold_answer", "llm_response")

OFFICIAL_PROMPT = (  # llm_judge.py QUESTION_QUALITY_PROMPT_EN_NO_COT, formatted with $placeholders
    'Please as a grading expert, judge whether the final answers given by the candidates below are '
    'consistent with the standard answers, that is, whether the candidates answered correctly. Here are '
    "some evaluation criteria: 1. Please refer to the given standard answer. You don't need to "
    're-generate the answer to the question because the standard answer has been given. You only need to '
    "judge whether the candidate's answer is consistent with the standard answer according to the form of "
    'the question. THE STANDARD ANSWER IS ALWAYS CORRECT AND THE QUESTION IS PERFECTLY VALID. NEVER '
    'QUESTION THEM. 2. ONLY compare the FINAL ANSWER - COMPLETELY IGNORE any potential errors in the '
    'REASONING PROCESSES. 3. Some answers may be expressed in different ways, such as some answers may be '
    'a mathematical expression, some answers may be a textual description, as long as the meaning '
    'expressed is the same. Before making a judgment, please understand the question and the standard '
    "answer first, and then judge whether the candidate's answer is correct.If the standard answer does "
    "not specify a unit, but the candidate's answer includes a unit that is correct for the value given, "
    'consider it correct. 4. Some answers may consist of multiple items, such as multiple-choice '
    'questions, multiple-select questions, fill-in-the-blank questions, etc. Regardless of the question '
    'type, the final answer will be considered correct as long as it matches the standard answer, '
    'regardless of whether the reasoning process is correct. For multiple-select questions and '
    'multi-blank fill-in-the-blank questions, all corresponding options or blanks must be answered '
    'correctly and match the standard answer exactly to be deemed correct. 5. If the prediction is given '
    "with \\boxed{}, please ignore the \\boxed{} and only judge whether the candidate's answer is "
    "consistent with the standard answer. 6. If the candidate's answer is invalid (e.g., incomplete (cut "
    'off mid-response), lots of unnormal repetitive content, or irrelevant to the question, saying it '
    "can't answer the question because some irresistible factors, like ethical issues, no enough "
    'information, etc.), select option C (INVALID).Please judge whether the following answers are '
    'consistent with the standard answer based on the above criteria. Grade the predicted answer of this '
    'new question as one of: A: CORRECT B: INCORRECT C: INVALID Just return the letters "A", "B", or "C", '
    'with no text around it. Here is your task. Simply reply with either CORRECT, INCORRECT, or INVALID. '
    "Don't apologize or correct yourself if there was a mistake; we are just trying to grade the answer. "
    '\n<Original Question Begin>: $question \n<Original Question End> \n<Standard Answer Begin>: '
    "$gold_answer \n<Standard Answer End> \n<Candidate's Answer Begin>: $llm_response \n<Candidate's Answer "
    "End> \nJudging the correctness of the candidate's answer:"
)


@dataclass(frozen=True)
class JudgePrompt:
    name: str  # "official", or the file it was read from
    sha256: str
    text: str  # with $question, $gold_answer, $llm_response

    def message(self, question: str, answers: list[str] | tuple[str, ...], reply: str) -> str:
        return Template(self.text).substitute(question=question, gold_answer=", ".join(answers),
                                              llm_response=final_answer(reply))


def load_judge_prompt(path: str | Path | None = None) -> JudgePrompt:
    if path is None:
        return JudgePrompt("official", hashlib.sha256(OFFICIAL_PROMPT.encode()).hexdigest(), OFFICIAL_PROMPT)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise EvalError(f"judge prompt file {path}: cannot be read ({err})") from None
    try:
        Template(text).substitute(dict.fromkeys(PLACEHOLDERS, "x"))
    except (KeyError, ValueError) as err:
        raise EvalError(f"judge prompt file {path}: an unknown or malformed placeholder ({err}); it may use "
                        f"{', '.join('$' + p for p in PLACEHOLDERS)}") from None
    return JudgePrompt(str(path), hashlib.sha256(text.encode()).hexdigest(), text)


_AFTER_THINK = re.compile(r"</think>(.*)", flags=re.DOTALL)


def final_answer(reply: str) -> str:
    """The reply after its first </think>, stripped (llm_judge.py's extract_final_answer)."""
    found = _AFTER_THINK.search(reply)
    return (found.group(1) if found else reply).strip()


def verdict(text: str) -> str | None:
    """"A", "B" or "C" when the judge's reply is exactly one of them (stripped), else None."""
    text = text.strip()
    return text if text in VERDICTS else None


@dataclass(frozen=True)
class JudgeCase:
    key: str  # the prediction's journal key
    question: str
    answers: tuple[str, ...]
    reply: str


def judge(cases: list[JudgeCase], backend, prompt: JudgePrompt, journal_path: Path, concurrency: int = 8,
          progress: bool = True, max_failed: int = 0, failed: dict[str, str] | None = None) -> dict[str, str | None]:
    """The judge's reply text per case key (None when it refused the request or failed: then the
    case key and the error go into `failed`). The same message for several cases is sent once."""
    messages = {c.key: prompt.message(c.question, c.answers, c.reply) for c in cases}
    sharing: dict[str, list[str]] = {}
    for case in cases:
        key = request_key("vtcbench-judge", backend.name, messages[case.key], JUDGE_MAX_TOKENS)
        sharing.setdefault(key, []).append(case.key)
    replies: dict[str, str | None] = {}

    def record(job: Job, reply: ChatReply) -> None:
        for case in sharing[job.key]:
            replies[case] = None if reply.error else reply.text

    def lost(job: Job, error: str) -> None:
        for case in sharing[job.key]:
            replies[case] = None
            if failed is not None:
                failed[case] = error

    def job(key: str, case: str) -> Job:
        request = ChatRequest([{"role": "user", "content": messages[case]}], max_tokens=JUDGE_MAX_TOKENS,
                              temperature=0.0)
        return Job(key, lambda: request)

    with Journal(journal_path) as journal:
        run_jobs(backend, [job(k, group[0]) for k, group in sharing.items()], journal, concurrency, record,
                 "judge" if progress else None, max_failed, lost)
    return replies
