"""``byol-ray spot-watch``: a cloud's spot interruption notice becomes a Ray drain of this node.

Ray Train writes a checkpoint at once when it learns that a node of its worker group is being preempted
(``ray_train.RayReporter.poll``), but it learns that only from Ray: a node drained with reason PREEMPTION and a
deadline. Nothing on a cloud VM tells Ray that the VM is about to go. This program does, one per worker node:

- **AWS** (EC2 spot): polls the instance metadata service with an IMDSv2 session token. ``spot/instance-action``
  appears about two minutes before the instance is stopped or terminated, with the time it happens; the
  drain's deadline is that time. ``events/recommendations/rebalance`` is an earlier, weaker signal (the
  capacity pool is at risk, no deadline): logged, or drained without a deadline with ``--rebalance drain``.
- **GCP** (spot and preemptible VMs): ``instance/preempted`` turns ``TRUE`` about 30 seconds before the stop;
  the deadline is 30 s from the moment it was seen.
- **Kubernetes** (KubeRay): there is no metadata to poll; the pod is stopped. ``--drain-now`` is the worker
  pods' ``preStop`` hook: it drains the node now, with the grace period as the deadline, and waits until the
  node has left the cluster (or the deadline passed), so that the checkpoint is committed before the kill.

A metadata answer that cannot be read (malformed, an unexpected status, a timeout, no service) is logged in
one line, when it starts and when it ends, and polling goes on: the watcher never drains on garbage.

    byol-ray spot-watch --cloud aws --address $RAY_HEAD_IP:6379        # every EC2 worker node, after ray start
    byol-ray spot-watch --drain-now --deadline-s 100                    # a KubeRay worker pod's preStop
"""
from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

from byol_ray.errors import ConfigError

AWS_METADATA_URL = "http://169.254.169.254"
GCP_METADATA_URL = "http://metadata.google.internal"
# GCP stops a spot/preemptible VM about 30 s after setting instance/preempted (its documented notice period)
GCP_NOTICE_S = 30.0
AWS_TOKEN_TTL_S = 21600  # IMDSv2's maximum; the watcher renews it well before
AWS_ACTIONS = ("terminate", "stop", "hibernate")


@dataclass(frozen=True)
class Notice:
    """What the cloud said: an ``interruption`` (the instance goes at a known time) or a ``rebalance``
    recommendation (elevated risk, no deadline)."""

    kind: str
    deadline_s: float  # seconds left when it was read; NaN when the cloud gives none
    detail: str  # the cloud's own words, for the log line and the drain's reason message


class MetadataError(Exception):
    """The metadata service did not answer, or answered something that is not a notice nor its absence."""


def _utc_seconds_until(stamp: str, now: float) -> float:
    when = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    return when.timestamp() - now


class AwsMetadata:
    """EC2's instance metadata service, IMDSv2: ``PUT /latest/api/token`` for a session token, then every
    ``GET`` carries it (an expired token answers 401 and is renewed once)."""

    cloud = "aws"

    def __init__(self, base_url: str = AWS_METADATA_URL, timeout_s: float = 1.0) -> None:
        self.base_url, self.timeout_s = base_url.rstrip("/"), timeout_s
        self._token, self._token_until = "", 0.0

    def _request(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, str]:
        req = urllib.request.Request(self.base_url + path, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:  # noqa: S310 - a fixed local URL
                return resp.status, resp.read(65536).decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            return exc.code, ""
        except (OSError, ValueError) as exc:  # refused, unreachable, timed out, a broken answer
            raise MetadataError(f"{self.base_url} did not answer ({type(exc).__name__}: {exc})") from None

    def _session_token(self, renew: bool = False) -> str:
        if renew or not self._token or time.monotonic() > self._token_until:
            status, body = self._request("PUT", "/latest/api/token",
                                         {"X-aws-ec2-metadata-token-ttl-seconds": str(AWS_TOKEN_TTL_S)})
            if status != 200 or not body.strip():
                raise MetadataError(f"IMDSv2 token request answered HTTP {status}")
            self._token, self._token_until = body.strip(), time.monotonic() + AWS_TOKEN_TTL_S / 2
        return self._token

    def _get(self, path: str) -> str | None:
        """The body, or None when the item does not exist (404: no notice)."""
        status, body = self._request("GET", path, {"X-aws-ec2-metadata-token": self._session_token()})
        if status == 401:  # the token expired (or the service restarted): renew once
            status, body = self._request("GET", path, {"X-aws-ec2-metadata-token": self._session_token(True)})
        if status == 404:
            return None
        if status != 200:
            raise MetadataError(f"{path} answered HTTP {status}")
        return body

    def poll(self, now: float | None = None) -> list[Notice]:
        notices = []
        body = self._get("/latest/meta-data/spot/instance-action")
        # the time left counts from the answer: taken before the request, it was too long by the request's time
        now = time.time() if now is None else now
        if body is not None:
            try:
                action = json.loads(body)
                kind, stamp = action["action"], action["time"]
                if kind not in AWS_ACTIONS:
                    raise ValueError(f"action {kind!r}")
                left = _utc_seconds_until(stamp, now)
            except (ValueError, KeyError, TypeError) as exc:
                raise MetadataError(f"malformed spot/instance-action {body[:80]!r} ({exc})") from None
            notices.append(Notice("interruption", max(left, 0.0), f"aws spot instance-action: {kind} at {stamp}"))
        body = self._get("/latest/meta-data/events/recommendations/rebalance")
        if body is not None:
            try:
                stamp = json.loads(body)["noticeTime"]
                _utc_seconds_until(stamp, now)
            except (ValueError, KeyError, TypeError) as exc:
                raise MetadataError(f"malformed rebalance recommendation {body[:80]!r} ({exc})") from None
            notices.append(Notice("rebalance", math.nan, f"aws rebalance recommendation at {stamp}"))
        return notices


class GcpMetadata:
    """GCP's metadata server: ``instance/preempted`` is ``FALSE`` until the VM is being preempted."""

    cloud = "gcp"

    def __init__(self, base_url: str = GCP_METADATA_URL, timeout_s: float = 1.0) -> None:
        self.base_url, self.timeout_s = base_url.rstrip("/"), timeout_s

    def poll(self, now: float | None = None) -> list[Notice]:
        req = urllib.request.Request(self.base_url + "/computeMetadata/v1/instance/preempted",
                                     headers={"Metadata-Flavor": "Google"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:  # noqa: S310 - a fixed local URL
                body = resp.read(64).decode("utf-8", "replace").strip()
        except urllib.error.HTTPError as exc:
            raise MetadataError(f"instance/preempted answered HTTP {exc.code}") from None
        except (OSError, ValueError) as exc:
            raise MetadataError(f"{self.base_url} did not answer ({type(exc).__name__}: {exc})") from None
        if body == "FALSE":
            return []
        if body == "TRUE":
            return [Notice("interruption", GCP_NOTICE_S, "gcp instance/preempted: TRUE")]
        raise MetadataError(f"malformed instance/preempted {body[:40]!r}")


# ----------------------------------------------------------------------------- Ray's side


def _gcs(address: str | None):
    from ray._private import services
    from ray._raylet import GcsClient

    try:
        address = services.canonicalize_bootstrap_address_or_die(address or None)
    except (ConnectionError, ValueError) as exc:
        raise ConfigError(f"spot-watch: no Ray cluster to watch for ({exc}); pass --address HOST:PORT") from None
    return GcsClient(address=address), address


def _alive_nodes(gcs) -> list:
    from ray.core.generated.gcs_pb2 import GcsNodeInfo

    return list(gcs.get_all_node_info(timeout=10, state_filter=GcsNodeInfo.GcsNodeState.ALIVE).values())


def find_local_node(gcs, wait_s: float = 60.0) -> str:
    """The hex id of the one worker node on this host (the head is never preempted by this watcher)."""
    from ray._private.services import get_node_ip_address

    ip = get_node_ip_address()
    deadline = time.monotonic() + wait_s
    while True:
        here = [n for n in _alive_nodes(gcs) if n.node_manager_address == ip and not n.is_head_node]
        if len(here) == 1:
            return here[0].node_id.hex()
        if len(here) > 1:
            raise ConfigError(f"spot-watch: {len(here)} Ray worker nodes run on this host ({ip}): "
                              + ", ".join(n.node_id.hex() for n in here) + "; pass --node-id for the one to watch")
        if time.monotonic() > deadline:
            raise ConfigError(f"spot-watch: no Ray worker node on this host ({ip}) after {wait_s:.0f} s; start it "
                              "with `ray start --address ...` first, or pass --node-id")
        time.sleep(1.0)


def node_alive(gcs, node_id: str) -> bool:
    return any(n.node_id.hex() == node_id for n in _alive_nodes(gcs))


def drain(gcs, node_id: str, deadline_s: float, message: str) -> None:
    """Drain ``node_id`` with reason PREEMPTION (Ray never rejects those) and the deadline, if any."""
    from ray.core.generated import autoscaler_pb2

    deadline_ms = int((time.time() + deadline_s) * 1000) if math.isfinite(deadline_s) else 0
    accepted, why = gcs.drain_node(node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                                   message, deadline_ms)
    if not accepted:
        raise RuntimeError(f"Ray did not accept the drain of node {node_id[:12]}: {why}")


# ----------------------------------------------------------------------------- the loop


def _log(message: str) -> None:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"
    print(f"{stamp} [byol-ray spot-watch] {message}", flush=True)


def watch(metadata, on_notice: Callable[[Notice], bool], *, poll_s: float = 1.0, rebalance: str = "log",
          log: Callable[[str], None] = _log, stop: Callable[[], bool] = lambda: False) -> Notice | None:
    """Poll until a notice is acted on (``on_notice`` returned True; that notice is returned) or ``stop()``.

    A failing metadata service is logged once when it starts failing (or fails differently) and once when it
    recovers; polling goes on. A rebalance recommendation is logged once and, with ``rebalance='drain'``,
    acted on like an interruption without a deadline.
    """
    failing, rebalance_seen = "", False
    while not stop():
        started = time.monotonic()
        try:
            notices = metadata.poll()
        except MetadataError as exc:
            if str(exc) != failing:
                log(f"metadata unreadable, still polling every {poll_s:g} s: {exc}")
                failing = str(exc)
            notices = None
        if notices is not None:
            if failing:
                log("metadata readable again")
                failing = ""
            for notice in notices:
                if notice.kind == "rebalance":
                    if rebalance_seen:
                        continue
                    rebalance_seen = True
                    if rebalance != "drain":
                        log(f"{notice.detail} (an early warning; not draining: --rebalance log)")
                        continue
                if on_notice(notice):
                    return notice
        time.sleep(max(0.0, poll_s - (time.monotonic() - started)))
    return None


def run(*, cloud: str, address: str | None, node_id: str | None, poll_s: float, metadata_url: str | None,
        rebalance: str) -> dict:
    """The node-side watcher: find this node, poll until a notice, drain, report."""
    if poll_s <= 0:
        raise ConfigError(f"spot-watch: --poll-s must be > 0, got {poll_s:g}")
    metadata = (AwsMetadata(metadata_url or AWS_METADATA_URL) if cloud == "aws"
                else GcpMetadata(metadata_url or GCP_METADATA_URL))
    gcs, address = _gcs(address)
    node_id = node_id or find_local_node(gcs)
    if not node_alive(gcs, node_id):
        raise ConfigError(f"spot-watch: --node-id {node_id} is not an alive node of the cluster at {address}")
    _log(f"watching {cloud} metadata at {metadata.base_url} every {poll_s:g} s for Ray node {node_id[:12]} "
         f"(cluster {address})")
    result: dict = {}

    def on_notice(notice: Notice) -> bool:
        seen = time.time()
        drain(gcs, node_id, notice.deadline_s, f"{notice.detail} (byol-ray spot-watch)")
        result.update(node_id=node_id, kind=notice.kind, detail=notice.detail, deadline_s=notice.deadline_s,
                      drained_at=seen)
        left = f"{notice.deadline_s:.0f} s before the deadline" if math.isfinite(notice.deadline_s) else "no deadline"
        _log(f"{notice.detail}: drained Ray node {node_id[:12]} with reason PREEMPTION ({left})")
        return True

    watch(metadata, on_notice, poll_s=poll_s, rebalance=rebalance)
    return result


def drain_now(*, address: str | None, node_id: str | None, deadline_s: float, reason: str) -> dict:
    """KubeRay's ``preStop``: drain this node now and wait until it has left the cluster or the deadline passed."""
    if deadline_s <= 0:
        raise ConfigError(f"spot-watch: --deadline-s must be > 0, got {deadline_s:g}")
    gcs, address = _gcs(address)
    node_id = node_id or find_local_node(gcs, wait_s=0.0)
    start = time.monotonic()
    drain(gcs, node_id, deadline_s, f"{reason} (byol-ray spot-watch --drain-now)")
    _log(f"{reason}: drained Ray node {node_id[:12]} with reason PREEMPTION, deadline {deadline_s:g} s; waiting "
         "for it to leave the cluster")
    while time.monotonic() - start < deadline_s:
        try:
            if not node_alive(gcs, node_id):
                waited = time.monotonic() - start
                _log(f"Ray node {node_id[:12]} left the cluster after {waited:.1f} s")
                return {"node_id": node_id, "left": True, "waited_s": waited}
        except Exception as exc:  # noqa: BLE001 - the head may be going too; wait out the deadline
            _log(f"cannot ask the cluster about node {node_id[:12]} ({type(exc).__name__}); still waiting")
        time.sleep(0.5)
    _log(f"Ray node {node_id[:12]} still in the cluster after the {deadline_s:g} s deadline")
    return {"node_id": node_id, "left": False, "waited_s": time.monotonic() - start}
