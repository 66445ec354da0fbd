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
