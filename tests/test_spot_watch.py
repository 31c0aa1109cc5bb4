"""``byol-ray spot-watch``'s metadata side against a metadata service on loopback (tests/fake_metadata.py: the
real paths, IMDSv2's token handshake, GCP's Metadata-Flavor header). The drain itself, on a two-node loopback
cluster during a run, is in test_spot.py."""
from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from byol_ray import spot_watch
from byol_ray.spot_watch import AwsMetadata, GcpMetadata, MetadataError, Notice
from fake_metadata import FakeMetadata

BYOL_RAY = Path(sys.executable).with_name("byol-ray")


@pytest.fixture
def metadata():
    service = FakeMetadata()
    yield service
    service.close()


def _stamp(seconds_from_now: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + seconds_from_now))


def test_aws_time_left_counts_from_the_answer_not_from_before_the_request(metadata):
    """A slow metadata service: the seconds left are those when the notice was read, never more (a CI run saw
    20.02 s left of a 20 s notice, counted from before the request)."""
    when = int(time.time() + 20)
    metadata.instance_action = json.dumps({"action": "terminate", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                      time.gmtime(when))})

    class Slow(AwsMetadata):
        def _get(self, path):
            time.sleep(1.0)
            return super()._get(path)

    start = time.time()
    (notice,) = Slow(metadata.url).poll()
    assert notice.deadline_s <= when - (start + 1.0) + 0.01, (notice.deadline_s, when - start)


def test_aws_no_notice_is_quiet_and_uses_one_session_token(metadata):
    aws = AwsMetadata(metadata.url)
    assert aws.poll() == [] and aws.poll() == []
    assert [r for r in metadata.requests if r[0] == "PUT"] == [("PUT", "/latest/api/token")]  # reused


def test_aws_interruption_gives_the_time_left_until_the_instance_goes(metadata):
    metadata.instance_action = json.dumps({"action": "stop", "time": _stamp(120)})
    (notice,) = AwsMetadata(metadata.url).poll()
    assert notice.kind == "interruption" and 115 <= notice.deadline_s <= 120
    assert "stop at" in notice.detail


def test_aws_rebalance_recommendation_is_a_notice_without_deadline(metadata):
    metadata.rebalance = json.dumps({"noticeTime": _stamp(0)})
    (notice,) = AwsMetadata(metadata.url).poll()
    assert notice.kind == "rebalance" and math.isnan(notice.deadline_s)


def test_aws_expired_token_is_renewed_once(metadata):
    aws = AwsMetadata(metadata.url)
    aws.poll()
    metadata.tokens.clear()  # the service forgot it (restarted, or the TTL ran out): 401, then a new token
    metadata.instance_action = json.dumps({"action": "terminate", "time": _stamp(60)})
    assert [n.kind for n in aws.poll()] == ["interruption"]
    assert sum(1 for r in metadata.requests if r[0] == "PUT") == 2


@pytest.mark.parametrize("body", ["{not json", '{"action": "terminate"}', '{"action": "explode", "time": "2026-12-04T10:00:00Z"}',
                                  '{"action": "terminate", "time": "in two minutes"}', "[]"])
def test_aws_malformed_notice_is_an_error_not_a_notice(metadata, body):
    metadata.instance_action = body
    with pytest.raises(MetadataError, match="malformed spot/instance-action"):
        AwsMetadata(metadata.url).poll()


def test_aws_failing_or_absent_service_is_an_error(metadata):
    metadata.status = 500
    with pytest.raises(MetadataError, match="HTTP 500"):
        AwsMetadata(metadata.url).poll()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here
    with pytest.raises(MetadataError, match="did not answer"):
        AwsMetadata(f"http://127.0.0.1:{port}", timeout_s=0.5).poll()


def test_gcp_preempted_flag(metadata):
    gcp = GcpMetadata(metadata.url)
    assert gcp.poll() == []
    metadata.preempted = "TRUE"
    (notice,) = gcp.poll()
    assert notice.kind == "interruption" and notice.deadline_s == spot_watch.GCP_NOTICE_S
    metadata.preempted = "MAYBE"
    with pytest.raises(MetadataError, match="malformed instance/preempted"):
        gcp.poll()


def test_watch_logs_garbage_once_keeps_polling_and_acts_on_the_first_real_notice(metadata):
    """The loop: a failure is one line (and one when it ends), garbage never reaches the drain, a rebalance
    recommendation is logged once with --rebalance log, and the first interruption is acted on."""
    script = iter(["garbage", "garbage", "garbage", "ok", "rebalance", "rebalance", "notice"])
    lines, acted = [], []

    class Scripted(AwsMetadata):
        def poll(self, now=None):
            step = next(script)
            metadata.instance_action = {"garbage": "{", "notice": json.dumps(
                {"action": "terminate", "time": _stamp(100)})}.get(step)
            metadata.rebalance = json.dumps({"noticeTime": _stamp(0)}) if step == "rebalance" else None
            return super().poll(now)

    notice = spot_watch.watch(Scripted(metadata.url), lambda n: acted.append(n) or n.kind == "interruption",
                              poll_s=0.01, log=lines.append)
    assert notice.kind == "interruption" and acted == [notice]  # neither garbage nor the rebalance was acted on
    assert len([line for line in lines if "unreadable" in line]) == 1
    assert len([line for line in lines if "readable again" in line]) == 1
    assert len([line for line in lines if "rebalance" in line]) == 1


def test_watch_drains_on_rebalance_when_asked(metadata):
    metadata.rebalance = json.dumps({"noticeTime": _stamp(0)})
    notice = spot_watch.watch(AwsMetadata(metadata.url), lambda n: True, poll_s=0.01, rebalance="drain",
                              log=lambda line: None)
    assert notice == Notice("rebalance", notice.deadline_s, notice.detail) and math.isnan(notice.deadline_s)


@pytest.mark.parametrize("argv, message", [
    ((), "needs --cloud aws|gcp (poll that cloud's metadata) or --drain-now"),
    (("--cloud", "aws", "--poll-s", "0"), "--poll-s must be > 0"),
    (("--drain-now", "--deadline-s", "-1"), "--deadline-s must be > 0"),
])
def test_cli_refuses_bad_input_in_one_line(argv, message, tmp_path):
    result = subprocess.run([str(BYOL_RAY), "spot-watch", *argv], capture_output=True, text=True, cwd=tmp_path,
                            timeout=60)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_the_node_side_command_does_not_import_torch():
    """spot-watch runs beside the training on every worker node: the CLI's parser and the watcher stay light
    (measured: about 68 MB resident with Ray's GCS client, against 554 MB with torch)."""
    code = ("import sys\nfrom byol_ray.cli import build_parser\nbuild_parser().parse_args(['spot-watch', '--cloud', "
            "'aws'])\nimport byol_ray.spot_watch\nprint(sorted(m for m in ('torch', 'mlflow', 'numpy') if m in "
            "sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
