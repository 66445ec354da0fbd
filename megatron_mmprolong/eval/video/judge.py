"""The optional LLM judge fallback, only where the reference uses one: MLVU (VLMEvalKit's default
judge for it is a GPT model; Video-MME and LongVideoBench are scored by the rule alone there). A
reply in which the rule finds no letter goes to the judge with VLMEvalKit's option-matching
prompt (`extract_answer_from_item`, English template, as it is sent); the judge's letter is its
answer, "Z" (or anything else) wrong. Verdicts are journaled in OUT/judge.jsonl.
"""

from __future__ import annotations

from pathlib import Path

from megatron_mmprolong.eval.video.answers import extract_letter
from megatron_mmprolong.serving.chat import ChatRequest, request_key
from megatron_mmprolong.serving.journal import Journal
from megatron_mmprolong.serving.runner import Job, run_jobs

JUDGED_BENCHMARKS = ("mlvu",)
JUDGE_FILE = "judge.jsonl"
TEMPLATE = (
    "You are an AI assistant who will help me to match an answer with several options of a single-choice question. "
    "You are provided with a question, several options, and an answer, and you need to find which option is most "
    "similar to the answer. If the meaning of all options are significantly different from the answer, output Z. "
    "Your should output a single uppercase character in A, B, C, D (if they are valid options), and Z. \n"
    "Example 1: \n"
    "Question: What is the main object in image?\nOptions: A. teddy bear B. rabbit C. cat D. dog\n"
    "Answer: a cute teddy bear\nYour output: A\n"
    "Example 2: \n"
    "Question: What is the main object in image?\nOptions: A. teddy bear B. rabbit C. cat D. dog\n"
    "Answer: Spider\nYour output: Z\n"
    "Example 3: \n"
    "Question: {question}?\nOptions: {options}\nAnswer: {reply}\nYour output: "
)


def judge_prompt(question: str, options: list[str], reply: str) -> str:
    listed = "There are several options: \n" + "".join(f"{'ABCDE'[i]}. {o}\n" for i, o in enumerate(options))
    return TEMPLATE.format(question=question, options=listed, reply=reply.strip())


def needs_judge(entry: dict) -> bool:
    return (entry["benchmark"] in JUDGED_BENCHMARKS and not entry["reply"].get("error")
            and extract_letter(entry["reply"]["text"], entry["options"]) == "")


def judge_letters(backend, entries: list[dict], out: Path, concurrency: int = 8, max_failed: int = 10) -> dict:
    """The judge's letter for each entry the rule cannot read ({prediction key: letter})."""
    jobs = []
    for entry in filter(needs_judge, entries):
        prompt = judge_prompt(entry["question"], entry["options"], entry["reply"]["text"])
        key = request_key("video-judge", backend.name, entry["key"], prompt)
        jobs.append(Job(key, lambda p=prompt: ChatRequest([{"role": "user", "content": p}], max_tokens=16),
                        {"prediction": entry["key"], "letters": len(entry["options"])}))
    if jobs:
        with Journal(out / JUDGE_FILE) as journal:
            run_jobs(backend, jobs, journal, concurrency, None, "judge", max_failed)
    verdicts = {e["key"]: e for e in Journal(out / JUDGE_FILE, read_only=True).entries()} if jobs else {}
    letters = {}
    for job in jobs:
        entry = verdicts.get(job.key)
        if entry and not entry["reply"].get("error"):
            letters[job.extra["prediction"]] = extract_letter(entry["reply"]["text"], [""] * job.extra["letters"])
    return letters
