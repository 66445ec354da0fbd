"""`eval mmlongbench --endpoint` (and its judge, and synth-qa's generator) against strict
OpenAI-compatible servers on loopback: one that validates the request's fields as FastAPI-based
servers do (`transformers serve`: HTTP 422, {"detail": "Unexpected fields in the request: ..."}),
a hosted reasoning model that refuses `max_tokens` (HTTP 400, `unsupported_parameter`), a server
that refuses every request alike, and one whose handler raises on one sample's image (a plain-text
500). The run adapts where the harness has another form, stops in one line where it cannot, and
names the samples that failed."""

import json

import pytest

from megatron_mmprolong.cli import main
from megatron_mmprolong.eval.mmlongbench.toy_data import DOC_QA, NIAH, stand_in_judge, write_toy_data_root
from megatron_mmprolong.serving.scripted_server import (
    INTERNAL_SERVER_ERROR, Fault, ScriptedChatServer, fastapi_strict, hosted_reasoning_model,
)

ANSWERS = {q: a for rows in DOC_QA.values() for q, a, _ in rows} | {
    q.replace("<image>", ""): a for rows in NIAH.values() for q, a in rows}
SAMPLES = 18  # 6 document-QA and 12 MM-NIAH samples at 8K


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_toy_data_root(tmp_path_factory.mktemp("mmlb"))


def _question(body) -> str:
    text = "".join(p.get("text", "") for p in body["messages"][0]["content"])
    return text.rsplit("Question: ", 1)[1].split("\nA. ")[0].split("answer the following question. ")[-1]


def _right(body) -> str:
    """The right answer to every sample (what the reply continues or follows: "Answer:")."""
    answer = ANSWERS[_question(body)]
    if isinstance(answer, int):
        return f" {'ABC'[answer]}"
    return f" {json.dumps(answer) if isinstance(answer, list) else answer}"


def _command(data_root, out, url, *more):
    return ["eval", "mmlongbench", "--endpoint", url, "--model", "scripted", "--data-root", str(data_root),
            "--out", str(out), "--lengths", "8", *more]


def _error_lines(err: str) -> list[str]:
    """The lines the command printed for the user, less the progress bars' redraws."""
    return [line for line in err.replace("\r", "\n").splitlines() if line.startswith("mmprolong")]


def _entries(out):
    path = out / "predictions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_server_that_refuses_the_prefill_fields_gets_the_harness_s_vllm_form(data_root, tmp_path, capsys):
    """transformers serve refuses continue_final_message / add_generation_prompt: the run sends
    the harness's vLLM request instead ("Answer:" as a closed assistant turn, the server's own
    generation prompt after it), says so once, records it in the folder, and a judge grades."""
    out = tmp_path / "run"
    with ScriptedChatServer(fastapi_strict(_right)) as model, \
            ScriptedChatServer(fastapi_strict(stand_in_judge), model="judge") as judge:
        command = _command(data_root, out, model.url, "--judge-endpoint", judge.url, "--judge-model", "judge")
        assert main(command) == 0
        logged = capsys.readouterr()
        sent = len(model.bodies)
        assert main(command) == 0  # a rerun sends nothing
        assert len(model.bodies) == sent
    refused = [b for b in model.bodies if "continue_final_message" in b]
    closed = [b for b in model.bodies if "continue_final_message" not in b]
    assert 1 <= len(refused) <= 4 and len(closed) == SAMPLES  # only the requests in flight before the switch
    assert all(b["messages"][-1] == {"role": "assistant", "content": "Answer:"} and "add_generation_prompt" not in b
               for b in closed)
    assert json.loads((out / "mmlongbench_config.json").read_text())["assistant_prefill"] == "closed"
    assert logged.err.count("closed assistant turn") == 1 and "Unexpected fields in the request" in logged.err
    entries = _entries(out)
    assert len(entries) == SAMPLES and not any(e["reply"]["error"] for e in entries)
    scores = json.loads((out / "scores.json").read_text())
    assert scores["run"]["request_form"]["assistant_prefill"] == "closed"
    assert scores["categories"]["docqa"]["avg"]["8"]["judge"] == 100.0
    assert "MMLongBench document QA (LLM judge / rule-based)" in logged.out
    assert f"{SAMPLES} replies: {SAMPLES} scored, 0 refused by the backend" in logged.out

    more = tmp_path / "more"  # a folder keeps its form, also on a server that takes both
    more.mkdir()
    (more / "mmlongbench_config.json").write_text((out / "mmlongbench_config.json").read_text())
    with ScriptedChatServer(_right) as lenient:
        assert main(_command(data_root, more, lenient.url, "--datasets", "slidevqa")) == 0
    assert lenient.bodies and all("continue_final_message" not in b for b in lenient.bodies)


def test_a_folder_answered_in_one_form_is_not_continued_in_the_other(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    with ScriptedChatServer(_right) as lenient:
        assert main(_command(data_root, out, lenient.url, "--datasets", "mmlongdoc")) == 0
    capsys.readouterr()
    with ScriptedChatServer(fastapi_strict(_right)) as strict:
        assert main(_command(data_root, out, strict.url, "--datasets", "mmlongdoc", "slidevqa")) == 2
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "Unexpected fields in the request" in err[0]
    err = err[0]
    assert "2 replies made with continue_final_message" in err and "another --out" in err
    assert len(_entries(out)) == 2  # nothing journaled
    assert json.loads((out / "mmlongbench_config.json").read_text())["assistant_prefill"] == "continue"


def test_the_same_refusal_for_every_request_stops_in_one_line_with_exit_2(data_root, tmp_path, capsys):
    """The server refuses the request itself (every request alike): one line quoting it, exit 2,
    nothing journaled as an answer, and a rerun on a fixed server sends every sample."""
    out = tmp_path / "run"
    refusal = Fault(status=400, body={"error": {"message": "Image input is not supported by this model.",
                                                "type": "BadRequestError"}})
    with ScriptedChatServer(lambda body: refusal) as server:
        assert main(_command(data_root, out, server.url)) == 2
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("mmprolong eval: error: ")
    err = err[0]
    assert "HTTP 400: Image input is not supported by this model." in err and server.url in err
    assert len(server.bodies) <= 3 + 4 and _entries(out) == []
    with ScriptedChatServer(_right) as server:
        assert main(_command(data_root, out, server.url)) == 0
    assert len(server.bodies) == SAMPLES and len(_entries(out)) == SAMPLES


def test_an_image_the_server_cannot_decode_fails_its_sample_by_id_and_the_run_goes_on(data_root, tmp_path, capsys):
    out = tmp_path / "run"

    def one_bad_image(body):
        return INTERNAL_SERVER_ERROR if _question(body) == "Who signed the report?" else _right(body)

    with ScriptedChatServer(one_bad_image) as server:
        assert main(_command(data_root, out, server.url, "--max-retries", "1")) == 1
    logged = capsys.readouterr()
    assert "17 replies: 17 scored" in logged.out  # the others are answered and scored
    err = _error_lines(logged.err)
    assert len(err) == 1
    err = err[0]
    assert "1 sample failed after retries" in err and "mmlongdoc 8K line 1 (id mmlongdoc_0)" in err
    assert "HTTP 500: Internal Server Error" in err and "rerun" in err
    assert len(_entries(out)) == 17 and "mmlongdoc_0" not in {e["id"] for e in _entries(out)}
    with ScriptedChatServer(one_bad_image) as server:  # at most 0 failures: stopped at the first, named
        assert main(_command(data_root, out, server.url, "--max-retries", "0", "--max-failed", "0")) == 1
    err = capsys.readouterr().err
    assert "mmlongdoc 8K line 1 (id mmlongdoc_0)" in err and "--max-failed 0" in err and len(server.bodies) == 1
    with ScriptedChatServer(_right) as server:  # a rerun retries the failed sample only
        assert main(_command(data_root, out, server.url)) == 0
    assert len(server.bodies) == 1 and len(_entries(out)) == SAMPLES


def test_a_hosted_reasoning_endpoint_and_judge_get_max_completion_tokens(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    docqa = ["--datasets", "mmlongdoc", "slidevqa", "longdocurl"]
    with ScriptedChatServer(hosted_reasoning_model(_right)) as model, \
            ScriptedChatServer(hosted_reasoning_model(stand_in_judge), model="judge") as judge:
        assert main(_command(data_root, out, model.url, "--judge-endpoint", judge.url, "--judge-model", "judge",
                             *docqa)) == 0
    logged = capsys.readouterr()
    answered = [b for b in model.bodies if "max_completion_tokens" in b]
    assert len(answered) == 6 and all(b["max_completion_tokens"] == 128 for b in answered)
    judged = [b for b in judge.bodies if "max_completion_tokens" in b]
    assert len(judged) == 6 and all(b["max_completion_tokens"] == 256 and "max_tokens" not in b for b in judged)
    assert logged.err.count("sending max_completion_tokens") == 2  # once per server
    scores = json.loads((out / "scores.json").read_text())
    assert scores["categories"]["docqa"]["avg"]["8"]["judge"] == 100.0
    assert scores["run"]["request_form"]["max_tokens_field"] == "max_completion_tokens"

    with ScriptedChatServer(hosted_reasoning_model(stand_in_judge), model="judge") as judge:
        assert main(["eval", "score", "--predictions", str(out / "predictions.jsonl"), "--out", str(tmp_path / "s"),
                     "--judge-endpoint", judge.url, "--judge-model", "judge", "--max-tokens-field", "max_tokens"]) == 2
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "Unsupported parameter: 'max_tokens'" in err[0]


def test_the_table_names_the_judge_when_it_gave_no_verdict():
    from megatron_mmprolong.eval.mmlongbench.scores import format_table, score_predictions

    entry = {"key": "k", "dataset": "mmlongdoc", "category": "docqa", "length": 8, "answer": "12",
             "answer_format": "Integer", "reply": {"text": " 12", "finish_reason": "stop", "error": None}}
    judge = {"model": "judge", "endpoint": "http://127.0.0.1:1/v1", "prompts": "v1", "prompts_sha256": "x"}
    table = format_table(score_predictions([entry], {"k": None}, judge))
    assert "no judge" not in table and "(LLM judge / rule-based)" in table
    assert "judge judge: 1 of 1 replies without a verdict" in table
    assert "no judge (--judge-endpoint)" in format_table(score_predictions([entry], {}, None))


def test_synth_qa_and_the_judges_take_the_max_tokens_field(monkeypatch, tmp_path):
    from megatron_mmprolong.cli import build_parser
    from megatron_mmprolong.data.synth_qa import pipeline

    seen = {}

    def fake_run(inputs, out, config, generator, progress=True):
        seen["field"] = generator.config.max_tokens_field
        return dict.fromkeys(("documents", "requests", "accepted", "rejects", "tokens", "seconds"), 0)

    monkeypatch.setattr(pipeline, "run_synth_qa", fake_run)
    with ScriptedChatServer(_right) as server:
        assert main(["synth-qa", "--input", str(tmp_path), "--out", str(tmp_path / "o"), "--endpoint", server.url,
                     "--model", "scripted", "--max-tokens-field", "max_completion_tokens"]) == 0
    assert seen["field"] == "max_completion_tokens"
    args = build_parser().parse_args(["eval", "score", "--predictions", "p"])
    assert (args.max_tokens_field, args.max_failed) == ("auto", 10)


def test_synth_qa_on_strict_servers_json_mode_ignored_and_max_tokens_refused(tmp_path, capsys):
    """transformers serve accepts response_format and ignores it: synth-qa still reads the fenced
    objects, and says once that JSON mode had no effect; a hosted reasoning model gets
    max_completion_tokens."""
    from megatron_mmprolong.data.synth import SynthConfig, synth_docs
    from megatron_mmprolong.data.synth_qa.oracle import TextLayerOracle

    pdfs = tmp_path / "pdfs"
    synth_docs(pdfs, SynthConfig(docs=1, min_pages=6, max_pages=6, page_width=308, page_height=336, font_size=9,
                                 format="pdf", seed=3))
    oracle = TextLayerOracle(sorted(str(p) for p in pdfs.glob("*.pdf")))
    command = ["synth-qa", "--input", str(pdfs), "--min-pages", "4", "--document-pages", "5", "8", "--segment-pages",
               "3", "4", "--questions-per-document", "3", "--tasks", "extract-single=1", "--workers", "0",
               "--model", "scripted"]
    with ScriptedChatServer(fastapi_strict(lambda body: "Here is the pair:\n```json\n" + oracle(body) + "\n```")) \
            as server:
        assert main([*command, "--out", str(tmp_path / "qa"), "--endpoint", server.url, "--json-mode"]) == 0
    assert len(server.bodies) == 3 and all(b["response_format"] == {"type": "json_object"} for b in server.bodies)
    logged = capsys.readouterr()
    accepted = json.loads(logged.out)["accepted"]
    assert accepted["extract-single"] >= 1  # read from the fenced objects
    assert logged.err.count("seems to ignore response_format") == 1 and "3 of 3 replies" in logged.err
    with ScriptedChatServer(hosted_reasoning_model(oracle)) as server:
        assert main([*command, "--out", str(tmp_path / "qa2"), "--endpoint", server.url, "--json-mode"]) == 0
    answered = [b for b in server.bodies if "max_completion_tokens" in b]
    assert len(answered) == 3 and all(b["max_completion_tokens"] == 1024 for b in answered)
    logged = capsys.readouterr()
    assert json.loads(logged.out)["accepted"] == accepted and "response_format" not in logged.err
