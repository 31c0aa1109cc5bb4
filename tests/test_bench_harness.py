"""scripts/harness.py, the benchmark scripts' one harness: interleaved paired rounds and the median of the paired
ratios, the quiet-machine check, the run's record, and one docs section per question (replaced, the old one moved to
the history file). Seconds, no benchmark runs; and docs/benchmarks.md's structure as the harness reads it."""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks.md"


def _load():
    spec = importlib.util.spec_from_file_location("harness", REPO / "scripts" / "harness.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("harness", module)
    spec.loader.exec_module(module)
    return module


harness = _load()


def test_rounds_interleave_the_arms_and_number_warmups_before_one():
    calls = []
    arms = {name: (lambda r, name=name: calls.append((name, r)) or 10 * r) for name in ("A", "B", "C")}
    done = harness.interleaved(arms, 3, warmup=2, log=None)
    assert calls == [("A", -1), ("B", -1), ("C", -1), ("A", 0), ("B", 0), ("C", 0),
                     ("A", 1), ("B", 1), ("C", 1), ("A", 2), ("B", 2), ("C", 2), ("A", 3), ("B", 3), ("C", 3)]
    assert [row["round"] for row in done.rows] == [1, 2, 3]  # the warm-ups are dropped
    assert done.values("A") == [10, 20, 30] and done.names == ["A", "B", "C"]


def test_paired_ratios_and_their_median_on_known_numbers():
    # Per-round values chosen so that the median of the paired ratios (2.0) differs from the ratio of the medians
    # (B median 8 / A median 2 = 4.0) and from the mean ratio: the harness reports the former.
    a = iter([1.0, 2.0, 4.0, 8.0, 0.5])
    b = iter([3.0, 4.0, 8.0, 8.0, 1.5])
    out = harness.paired_rounds(lambda r: next(a), lambda r: next(b), 5, log=None)
    assert out["A"] == [1.0, 2.0, 4.0, 8.0, 0.5] and out["B"] == [3.0, 4.0, 8.0, 8.0, 1.5]
    assert out["ratios"] == [3.0, 2.0, 2.0, 1.0, 3.0]
    assert out["median_ratio"] == 2.0 and out["ratio_range"] == [1.0, 3.0]
    assert [row["round"] for row in out["rounds"]] == [1, 2, 3, 4, 5]
    # dict values: the ratio of one of their items, in either direction
    rows = harness.Rounds(["x", "y"], [{"round": 1, "x": {"s": 2.0}, "y": {"s": 3.0}},
                                       {"round": 2, "x": {"s": 4.0}, "y": {"s": 2.0}},
                                       {"round": 3, "x": {"s": 1.0}, "y": {"s": 4.0}}])
    assert rows.ratios("y", "x", "s") == [1.5, 0.5, 4.0] and rows.paired("y", "x", "s")["median_ratio"] == 1.5
    assert rows.paired("x", "y", "s", digits=2)["ratios"] == [0.67, 2.0, 0.25] and rows.median("x", "s") == 2.0
    assert harness.ratio_summary([1.0, 3.0])["median_ratio"] == 2.0  # an even count: the middle two's mean


def test_log_names_each_round(capsys):
    harness.interleaved({"A": lambda r: 1.0, "B": lambda r: {"pairs_per_s": 2.5}}, 2)
    err = capsys.readouterr().err
    assert "round 1/2: A 1, B (pairs_per_s 2.5)" in err and "round 2/2" in err


def test_quiet_machine_rule():
    assert harness.quiet_machine([1.5, 9.0, 9.0], cores=2) == (True, "")  # at most cores - 0.5, the 1-minute figure
    quiet, why = harness.quiet_machine([1.51, 0.0, 0.0], cores=2)
    assert not quiet and "1.51" in why and "1.5" in why
    assert harness.quiet_machine([7.0, 0, 0], cores=8)[0]


def test_bench_refuses_to_write_timed_figures_on_a_loaded_machine(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(harness.os, "getloadavg", lambda: (9.0, 8.0, 7.0))
    monkeypatch.setattr(harness.os, "cpu_count", lambda: 2)
    args = type("Args", (), {"write": True, "markdown": str(tmp_path / "b.md"), "record": None})()
    with pytest.raises(SystemExit) as refused:
        harness.Bench("bench_x.py", ["--write"], args)
    assert refused.value.code == 2 and "refusing --write" in capsys.readouterr().err
    # untimed figures (accuracy, statistics) are written, the load noted; without --write a warning only
    bench = harness.Bench("bench_x.py", ["--write"], args, timed=False)
    assert not bench.quiet and "loaded" in bench.load_text() and "[9.0, 8.0, 7.0]" in bench.load_text()
    args.write = False
    out = harness.Bench("bench_x.py", [], args).finish({"figure": 1.0})
    load = out["run"]["load"]
    assert load["before"] == [9.0, 8.0, 7.0] and load["cores"] == 2 and not load["quiet"] and "load average" in \
        load["warning"] and "other jobs" in capsys.readouterr().err


def test_bench_record_has_the_command_date_machine_commit_load_and_figures(monkeypatch, tmp_path):
    monkeypatch.setattr(harness.os, "getloadavg", lambda: (0.1, 0.2, 0.3))
    record = tmp_path / "records" / "run.json"
    args = type("Args", (), {"write": False, "markdown": None, "record": str(record)})()
    bench = harness.Bench("bench_x.py", ["--rounds", "3", "--name", "a b"], args)
    out = bench.finish({"median_ratio": 1.5})
    saved = json.loads(record.read_text())
    assert saved == json.loads(json.dumps(out))
    run = saved["run"]
    assert run["command"] == ".venv/bin/python scripts/bench_x.py --rounds 3 --name 'a b'"
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", run["date"]) and saved["median_ratio"] == 1.5
    machine = run["machine"]
    assert machine["cores"] >= 1 and machine["cpu"] and machine["python"] and isinstance(machine["gpus"], list)
    assert machine["ram_gib"] is None or machine["ram_gib"] > 0
    assert run["git"]["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", run["git"]["commit"])
    assert run["load"]["before"] == [0.1, 0.2, 0.3] and run["load"]["quiet"]
    line = bench.run_line()
    assert line.startswith("Command: `.venv/bin/python scripts/bench_x.py --rounds 3") and "[0.1, 0.2, 0.3]" in line


DOC = """# Benchmarks

Intro.

| question | section | in short |
|---|---|---|
| Old question? | [Thing A (2026-01-01)](#thing-a) | A was 2x |
| Other? | [Thing B (2026-01-02)](#thing-b) | B \\| C |

<a id="thing-a"></a>

## Thing A (2026-01-01)

Old figures of A.

```
## not a heading (a code block)
```

<a id="thing-b"></a>

## Thing B (2026-01-02)

Figures of B.
"""


def test_replace_section_keeps_one_per_question_and_moves_the_old_one_to_history(tmp_path):
    docs = tmp_path / "benchmarks.md"
    docs.write_text(DOC)
    old = harness.replace_section(docs, "thing-a", "Thing A (2026-02-01)", "New figures of A.",
                                  question="Ignored for an existing row", summary="A is 3x")
    assert old.startswith("## Thing A (2026-01-01)") and "Old figures of A." in old and "not a heading" in old
    text = docs.read_text()
    assert text.count("## Thing A") == 1 and "New figures of A." in text and "Old figures" not in text
    assert text.index("## Thing A (2026-02-01)") < text.index("## Thing B")  # replaced in place
    assert "| Old question? | [Thing A (2026-02-01)](#thing-a) | A is 3x |" in text
    assert "| Other? | [Thing B (2026-01-02)](#thing-b) | B \\| C |" in text  # other rows untouched
    assert text.endswith("## Thing B (2026-01-02)\n\nFigures of B.\n")
    history = (tmp_path / "benchmarks-history.md").read_text()
    assert history.startswith(harness.HISTORY_TITLE + "\n\n" + harness.HISTORY_NOTE)
    assert history.rstrip("\n").endswith(old) and '<a id="' not in history  # verbatim, without the anchor

    # again: the second old section follows the first in the history (oldest first)
    harness.replace_section(docs, "thing-a", "Thing A (2026-03-01)", "Newest figures of A.")
    history = (tmp_path / "benchmarks-history.md").read_text()
    assert history.index("Old figures of A.") < history.index("New figures of A.")
    assert "| Old question? | [Thing A (2026-03-01)](#thing-a) | A is 3x |" in docs.read_text()  # summary kept

    # a new id: appended at the end, with a row in the table; nothing moves
    assert harness.replace_section(docs, "thing-c", "Thing C (2026-03-02)", "C.", question="C?",
                                   summary="C is 1 | 2") is None
    text = docs.read_text()
    assert text.rstrip().endswith("## Thing C (2026-03-02)\n\nC.")
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[-1] == "| C? | [Thing C (2026-03-02)](#thing-c) | C is 1 \\| 2 |"
    assert [s.id for s in harness.sections(text.split("\n"))] == ["thing-a", "thing-b", "thing-c"]


def test_replace_section_starts_a_missing_file_and_refuses_duplicate_ids(tmp_path):
    docs = tmp_path / "sub" / "benchmarks.md"
    harness.replace_section(docs, "x", "X (today)", "Body.", question="X?", summary="s")
    assert docs.read_text() == '# Benchmarks\n\n<a id="x"></a>\n\n## X (today)\n\nBody.\n'
    docs.write_text(docs.read_text() + '\n<a id="x"></a>\n\n## X again\n')
    with pytest.raises(ValueError, match="2 sections"):
        harness.replace_section(docs, "x", "X", "Body.")


def test_bench_write_section_on_a_copy_of_the_docs(tmp_path, monkeypatch):
    """The real docs/benchmarks.md, copied: a script's --write replaces its question's section and table row."""
    monkeypatch.setattr(harness.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    shutil.copy(DOCS, tmp_path / "benchmarks.md")
    shutil.copy(DOCS.with_name("benchmarks-history.md"), tmp_path / "benchmarks-history.md")
    before = (tmp_path / "benchmarks.md").read_text()
    history_before = (tmp_path / "benchmarks-history.md").read_text()
    args = type("Args", (), {"write": True, "markdown": str(tmp_path / "benchmarks.md"), "record": None})()
    bench = harness.Bench("bench_staging.py", ["--size-mb", "8", "--write"], args)
    bench.write_section("staging-object-store", "Staging a training file from an object store (2099-01-01)",
                        "New table.", summary="new summary")
    text = (tmp_path / "benchmarks.md").read_text()
    history = (tmp_path / "benchmarks-history.md").read_text()
    old = next(s for s in harness.sections(before.split("\n")) if s.id == "staging-object-store")
    old_text = "\n".join(before.split("\n")[old.start + 1:old.end]).strip()
    assert old_text.startswith("## Staging a training file from an object store (2026-12-04)")
    assert history.startswith(history_before.rstrip("\n")) and history.rstrip().endswith(old_text)
    assert "## Staging a training file from an object store (2099-01-01)" in text and old_text not in text
    assert "Command: `.venv/bin/python scripts/bench_staging.py --size-mb 8 --write` (" in text
    assert "[Staging a training file from an object store (2099-01-01)](#staging-object-store) | new summary |" in text
    assert len(text.splitlines()) < len(before.splitlines())  # only that section changed
    assert [s.id for s in harness.sections(text.split("\n"))] == [s.id for s in harness.sections(before.split("\n"))]


REFERENCED_TITLES = ("Short-run learning-rate sweep", "Stored resolution for ImageNet", "Checkpoint upload",
                     "Staging a training file from an object store")


def test_docs_hold_one_section_per_question_with_an_id_and_a_row():
    """docs/benchmarks.md as the harness keeps it: every section has a unique id and a row of the summary table that
    links it; the sections other files quote by title are there."""
    lines = DOCS.read_text().split("\n")
    found = harness.sections(lines)
    ids = [s.id for s in found]
    assert len(found) >= 20 and None not in ids and len(set(ids)) == len(ids)
    rows = [line for line in lines if line.startswith("| ") and "](#" in line]
    linked = [re.search(r"\]\(#([^)]+)\)", row).group(1) for row in rows]
    assert sorted(linked) == sorted(ids)
    for row, sid in zip(rows, linked):
        title = next(s.title for s in found if s.id == sid)
        assert f"[{title}](#{sid})" in row, sid  # the row names the section's heading
        assert len(harness._cells(row)) == 3, row
    titles = [s.title for s in found]
    for quoted in REFERENCED_TITLES:
        assert any(t.startswith(quoted) for t in titles), quoted
    history = DOCS.with_name("benchmarks-history.md").read_text()
    assert history.startswith(harness.HISTORY_TITLE) and '<a id="' not in history


def test_cpu_by_process_counts_a_commands_children_by_kind():
    """scripts/cpu_by_process.py (the suite's CPU accounting in docs/design.md): a child that burns 2 s of CPU is
    seen, under its kind (less its last 0.2 s at most: a process is counted up to its last sample), and the
    command's exit code is passed on."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "cpu_by_process.py"
    burn = "import time\nend = time.process_time() + 2.0\nwhile time.process_time() < end: pass\nraise SystemExit(3)"
    out = subprocess.run([sys.executable, str(script), "--", sys.executable, "-c", burn],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 3, out.stderr
    rows = [re.match(r"\s*([\d.]+) s\s+(\d+)\s+(.*)", line) for line in out.stderr.splitlines()]
    burned = [float(m.group(1)) for m in rows if m and m.group(3).startswith("other: ") and "import time" in m.group(3)]
    assert len(burned) == 1 and 1.5 <= burned[0] <= 2.5, out.stderr
    assert ": exit 3," in out.stderr and "busy CPU time" in out.stderr, out.stderr
