"""The ``byol-ray`` command line as a user meets it: the real entry point run as a subprocess.

Version and help, one spelling per setting, exit codes (0 ok, 1 bug, 2 bad input in one line,
3 promote declined, 130 interrupted), and ``--json`` results alone on stdout.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from byol_ray import cli

from ports import free_port

BYOL_RAY = Path(sys.executable).with_name("byol-ray")
_TIMEOUT_S = 300


def byol_ray(*argv: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the installed ``byol-ray`` (``python -m byol_ray.cli`` when the script is missing)."""
    command = [str(BYOL_RAY)] if BYOL_RAY.exists() else [sys.executable, "-m", "byol_ray.cli"]
    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # only what a test sets
    full_env.update({"TQDM_DISABLE": "1", "COLUMNS": "200", **(env or {})})  # help text unwrapped
    return subprocess.run([*command, *argv], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=_TIMEOUT_S)


def assert_bad_input(proc: subprocess.CompletedProcess, command: str, *needles: str) -> str:
    """Exit 2, exactly one line on stderr naming the command, no traceback, nothing on stdout."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"byol-ray {command}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert proc.stdout == ""
    return lines[0]


# ----------------------------------------------------------------------------- version and help


def test_version_names_the_installed_package(tmp_path):
    from importlib.metadata import version

    proc = byol_ray("--version", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == f"byol-ray {version('byol-ray')}"


def test_help_shows_exit_codes_and_defaults(tmp_path):
    top = byol_ray("--help", cwd=tmp_path)
    assert top.returncode == 0
    for line in ("0    success", "1    failure", "2    bad input", "3    promote declined", "130  interrupted"):
        assert line in top.stdout, top.stdout
    for command in ("train", "prepare", "tune", "config", "linear-eval", "finetune", "knn", "promote", "register"):
        assert command in top.stdout
    prepare = byol_ray("prepare", "--help", cwd=tmp_path).stdout
    assert "--num-workers NUM_WORKERS" in prepare and "writer processes (default: 2)" in prepare
    assert "(default: 0)" in prepare and "(default: 90)" in prepare and "exit codes:" in prepare


def test_one_setting_one_spelling():
    """Old spellings are gone; the same setting has the same name in every command; --name means nothing."""
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001 - the real subcommand parsers
    flags = {name: {s for a in p._actions for s in a.option_strings} for name, p in commands.items()}  # noqa: SLF001
    for name, options in flags.items():
        assert "--json" in options, name
        assert not options & {"--tracking-uri", "--workers", "--name", "--storage-path", "--experiment"}, name
    assert "--search-name" in flags["tune"] and "--num-workers" in flags["prepare"]
    for name in ("linear-eval", "finetune", "knn"):
        args = parser.parse_args([name, "--model", "m:1", "mlflow.tracking_uri=sqlite:////x/mlflow.db"])
        assert args.overrides == ["mlflow.tracking_uri=sqlite:////x/mlflow.db"] and args.num_workers == 0
    assert parser.parse_args(["promote", "--model", "m:1", "mlflow.tracking_uri=u"]).overrides
    assert parser.parse_args(["register", "--checkpoint", "c", "mlflow.register_name=n"]).overrides
    assert parser.parse_args(["train", "mlflow.tracking_uri=u"]).overrides == ["mlflow.tracking_uri=u"]


# ----------------------------------------------------------------------------- bad input: one line, exit 2


def test_config_file_that_is_not_utf8(tmp_path):
    (tmp_path / "bad.yaml").write_bytes(b"optim:\n  base_lr: \xff\xfe\n")
    assert_bad_input(byol_ray("config", "--config", "bad.yaml", cwd=tmp_path), "config", "bad.yaml", "UTF-8")


def test_config_file_that_is_not_a_mapping(tmp_path):
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    assert_bad_input(byol_ray("train", "--no-ray", "--config", "list.yaml", cwd=tmp_path), "train", "mapping")


def test_config_file_that_does_not_exist(tmp_path):
    assert_bad_input(byol_ray("train", "--no-ray", "--config", "missing.yaml", cwd=tmp_path), "train",
                     "missing.yaml", "not found")


@pytest.mark.parametrize("override, key", [("optim.warmup_epochs=.inf", "optim.warmup_epochs"),
                                           ("optim.base_lr=nan", "optim.base_lr"),
                                           ("data.crop_scale=[0.1, -.inf]", "data.crop_scale")])
def test_non_finite_numbers_are_refused_naming_the_key(tmp_path, override, key):
    assert_bad_input(byol_ray("config", override, cwd=tmp_path), "config", key, "finite")


def test_non_finite_numbers_in_a_yaml_file(tmp_path):
    (tmp_path / "inf.yaml").write_text("optim:\n  weight_decay: .inf\n")
    assert_bad_input(byol_ray("config", "--config", "inf.yaml", cwd=tmp_path), "config",
                     "optim.weight_decay", "finite")


@pytest.mark.parametrize("argv, needles", [
    (("train", "--no-ray", "run_name=../../escaped"), ("run_name='../../escaped' is not a plain folder name",)),
    (("train", "--no-ray", "run_name=a/b"), ("run_name='a/b'",)),
    (("tune", "--search", "cpu_smoke", "--search-name", "../x"), ("--search-name='../x' is not a plain folder",)),
    (("train", "--resume", "../up"), ("--resume='../up' is not a plain folder name",)),
    (("train", "--resume", "some-run", "--config", "cifar10_cpu"), ("--config cifar10_cpu cannot change it",)),
    (("train", "--resume", "some-run", "run_name=other"), ("drop run_name=...",)),
])
def test_names_stay_inside_their_folder_and_resume_takes_no_recipe(tmp_path, argv, needles):
    """A run or search name is one folder name; --resume keeps the saved recipe and name (refused, not dropped)."""
    assert_bad_input(byol_ray(*argv, f"output_dir={tmp_path / 'runs'}", cwd=tmp_path), argv[0], *needles)
    assert not (tmp_path / "escaped").exists() and not any((tmp_path / "runs").glob("**/config.yaml"))


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path):
    """`register --checkpoint` loads with weights_only=True: a crafted pickle's command never runs."""
    import torch

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"online": Payload()}, tmp_path / "state.pt")
    line = assert_bad_input(byol_ray("register", "--checkpoint", str(tmp_path / "state.pt"),
                                     f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db", cwd=tmp_path), "register",
                            "refused without running it", "system")
    assert not marker.exists(), line
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    assert_bad_input(byol_ray("register", "--checkpoint", str(tmp_path / "junk.pt"), cwd=tmp_path), "register",
                     "is unreadable")


def test_unknown_flag_and_misplaced_setting_name_the_command(tmp_path):
    assert_bad_input(byol_ray("train", "--tracking-uri", "x", cwd=tmp_path), "train", "--tracking-uri")
    line = assert_bad_input(byol_ray("knn", "--model", "m:1", "mlflow.tracking_url=x", cwd=tmp_path), "knn",
                            "mlflow.tracking_uri=")
    assert "did you mean" in line


@pytest.mark.parametrize("uri, needle", [("bogus://x", "bogus"), ("sqlite://rel.db", "sqlite")])
def test_unusable_tracking_uri(tmp_path, uri, needle):
    proc = byol_ray("train", "--no-ray", f"output_dir={tmp_path / 'runs'}", "train.epochs=1",
                    f"mlflow.tracking_uri={uri}", cwd=tmp_path)
    assert_bad_input(proc, "train", needle)


@pytest.fixture
def web_server(tmp_path):
    """A plain web server (``python -m http.server``) on loopback: answers HTTP, is not MLflow."""
    port = free_port()
    (tmp_path / "www").mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                            cwd=tmp_path / "www", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None and time.monotonic() < deadline, "http.server did not start"
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_tracking_uri_that_is_a_web_server_but_not_mlflow(tmp_path, web_server):
    proc = byol_ray("train", "--no-ray", f"output_dir={tmp_path / 'runs'}", "train.epochs=1",
                    f"mlflow.tracking_uri={web_server}", cwd=tmp_path)
    assert "<html" not in proc.stderr.lower()
    assert_bad_input(proc, "train", web_server, "not an MLflow")


def test_downstream_commands_take_the_store_as_train_does(tmp_path, web_server):
    """``mlflow.tracking_uri=`` and ``$MLFLOW_TRACKING_URI`` reach the same store check as in train."""
    assert_bad_input(byol_ray("knn", "--model", "m:1", f"mlflow.tracking_uri={web_server}", cwd=tmp_path),
                     "knn", "not an MLflow")
    assert_bad_input(byol_ray("promote", "--model", "m:1", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": "bogus://x"}),
                     "promote", "bogus")


# ----------------------------------------------------------------------------- exit codes 1 and 130


def test_unexpected_error_exits_1_with_its_traceback(monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "cmd_config", broken)
    assert cli.main(["config"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("byol-ray config: failed: RuntimeError: boom")


def test_interrupt_exits_130_in_one_line(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_config", interrupted)
    assert cli.main(["config"]) == 130
    out, err = capsys.readouterr()
    assert out == "" and err.strip().splitlines() == ["byol-ray config: interrupted"]


# ----------------------------------------------------------------------------- --json: the result alone on stdout


def test_prepare_json_is_the_only_thing_on_stdout(tmp_path):
    proc = byol_ray("prepare", "demo", "out.beton", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)  # exactly one document: json.loads refuses anything after it
    assert result["num_written"] == 1797 and Path(result["path"]) == tmp_path / "out.beton"
    assert "wrote 1797 images" in proc.stderr


def test_train_json_names_the_run_its_mlflow_run_and_version(tmp_path):
    proc = byol_ray("train", "--no-ray", "--config", "demo", "train.epochs=1", f"output_dir={tmp_path / 'runs'}",
                    "mlflow.register_name=cli-train", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert Path(result["folder"]) == tmp_path / "runs" / result["run_name"]
    assert result["run_id"] and result["registered"] == "cli-train/1" and result["metrics"]["epoch"] == 1
    assert f"run {result['run_name']} finished" in proc.stderr  # the summary is for humans: stderr


def test_config_prints_yaml_or_json_on_stdout_and_nothing_else(tmp_path):
    import yaml

    plain = byol_ray("config", "train.epochs=3", "run_name=r", cwd=tmp_path)
    as_json = byol_ray("config", "train.epochs=3", "run_name=r", "--json", cwd=tmp_path)
    assert plain.returncode == as_json.returncode == 0 and plain.stderr == as_json.stderr == ""
    assert yaml.safe_load(plain.stdout) == json.loads(as_json.stdout)
    assert json.loads(as_json.stdout)["train"]["epochs"] == 3


# ----------------------------------------------------------------------------- promote: exit 3 when declined


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory):
    """Two versions of a tiny encoder in a sqlite store: v1 holds @champion with the better linear_top1."""
    import torch

    from byol_ray.config import load_config, to_dict
    from byol_ray.encoders import build_encoder
    from byol_ray.mlflow_store import client
    from byol_ray.registry import register_encoder

    root = tmp_path_factory.mktemp("cli-promote")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg_dict = to_dict(load_config(["demo"], [f"output_dir={root}"]))
    mlflow_client = client(uri)
    for top1 in ("0.7", "0.5"):
        torch.manual_seed(0)
        mv = register_encoder(build_encoder("tiny", cifar_stem=True), name="cli-gate", cfg_dict=cfg_dict,
                              run_id=None, tracking_uri=uri, metadata={"epochs": 0})
        mlflow_client.set_model_version_tag("cli-gate", mv.version, "linear_top1", top1)
    mlflow_client.set_registered_model_alias("cli-gate", "champion", "1")
    return {"uri": uri, "root": root}


def test_promote_declined_exits_3_with_the_decision_as_json(two_versions):
    proc = byol_ray("promote", "--model", "cli-gate:2", f"mlflow.tracking_uri={two_versions['uri']}", "--json",
                    cwd=two_versions["root"])
    assert proc.returncode == 3, proc.stderr
    decision = json.loads(proc.stdout)
    assert decision["promoted"] is False and decision["previous_version"] == "1" and decision["version"] == "2"
    assert "not promoted" in proc.stderr and "stays on v1" in proc.stderr


def test_promote_of_the_holder_exits_0_and_reads_mlflow_tracking_uri(two_versions):
    proc = byol_ray("promote", "--model", "cli-gate:1", cwd=two_versions["root"],
                    env={"MLFLOW_TRACKING_URI": two_versions["uri"]})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and "already on v1" in proc.stderr  # no --json: messages only, on stderr
