"""The benchmark scripts' one harness: interleaved paired rounds, the quiet-machine check, the run's JSON record and
its section of docs/benchmarks.md.

The project's rules it carries: a speed ratio is measured in interleaved paired rounds (A, B, A, B, ...) in one
script on a quiet machine, and reported as the median of the paired ratios with the load average; every figure in
the docs says the command that reproduces it.

- :func:`interleaved` runs the arms round after round; :class:`Rounds` gives each round's values, medians and the
  paired ratios with their median (:func:`ratio_summary`).
- :class:`Bench` is one run of a script: the load average before and after (:func:`quiet_machine`: ``--write`` of
  timed figures is refused on a loaded machine, and the result says the load either way), the record (command
  line, date, machine, git commit, figures; ``--record PATH`` writes it) and :meth:`Bench.write_section`.
- :func:`replace_section` keeps docs/benchmarks.md at one section per question, keyed by the ``<a id="...">`` line
  before the section's heading: a new run replaces that section in place, the old text moves verbatim to
  docs/benchmarks-history.md, and the summary table's row that links ``#id`` takes the new title and summary.

A script imports it after putting its own folder first on ``sys.path``, which works both for
``python scripts/X.py`` and for the tests, which load scripts with ``importlib.util.spec_from_file_location``::

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import harness

Standard library only (torch is described when a script has imported it), so it runs on a GPU machine that has
nothing but torch.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks.md"
# A 1-minute load average above (cores - QUIET_MARGIN) at the start means other jobs share the cores.
QUIET_MARGIN = 0.5
HISTORY_TITLE = "# Benchmarks: superseded sections"
HISTORY_NOTE = ("Sections of [benchmarks.md](benchmarks.md) that a newer run of the same question replaced, moved "
                "here verbatim, oldest first; the current answers are in benchmarks.md.")
ANCHOR = re.compile(r'^<a id="([^"]+)"></a>\s*$')


def say(message: str) -> None:
    """A progress line on stderr (stdout is the script's JSON)."""
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------- rounds


def _pick(value: Any, key: str | Callable | None) -> Any:
    if key is None:
        return value
    return key(value) if callable(key) else value[key]


def ratio_summary(ratios, digits: int = 3) -> dict:
    """{"ratios": [...], "median_ratio": median, "ratio_range": [min, max]} of paired ratios, rounded to ``digits``."""
    ratios = [float(r) for r in ratios]
    return {"ratios": [round(r, digits) for r in ratios], "median_ratio": round(statistics.median(ratios), digits),
            "ratio_range": [round(min(ratios), digits), round(max(ratios), digits)]}


@dataclass
class Rounds:
    """The measured rounds of :func:`interleaved`: ``rows[i] = {"round": i + 1, arm: value, ...}``."""

    names: list[str]
    rows: list[dict]

    def values(self, name: str, key: str | Callable | None = None) -> list:
        """``name``'s value in every round (``key``: an item of a dict value, or a function of the value)."""
        return [_pick(row[name], key) for row in self.rows]

    def median(self, name: str, key: str | Callable | None = None) -> float:
        return statistics.median(self.values(name, key))

    def ratios(self, num: str, den: str, key: str | Callable | None = None) -> list[float]:
        """The paired ratios num / den, one per round (both measured in that round)."""
        return [_pick(row[num], key) / _pick(row[den], key) for row in self.rows]

    def paired(self, num: str, den: str, key: str | Callable | None = None, digits: int = 3) -> dict:
        """:func:`ratio_summary` of num / den: the ratios, their median and range."""
        return ratio_summary(self.ratios(num, den, key), digits)


def _describe(row: dict, names: list[str]) -> str:
    def short(value):
        if isinstance(value, float):
            return f"{value:.4g}"
        if isinstance(value, dict):
            numbers = [f"{k} {v:.4g}" for k, v in value.items() if isinstance(v, (int, float))][:2]
            return "(" + ", ".join(numbers) + ")"
        return str(value)

    return ", ".join(f"{name} {short(row[name])}" for name in names)


def interleaved(arms: dict[str, Callable[[int], Any]], rounds: int, *, warmup: int = 0,
                log: Callable[[str], None] | None = say, describe: Callable[[dict], str] | None = None,
                after_round: Callable[[int], None] | None = None) -> Rounds:
    """Runs the arms in turn, round after round: A, B, A, B, ... (with three arms A, B, C, A, B, C, ...), so a
    slow spell of the machine falls on every arm alike.

    Args:
        arms: ``{name: fn}`` in the order they run in a round; ``fn(round)`` returns that round's value (a number
            or a dict of them).
        rounds: measured rounds, numbered 1..rounds.
        warmup: untimed rounds first, in the same order, numbered 1 - warmup .. 0; their values are dropped.
        log: gets one line per measured round, ``round r/N: ...`` (``describe(row)`` formats the rest).
        after_round: called with the round's number after each round, warm-ups included.
    """
    names = list(arms)
    rows = []
    for number in range(1 - warmup, rounds + 1):
        row = {"round": number}
        for name in names:
            row[name] = arms[name](number)
        if after_round is not None:
            after_round(number)
        if number < 1:
            continue
        rows.append(row)
        if log is not None:
            log(f"round {number}/{rounds}: " + (describe(row) if describe else _describe(row, names)))
    return Rounds(names, rows)


def paired_rounds(a: Callable[[int], Any], b: Callable[[int], Any], rounds: int, *, names=("A", "B"),
                  key: str | Callable | None = None, warmup: int = 0, log=say, digits: int = 3) -> dict:
    """Two arms in interleaved rounds: each round's values and the median of the paired ratios B / A."""
    result = interleaved({names[0]: a, names[1]: b}, rounds, warmup=warmup, log=log)
    return {"rounds": result.rows, names[0]: result.values(names[0], key), names[1]: result.values(names[1], key),
            **result.paired(names[1], names[0], key, digits)}


# ---------------------------------------------------------------------------------------- the machine


def load_average() -> list[float]:
    """The 1-, 5- and 15-minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]


def quiet_machine(load: list[float], cores: int, margin: float = QUIET_MARGIN) -> tuple[bool, str]:
    """(quiet, why not): the 1-minute load average must not exceed cores - margin."""
    limit = cores - margin
    if load[0] > limit:
        return False, (f"1-minute load average {load[0]} at start > {limit} ({cores} cores - {margin}): other jobs "
                       "share the cores, so timed figures are not a result")
    return True, ""


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpus() -> list[str]:
    """The GPUs, "name (N GiB)": from torch when the script imported it, else from nvidia-smi if there is one."""
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available():
                return [f"{torch.cuda.get_device_name(i)} ({torch.cuda.get_device_properties(i).total_memory / 2**30:.0f}"
                        " GiB)" for i in range(torch.cuda.device_count())]
            return []
        except Exception:  # noqa: BLE001 - a broken driver is not a benchmark's problem
            return []
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout
            return [line.strip() for line in out.splitlines() if line.strip()]
        except (OSError, subprocess.SubprocessError):
            return []
    return []


def machine() -> dict:
    """CPU model and count, RAM, GPUs, and the versions of Python and (when imported) torch and torchvision."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        ram = None
    out = {"cpu": _cpu_model(), "cores": os.cpu_count(),
           "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
           "ram_gib": round(ram, 1) if ram else None, "gpus": gpus(), "python": platform.python_version()}
    for name in ("torch", "torchvision"):
        module = sys.modules.get(name)
        if module is not None:
            out[name] = getattr(module, "__version__", "?")
    return out


def git_commit(repo: Path = REPO) -> dict:
    """{"commit": HEAD or None, "dirty": tracked files changed}; None where the tree is not a git checkout."""
    def git(*args):
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
        return {"commit": head.stdout.strip(), "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def describe_machine(m: dict) -> str:
    """ "AMD EPYC 7B13, 2 cores, 7.8 GiB RAM, no GPU; Python 3.11.7, torch 2.14.1" """
    parts = [m["cpu"], f"{m['cores']} cores"]
    if m.get("ram_gib"):
        parts.append(f"{m['ram_gib']:g} GiB RAM")
    parts.append("GPU: " + ", ".join(m["gpus"]) if m.get("gpus") else "no GPU")
    versions = [f"Python {m['python']}"] + [f"{k} {m[k]}" for k in ("torch", "torchvision") if k in m]
    return ", ".join(parts) + "; " + ", ".join(versions)


# ----------------------------------------------------------------------------------------------- a run


def add_arguments(parser: argparse.ArgumentParser, *, write: bool = True) -> None:
    """The flags every benchmark script shares: --write, --markdown, --record."""
    if write:
        parser.add_argument("--write", action="store_true",
                            help="replace this benchmark's section of --markdown (the old one moves to the history "
                                 "file beside it; refused on a loaded machine for timed figures)")
        parser.add_argument("--markdown", default=str(DOCS), help="the file --write updates (default: %(default)s)")
    parser.add_argument("--record", default=None, metavar="PATH",
                        help="write the run's JSON record (command, date, machine, git commit, load, figures) there")


class Bench:
    """One run of a benchmark script: its command, the load before and after, its record and its docs section.

    Made before the work starts: it reads the load average then and, when ``--write`` would publish timed figures
    taken on a loaded machine, refuses (exit status 2) before anything runs. ``timed=False`` (accuracy figures,
    crop statistics) only notes the load.
    """

    def __init__(self, script: str, argv: list[str] | None = None, args: argparse.Namespace | None = None, *,
                 timed: bool = True, python: str = ".venv/bin/python") -> None:
        argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
        self.script, self.timed = script, timed
        self.command = shlex.join([python, f"scripts/{script}", *argv])
        self.write = bool(getattr(args, "write", False))
        self.markdown = Path(getattr(args, "markdown", None) or DOCS)
        self.record_path = getattr(args, "record", None)
        self.date = time.strftime("%Y-%m-%d")
        self.cores = os.cpu_count() or 1
        self.load_before = load_average()
        self.load_after: list[float] | None = None
        self.quiet, self.why_not = quiet_machine(self.load_before, self.cores)
        self._info: dict | None = None
        if self.write and timed and not self.quiet:
            say(f"{Path(script).stem}: refusing --write: {self.why_not}. Run it again on a quiet machine, or "
                "without --write.")
            raise SystemExit(2)
        if not self.quiet:
            say(f"{Path(script).stem}: {self.why_not}")

    def end(self) -> list[float]:
        """Reads the load average at the end of the measurement (once; later calls return it)."""
        if self.load_after is None:
            self.load_after = load_average()
        return self.load_after

    def load(self) -> dict:
        out = {"cores": self.cores, "before": self.load_before, "after": self.end(), "quiet": self.quiet}
        if not self.quiet:
            out["warning"] = self.why_not
        return out

    def info(self) -> dict:
        """The run's record without its figures: command, date, machine, git commit, load."""
        if self._info is None:
            self._info = {"script": self.script, "command": self.command, "date": self.date, "machine": machine(),
                          "git": git_commit(), "load": self.load()}
        return self._info

    def finish(self, figures: dict) -> dict:
        """Adds the record (``figures["run"]``), writes it to ``--record`` if given, and returns ``figures``."""
        figures["run"] = self.info()
        if self.record_path:
            Path(self.record_path).parent.mkdir(parents=True, exist_ok=True)
            Path(self.record_path).write_text(json.dumps(figures, indent=1, default=str) + "\n")
            say(f"{Path(self.script).stem}: record written to {self.record_path}")
        return figures

    def load_text(self) -> str:
        text = (f"load average {self.load_before} at start, {self.end()} at end (1, 5, 15 min; {self.cores} cores; "
                f"quiet = the 1-minute figure at most {self.cores - QUIET_MARGIN} at start)")
        return text if self.quiet else text + f" — **loaded**: {self.why_not}"

    def run_line(self) -> str:
        """The line every section written through the harness starts with: command, date, commit, machine, load."""
        info = self.info()
        commit = info["git"]["commit"]
        where = f"git {commit[:10]}{' + local changes' if info['git']['dirty'] else ''}" if commit else "no git"
        return (f"Command: `{self.command}` ({self.date}, {where}). Machine: {describe_machine(info['machine'])}; "
                f"{self.load_text()}.")

    def write_section(self, section_id: str, title: str, body: str, *, question: str | None = None,
                      summary: str | None = None) -> None:
        """With --write: the run's section (``## title``, the run line, ``body``) replaces the one of ``section_id``
        in --markdown, whose old text moves to the history file; without --write, nothing."""
        if not self.write:
            return
        text = f"{self.run_line()}\n\n{body.strip()}\n"
        replace_section(self.markdown, section_id, title, text, question=question, summary=summary)
        say(f"{Path(self.script).stem}: wrote section #{section_id} of {self.markdown}")


# ----------------------------------------------------------------------------------------------- the docs


@dataclass
class Section:
    """A ``## `` section of a markdown file: lines ``start`` (its anchor line, if any) to ``end`` (exclusive)."""

    id: str | None
    title: str
    start: int
    end: int


def sections(lines: list[str]) -> list[Section]:
    """The level-2 sections of a markdown file's lines; an ``<a id="...">`` line (blank lines after it allowed)
    right before a heading gives that section its id. Fenced code blocks are skipped."""
    out: list[Section] = []
    fence, anchor = False, None
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fence, anchor = not fence, None
            continue
        if fence:
            continue
        match = ANCHOR.match(line)
        if match:
            anchor = (i, match.group(1))
        elif line.startswith("## "):
            start, sid = anchor if anchor else (i, None)
            if out:
                out[-1].end = start
            out.append(Section(sid, line[3:].strip(), start, len(lines)))
            anchor = None
        elif line.strip():
            anchor = None
    return out


def history_path(markdown: Path) -> Path:
    """docs/benchmarks.md -> docs/benchmarks-history.md (beside it)."""
    markdown = Path(markdown)
    return markdown.with_name(f"{markdown.stem}-history{markdown.suffix}")


def _cells(row: str) -> list[str]:
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", row.strip())[1:-1]]


def _cell(text: str) -> str:
    return " ".join(text.replace("|", "\\|").split())


def _update_table(lines: list[str], section_id: str, title: str, question: str | None, summary: str | None) -> None:
    """The summary table's row that links ``#section_id`` gets the new title (and summary, if given); without such a
    row, one is added to the table whose header starts with ``| question`` (if the file has one)."""
    link = f"(#{section_id})"
    row = next((i for i, line in enumerate(lines) if line.startswith("|") and link in line), None)
    if row is not None:
        cells = _cells(lines[row])
        for k, cell in enumerate(cells):
            if link in cell:
                cells[k] = f"[{_cell(title)}](#{section_id})"
        if summary:
            cells[-1] = _cell(summary)
        lines[row] = "| " + " | ".join(cells) + " |"
        return
    header = next((i for i, line in enumerate(lines) if line.startswith("| question")), None)
    if header is None or not (question or summary):
        return
    end = header + 2
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    lines.insert(end, f"| {_cell(question or title)} | [{_cell(title)}](#{section_id}) | {_cell(summary or '')} |")


def _append_history(history: Path, text: str) -> None:
    old = history.read_text() if history.exists() else f"{HISTORY_TITLE}\n\n{HISTORY_NOTE}\n"
    history.write_text(old.rstrip("\n") + "\n\n" + text.strip("\n") + "\n")


def replace_section(markdown: Path, section_id: str, title: str, body: str, *, question: str | None = None,
                    summary: str | None = None, history: Path | None = None) -> str | None:
    """Puts ``## title`` + ``body`` in ``markdown`` as the section of ``section_id``.

    The section of that id is replaced in place and its old text (without the anchor line) appended, verbatim, to
    ``history`` (default: :func:`history_path`); with none, the new section goes at the end. The summary table's
    row of the id is updated (:func:`_update_table`). A missing ``markdown`` starts as "# Benchmarks".

    Returns the old section's text, or None.
    """
    markdown = Path(markdown)
    history = Path(history) if history else history_path(markdown)
    lines = (markdown.read_text() if markdown.exists() else "# Benchmarks\n").rstrip("\n").split("\n")
    new = [f'<a id="{section_id}"></a>', "", f"## {title}", "", *body.strip("\n").split("\n")]
    found = [s for s in sections(lines) if s.id == section_id]
    if len(found) > 1:
        raise ValueError(f"{markdown} has {len(found)} sections with id {section_id!r}")
    old = None
    if found:
        section = found[0]
        end = section.end
        while end > section.start and not lines[end - 1].strip():
            end -= 1  # the blank lines before the next section stay
        old = "\n".join(lines[section.start + 1:end]).strip("\n")  # without its anchor line
        lines[section.start:end] = new
    else:
        lines += ["", *new]
    _update_table(lines, section_id, title, question, summary)
    if old is not None:
        _append_history(history, old)  # first: a failure after it leaves both texts somewhere
    markdown.parent.mkdir(parents=True, exist_ok=True)
    markdown.write_text("\n".join(lines).rstrip("\n") + "\n")
    return old


def markdown_table(header: list[str], rows: list[list], align: list[str] | None = None) -> str:
    """A markdown table; ``align`` per column: "l" (default) or "r"."""
    align = align or ["l"] * len(header)
    rule = ["---:" if a == "r" else "---" for a in align]
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)
