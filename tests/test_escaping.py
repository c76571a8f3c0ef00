"""Untrusted text stays text: in the review page's HTML and on the terminal (in-process, generated cases)."""
from __future__ import annotations

import io
import json
import re
import sys
from html.parser import HTMLParser
from pathlib import Path
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console

from datagen.cli import main
from datagen.escaping import html_text, script_json, terminal_markup, terminal_text
from datagen.quality.checks import SampleReport
from datagen.quality.review import ReviewItem, sample_panel, write_html
from datagen.quality.review_page import render_page

# Every code point, lone surrogates included (a JSON string may hold one: "\ud800").
ANY_CHAR = st.characters(codec=None, exclude_categories=())
# Pieces a hostile sample would use, mixed into arbitrary text.
HOSTILE = st.sampled_from([
    "<!--<script>", "</script>", "<script>document.title='PWNED'</script>", "<img src=x onerror=alert(1)>",
    "]]>", "<![CDATA[", "</title>", "-->", "&amp;", "&#60;", "\u2028", "\u2029", "\u202e", "\u2066", "\ud800",
    "__DATA__", "__TITLE__", '"', "'", "`", "\\", "\x00", "\x1b[2J", "\x1b]8;;file:///etc/passwd\x07x\x1b]8;;\x07",
    "\x9b31m", "\x07", "\r", "\b", "[link=file:///etc/passwd]x[/link]", "[bold red]", "[/]", ":warning:",
    "\x1b[31m", "\x7f", "\x85",
])
TEXT = st.lists(st.one_of(HOSTILE, st.text(ANY_CHAR, max_size=12)), max_size=6).map("".join)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
BOUNDED = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Tags(HTMLParser):
    """The element structure of a page as the HTML tokenizer sees it, and the text of its data element."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.events: list[tuple[str, str]] = []
        self.data_text: list[str] = []
        self.title: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag, attrs):
        self.events.append(("start", tag))
        self._in = "data" if tag == "script" and dict(attrs).get("id") == "data" else tag

    def handle_endtag(self, tag):
        self.events.append(("end", tag))
        self._in = None

    def handle_comment(self, data):
        self.events.append(("comment", ""))

    def handle_data(self, data):
        if self._in == "data":
            self.data_text.append(data)
        elif self._in == "title":
            self.title.append(data)


def parsed(page: str) -> Tags:
    tags = Tags()
    tags.feed(page)
    tags.close()
    return tags


EMPTY_PAGE = parsed(render_page("t", {}))


@BOUNDED
@given(data=JSON_VALUES, title=TEXT)
def test_embedded_data_cannot_end_or_reopen_an_element(data, title):
    payload = script_json(data)
    for bad in ("<", ">", "&", "\u2028", "\u2029"):
        assert bad not in payload
    assert not re.search("[\ud800-\udfff]", payload)
    payload.encode("utf-8")  # writable as UTF-8 whatever the text
    page = render_page(title, {"samples": data})
    tags = parsed(page)
    # The same elements as a page with no data: nothing in the data or the title opened or closed one.
    assert tags.events == EMPTY_PAGE.events
    assert json.loads("".join(tags.data_text)) == {"samples": data}  # what JSON.parse(textContent) reads
    assert "".join(tags.title) == re.sub("[\ud800-\udfff]", "\ufffd", title)


@BOUNDED
@given(text=TEXT)
def test_html_text_is_inert_in_content_and_attributes(text):
    escaped = html_text(text)
    assert not set("<>\"'") & set(escaped)
    tags = parsed(f'<p title="{escaped}">{escaped}</p>')
    assert tags.events == [("start", "p"), ("end", "p")]


def item_for(rec: dict, split: str = "detail") -> ReviewItem:
    return ReviewItem(0, rec, split, rec.get("context"), SampleReport([], {}, set(), set(), False), None)


def hostile_record(text: str) -> dict:
    return {
        "id": text, "image": text, "context": text + "\n" + text,
        "conversations": [{"from": "human", "value": "<image>\n" + text}, {"from": "gpt", "value": text},
                          {"from": text, "value": text}],
        "reject_reasons": [text, "truncated"],
    }


@BOUNDED
@given(text=TEXT)
def test_review_page_data_round_trips_for_any_sample_text(text, tmp_path_factory):
    out = tmp_path_factory.mktemp("page") / "review.html"
    write_html([item_for(hostile_record(text), split=text)], out, None, embed=False, title=text)
    page = out.read_text(encoding="utf-8")
    tags = parsed(page)
    assert tags.events == EMPTY_PAGE.events
    entry = json.loads("".join(tags.data_text))["samples"][0]
    assert entry["id"] == text and entry["split"] == text and entry["turns"][1] == ["gpt", text]
    assert text in entry["flags"]


# Every control character a terminal acts on; after escaping none may be left.
UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029\ud800-\udfff]")
SGR = re.compile(r"\x1b\[[0-9;]*m")


def rendered(renderable, color_system: str | None, width: int = 4000) -> str:
    console = Console(file=io.StringIO(), force_terminal=True, color_system=color_system, width=width,
                      legacy_windows=False)
    console.print(renderable)
    return console.file.getvalue()


@BOUNDED
@given(text=TEXT)
def test_terminal_text_writes_out_every_control_and_keeps_the_rest(text):
    one_line, multi = terminal_text(text), terminal_text(text, multiline=True)
    assert not UNSAFE.search(one_line) and "\n" not in one_line and "\t" not in one_line
    assert not UNSAFE.search(multi)
    if not UNSAFE.search(text):
        assert multi == text  # ordinary text of any script, newlines and tabs: unchanged
    assert terminal_text(one_line) == one_line


@BOUNDED
@given(text=TEXT)
def test_review_panel_prints_sample_text_as_text(text):
    panel = sample_panel(item_for(hostile_record(text), split=text), "1/1")
    plain = rendered(panel, None)
    assert "\x1b" not in plain and not UNSAFE.search(plain.replace("\n", ""))
    coloured = rendered(panel, "truecolor")
    assert "\x1b]" not in coloured  # no OSC (hyperlinks, titles): the page uses none, so none came from the text
    assert not UNSAFE.search(SGR.sub("", coloured).replace("\n", ""))
    # Markup in the text is shown, not obeyed: every line of the escaped text is on screen as written.
    for line in terminal_text(text, multiline=True).expandtabs(8).split("\n"):
        if line.strip() and "\t" not in text:
            assert line.strip() in plain


def test_markup_and_escapes_are_printed_literally():
    text = "[link=file:///etc/passwd]click[/link] \x1b[2J\x1b]8;;http://x\x07y\x1b]8;;\x07 \u202eevil"
    out = rendered(sample_panel(item_for(hostile_record(text)), "1/1"), "truecolor")
    assert "[link=file:///etc/passwd]click[/link]" in out
    assert "\\x1b[2J" in out and "\\x1b]8;;http://x\\x07" in out and "\\u202eevil" in out
    assert "\x1b]8" not in out and "\x1b[2J" not in out
    assert terminal_markup("[bold]x[/bold]") == "\\[bold]x\\[/bold]"
    assert terminal_text("日本語 عربي émoji 👩‍👩‍👧 e\u0301") == "日本語 عربي émoji 👩‍👩‍👧 e\u0301"


def run(capsys, *args: object) -> tuple[int, str, str]:
    with mock.patch.object(sys, "argv", ["datagen", *map(str, args)]):
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def test_stats_table_shows_hostile_split_and_reason_names_literally(capsys, tmp_path):
    split = "[link=file:///etc/passwd]s[/link]\x1b[2J"
    rec = {"id": "1", "image": "a.jpg", "split": split, "reject_reasons": ["[bold]r\x07[/bold]"],
           "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]}
    src = tmp_path / "x.jsonl"
    src.write_text(json.dumps(rec) + "\n")
    code, out, err = run(capsys, "stats", src)
    assert code == 0, err
    assert "[link=file:///etc/passwd]s[/link]\\x1b[2J" in out and "[bold]r\\x07[/bold]" in out
    assert not UNSAFE.search(out.replace("\n", ""))


def test_error_line_quoting_a_hostile_file_name_stays_one_visible_line(capsys, tmp_path):
    name = tmp_path / "a\x1b[2J\nb\u202e.jsonl"
    code, out, err = run(capsys, "review", name)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert "\\x1b[2J\\x0ab\\u202e.jsonl" in err and not UNSAFE.search(err.rstrip("\n"))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(texts=st.lists(TEXT, min_size=4, max_size=4))
def test_no_reading_command_passes_a_control_character_from_the_file_to_the_terminal(capsys, tmp_path_factory, texts):
    tid, split, value, reason = texts
    folder = tmp_path_factory.mktemp("cli")
    src = folder / "samples.jsonl"
    recs = [
        {"id": tid, "image": value, "split": split or "x",
         "conversations": [{"from": "human", "value": "<image>\n" + value}, {"from": "gpt", "value": value}]},
        {"id": tid + "2", "image": "a.jpg", "split": split or "x", "reject_reasons": [reason], "raw": value},
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    for args in (["check", src], ["stats", src], ["review", src], ["export", src, "--out", folder / "o.json", "--mix", "none"]):
        code, out, err = run(capsys, *args)
        assert code in (0, 2), (args, err)
        for stream in (out, err):
            assert not UNSAFE.search(stream.replace("\n", "")), (args, stream)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(name=TEXT)
def test_writing_commands_print_a_hostile_output_name_as_text(capsys, tmp_path_factory, name):
    """The name of a file a command writes (given by the user, or found by a glob) is echoed through the CLI's one
    print path: whatever characters it holds, none reaches the terminal as a control character."""
    safe = "".join(c for c in name if c not in "/\x00") or "x"  # what a file name can hold
    folder = tmp_path_factory.mktemp("out")
    src = folder / "detail.jsonl"
    src.write_text(Path(__file__).parent.joinpath("fixtures", "good_samples.jsonl").read_text(encoding="utf-8"),
                   encoding="utf-8")
    for args in (["export", src, "--out", folder / f"{safe}.json", "--mix", "none"],
                 ["review", src, "--html", folder / f"{safe}.html"],
                 ["export", src, "--format", "hf", "--out", folder / f"{safe}-hf"]):
        try:
            code, out, err = run(capsys, *args)
        except (OSError, UnicodeError):  # a name this file system refuses (too long, not encodable) is not the point
            continue
        assert code in (0, 2), (args, err)
        for stream in (out, err):
            assert not UNSAFE.search(stream.replace("\n", "").replace("\t", "")), (args, stream)


def test_the_cli_prints_only_through_echo():
    """`datagen.escaping.echo` is the one way the CLI prints its lines; a raw typer.echo would bypass the terminal
    rule (the help text, printed by typer itself, is the one exception)."""
    root = Path(__file__).resolve().parent.parent / "datagen"
    raw = [f"{p.relative_to(root)}:{i}" for p in [*root.glob("cli/*.py"), root / "hf_export.py", root / "quality" / "evaluate.py"]
           for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
           if "typer.echo(" in line and "get_help()" not in line]
    assert not raw, raw
