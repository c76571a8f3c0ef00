"""Token prices, run cost and the spending guard behind --budget."""
from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from datagen.errors import VisinstructError
from datagen.inputs import load_yaml


@dataclass(frozen=True)
class Price:
    """USD per one million input and output tokens."""

    input: float
    output: float

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input + completion_tokens * self.output) / 1_000_000


@dataclass(frozen=True)
class PriceTable:
    """Model-name prefix -> Price, plus the Batch API discount."""

    models: dict[str, Price]
    batch_discount: float = 0.5

    def lookup(self, model: str) -> Price | None:
        """The price of the longest matching prefix of `model` (dated snapshots share their family's price)."""
        name = model.lower().rsplit("/", 1)[-1]
        best = max((p for p in self.models if name.startswith(p.lower())), key=len, default=None)
        return self.models[best] if best is not None else None

    def batch(self, price: Price) -> Price:
        return Price(price.input * (1 - self.batch_discount), price.output * (1 - self.batch_discount))


def _parse_table(data: object, source: str) -> PriceTable:
    if not isinstance(data, dict) or not isinstance(data.get("models", {}), dict):
        raise VisinstructError(f"{source} is not a price table", "use `models: {name: {input: USD, output: USD}}` per 1M tokens")
    models = {}
    for name, entry in (data.get("models") or {}).items():
        try:
            models[str(name)] = Price(_usd(entry["input"]), _usd(entry["output"]))
        except (KeyError, TypeError, ValueError):
            raise VisinstructError(
                f"{source}: price of {name!r} must be {{input: USD, output: USD}} per 1M tokens, each a number >= 0",
                "fix that entry",
            ) from None
    try:
        discount = float(data.get("batch_discount", 0.5))
    except (TypeError, ValueError):
        discount = math.nan
    if not 0 <= discount <= 1:
        raise VisinstructError(f"{source}: batch_discount must be a number from 0 to 1", "e.g. batch_discount: 0.5")
    return PriceTable(models, discount)


def _usd(value: object) -> float:
    """A price: a finite number >= 0 (a negative price would let --budget spend without limit)."""
    if isinstance(value, bool):
        raise TypeError("a boolean is not a price")
    number = float(value)  # type: ignore[arg-type]
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{value!r} is not a price")
    return number


def load_prices(override: Path | None = None) -> PriceTable:
    """The shipped table, with entries of `override` (a YAML or JSON file) replacing or adding models."""
    shipped = yaml.safe_load(resources.files("datagen.engine").joinpath("prices.yaml").read_text(encoding="utf-8"))
    table = _parse_table(shipped, "prices.yaml")
    if override is None:
        return table
    raw = load_yaml(override, "price file", "fix the price file")
    extra = _parse_table(raw, str(override))
    discount = extra.batch_discount if "batch_discount" in raw else table.batch_discount
    return PriceTable({**table.models, **extra.models}, discount)


class BudgetGuard:
    """Admits a request only if the spend so far plus every in-flight worst case stays within the budget."""

    def __init__(self, limit_usd: float, price: Price, spent_usd: float = 0.0) -> None:
        self.limit_usd = limit_usd
        self.price = price
        self.spent_usd = spent_usd
        self.reserved_usd = 0.0
        self.refused = 0

    def reserve(self, prompt_tokens: int, max_tokens: int) -> float | None:
        """Reserve the worst-case cost of one request; None when it might exceed the budget."""
        worst = self.price.cost(prompt_tokens, max_tokens)
        if self.spent_usd + self.reserved_usd + worst > self.limit_usd:
            self.refused += 1
            return None
        self.reserved_usd += worst
        return worst

    def settle(self, reserved: float, actual_usd: float) -> None:
        self.reserved_usd -= reserved
        self.spent_usd += actual_usd
