"""Mechanism registry: `mechanism=<name>` on the command line picks one of these."""

from __future__ import annotations

from typing import Any

from persona_lit.errors import UserError
from persona_lit.mechanisms.base import Mechanism
from persona_lit.mechanisms.instaboost import InstaBoostMechanism
from persona_lit.mechanisms.lora import LoraMechanism
from persona_lit.mechanisms.lyra import LyraMechanism
from persona_lit.mechanisms.none import NoMechanism
from persona_lit.mechanisms.repeat import RepeatMechanism
from persona_lit.mechanisms.split_softmax import SplitSoftmaxMechanism
from persona_lit.mechanisms.steer import SteerMechanism
from persona_lit.mechanisms.triplet import TripletMechanism
from persona_lit.mechanisms.weight_steer import WeightSteerMechanism

REGISTRY: dict[str, type[Mechanism]] = {
    "none": NoMechanism, "lora": LoraMechanism, "lyra": LyraMechanism, "triplet": TripletMechanism,
    "steer": SteerMechanism, "weight_steer": WeightSteerMechanism,
    # training-free baselines
    "repeat": RepeatMechanism, "split_softmax": SplitSoftmaxMechanism, "instaboost": InstaBoostMechanism,
}


def build_mechanism(name: str, **options: Any) -> Mechanism:
    if name not in REGISTRY:
        raise UserError(f"unknown mechanism {name!r}; allowed: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name](**options)


__all__ = ["Mechanism", "REGISTRY", "build_mechanism"]
