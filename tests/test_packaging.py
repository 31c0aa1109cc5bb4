"""What a `pip install` of byol-ray carries: every preset and every search file (the runtime image installs the
same wheel), and search files are found by name."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from byol_ray.tune import search_file, shipped_searches

REPO = Path(__file__).resolve().parents[1]


def test_the_wheel_holds_every_preset_and_search_file(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("byol_ray-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    presets = {f"byol_ray/presets/{p.name}" for p in (REPO / "byol_ray" / "presets").glob("*.yaml")}
    searches = {f"byol_ray/tune_configs/{p.name}" for p in (REPO / "tune_configs").glob("*.yaml")}
    assert len(presets) >= 7 and len(searches) >= 3
    assert presets <= names and searches <= names, sorted((presets | searches) - names)
    # the package's copy is the repository's tune_configs/, not a second set of files that could drift
    assert (REPO / "byol_ray" / "tune_configs").resolve() == (REPO / "tune_configs").resolve()


def test_search_files_by_name_or_path(tmp_path):
    assert shipped_searches() == sorted(p.stem for p in (REPO / "tune_configs").glob("*.yaml"))
    assert search_file("cpu_smoke").read_text() == (REPO / "tune_configs" / "cpu_smoke.yaml").read_text()
    assert search_file("tune_configs/cpu_smoke.yaml").name == "cpu_smoke.yaml"  # as the README writes it
    own = tmp_path / "mine.yaml"
    own.write_text("base_config: [demo]\n")
    assert search_file(str(own)) == own
    listed = subprocess.run([str(Path(sys.executable).with_name("byol-ray")), "tune", "--list"], capture_output=True,
                            text=True, timeout=60)
    assert listed.returncode == 0 and [line.split()[0] for line in listed.stdout.splitlines()] == shipped_searches()
    missing = subprocess.run([str(Path(sys.executable).with_name("byol-ray")), "tune", "--search", "nope",
                              "--search-name", "x"], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "search file 'nope' not found" in missing.stderr
    assert "cpu_smoke" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
