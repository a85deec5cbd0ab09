"""The optional LLM judge against a local OpenAI-compatible endpoint (a real HTTP server in a thread)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from persona_lit.evaluation.protocol import run_protocol, summarize
from persona_lit.errors import UserError
from persona_lit.evaluation.judge import Judge, judge_arm
from tests.conftest import run_cli
from tests.test_drift import PERSONA, PROBE_TURNS, ScriptedRunner


class Endpoint(BaseHTTPRequestHandler):
    seen: list = []

    def do_POST(self):  # noqa: N802 - the http.server API
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Endpoint.seen.append((self.path, self.headers.get("Authorization"), body["model"]))
        reply = body["messages"][0]["content"].split("<reply>")[1]
        score = '{"persona": 90, "coherence": 80}' if "Cato" in reply else 'Sure: {"persona": 5, "coherence": 70}'
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": score}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def endpoint():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Endpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Endpoint.seen = []
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_judge_scores_become_per_turn_metrics_and_the_key_is_only_a_header(endpoint, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sekrit")
    turns = ["What is your name?"] * 8
    result = run_protocol(ScriptedRunner(lambda t: t < 4), PERSONA, [turns, turns], PROBE_TURNS, progress=False)
    judge = Judge(endpoint, "grader", "JUDGE_KEY")
    for arm in (result.persona_arm, result.control_arm):
        judge_arm(judge, PERSONA.system_prompt, arm)
    metrics = summarize(result, PROBE_TURNS, layer=0)["metrics"]
    assert metrics["judge/persona"]["turn"] == PROBE_TURNS
    # turn k's answer is written with k - 1 turns behind it: in persona through turn 4, not at 8
    assert metrics["judge/persona"]["mean"][1:] == [90, 90, 90, 5]
    assert metrics["judge/persona_control"]["mean"][1:] == [5, 5, 5, 5]
    assert metrics["judge/coherence"]["mean"][1:] == [80, 80, 80, 70]
    assert {s[:3] for s in Endpoint.seen} == {("/v1/chat/completions", "Bearer sekrit", "grader")}
    assert "sekrit" not in json.dumps(metrics)


def test_a_wrong_judge_endpoint_is_one_clear_error(endpoint):
    with pytest.raises(UserError, match=r"judge.url=http://127.0.0.1:1/v1: request failed"):
        Judge("http://127.0.0.1:1/v1", "grader", None, timeout_s=5).score("p", "q", "a")


def test_evaluate_with_a_judge_url_needs_a_model():
    r = run_cli("evaluate.py", "judge.url=http://127.0.0.1:1/v1", "model=tiny-llama")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: judge.url=")
