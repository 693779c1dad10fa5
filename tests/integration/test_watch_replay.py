"""WatchKeys replay cannot exhaust the CA's memory (issue 10, finding 4).

Once, each key event carried the whole policy: 200 streams from one identity
replaying the log with ``after_seq`` took the CA from 85 to 710 MB, 574 MB of
it still held after they closed. Now events reference a policy version, only
the newest policy of an org is sent, streams per identity are capped, and a
replay batch is a few hundred bytes an event.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import grpc

from protos.keyward.v1 import keyward_pb2 as pb
from protos.keyward.v1 import keyward_pb2_grpc as pb_grpc
from tests.helpers import CAProcess, Clients, clients, wait_for
from tests.integration.flow import create_org, org_admin

STREAMS = 200
CAP = 64  # KEYWARD_MAX_WATCH_STREAMS default
UPDATES = 12


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _big_policy(n: int) -> pb.Policy:
    """About 190 KiB of entries (the limit is 256 KiB), different for each n."""
    return pb.Policy(blocked_hosts=[f"h{i}-{n}-{'b' * 40}.example.com" for i in range(1000)],
                     do_not_inspect_hosts=[f"*.bank{i}-{n}-{'d' * 40}.example.net" for i in range(1000)],
                     blocked_url_prefixes=[f"s{i}.example.org/{n}/{'p' * 40}/" for i in range(1000)])


class _Peak:
    """The CA's peak resident size while the streams run (sampled; the process's
    own high-water mark also counts every earlier test)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, _rss_mb(pid), threading.Event()
        self.start = self.peak
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_mb(self.pid))

    def stop(self) -> float:
        self._stop.set()
        self._t.join(5)
        return self.peak


async def _replay(ca: CAProcess, pki_dir: Path, org_id: str, after: int, final_version: int
                  ) -> tuple[list[list[pb.KeyEvent]], list[tuple[grpc.StatusCode, str]]]:
    creds = grpc.ssl_channel_credentials(
        root_certificates=(pki_dir / "ca.crt").read_bytes(),
        private_key=(pki_dir / "zen-public.key").read_bytes(),
        certificate_chain=(pki_dir / "zen-public.crt").read_bytes())
    # 100 streams per HTTP/2 connection at most: four connections, one identity.
    chans = [grpc.aio.secure_channel(ca.addr, creds) for _ in range(4)]
    got: list[list[pb.KeyEvent]] = []
    refused: list[tuple[grpc.StatusCode, str]] = []
    calls = []
    all_in = asyncio.Event()
    served = 0

    async def one(i: int) -> None:
        nonlocal served
        call = pb_grpc.KeyDistributionStub(chans[i % 4]).WatchKeys(
            pb.WatchKeysRequest(org_ids=[org_id], after_seq=after), timeout=120)
        calls.append(call)
        events: list[pb.KeyEvent] = []
        try:
            async for ev in call:
                events.append(ev)
                if ev.policy_version == final_version:
                    served += 1
                    got.append(events)
                    break
        except grpc.aio.AioRpcError as e:
            refused.append((e.code(), e.details() or ""))
        if served + len(refused) == STREAMS:
            all_in.set()
        await all_in.wait()  # every admitted stream stays open until all have been answered

    try:
        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(STREAMS))), 120)
    except TimeoutError:
        raise AssertionError(f"after 120 s: {served} streams served, {len(refused)} refused of {STREAMS}; "
                             f"refusals {refused[:2]}") from None
    finally:
        for c in calls:
            c.cancel()
        for ch in chans:
            await ch.close()
    return got, refused


def test_two_hundred_replaying_streams_keep_the_ca_memory_bounded(
    ca: CAProcess, platform: Clients, pki_dir: Path, new_org_id: str,
) -> None:
    create_org(platform, new_org_id)
    admin = org_admin(ca.addr, pki_dir, new_org_id)
    zen = clients(ca.addr, pki_dir, "zen-public")
    s = zen.keys.WatchKeys(pb.WatchKeysRequest(org_ids=[new_org_id]), timeout=30)
    after = int(dict(s.initial_metadata())["keyward-event-seq"])
    s.cancel()
    for n in range(UPDATES):
        org = admin.admin.UpdatePolicy(pb.UpdatePolicyRequest(org_id=new_org_id, policy=_big_policy(n)),
                                       timeout=60)
    final = org.policy_version

    before = _rss_mb(ca.proc.pid)
    peak = _Peak(ca.proc.pid)
    got, refused = asyncio.run(_replay(ca, pki_dir, new_org_id, after, final))
    high = peak.stop()

    print(f"CA RSS {before:.0f} MB before, peak {high:.0f} MB; {len(got)} served, {len(refused)} refused")
    # The cap: one identity holds at most 64 streams; the rest are told why, not queued.
    assert len(got) == CAP and len(refused) == STREAMS - CAP, (len(got), refused[:3])
    assert {c for c, _ in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert all("WatchKeys streams" in m and "each ZEN needs one" in m for _, m in refused), refused[0]
    # Only the newest policy is sent: the eleven older versions are superseded.
    for events in got:
        policies = [e for e in events if e.kind == pb.KEY_EVENT_KIND_POLICY_CHANGED]
        assert [e.policy_version for e in policies] == [final]
        assert sorted(policies[0].policy.blocked_hosts) == sorted(_big_policy(UPDATES - 1).blocked_hosts)
    # Memory: once 710 MB (+625) for 200 streams; bounded now by the cap and one policy per stream.
    assert high - before < 120, f"CA grew from {before:.0f} to {high:.0f} MB while replaying"
    wait_for(lambda: _rss_mb(ca.proc.pid) < before + 60, 30,
             "the CA to give back what the streams held")
