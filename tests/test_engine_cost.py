"""Prices, cost arithmetic, --budget and --dry-run."""
from __future__ import annotations

import pytest

from datagen.backends.base import DEFAULT_MAX_TOKENS
from datagen.engine.cost import BudgetGuard, Price, load_prices
from datagen.engine.tokens import PromptTokenCounter
from datagen.errors import VisinstructError
from datagen.sample import OutputLayout
from engine_support import datagen, ids_of, run_engine
from fake_openai_server import FakeOpenAIServer


def test_price_lookup_uses_the_longest_prefix():
    table = load_prices()
    assert table.lookup("gpt-4o-mini-2024-07-18") == Price(0.15, 0.60)
    assert table.lookup("gpt-4o-2024-08-06") == Price(2.50, 10.00)
    assert table.lookup("openai/gpt-4.1-mini") == Price(0.40, 1.60)
    assert table.lookup("Qwen2.5-72B-Instruct") is None


def test_cost_arithmetic_and_batch_discount():
    price = Price(0.15, 0.60)
    assert price.cost(1_000_000, 0) == pytest.approx(0.15)
    assert price.cost(2_000, 500) == pytest.approx((2_000 * 0.15 + 500 * 0.60) / 1e6)
    assert load_prices().batch(price) == Price(0.075, 0.30)


def test_price_file_overrides_and_adds(tmp_path):
    path = tmp_path / "prices.yaml"
    path.write_text("batch_discount: 0.25\nmodels:\n  gpt-4o-mini: {input: 1, output: 2}\n  qwen2.5-72b: {input: 0.3, output: 0.4}\n")
    table = load_prices(path)
    assert table.lookup("gpt-4o-mini") == Price(1, 2) and table.lookup("Qwen2.5-72B-Instruct") == Price(0.3, 0.4)
    assert table.lookup("gpt-4o") == Price(2.50, 10.00) and table.batch_discount == 0.25
    path.write_text("models:\n  x: {input: cheap}\n")
    with pytest.raises(VisinstructError, match="price of 'x'"):
        load_prices(path)


def test_budget_guard_reserves_the_worst_case():
    guard = BudgetGuard(limit_usd=0.001, price=Price(1.0, 1.0))  # $1 per 1M tokens: 1,000 tokens = $0.001
    first = guard.reserve(300, 200)  # worst case $0.0005
    assert first is not None and guard.reserve(300, 200) is not None and guard.reserve(1, 0) is None
    guard.settle(first, Price(1.0, 1.0).cost(300, 50))  # used less than reserved: room comes back
    assert guard.reserve(100, 40) is not None and guard.spent_usd == pytest.approx(0.00035)


def test_run_sums_usage_into_tokens_and_dollars(coco_root, tmp_path):
    with FakeOpenAIServer() as server:
        stats = run_engine(server.base_url, tmp_path / "c.jsonl", coco_root, limit=5)
    assert stats.prompt_tokens > 0 and stats.completion_tokens > 0
    assert stats.cost_usd == pytest.approx(Price(0.15, 0.60).cost(stats.prompt_tokens, stats.completion_tokens))


def test_budget_stops_cleanly_before_exceeding_it(coco_root, tmp_path):
    out = tmp_path / "c.jsonl"
    # Each request reserves about 600 prompt + 300 completion tokens at gpt-4o's price, about $0.0045.
    with FakeOpenAIServer() as server:
        stats = run_engine(server.base_url, out, coco_root, limit=20, model="gpt-4o", budget_usd=0.02, concurrency=4)
    assert 0 < stats.cost_usd <= 0.02
    assert stats.budget_stopped > 0 and stats.accepted + stats.rejected + stats.budget_stopped == 20
    assert len(ids_of(out, OutputLayout(out).rejects)) == stats.accepted + stats.rejected


def test_budget_needs_a_known_price(coco_root, tmp_path):
    with FakeOpenAIServer() as server:
        with pytest.raises(VisinstructError, match="no price known"):
            run_engine(server.base_url, tmp_path / "c.jsonl", coco_root, limit=2, model="my-local-llama", budget_usd=1.0)
        assert server.state.count == 0


def test_dry_run_counts_tokens_and_sends_nothing(coco_root, tmp_path):
    from engine_support import load_index
    from datagen.backends.base import SamplingParams
    from datagen.prompts import load_prompt_set
    from datagen.task import LlavaTask

    index = load_index(coco_root, "detail")
    task = LlavaTask("detail", load_prompt_set(None, "detail"), SamplingParams())
    counter = PromptTokenCounter()
    expected = sum(counter.count(task.prepare(index.record(i)).request.messages) for i in index.image_ids()[:7])
    with FakeOpenAIServer() as server:
        proc = datagen("generate", "--split", "detail", "--coco-root", str(coco_root), "--limit", "7", "--dry-run",
                       "--backend", "openai", "--base-url", server.base_url, "--out", str(tmp_path / "d.jsonl"))
        assert server.state.count == 0
    assert proc.returncode == 0, proc.stderr
    assert f"prompt tokens: {expected:,}" in proc.stdout and "7 to request" in proc.stdout
    high = Price(0.15, 0.60).cost(expected, 7 * DEFAULT_MAX_TOKENS)
    assert f"at most ${high:.4f}" in proc.stdout
    assert not (tmp_path / "d.jsonl").exists()
