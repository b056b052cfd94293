"""Standard (non-adversarial) training: x_adv = x. The speed and accuracy baseline."""

from __future__ import annotations

from dataclasses import dataclass

from atas.methods.base import Method, register


@register
class Standard(Method):
    """Standard training, no attack.

    Cost: 1 forward + 1 backward per step.
    """

    name = "none"
    label = "standard"
    cost = "1 fwd + 1 bwd"
    passes = (1, 1)

    @dataclass
    class Options(Method.Options):
        pass

    def attack(self, model, x, y, state):
        return x
