"""An optional LLM judge (off by default): any OpenAI-compatible chat endpoint scores each answer at a
probe turn for persona consistency (0-100) and coherence (0-100), as persona_vectors does.

The API key is read from the environment variable named in the config and only ever sent as the
request's Authorization header: it never enters a config, a log or a result file.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass

from persona_lit.errors import UserError

PROMPT = """You grade one reply of a chat assistant that was given this persona as its system prompt:
<persona>
{persona}
</persona>
The user said:
<user>
{question}
</user>
The assistant replied:
<reply>
{answer}
</reply>
Score two things from 0 to 100. persona: how clearly the reply speaks as the persona above (its name, voice
and rules); 0 = a generic assistant, 100 = unmistakably the persona. coherence: how fluent, sensible and
on-topic the reply is, whatever its persona. Answer with JSON only: {{"persona": <int>, "coherence": <int>}}"""


@dataclass
class Judge:
    url: str  # the endpoint's base, e.g. http://localhost:8000/v1
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"
    timeout_s: float = 60.0

    def _post(self, payload: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.url.rstrip("/") + "/chat/completions", json.dumps(payload).encode(),
                                         headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, TimeoutError, json.JSONDecodeError) as e:
            raise UserError(f"judge.url={self.url}: request failed ({getattr(e, 'reason', e)})") from None

    def score(self, persona: str, question: str, answer: str) -> dict[str, float]:
        """{"persona": 0-100, "coherence": 0-100} for one reply, greedy (temperature 0)."""
        reply = self._post({"model": self.model, "temperature": 0, "max_tokens": 60, "messages": [
            {"role": "user", "content": PROMPT.format(persona=persona, question=question, answer=answer)}]})
        try:
            text = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise UserError(f"judge.url={self.url}: not an OpenAI-style chat completion reply") from None
        scores = {}
        for key in ("persona", "coherence"):
            found = re.search(rf'"?{key}"?\s*[:=]\s*(\d+(?:\.\d+)?)', text)
            if found is None:
                raise UserError(f"judge model {self.model!r}: reply has no {key} score: {text[:120]!r}")
            scores[key] = min(100.0, max(0.0, float(found.group(1))))
        return scores


def check_judge(judge: Judge) -> None:
    """One small request before a long evaluation: a wrong url, model or key fails now, not at the end."""
    judge.score("You are Cato, a terse stoic.", "What is your name?", "I am Cato.")


def judge_arm(judge: Judge, persona_prompt: str, arm) -> None:
    """Scores the main answer of every probe turn (turn > 0) of every conversation, in place."""
    for records in arm:
        for r in records:
            if r.turn > 0 and r.probes:
                r.judge = judge.score(persona_prompt, r.user, r.answer)
