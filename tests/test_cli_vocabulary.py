"""One CLI vocabulary (issue 10): the same flag means the same thing, lists its values, and has help everywhere."""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from unittest import mock

import pytest
import typer
from typer.testing import CliRunner

from datagen.backends.base import DEFAULT_MAX_TOKENS, TRANSPORTS
from datagen.cli import app
from datagen.parse import PARSE_REASON_CODES, ParseError
from datagen.quality.checks import REASON_CODES
from datagen.sample import SPLIT_NAMES
from datagen.splits import SPLITS

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
GOOD = FIXTURES / "good_samples.jsonl"


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


# typer >= 0.20 carries its own copy of click, so the tests look at parameters by duck type.
def is_option(param) -> bool:
    return getattr(param, "param_type_name", "") == "option"


def choices(param) -> list[str] | None:
    """The values a choice option accepts (click's Choice, or typer's own type descriptor); None if free."""
    kind = getattr(param, "type", None)
    if kind is None or not hasattr(kind, "choices"):
        kind = getattr(param, "type_descriptor", None)
        if kind is None or not kind.is_choice:
            return None
    return [str(getattr(c, "value", c)) for c in kind.choices]


def commands(command=None, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], object]]:
    """Every command of the tree with its path (groups included)."""
    command = command or typer.main.get_command(app)
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from commands(sub, path + (name,))


def option(command, flag: str):
    return next((p for p in command.params if is_option(p) and flag in p.opts), None)


ALL = list(commands())


def test_every_command_answers_dash_h():
    for path, _ in ALL:
        result = invoke(*path, "-h")
        assert result.exit_code == 0, (path, result.output)
        assert "Usage:" in result.output, path


def test_version_comes_from_package_metadata():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.output.strip() == f"datagen (visinstruct) {metadata.version('visinstruct')}"


def test_every_visible_option_has_help():
    missing = [(path, p.opts) for path, command in ALL for p in command.params
               if is_option(p) and not p.hidden and not (p.help or "").strip()]
    assert not missing


def test_split_is_a_choice_of_sample_kinds_wherever_it_is_visible():
    seen = []
    for path, command in ALL:
        split = option(command, "--split")
        if split is None or split.hidden:
            continue
        seen.append(path[-1])
        assert choices(split) is not None, path
        assert set(SPLITS) <= set(choices(split)) <= set(SPLIT_NAMES), path
    assert {"generate", "render", "check", "stats", "review", "export", "submit"} <= set(seen)
    assert len(ALL) > 15  # the walk reached the subcommands


def test_coco_split_is_never_called_split():
    for path, command in ALL:
        split = option(command, "--split")
        if split is not None and not split.hidden:
            assert not any("2017" in c for c in choices(split)), path


def test_coco_fetch_takes_coco_split_and_the_old_split_flag_warns(tmp_path):
    with mock.patch("datagen.cli.coco.fetch_coco", return_value=tmp_path) as fetch:
        new = invoke("coco", "fetch", "--coco-split", "train2014", "--images", "0", "--to", tmp_path)
        old = invoke("coco", "fetch", "--split", "val2014", "--images", "0", "--to", tmp_path)
    assert new.exit_code == 0 and "warning" not in new.stderr
    assert old.exit_code == 0
    assert [c.kwargs["split"] for c in fetch.call_args_list] == ["train2014", "val2014"]
    assert "warning:" in old.stderr and "--coco-split" in old.stderr
    assert "--split" not in invoke("coco", "fetch", "-h").output  # hidden


def test_coco_fetch_verify_promises_no_checksums():
    text = option(dict(ALL)[("coco", "fetch")], "--verify").help
    assert "no checksums" in text and "decode" in text.lower()


def choices_of(path: tuple[str, ...], flag: str) -> list[str]:
    command = dict(ALL)[path]
    found = option(command, flag)
    assert found is not None and choices(found) is not None, (path, flag)
    return choices(found)


def test_reason_and_disable_list_the_codes():
    assert choices_of(("check",), "--disable") == list(REASON_CODES)
    assert choices_of(("review",), "--reason") == ["any", *dict.fromkeys((*REASON_CODES, *PARSE_REASON_CODES))]
    for path, flag in ((("check",), "--disable"), (("review",), "--reason")):
        text = option(dict(ALL)[path], flag).help
        assert all(code in text for code in choices_of(path, flag)), (path, flag)


def test_an_unknown_reason_code_is_a_usage_error(tmp_path):
    result = invoke("check", GOOD, "--disable", "no_such_check")
    assert result.exit_code == 2 and "no_such_check" in result.output + result.stderr


def test_parse_codes_are_all_listed():
    with pytest.raises(ValueError):
        ParseError("not_a_listed_code", "x")
    for code in PARSE_REASON_CODES:
        assert ParseError(code, "x").code == code


def test_transport_lists_its_values():
    assert choices_of(("generate",), "--transport") == list(TRANSPORTS)


def test_max_tokens_default_is_what_make_data_uses():
    makefile = (REPO / "Makefile").read_text()
    make_default = int(re.search(r"^MAX_TOKENS\s*\?=\s*(\d+)", makefile, re.M).group(1))
    assert DEFAULT_MAX_TOKENS == make_default
    for path in (("generate",), ("batch", "submit")):
        assert option(dict(ALL)[path], "--max-tokens").default == make_default, path


def test_stats_reads_a_quality_config(tmp_path):
    sample = {"id": "1", "image": "x.jpg", "split": "conversation",
              "conversations": [{"from": "human", "value": "<image>\nWhat is there?"},
                                {"from": "gpt", "value": "A table. There might be a dog under it."}]}
    src = tmp_path / "s.jsonl"
    src.write_text(json.dumps(sample) + "\n")
    config = tmp_path / "q.yaml"
    config.write_text("count_hedged_mentions: true\n")
    plain = invoke("stats", src, "--json")
    hedged = invoke("stats", src, "--json", "--config", config)
    assert plain.exit_code == hedged.exit_code == 0, plain.output + hedged.output
    assert "dog" not in json.loads(plain.stdout)["conversation"]["top_objects"]
    assert "dog" in json.loads(hedged.stdout)["conversation"]["top_objects"]


def test_review_takes_many_files(tmp_path):
    records = [json.loads(line) for line in GOOD.read_text().splitlines()[:4]]
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("".join(json.dumps(r) + "\n" for r in records[:2]))
    second.write_text("".join(json.dumps(r) + "\n" for r in records[2:]))
    page = tmp_path / "page.html"
    result = invoke("review", first, second, "--html", page)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == f"4 samples -> {page}"
    html = page.read_text()
    assert all(str(r["id"]) in html for r in records)


def test_review_of_many_files_flags_a_near_duplicate_across_them(tmp_path):
    record = json.loads(GOOD.read_text().splitlines()[0])
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text(json.dumps(record) + "\n")
    second.write_text(json.dumps({**record, "id": "copy"}) + "\n")
    page = tmp_path / "page.html"
    result = invoke("review", first, second, "--reason", "near_duplicate", "--html", page)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == f"1 samples -> {page}"
