"""The chat-completions client, journal and runner against a real HTTP server on loopback (the
package's scripted server: the protocol and its faults, not a model)."""

import json
import socket
import threading
import time

import pytest

from megatron_mmprolong.serving.chat import ChatReply, ChatRequest, image_part, request_key, text_part
from megatron_mmprolong.serving.endpoint import ChatEndpoint, EndpointConfig, EndpointError
from megatron_mmprolong.serving.journal import Journal
from megatron_mmprolong.serving.runner import Job, UnbuildableJob, run_jobs
from megatron_mmprolong.serving.scripted_server import Fault, ScriptedChatServer


def _echo(body):
    return "echo: " + next(p["text"] for p in body["messages"][-1]["content"] if p["type"] == "text")


def _job(i: int) -> Job:
    return Job(request_key("test", i), lambda: ChatRequest([{"role": "user", "content": [text_part(f"q{i}")]}]))


def _config(server, **kwargs) -> EndpointConfig:
    return EndpointConfig(url=server.url, model=server.model, backoff=0.01, **kwargs)


def test_replies_come_back_in_the_protocol_and_images_travel_as_data_urls():
    with ScriptedChatServer(_echo) as server:
        endpoint = ChatEndpoint(_config(server))
        assert endpoint.check() == ["scripted"]
        replies = {}
        messages = [{"role": "user", "content": [image_part(b"\x89PNG\r\n\x1a\nxx"), text_part("hello")]}]
        job = Job("a", lambda: ChatRequest(messages, max_tokens=7))
        stats = run_jobs(endpoint, [job], on_reply=lambda j, r: replies.setdefault(j.key, r))
    assert replies["a"].text == "echo: hello" and replies["a"].finish_reason == "stop"
    assert replies["a"].completion_tokens > 0 and stats.sent == 1
    body = server.bodies[0]
    assert body["model"] == "scripted" and body["max_tokens"] == 7 and body["temperature"] == 0.0
    assert body["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")


def test_a_500_and_a_timeout_are_retried_until_an_answer():
    script = iter([Fault(status=500), Fault(delay=1.0, text="late"), Fault(status=429), Fault(text="ok")])
    with ScriptedChatServer(lambda body: next(script)) as server:
        endpoint = ChatEndpoint(_config(server, timeout=0.3))
        got = []
        run_jobs(endpoint, [_job(0)], on_reply=lambda j, r: got.append(r))
    assert [r.text for r in got] == ["ok"]
    assert endpoint.stats.retries == 3 and endpoint.stats.requests == 4


def test_retries_give_up_with_the_url_and_the_last_error():
    with ScriptedChatServer(lambda body: Fault(status=503)) as server:
        endpoint = ChatEndpoint(_config(server, max_retries=2))
        with pytest.raises(EndpointError, match=r"failed 3 times; last: HTTP 503") as err:
            run_jobs(endpoint, [_job(0)])
    assert server.url in str(err.value)


def test_a_refused_request_is_counted_not_fatal():
    with ScriptedChatServer(lambda body: Fault(status=400) if "q1" in json.dumps(body) else "fine") as server:
        endpoint = ChatEndpoint(_config(server))
        got = {}
        stats = run_jobs(endpoint, [_job(0), _job(1), _job(2)], on_reply=lambda j, r: got.setdefault(j.key, r))
    assert stats.refused == 1 and stats.sent == 3
    assert got[_job(1).key].error.startswith("HTTP 400") and got[_job(0).key].text == "fine"


def test_a_reply_cut_at_the_length_limit_is_counted():
    with ScriptedChatServer(lambda body: Fault(text="cut", finish_reason="length")) as server:
        stats = run_jobs(ChatEndpoint(_config(server)), [_job(0)])
    assert stats.truncated == 1


def test_a_job_whose_request_cannot_be_built_is_answered_with_the_reason_unsent(tmp_path):
    def unbuildable():
        raise UnbuildableJob("page 3 of a.pdf cannot be rendered")

    with ScriptedChatServer(_echo) as server:
        got = {}
        with Journal(tmp_path / "answers.jsonl") as journal:
            stats = run_jobs(ChatEndpoint(_config(server)), [Job("bad", unbuildable), _job(1)], journal,
                             on_reply=lambda j, r: got.setdefault(j.key, r))
            assert "bad" not in journal  # a rerun tries to build it again
    assert (stats.unbuilt, stats.sent, len(server.bodies)) == (1, 1, 1)
    assert got["bad"].error == "page 3 of a.pdf cannot be rendered" and got[_job(1).key].text == "echo: q1"


def test_unreachable_endpoint_fails_fast_naming_the_url():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    endpoint = ChatEndpoint(EndpointConfig(url=f"http://127.0.0.1:{port}", model="m"))
    began = time.perf_counter()
    with pytest.raises(EndpointError, match=f"cannot reach the endpoint http://127.0.0.1:{port}/v1"):
        endpoint.check()
    assert time.perf_counter() - began < 5


def test_a_model_the_server_does_not_serve_is_named():
    with ScriptedChatServer(_echo, model="served-one") as server:
        with pytest.raises(EndpointError, match="does not serve model 'other'.*served-one"):
            ChatEndpoint(EndpointConfig(url=server.url, model="other")).check()


def test_the_api_key_is_sent_but_never_written(tmp_path, monkeypatch):
    secret = "sk-test-0123456789abcdef"
    monkeypatch.setenv("MY_KEY", secret)
    with ScriptedChatServer(lambda body: Fault(status=500) if len(server.bodies) == 1 else "ok") as server:
        endpoint = ChatEndpoint(_config(server, api_key_env="MY_KEY"))
        with Journal(tmp_path / "answers.jsonl") as journal:
            run_jobs(endpoint, [_job(0)], journal)
    assert server.headers[0]["Authorization"] == f"Bearer {secret}"
    assert secret not in (tmp_path / "answers.jsonl").read_text()
    monkeypatch.delenv("MY_KEY")
    with pytest.raises(EndpointError, match="MY_KEY"):
        ChatEndpoint(_config(server, api_key_env="MY_KEY"))


def test_a_rerun_sends_only_what_the_journal_lacks(tmp_path):
    path = tmp_path / "answers.jsonl"
    with ScriptedChatServer(_echo) as server:
        with Journal(path) as journal:
            run_jobs(ChatEndpoint(_config(server)), [_job(i) for i in range(3)], journal)
        built = []
        jobs = [Job(j.key, lambda j=j: built.append(j.key) or j.build()) for j in map(_job, range(5))]
        with Journal(path) as journal:
            got = {}
            stats = run_jobs(ChatEndpoint(_config(server)), jobs, journal, on_reply=lambda j, r: got.setdefault(j.key, r))
    assert stats.journaled == 3 and stats.sent == 2 and len(server.bodies) == 5
    assert built == [_job(3).key, _job(4).key] or sorted(built) == sorted([_job(3).key, _job(4).key])
    assert got[_job(0).key].text == "echo: q0" and got[_job(4).key].text == "echo: q4"


def test_a_torn_last_line_is_dropped_and_its_request_sent_again(tmp_path):
    path = tmp_path / "answers.jsonl"
    with Journal(path) as journal:
        journal.put("a", ChatReply("one"))
        journal.put("b", ChatReply("two"))
    whole = path.read_bytes()
    path.write_bytes(whole[:-7])  # a kill in the middle of writing "b"
    with Journal(path) as journal:
        assert "a" in journal and "b" not in journal
        journal.put("b", ChatReply("two again"))
    with Journal(path) as journal:
        assert journal.reply("b").text == "two again" and len(journal) == 2
    path.write_text("not json\n")
    with pytest.raises(ValueError, match="line 1 is not a journal entry"):
        Journal(path)



def test_a_read_only_journal_reads_whole_lines_and_leaves_the_file_alone(tmp_path):
    path = tmp_path / "answers.jsonl"
    assert len(Journal(tmp_path / "absent" / "a.jsonl", read_only=True)) == 0 and not (tmp_path / "absent").exists()
    with Journal(path) as journal:
        journal.put("a", ChatReply("one"), dataset="x")
        journal.put("b", ChatReply("two"))
    torn = path.read_bytes()[:-7]
    path.write_bytes(torn)
    reader = Journal(path, read_only=True)
    assert reader.entry("a") == {"key": "a", "reply": ChatReply("one").to_dict(), "dataset": "x"}
    assert "b" not in reader and path.read_bytes() == torn


def test_a_job_s_extra_fields_are_journaled_beside_its_reply(tmp_path):
    job = Job("k", lambda: ChatRequest([{"role": "user", "content": "q"}]), {"dataset": "d", "line": 3})
    with ScriptedChatServer(lambda body: "ok") as server, Journal(tmp_path / "j.jsonl") as journal:
        run_jobs(ChatEndpoint(_config(server)), [job], journal)
    assert Journal(tmp_path / "j.jsonl", read_only=True).entry("k")["line"] == 3

def test_requests_are_in_flight_together():
    active, peak, lock = [0], [0], threading.Lock()

    def slow(body):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.2)
        with lock:
            active[0] -= 1
        return "ok"

    with ScriptedChatServer(slow) as server:
        began = time.perf_counter()
        run_jobs(ChatEndpoint(_config(server)), [_job(i) for i in range(8)], concurrency=8)
        elapsed = time.perf_counter() - began
    assert peak[0] == 8 and elapsed < 1.2


def test_duplicate_keys_are_refused():
    with pytest.raises(ValueError, match="share the key"):
        run_jobs(ChatEndpoint(EndpointConfig(url="http://127.0.0.1:9", model="m")), [_job(0), _job(0)])


# ---- strict servers: what is refused, what fails, what adapts ------------------------------------

def test_a_fastapi_422_and_a_plain_text_500_are_quoted_as_the_server_wrote_them():
    from megatron_mmprolong.serving.endpoint import RequestFailed, RequestRefused
    from megatron_mmprolong.serving.scripted_server import INTERNAL_SERVER_ERROR, fastapi_strict

    with ScriptedChatServer(fastapi_strict(_echo)) as server:
        endpoint = ChatEndpoint(_config(server))
        with pytest.raises(RequestRefused, match=r"HTTP 422: Unexpected fields in the request: \{'best_of'\}"):
            run_jobs(endpoint, [Job("a", lambda: ChatRequest([{"role": "user", "content": "q"}], extra={"best_of": 2}))])
    detail = [{"type": "extra_forbidden", "loc": ["body", "best_of"], "msg": "Extra inputs are not permitted"}]
    with ScriptedChatServer(lambda body: Fault(status=422, body={"detail": detail})) as server:
        with pytest.raises(RequestRefused, match=r"HTTP 422: body.best_of: Extra inputs are not permitted"):
            run_jobs(ChatEndpoint(_config(server)), [_job(0)])
    with ScriptedChatServer(lambda body: INTERNAL_SERVER_ERROR) as server:
        with pytest.raises(RequestFailed, match=r"failed 2 times; last: HTTP 500: Internal Server Error"):
            run_jobs(ChatEndpoint(_config(server, max_retries=1)), [_job(0)])


def test_the_same_refusal_for_every_request_stops_the_run_and_is_never_journaled(tmp_path):
    from megatron_mmprolong.serving.endpoint import RequestRefused

    path = tmp_path / "answers.jsonl"
    refusal = Fault(status=400, body={"error": {"message": "this model does not take image input"}})
    with ScriptedChatServer(lambda body: refusal) as server:
        with Journal(path) as journal, pytest.raises(RequestRefused) as err:
            run_jobs(ChatEndpoint(_config(server)), [_job(i) for i in range(40)], journal, concurrency=4)
    assert "HTTP 400: this model does not take image input" in str(err.value) and "\n" not in str(err.value)
    assert len(server.bodies) <= 3 + 4 and len(Journal(path)) == 0
    with ScriptedChatServer(lambda body: refusal) as server, Journal(path) as journal:
        with pytest.raises(RequestRefused, match="refused the only request of this run"):  # and nothing answered ever
            run_jobs(ChatEndpoint(_config(server)), [_job(0)], journal)
    with ScriptedChatServer(_echo) as server, Journal(path) as journal:  # the server fixed: every request is sent
        assert run_jobs(ChatEndpoint(_config(server)), [_job(i) for i in range(40)], journal).sent == 40


def test_a_refusal_of_one_request_among_answers_is_final_as_before(tmp_path):
    path = tmp_path / "answers.jsonl"
    script = lambda body: Fault(status=400, body={"error": {"message": "prompt too long"}}) \
        if "q0" in json.dumps(body) else "fine"  # noqa: E731
    with ScriptedChatServer(script) as server, Journal(path) as journal:
        stats = run_jobs(ChatEndpoint(_config(server)), [_job(i) for i in range(3)], journal, concurrency=1)
    assert (stats.refused, stats.sent) == (1, 3) and journal.reply(_job(0).key).error == "HTTP 400: prompt too long"
    with ScriptedChatServer(script) as server, Journal(path) as journal:  # a rerun: the one answer left is refused
        stats = run_jobs(ChatEndpoint(_config(server)), [_job(i) for i in range(4)], journal)
    assert (stats.journaled, stats.sent, len(server.bodies)) == (3, 1, 1)  # a per-sample refusal, journaled


def test_shape_refusals_journaled_by_an_earlier_version_are_sent_again(tmp_path):
    path = tmp_path / "answers.jsonl"
    with Journal(path) as journal:
        journal.put(_job(0).key, ChatReply("", error="HTTP 422: Unexpected fields in the request: "
                                                     "{'add_generation_prompt', 'continue_final_message'}"))
        journal.put(_job(1).key, ChatReply("", error="HTTP 400: prompt too long"))
    with ScriptedChatServer(_echo) as server, Journal(path) as journal:
        stats = run_jobs(ChatEndpoint(_config(server)), [_job(0), _job(1)], journal)
        assert journal.reply(_job(0).key).text == "echo: q0"
    assert (stats.sent, stats.journaled) == (1, 1)


def test_a_request_that_keeps_failing_is_recorded_as_failed_not_journaled_and_the_run_goes_on(tmp_path):
    from megatron_mmprolong.serving.runner import TooManyFailures

    path = tmp_path / "answers.jsonl"
    broken = lambda body: Fault(status=500, body="Internal Server Error") if "q1" in json.dumps(body) else "ok"  # noqa
    failed = []
    with ScriptedChatServer(broken) as server, Journal(path) as journal:
        stats = run_jobs(ChatEndpoint(_config(server, max_retries=1)), [_job(i) for i in range(4)], journal,
                         max_failed=1, on_failed=lambda job, error: failed.append((job.key, error)))
        assert _job(1).key not in journal and len(journal) == 3
    assert list(stats.failed) == [_job(1).key] and failed[0][0] == _job(1).key and stats.sent == 3
    assert "HTTP 500: Internal Server Error" in failed[0][1] and len(server.bodies) == 2 + 3
    with ScriptedChatServer(broken) as server, Journal(path) as journal:  # at most 0 failures: the run stops
        with pytest.raises(TooManyFailures, match=r"1 request failed after retries, more than 0 allowed.*HTTP 500") as err:
            run_jobs(ChatEndpoint(_config(server, max_retries=1)), [_job(i) for i in range(4)], journal)
    assert list(err.value.failed) == [_job(1).key]
    with ScriptedChatServer(_echo) as server, Journal(path) as journal:  # a rerun retries the failed request only
        stats = run_jobs(ChatEndpoint(_config(server)), [_job(i) for i in range(4)], journal)
    assert (stats.sent, stats.journaled, len(server.bodies)) == (1, 3, 1)


def test_max_tokens_field_auto_switches_once_on_the_hosted_models_400(capsys):
    from megatron_mmprolong.serving.endpoint import RequestRefused
    from megatron_mmprolong.serving.scripted_server import hosted_reasoning_model

    with ScriptedChatServer(hosted_reasoning_model(_echo)) as server:
        endpoint = ChatEndpoint(_config(server))
        got = {}
        stats = run_jobs(endpoint, [_job(i) for i in range(6)], concurrency=3, on_reply=lambda j, r: got.setdefault(j.key, r))
    assert stats.sent == 6 and all(r.text.startswith("echo: q") for r in got.values())
    assert endpoint.max_tokens_field == "max_completion_tokens"
    answered = [b for b in server.bodies if "max_completion_tokens" in b]
    assert len(answered) == 6 and all("max_tokens" not in b and b["max_completion_tokens"] == 512 for b in answered)
    assert len(server.bodies) <= 6 + 3  # only requests in flight before the switch were refused
    notes = capsys.readouterr().err
    assert notes.count("max_completion_tokens") >= 1 and notes.count("\n") == 1  # said once
    assert "Unsupported parameter: 'max_tokens'" in notes
    with ScriptedChatServer(hosted_reasoning_model(_echo)) as server:
        endpoint = ChatEndpoint(_config(server, max_tokens_field="max_completion_tokens"))
        run_jobs(endpoint, [_job(0)])
        assert len(server.bodies) == 1 and "max_tokens" not in server.bodies[0]
        with pytest.raises(RequestRefused, match=r"HTTP 400: Unsupported parameter: 'max_tokens'"):
            run_jobs(ChatEndpoint(_config(server, max_tokens_field="max_tokens")), [_job(0)])
    with pytest.raises(EndpointError, match="max_tokens_field"):
        ChatEndpoint(EndpointConfig(url="http://127.0.0.1:9/v1", model="m", max_tokens_field="tokens"))


def test_a_per_sample_context_length_400_naming_max_tokens_does_not_switch_the_field():
    vllm = ("'max_tokens' or 'max_completion_tokens' is too large: 128. This model's maximum context length is "
            "32768 tokens and your request has 32700 input tokens (128 > 32768 - 32700).")
    with ScriptedChatServer(lambda body: Fault(status=400, body={"error": {"message": vllm}})
                            if "q0" in json.dumps(body) else "ok") as server:
        endpoint = ChatEndpoint(_config(server))
        got = {}
        run_jobs(endpoint, [_job(i) for i in range(3)], concurrency=1, on_reply=lambda j, r: got.setdefault(j.key, r))
    assert endpoint.max_tokens_field == "max_tokens" and got[_job(0).key].error.startswith("HTTP 400: 'max_tokens'")


def _json_job(i: int) -> Job:
    return Job(request_key("json", i), lambda: ChatRequest([{"role": "user", "content": f"q{i}"}],
                                                           extra={"response_format": {"type": "json_object"}}))


def test_json_mode_warns_once_when_most_replies_are_not_json(capsys):
    from megatron_mmprolong.serving.scripted_server import fastapi_strict

    with ScriptedChatServer(fastapi_strict(lambda body: "Sure! Here it is: {\"answer\": 1}")) as server:
        endpoint = ChatEndpoint(_config(server))
        run_jobs(endpoint, [_json_job(i) for i in range(5)])
        run_jobs(endpoint, [_json_job(i) for i in range(5, 7)])
    err = capsys.readouterr().err
    assert err.count("response_format") == 1 and "5 of 5 replies" in err and server.url in err
    with ScriptedChatServer(lambda body: '{"answer": 1}') as server:
        run_jobs(ChatEndpoint(_config(server)), [_json_job(i) for i in range(5)])
        run_jobs(ChatEndpoint(_config(server)), [_job(i) for i in range(5)])  # prose without json mode: fine
    assert capsys.readouterr().err == ""
