"""The options a matrix rule takes, declared once: every constructor and the trainer's config check read them.

Why one declaration: a rule given an option it does not have, a value outside its choices, or a count that makes
it degenerate (0 Newton-Schulz steps orthogonalize nothing, 0 SinkGD iterations normalize nothing) must fail
before anything runs, with one line that names the key and what it allows, whether the rule was built from a
YAML config (`optim.<key>`) or by hand (the constructor argument). Each class lists its `options`; the checks
below are the only place their bounds and choices live.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from optim.newton_schulz import NS_COEFFICIENTS, NS_FORMS

DTYPES = ("bfloat16", "float32", "float64")
VARIANTS = ("paper", "reference_code")  # NorMuon, AuON, Hybrid-AuON: the paper's rule or the authors' code


@dataclass(frozen=True)
class Option:
    """One option of a matrix rule: its config key (`optim.<key>`), the constructor argument it sets, and the
    values it allows (a set of choices, or a numeric range [minimum, below))."""

    key: str
    arg: str
    choices: tuple[Any, ...] = ()
    minimum: float | None = None
    below: float | None = None
    kind: type | None = None  # the value's type where no choices or range say it (nesterov: bool)
    why: str = ""  # why the bound exists, said with the error

    def problem(self, value: Any) -> str | None:
        """What is wrong with `value` for this option, or None."""
        if isinstance(value, torch.dtype):
            value = str(value).removeprefix("torch.")
        if self.choices:
            return None if value in self.choices else f"{value!r} is not one of {', '.join(self.choices)}"
        if self.kind is not None and not isinstance(value, self.kind):
            return f"expected {self.kind.__name__}, got {value!r}"
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        if (self.minimum is not None or self.below is not None) and not numeric:
            return f"expected a number, got {value!r}"
        too_small = self.minimum is not None and value < self.minimum
        too_large = self.below is not None and value >= self.below
        if too_small or too_large:
            low = "" if self.minimum is None else f">= {self.minimum}"
            high = "" if self.below is None else f"< {self.below}"
            reason = f": {self.why}" if self.why else ""
            return f"must be {' and '.join(filter(None, (low, high)))}, got {value}{reason}"
        return None


MOMENTUM = Option("momentum", "momentum", minimum=0.0, below=1.0)
NESTEROV = Option("nesterov", "nesterov", kind=bool)
NS_STEPS = Option(
    "ns_steps", "ns_steps", minimum=1, why="0 iterations would leave the update unorthogonalized"
)
NS_DTYPE = Option("ns_dtype", "ns_dtype", choices=DTYPES)
COMM_DTYPE = Option("comm_dtype", "comm_dtype", choices=DTYPES)
NEWTON_SCHULZ = (NS_STEPS, NS_DTYPE, COMM_DTYPE)
NS5_POLYNOMIALS = (
    Option("ns_coefficients", "ns_coefficients", choices=NS_COEFFICIENTS),
    Option("ns_form", "ns_form", choices=NS_FORMS),
)
VARIANT = Option("variant", "variant", choices=VARIANTS)


def check_arguments(owner: str, options: Iterable[Option], values: Mapping[str, Any]) -> None:
    """ValueError (one line) for a constructor argument outside its option's declaration; None values are unset."""
    for option in options:
        value = values.get(option.arg)
        problem = None if value is None else option.problem(value)
        if problem:
            raise ValueError(f"{owner} {option.arg}: {problem}")


def check_config(rule: str, options: Iterable[Option], all_keys: Iterable[str], config: Any) -> None:
    """ValueError naming `optim.<key>` when the config sets a rule option that `rule` does not take, or a value
    its declaration does not allow. `all_keys`: every rule option key of every optimizer (the ones to look at)."""
    own = {option.key: option for option in options}
    for key in all_keys:
        value = getattr(config, key, None)
        if value is None:
            continue
        if key not in own:
            taken = f"its options: {', '.join(own)}" if own else "it takes no matrix-rule options"
            raise ValueError(f"optim.{key}: {rule} has no such option ({taken})")
        problem = own[key].problem(value)
        if problem:
            raise ValueError(f"optim.{key}: {problem} ({rule})")
