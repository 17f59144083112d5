"""Method hyperparameters: each method declares them in a dataclass beside its code, and the CLI's
"method hyperparameters" group is built from the method registry.

    @dataclass
    class CLoRAHyperparameters:
        clora_lambda: float = hparam(100.0, NONNEG, "lambda of ||abs(dW_<n) * dW_n||_F^2 (...why...)")

    @register
    class CLoRA(Method):
        hyperparameters = CLoRAHyperparameters
        ...   # reads self.hp.clora_lambda

Adding a method (or a hyperparameter) touches only the method's own file: ``add_method_arguments``
walks ``METHODS`` and adds every field once, with the names of the methods that read it; the run
fingerprint (``fastcp.checkpoint``) holds the running method's fields, so resuming with another
value is refused.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable


def typed(kind: type, ok: Callable[[Any], bool], what: str):
    """argparse type: convert with ``kind`` and reject values failing ``ok`` (a one-line usage error)."""
    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    convert.what = what
    return convert


FRACTION = typed(float, lambda v: 0 < v <= 1, "a fraction in (0, 1]")
UNIT = typed(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
NONNEG = typed(float, lambda v: v >= 0, "a number >= 0")
POS = typed(float, lambda v: v > 0, "a number > 0")
POSINT = typed(int, lambda v: v >= 1, "an integer >= 1")
NATURAL = typed(int, lambda v: v >= 0, "an integer >= 0")
FLOAT = typed(float, lambda v: True, "a number")
#: an on/off switch: the flag takes no value (``--clora_class_word``), default off
BOOL = bool


def hparam(default, kind, help: str, choices=None):
    """A dataclass field that is also a CLI flag ``--<name>``: ``kind`` converts and checks the
    text (one of the typed converters above, or ``str`` with ``choices``)."""
    return dataclasses.field(default=default, metadata={"kind": kind, "help": help, "choices": choices})


def validate(hp) -> None:
    """Check every field of a hyperparameter dataclass instance with its converter (the Python API
    skips argparse): raises ValueError naming the flag."""
    for f in dataclasses.fields(hp):
        value, kind, choices = getattr(hp, f.name), f.metadata.get("kind"), f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ValueError(f"--{f.name}: expected one of {', '.join(map(str, choices))}, got {value!r}")
        if callable(kind) and hasattr(kind, "what"):
            try:
                kind(str(value))
            except argparse.ArgumentTypeError as exc:
                raise ValueError(f"--{f.name}: {exc}") from None


def from_args(cls, args) -> Any:
    """The dataclass ``cls`` filled from ``args`` (a Namespace); missing attributes take defaults."""
    hp = cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})
    validate(hp)
    return hp


def add_method_arguments(parser: argparse.ArgumentParser, methods: dict) -> None:
    """One flag per hyperparameter field of every registered method (each field once), in a
    "method hyperparameters" group; each help line starts with the methods that read the flag."""
    group = parser.add_argument_group("method hyperparameters")
    users: dict[str, list[str]] = {}
    fields: dict[str, dataclasses.Field] = {}
    for name, cls in methods.items():
        if name.startswith("_"):
            continue
        for f in dataclasses.fields(cls.hyperparameters):
            users.setdefault(f.name, []).append(name)
            fields.setdefault(f.name, f)
    for fname, f in fields.items():
        kind = f.metadata["kind"]
        kwargs = {"default": f.default, "help": f"{'/'.join(users[fname])}: {f.metadata['help']}"}
        if kind is BOOL:
            kwargs["action"] = "store_true"
        elif f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        else:
            kwargs["type"] = kind
        group.add_argument(f"--{fname}", **kwargs)


@dataclasses.dataclass
class NoHyperparameters:
    """Methods with nothing beyond the shared training flags (naive, merge, joint, separate)."""
