"""What a persona is: a name, a system prompt, and probes whose adherence checks are code (checks.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persona_lit.personas.checks import CHECKS


@dataclass(frozen=True)
class Check:
    spec: dict[str, Any]

    def __call__(self, answer: str) -> bool:
        return all(CHECKS[name](answer, arg) for name, arg in self.spec.items())


@dataclass(frozen=True)
class Probe:
    question: str
    check: Check
    kind: str = "style"  # "name" for name recall; reports group probes by kind
    # Reference answers: one in the persona's voice (passes the check), one a default assistant
    # would give (fails it). They test the check itself and feed likelihood-margin metrics.
    persona_answer: str = ""
    assistant_answer: str = ""
    # A forced-choice probe (kind "choice", evaluation/choice.py): the wrong candidates; persona_answer is the
    # right one. Scored teacher-forced, never generated; `check` is not used.
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class Persona:
    name: str
    system_prompt: str
    description: str = ""
    probes: tuple[Probe, ...] = ()
    exchanges_path: Path | None = None
    source: str = "<inline>"

    @property
    def key(self) -> str:
        """The short name used on the command line and in logs (file stem for YAML personas)."""
        return Path(self.source).stem if self.source != "<inline>" else self.name.lower().replace(" ", "_")

    def name_probe(self) -> Probe | None:
        return next((p for p in self.probes if p.kind == "name"), None)
