"""Cluster faults on a real 3-master + 3-replica Redis Cluster (``cluster-node-timeout
2000``) with worker PROCESSES: a four-stage chain (tests/chain_worker.py, stages named
like the pipeline's, so their keys sit on the pipeline's masters) keeps flowing through
a CLUSTER FAILOVER, a live slot migration, a SIGKILLed master and the death of the seed
node in the URL. No worker exits, nothing is lost, nothing is dead-lettered.

The scenarios share one cluster and one set of workers and run in order (each starts
from the cluster the previous one left); every scenario publishes its own numbers.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path

import pytest

from streams.connection import connect
from streams.producer import Producer, Route
from streams.settings import StreamSettings
from tests.servers import RedisCluster
from tests.support import FAST, Ping, wait_for

ROOT = Path(__file__).resolve().parent.parent
TRACKSTREAM = str(Path(sys.executable).parent / "trackstream")
CHAIN = ("fetch", "geocode", "geofence", "view-refresh")
SLOT = {"fetch": 1745, "geocode": 8387, "geofence": 11589, "view-refresh": 9757}
NODE_TIMEOUT_S = 2.0
# seconds per entry: fetch hands its batch on at once, the others build a backlog
# (a batch of 120 keeps each ~2.4 s busy)
DELAY_S = {"fetch": 0.002, "geocode": 0.02, "geofence": 0.02, "view-refresh": 0.02}
BATCH = 120

REASON = re.compile(r"Redis unavailable \((\S+): ")
pytestmark = pytest.mark.slow
FIGURES: dict[str, dict[str, object]] = {}  # printed at the end of the module


class Chain:
    """The four stage workers and what their logs say."""

    def __init__(self, cluster: RedisCluster, prefix: str, logdir: Path) -> None:
        self.cluster = cluster
        self.prefix = prefix
        self.logdir = logdir
        self.url = cluster.seeds_url  # the first seed is node 0: scenario (c) kills it
        self.settings = StreamSettings.build(
            redis_url=self.url, redis_cluster=True, prefix=prefix, **FAST
        )
        self.procs: dict[str, list[subprocess.Popen[bytes]]] = defaultdict(list)
        self.next_n = 0

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKSTREAM_")}
        for k, v in {**FAST, "batch_size": 10, "concurrency": 1}.items():
            env[f"TRACKSTREAM_{k.upper()}"] = str(v)
        env.update(
            TRACKSTREAM_REDIS_URL=self.url,
            TRACKSTREAM_REDIS_CLUSTER="true",
            TRACKSTREAM_PREFIX=self.prefix,
        )
        return env

    def start(self, stage: str) -> subprocess.Popen[bytes]:
        nxt = CHAIN[CHAIN.index(stage) + 1] if stage != CHAIN[-1] else "-"
        with (self.logdir / f"{stage}.stderr").open("ab") as err:  # the child keeps its copy
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.chain_worker", stage, nxt, str(self.logdir),
                 str(DELAY_S[stage])],
                cwd=ROOT, env=self.env(), stdout=subprocess.DEVNULL, stderr=err,
            )  # fmt: skip
        self.procs[stage].append(proc)
        return proc

    def exited(self) -> dict[str, list[int | None]]:
        return {
            s: [p.returncode for p in ps if p.poll() is not None]
            for s, ps in self.procs.items()
            if any(p.poll() is not None for p in ps)
        }

    def logs(self, lines: int = 15) -> str:
        """The last lines of each worker's stderr, for a failure message."""
        return "\n".join(
            f"--- {p.name}\n" + "\n".join(p.read_text().splitlines()[-lines:])
            for p in sorted(self.logdir.glob("*.stderr"))
        )

    def log_lines_since(self, since: float) -> list[str]:
        """Worker log lines (all stages) stamped at or after ``since`` (unix time)."""
        found = []
        for path in self.logdir.glob("*.stderr"):
            for line in path.read_text().splitlines():
                try:
                    at = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                except ValueError:
                    continue
                if at >= since - 0.01:
                    found.append(line)
        return found

    def handled(self, stage: str) -> list[tuple[int, float]]:
        """(n, unix time) of every handler call of ``stage``, in time order."""
        rows = []
        for path in self.logdir.glob(f"{stage}-*.log"):
            for line in path.read_text().splitlines():
                n, _, at = line.partition(" ")
                if at:
                    rows.append((int(n), float(at)))
        return sorted(rows, key=lambda r: r[1])

    async def publish(self, count: int = BATCH) -> range:
        numbers = range(self.next_n, self.next_n + count)
        self.next_n += count
        client = connect(self.settings)
        try:
            await Producer(client, _codec()).publish(
                Route(self.prefix, "fetch"), [Ping(n=n) for n in numbers]
            )
        finally:
            await client.aclose()
        return numbers

    def arrived(self, numbers: range) -> set[int]:
        return {n for n, _ in self.handled(CHAIN[-1]) if n in numbers}

    async def dead_letters(self) -> int:
        client = connect(self.settings)
        try:
            return sum([await client.xlen(Route(self.prefix, s).keys().dlq) for s in CHAIN])
        finally:
            await client.aclose()

    def stop(self) -> None:
        for ps in self.procs.values():
            for p in ps:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
        for ps in self.procs.values():
            for p in ps:
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)


def _codec():  # type: ignore[no-untyped-def]
    from streams.message import Codec

    return Codec([Ping])


@pytest.fixture(scope="module")
def chain(replicated_cluster, tmp_path_factory):  # type: ignore[no-untyped-def]
    logdir = tmp_path_factory.mktemp("chain")
    c = Chain(replicated_cluster, f"faults{replicated_cluster.nodes[0].flavor}", logdir)
    for stage in CHAIN:
        c.start(stage)
    yield c
    c.stop()
    for name, figures in FIGURES.items():
        if name.startswith(replicated_cluster.nodes[0].flavor):
            print(f"\n{name}: {json.dumps(figures)}")


async def run_scenario(chain: Chain, name: str, fault, started_when: int = 20) -> dict:  # type: ignore[no-untyped-def]
    """Publish a batch, apply ``fault`` once ``started_when`` entries went through,
    wait for every entry to arrive; returns the figures (and checks the invariants)."""
    await wait_for(lambda: not chain.exited(), 1, "all workers running")
    dead_before = await chain.dead_letters()  # an xfailed scenario may have left some
    numbers = await chain.publish()
    await wait_for(lambda: len(chain.arrived(numbers)) >= started_when, 30, f"{name}: flowing")
    fault_at = time.time()
    details = await asyncio.to_thread(fault) or {}
    fault_done = time.time()

    async def settled() -> bool:  # everything arrived, or some of it was dead-lettered
        return chain.arrived(numbers) == set(numbers) or await chain.dead_letters() > dead_before

    await wait_for(settled, 60, f"{name}: all arrived")
    assert not chain.exited(), f"{name}: a worker exited: {chain.exited()}\n{chain.logs()}"
    dead = await chain.dead_letters() - dead_before
    assert dead == 0, f"{name}: {dead} dead letters\n{chain.logs()}"
    lines = chain.log_lines_since(fault_at)
    bugs = [line for line in lines if "unexpected error" in line]
    assert not bugs, f"{name}: errors classified as bugs: {bugs[:3]}"
    reasons = sorted({m.group(1) for line in lines if (m := REASON.search(line))})
    sink = [n for n, _ in chain.handled(CHAIN[-1]) if n in numbers]
    figures: dict[str, object] = {
        "entries": len(numbers),
        "lost": len(set(numbers) - set(sink)),
        "sink_duplicates": len(sink) - len(set(sink)),
        "fault_took_s": round(fault_done - fault_at, 2),
        "transient_reasons": reasons,
        **details,
    }
    for stage in CHAIN:
        rows = [(n, at) for n, at in chain.handled(stage) if n in numbers]
        after = [at for _, at in rows if at >= fault_at]
        gaps = [b - a for a, b in zip([fault_at, *after], after, strict=False)]
        figures[f"{stage}_max_stall_s"] = round(max(gaps, default=0.0), 2)
        figures[f"{stage}_redeliveries"] = len(rows) - len({n for n, _ in rows})
    FIGURES[f"{chain.cluster.nodes[0].flavor}/{name}"] = figures
    return figures


def flows_within(figures: dict, limit_s: float) -> None:
    stalls = {k: v for k, v in figures.items() if k.endswith("_max_stall_s")}
    assert all(v <= limit_s for v in stalls.values()), stalls  # type: ignore[operator]


async def test_cluster_failover_of_a_busy_stage(chain):
    c = chain.cluster
    master = c.master_of_slot(SLOT["geocode"])
    replica = c.replicas_of(master)[0]

    def fault() -> dict:
        c.failover(replica)
        return {"new_master": replica.port}

    figures = await run_scenario(chain, "failover", fault)
    assert figures["lost"] == 0 and figures["sink_duplicates"] == 0
    flows_within(figures, NODE_TIMEOUT_S + 5)


async def test_live_slot_migration_of_a_busy_stage(chain):
    c = chain.cluster
    dest = c.master_of_slot(SLOT["geofence"])
    assert dest is not c.master_of_slot(SLOT["geocode"])

    def fault() -> dict:
        moved = c.migrate_slot(SLOT["geocode"], dest)
        c.wait_ok(20)
        assert c.master_of_slot(SLOT["geocode"]) is dest
        return {"keys_moved": moved}

    figures = await run_scenario(chain, "slot-migration", fault)
    assert figures["lost"] == 0 and figures["sink_duplicates"] == 0
    flows_within(figures, NODE_TIMEOUT_S + 5)


async def test_sigkill_the_master_of_a_busy_stage(chain):
    c = chain.cluster
    victim = c.master_of_slot(SLOT["geocode"])

    def fault() -> dict:
        killed = time.monotonic()
        victim.kill()
        new = c.wait_promoted(SLOT["geocode"], victim, 30)
        return {"promoted_after_s": round(time.monotonic() - killed, 2), "new_master": new.port}

    figures = await run_scenario(chain, "sigkill-master", fault)
    assert figures["lost"] == 0
    flows_within(figures, NODE_TIMEOUT_S + 5)


async def test_sigkill_the_master_downstream_of_a_busy_stage(chain):
    """view-refresh's master dies alone (geocode moved away above): view-refresh stalls
    until its replica takes over, and geofence, whose handlers succeed, cannot write
    its output there meanwhile. An outage is waited out: no dead letters."""
    c = chain.cluster
    victim = c.master_of_slot(SLOT["view-refresh"])
    assert all(c.master_of_slot(SLOT[s]) is not victim for s in ("fetch", "geocode", "geofence"))

    def fault() -> dict:
        killed = time.monotonic()
        victim.kill()
        new = c.wait_promoted(SLOT["view-refresh"], victim, 30)
        return {"promoted_after_s": round(time.monotonic() - killed, 2), "new_master": new.port}

    figures = await run_scenario(chain, "sigkill-downstream-master", fault)
    assert figures["lost"] == 0
    flows_within(figures, NODE_TIMEOUT_S + 5)


async def test_seed_node_dies_other_stages_flow_and_newcomers_start(chain):
    """Node 0 (the first seed of the URL; master of fetch) is SIGKILLed. While it is
    down, the stages whose masters are alive keep handling their backlog; after the
    promotion, a newly started worker and ``trackstream status`` work with the same
    URL, whose first node is dead."""
    c = chain.cluster
    seed = c.nodes[0]
    assert c.master_of_slot(SLOT["fetch"]) is seed
    window: dict[str, float] = {}
    # a client whose COMMAND GETKEYS node (redis-py's default node) is the one to die:
    # the case that stalled XREADGROUP on healthy masters until the dead node came back
    reader = connect(chain.settings)
    await reader.initialize()
    reader.commands_parser.node = reader.get_node(node_name=seed.addr)

    def fault() -> dict:
        window["killed"] = time.time()
        seed.kill()
        c.wait_promoted(SLOT["fetch"], seed, 30)
        window["promoted"] = time.time()
        return {"promoted_after_s": round(window["promoted"] - window["killed"], 2)}

    # fetch gets its batch ahead of the others: they have a backlog while fetch is down
    figures = await run_scenario(chain, "seed-dies", fault, started_when=5)
    assert figures["lost"] == 0
    for stage in ("geocode", "geofence", "view-refresh"):  # their masters are alive
        during = [
            at for _, at in chain.handled(stage) if window["killed"] < at < window["promoted"]
        ]
        assert during, f"{stage} stood still while another master was down"
    started = time.monotonic()
    await reader.xread({Route(chain.prefix, "geocode").keys().stream: "0"}, count=1)
    figures["read_after_promotion_s"] = round(time.monotonic() - started, 2)
    await reader.aclose()
    figures["outage_handled"] = {
        s: sum(window["killed"] < at < window["promoted"] for _, at in chain.handled(s))
        for s in CHAIN
    }

    newcomer = chain.start("geocode")
    started = time.monotonic()
    status = await asyncio.to_thread(
        subprocess.run,
        [TRACKSTREAM, "status", "--json", "--no-require-consumers"],
        env=chain.env(), capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert status.returncode in (0, 1), status.stderr
    report = json.loads(status.stdout)
    assert report["cluster"] is True
    numbers = await chain.publish(40)
    await wait_for(lambda: chain.arrived(numbers) == set(numbers), 30, "entries after newcomer")
    assert newcomer.poll() is None
    figures["newcomer_and_status_s"] = round(time.monotonic() - started, 2)
    assert not chain.exited()
