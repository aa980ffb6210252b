"""``trackstream bench --pipeline``: the real stages, as worker processes, end to end
and one at a time, with the CPU every process spent per report.

One run, against a throwaway redis-server and PostgreSQL (or given URLs):

1. the runtime's own pass-through figure (:mod:`streams.bench`) on the same Redis;
2. for each number of workers per stage (``--workers 1,2``), on fresh simulated
   trackers (the source's rate limit lifted, ``--history`` older reports each):

   - each stage alone: fetch requests for every tracker are queued, fetch runs alone
     until its stream is drained, then geocode alone on what fetch published, then
     geofence alone on what geocode published;
   - end to end: fetch requests for another set of trackers, with fetch, geocode,
     geofence and view-refresh running at once, until geofence has checked every
     report (notify, when the pipeline has it, is not run: it calls webhooks).

Workers start, load what they need and wait at a gate; the clock and the CPU
counters start when the gate opens and stop when the stage's input is drained (the
time of the last entry written downstream), or after ``max_phase_s``. CPU comes from
``/proc/<pid>/stat`` for the workers and PostgreSQL (postmaster, its children and what
its exited children used) and from ``INFO cpu`` for Redis; RSS is each worker's peak
(``VmHWM``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from processors import topology
from processors.topology import FETCH, GEOCODE, GEOFENCE, VIEW_REFRESH

Progress = Callable[[str], None]
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
STAGE_NEXT = {FETCH: GEOCODE, GEOCODE: GEOFENCE, GEOFENCE: VIEW_REFRESH}


# -- CPU and memory of processes, from /proc


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()  # fields from 3 (state) on


def cpu_s(pid: int, *, children: bool = False) -> float:
    """CPU seconds (user + system) of ``pid``; with ``children``, plus what its exited
    and waited-for children used."""
    f = _stat(pid)
    if f is None:
        return 0.0
    ticks = int(f[11]) + int(f[12])  # utime, stime (fields 14, 15)
    if children:
        ticks += int(f[13]) + int(f[14])  # cutime, cstime
    return ticks / CLK_TCK


def child_pids(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            f = _stat(int(entry.name))
            if f is not None and int(f[1]) == pid:
                found.append(int(entry.name))
    return found


def tree_cpu_s(pid: int) -> float:
    """A server's CPU: the parent with its exited children, plus its live children."""
    return cpu_s(pid, children=True) + sum(cpu_s(c) for c in child_pids(pid))


def rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident set size in MB."""
    now = peak = 0.0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                now = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    except OSError:
        pass
    return now, peak


MIN_WINDOW_S = 0.5  # shorter measured windows are timed from the start instead


def _delta_ms(first: float | None, last: float | None) -> float | None:
    return (last - first) * 1000 if first is not None and last is not None else None


# -- servers


@dataclass
class Servers:
    redis_url: str
    database_url: str
    postgres_pid: int | None
    description: dict[str, str]


@contextlib.contextmanager
def servers(
    redis_url: str | None, database_url: str | None, progress: Progress
) -> Iterator[Servers]:
    """The given URLs, or a throwaway redis-server and PostgreSQL (durable settings)."""
    from ops.servers import PostgresServer, temp_root
    from streams.embedded import EmbeddedRedis

    cleanups: list[Callable[[], None]] = []
    described: dict[str, str] = {}
    try:
        if redis_url is None:
            embedded = EmbeddedRedis().start()
            cleanups.append(embedded.stop)
            redis_url = embedded.url
            described["redis"] = f"throwaway {embedded.name} (no persistence)"
        else:
            described["redis"] = "given"
        pg_pid = None
        if database_url is None:
            root = temp_root("trackstream-bench-pg-")
            cleanups.append(lambda: shutil.rmtree(root, ignore_errors=True))
            progress("starting a throwaway PostgreSQL (initdb) ...")
            pg = PostgresServer.start(root, durable=True)
            cleanups.append(pg.stop)
            database_url = pg.create_database("bench")
            pg_pid = pg.proc_pid
            described["postgresql"] = "throwaway, default (durable) settings"
        else:
            pg_pid = _local_postmaster(database_url)
            described["postgresql"] = "given" + ("" if pg_pid else " (its CPU is not visible)")
        yield Servers(redis_url, database_url, pg_pid, described)
    finally:
        for stop in reversed(cleanups):
            with contextlib.suppress(Exception):
                stop()


def _local_postmaster(database_url: str) -> int | None:
    """The postmaster's pid when the database runs on this machine and we may read its
    data directory; None otherwise."""
    from sqlalchemy import text

    from schemas.db import make_engine

    if not database_url.startswith(("postgresql", "postgres")):
        return None
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            data_dir = conn.execute(text("SHOW data_directory")).scalar()
        pid = int((Path(str(data_dir)) / "postmaster.pid").read_text().split()[0])
        return pid if _stat(pid) is not None else None
    except Exception:
        return None
    finally:
        engine.dispose()


# -- results


@dataclass
class Phase:
    name: str
    workers: int
    reports: int
    seconds: float
    complete: bool
    cpu_ms: dict[str, float | None] = field(default_factory=dict)  # stages, redis, postgres
    rss_mb: dict[str, float] = field(default_factory=dict)  # peak per stage (max worker)
    counts: dict[str, int] = field(default_factory=dict)
    handled: dict[str, int] = field(default_factory=dict)  # reports each stage got through
    total: int = 0  # reports through the phase (``reports``: those in the measured window)

    @property
    def rate(self) -> float:
        return self.reports / self.seconds if self.seconds > 0 else 0.0

    def per_report(self) -> dict[str, float | None]:
        """CPU ms per report. A phase cut short leaves its stages at different counts:
        each stage's CPU is then divided by the reports it handled, and the servers' by
        the mean of those (for a complete phase every count is ``reports``)."""
        mean = sum(self.handled.values()) / len(self.handled) if self.handled else self.reports
        out: dict[str, float | None] = {}
        for k, v in self.cpu_ms.items():
            n = self.handled.get(k, self.reports if k == VIEW_REFRESH else mean)
            out[k] = v / n if n and v is not None else None
        known = [v for v in out.values() if v is not None]
        out["total"] = sum(known) if known else None
        return out

    def as_json(self) -> dict[str, Any]:
        total = self.per_report()["total"]
        return {
            "phase": self.name,
            "workers_per_stage": self.workers,
            "reports": self.total,
            "measured_reports": self.reports,
            "seconds": round(self.seconds, 3),
            "reports_per_s": round(self.rate, 1),
            "complete": self.complete,
            "cpu_ms": {k: (round(v, 1) if v is not None else None) for k, v in self.cpu_ms.items()},
            "cpu_ms_per_report": {
                k: (round(v, 4) if v is not None else None) for k, v in self.per_report().items()
            },
            "rss_mb_peak": {k: round(v, 1) for k, v in self.rss_mb.items()},
            "counts": self.counts,
            "handled_by_stage": self.handled,
            # what an otherwise idle machine could sustain if CPU were the only limit
            "cpu_ceiling_reports_per_s": (
                round((os.cpu_count() or 1) * 1000 / total, 1) if total else None
            ),
        }


# -- the benchmark


class _Worker:
    def __init__(
        self, stage: str, consumer: str, env: dict[str, str], log: Path, keys: tuple[str, str]
    ):
        self.stage = stage
        self.log = log
        self.out = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ops.bench.worker", stage, consumer, *keys],
            env=env,
            stdout=self.out,
            stderr=subprocess.STDOUT,
        )

    def tail(self) -> str:
        self.out.flush()
        return self.log.read_text(errors="replace")[-2000:]


class PipelineBench:
    def __init__(
        self,
        srv: Servers,
        *,
        trackers: int,
        history: int,
        max_phase_s: float,
        progress: Progress,
        status: Progress,
        workdir: Path,
        seed: int = 7,
        messy: bool = False,
    ) -> None:
        self.messy = messy
        self.srv = srv
        self.trackers = trackers
        self.history = history
        self.max_phase_s = max_phase_s
        self.progress = progress
        self.status = status
        self.workdir = workdir
        self.seed = seed
        self.run_id = secrets.token_hex(3)
        from processors.database import Database

        self.db = Database(srv.database_url)

    def close(self) -> None:
        self.db.dispose()

    # setup

    def prepare_database(self) -> None:
        from processors.sources import SimulatedFleet
        from schemas import geofence_defs
        from schemas.db import upgrade

        upgrade(self.srv.database_url)

        def fences(session: Any) -> None:
            existing = {g.name for g in geofence_defs.active_geofences(session)}
            for g in SimulatedFleet.geofences_for_demo():
                if g["name"] not in existing:
                    geofence_defs.add_geofence(session, **g)

        self.db.run_sync(fences)

    def seed_trackers(self, tag: str) -> list[str]:
        """``trackers`` new simulated trackers, each with ``history`` older reports
        (geocoded and checked, as if the pipeline had handled them)."""
        from sqlalchemy import insert

        from processors.sources import SimulatedFleet
        from schemas import tracker_store
        from schemas.tables import LocationReport

        ids = [f"B{self.run_id}-{tag}-{i:06d}" for i in range(self.trackers)]
        now = datetime.now(UTC)
        rows = [
            {
                "external_id": t,
                "name": f"bench tracker {t}",
                "active": True,
                "run_starts_at": now - timedelta(days=1),
                "run_ends_at": now + timedelta(days=30),
            }
            for t in ids
        ]
        fleet = SimulatedFleet(self.seed)
        history = []
        for t in ids:
            # the reports before the one fetch will find first (the latest at this time)
            latest = fleet._report_index(t, now.timestamp())
            for k in range(latest - self.history, latest):
                f = fleet.report(t, k)
                history.append(
                    {
                        "tracker_id": t,
                        "observed_at": f.observed_at,
                        "lat": f.lat,
                        "lon": f.lon,
                        "accuracy_m": f.accuracy_m,
                        "source": f.source,
                        "fetched_at": f.observed_at + timedelta(seconds=2),
                        "city": "(seeded)",
                        "geocoded_at": f.observed_at + timedelta(seconds=3),
                        "geofence_checked_at": f.observed_at + timedelta(seconds=4),
                    }
                )

        def write(session: Any) -> None:
            tracker_store.upsert_trackers(session, rows)
            for i in range(0, len(history), 5000):
                session.execute(insert(LocationReport), history[i : i + 5000])

        self.db.run_sync(write)
        return ids

    # one phase

    def _env(self, prefix: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            TRACKSTREAM_REDIS_URL=self.srv.redis_url,
            TRACKSTREAM_REDIS_CLUSTER="false",
            TRACKSTREAM_DATABASE_URL=self.srv.database_url,
            TRACKSTREAM_PREFIX=prefix,
            TRACKSTREAM_SOURCE="simulated",
            TRACKSTREAM_FLEET_SEED=str(self.seed),
            TRACKSTREAM_FLEET_MESSY="true" if self.messy else "false",
            TRACKSTREAM_SOURCE_RATE_PER_S="1000000",
            TRACKSTREAM_SOURCE_BURST="1000000",
            TRACKSTREAM_GEOCODER="offline",
            TRACKSTREAM_BLOCK_MS="250",  # a stopping worker waits at most this for its read
        )
        env.pop("TRACKSTREAM_METRICS_PORT", None)
        return env

    async def queue_fetches(self, client: Any, prefix: str, ids: Sequence[str]) -> int:
        from schemas.events import FetchRequested
        from streams.producer import Producer

        now = datetime.now(UTC)
        batches = [
            FetchRequested(
                batch_id=f"bench-{prefix}-{i}", tracker_ids=list(ids[i : i + 64]), requested_at=now
            )
            for i in range(0, len(ids), 64)
        ]
        producer = Producer(client, topology.codec(), self.srv.redis_url)
        route = topology.routes(prefix)[FETCH]
        for i in range(0, len(batches), 500):
            await producer.publish(route, batches[i : i + 500])
        return len(batches)

    async def phase(
        self,
        client: Any,
        name: str,
        prefix: str,
        stages: Sequence[str],
        workers: int,
        expected: int,
    ) -> Phase:
        """Runs ``workers`` processes of each of ``stages`` until the last measured stage
        (the last of ``stages`` but view-refresh) has handled ``expected`` reports."""
        routes = topology.routes(prefix)
        ready_key = f"bench:{prefix}:ready"
        go_key = f"bench:{prefix}:go"
        env = self._env(prefix)
        measured = [s for s in stages if s != VIEW_REFRESH]
        last = measured[-1]
        out_keys = routes[STAGE_NEXT[last]].keys()
        in_keys = [routes[s].keys() for s in measured]
        procs: list[_Worker] = []
        try:  # from the first process started on, whatever happens stops them all
            for stage in stages:
                for n in range(workers):
                    log = self.workdir / f"{prefix}-{stage}-{n}.log"
                    procs.append(_Worker(stage, f"bench-{n}", env, log, (ready_key, go_key)))
            deadline = time.monotonic() + 120
            while int(await client.scard(ready_key)) < len(procs):
                for p in procs:
                    if p.proc.poll() is not None:
                        raise RuntimeError(
                            f"{p.stage} worker exited with {p.proc.returncode}:\n{p.tail()}"
                        )
                if time.monotonic() > deadline:
                    raise RuntimeError("workers did not get ready within 120 s")
                await asyncio.sleep(0.05)
            before = start = await self._cpu(client, procs)
            t0 = time.time()
            await client.set(go_key, 1)
            # the clock and the counters restart once the first reports are through, so
            # what every process does once (first connections, compiling statements,
            # caches) is not charged to the reports
            warm_at = max(1, min(500, expected // 20))
            warm: tuple[float, dict[str, float | None], dict[str, int]] | None = None
            # each stage's own mark: (its CPU, its count) when it first passed warm_at
            marks: dict[str, tuple[float | None, int]] = {}
            complete = False
            done = 0
            stop_at = time.monotonic() + self.max_phase_s
            shown = 0.0
            while True:
                backlog = [await self._group(client, k) for k in in_keys]
                drained = all(lag == 0 and pending == 0 for lag, pending, _ in backlog)
                counts = await self._counts(client, routes, measured)
                done = counts[last]
                for p in procs:
                    if p.proc.poll() is not None:
                        raise RuntimeError(
                            f"{p.stage} worker exited with {p.proc.returncode}:\n{p.tail()}"
                        )
                if drained and done >= expected:
                    complete = True
                    break
                if warm is None and done >= warm_at:
                    warm = (time.time(), await self._cpu(client, procs), counts)
                unmarked = [s for s in measured if s not in marks and counts[s] >= warm_at]
                if unmarked:
                    now_cpu = await self._cpu(client, procs)
                    marks.update({s: (now_cpu[s], counts[s]) for s in unmarked})
                if time.monotonic() >= stop_at:
                    break
                if time.monotonic() - shown >= 0.5:
                    shown = time.monotonic()
                    elapsed = time.time() - t0
                    self.status(
                        f"  {name}: {done:,}/{expected:,} reports, {elapsed:.0f} s"
                        f" ({done / max(elapsed, 1e-9):,.0f}/s)"
                    )
                await asyncio.sleep(0.05)
            t_poll = time.time()
            after = await self._cpu(client, procs)
            rss = {s: max(rss_mb(p.proc.pid)[1] for p in procs if p.stage == s) for s in stages}
            t_end = t_poll
            if complete:
                last_id = await client.xrevrange(out_keys.stream, count=1)
                if last_id:
                    t_end = min(t_poll, int(last_id[0][0].split(b"-")[0]) / 1000)
            counts = await self._counts(client, routes, measured)
        finally:
            await self._stop(procs)
        window = done
        # the window after the warm mark, if it is long enough to time: a small phase can
        # finish its last batch within the same millisecond as the mark
        if warm is not None and counts[last] > warm[2][last] and t_end - warm[0] >= MIN_WINDOW_S:
            t0, before = warm[0], warm[1]
            window = counts[last] - warm[2][last]
        cpu: dict[str, float | None] = {k: _delta_ms(before[k], after[k]) for k in after}
        # a stage's CPU and count from its own mark (from the start if it passed none)
        handled = {}
        for s in measured:
            mark = marks.get(s)
            if mark is not None and mark[0] is not None and counts[s] > mark[1]:
                cpu[s], handled[s] = _delta_ms(mark[0], after[s]), counts[s] - mark[1]
            else:
                cpu[s], handled[s] = _delta_ms(start[s], after[s]), counts[s]
        t = max(t_end - t0, 1e-6)
        ph = Phase(name, workers, window, t, complete, cpu, rss, handled=handled)
        ph.total = done
        return ph

    async def _counts(self, client: Any, routes: Any, stages: Sequence[str]) -> dict[str, int]:
        """Reports each stage got through: what fetch published, what the others acked."""
        out = {}
        for s in stages:
            if s == FETCH:
                out[s] = await self._added(client, routes[GEOCODE].keys().stream)
            else:
                out[s] = await self._handled(client, routes[s].keys())
        return out

    async def _group(self, client: Any, keys: Any) -> tuple[int, int, int]:
        """(lag, pending, finished) of the stage's group over its streams; finished is
        entries read and acked."""
        lag = pending = finished = 0
        for stream in keys.streams():
            with contextlib.suppress(Exception):  # no stream yet
                for g in await client.xinfo_groups(stream):
                    name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
                    if name == keys.group:
                        lag += int(g.get("lag") or 0)
                        pending += int(g["pending"])
                        finished += int(g.get("entries-read") or 0) - int(g["pending"])
        return lag, pending, finished

    async def _added(self, client: Any, stream: str) -> int:
        """Entries ever added to ``stream`` (so a trim of acked entries does not count)."""
        try:
            info = await client.xinfo_stream(stream)
        except Exception:  # no stream yet
            return 0
        added = info.get("entries-added")
        return int(added) if added is not None else int(info["length"])

    async def _handled(self, client: Any, keys: Any) -> int:
        return (await self._group(client, keys))[2]

    async def _cpu(self, client: Any, procs: Sequence[_Worker]) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for p in procs:
            out[p.stage] = (out.get(p.stage) or 0.0) + cpu_s(p.proc.pid)
        info = await client.info("cpu")
        out["redis"] = float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
        pid = self.srv.postgres_pid
        out["postgres"] = tree_cpu_s(pid) if pid else None
        return out

    async def _stop(self, procs: Sequence[_Worker]) -> None:
        for p in procs:
            if p.proc.poll() is None:
                p.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(p.proc.wait, max(0.1, deadline - time.monotonic()))
            if p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait(10)
            p.out.close()

    def db_counts(self, tag: str, since: datetime) -> dict[str, int]:
        from sqlalchemy import func, select

        from schemas.tables import LocationReport as R

        def count(session: Any) -> dict[str, int]:
            row = session.execute(
                select(
                    func.count(R.id), func.count(R.geocoded_at), func.count(R.geofence_checked_at)
                ).where(R.tracker_id.like(f"B{self.run_id}-{tag}-%"), R.fetched_at >= since)
            ).one()
            return {"fetched": row[0], "geocoded": row[1], "geofence_checked": row[2]}

        return self.db.run_sync(count)

    async def run_workers(self, client: Any, workers: int) -> dict[str, Any]:
        tag = f"w{workers}"
        n = self.trackers
        self.progress(f"workers per stage: {workers}; seeding {2 * n:,} trackers ...")
        stage_ids = self.seed_trackers(f"{tag}s")
        e2e_ids = self.seed_trackers(f"{tag}e")
        since = datetime.now(UTC)
        stage_prefix = f"b{self.run_id}-{tag}-s"
        requests = await self.queue_fetches(client, stage_prefix, stage_ids)
        alone: dict[str, Phase] = {}
        expected = n
        for stage in (FETCH, GEOCODE, GEOFENCE):
            self.progress(f"{stage} alone, {workers} worker(s) ...")
            ph = await self.phase(
                client, f"{stage} alone", stage_prefix, [stage], workers, expected
            )
            alone[stage] = ph
            self._report(ph)
            expected = ph.total
        self.progress(f"end to end, {workers} worker(s) per stage ...")
        e2e_prefix = f"b{self.run_id}-{tag}-e"
        e2e_requests = await self.queue_fetches(client, e2e_prefix, e2e_ids)
        e2e = await self.phase(
            client, "end to end", e2e_prefix, [FETCH, GEOCODE, GEOFENCE, VIEW_REFRESH], workers, n
        )
        e2e.counts = {
            "trackers": n,
            "fetch_requests": e2e_requests,
            **self.db_counts(f"{tag}e", since),
        }
        alone[FETCH].counts = {"trackers": n, "fetch_requests": requests}
        alone[GEOFENCE].counts = self.db_counts(f"{tag}s", since)
        self._report(e2e)
        return {"workers_per_stage": workers, "alone": alone, "end_to_end": e2e}

    def _report(self, ph: Phase) -> None:
        total = ph.per_report()["total"]
        self.progress(
            f"  {ph.name}: {ph.total:,} reports; {ph.reports:,} measured in {ph.seconds:.1f} s"
            f" = {ph.rate:,.0f}/s"
            + (f", {total:.3f} ms CPU/report" if total is not None else "")
            + ("" if ph.complete else f" (stopped after {self.max_phase_s:.0f} s)")
        )


def runtime_figure(
    redis_url: str, messages: int, progress: Progress, rounds: int = 3
) -> dict[str, float]:
    """The pass-through runtime and the batched raw loop on this Redis: the median of
    ``rounds`` interleaved rounds each."""
    import statistics

    from streams.bench import run_raw, run_runtime
    from streams.settings import StreamSettings

    settings = StreamSettings.build(redis_url=redis_url, batch_size=200, block_ms=5)
    raw, rt = [], []
    for r in range(rounds):
        stamp = secrets.token_hex(3)
        progress(f"runtime pass-through: {messages:,} messages x 4 stages, round {r + 1}/{rounds}")
        raw.append(run_raw(settings, f"bench-rawb-{stamp}", messages, 200, pipelined=True).rate)
        rt.append(asyncio.run(run_runtime(settings, f"bench-rt-{stamp}", messages)).rate)
    return {
        "messages": messages,
        "rounds": rounds,
        "raw_batched_per_s": statistics.median(raw),
        "runtime_per_s": statistics.median(rt),
    }


def run_pipeline_bench(
    redis_url: str | None = None,
    database_url: str | None = None,
    *,
    trackers: int = 20_000,
    history: int = 2,
    workers: Sequence[int] = (1, 2),
    max_phase_s: float = 30.0,
    runtime_messages: int = 10_000,
    progress: Progress = print,
    status: Progress | None = None,
    messy: bool = False,
) -> dict[str, Any]:
    """Runs the whole benchmark; returns the results as JSON-ready data (``messy``:
    the fleet sends realistic trouble, :class:`processors.sources.SimulatedFleet`)."""
    from streams.connection import connect
    from streams.settings import StreamSettings

    started = time.monotonic()
    load_before = os.getloadavg()
    # SIGTERM stops it like Ctrl-C: through the finally blocks that stop every worker
    # and server it started
    with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    with servers(redis_url, database_url, progress) as srv:
        workdir = Path(tempfile.mkdtemp(prefix="trackstream-bench-"))
        bench = PipelineBench(
            srv,
            trackers=trackers,
            history=history,
            max_phase_s=max_phase_s,
            progress=progress,
            status=status or (lambda _: None),
            workdir=workdir,
            messy=messy,
        )
        try:
            runtime = (
                runtime_figure(srv.redis_url, runtime_messages, progress)
                if runtime_messages
                else None
            )
            bench.prepare_database()

            async def all_runs() -> list[dict[str, Any]]:
                client = connect(StreamSettings.build(redis_url=srv.redis_url))
                try:
                    return [await bench.run_workers(client, w) for w in workers]
                finally:
                    await client.aclose()

            runs = asyncio.run(all_runs())
        finally:
            bench.close()
            shutil.rmtree(workdir, ignore_errors=True)
        return {
            "config": {
                "messy": messy,
                "trackers_per_phase": trackers,
                "history_per_tracker": history,
                "workers_per_stage": list(workers),
                "max_phase_s": max_phase_s,
                "cpus": os.cpu_count(),
                # other work on the machine skews every figure: say how busy it was
                "loadavg_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
                "servers": srv.description,
            },
            "runtime": runtime,
            "runs": [
                {
                    "workers_per_stage": r["workers_per_stage"],
                    "alone": {s: ph.as_json() for s, ph in r["alone"].items()},
                    "end_to_end": r["end_to_end"].as_json(),
                }
                for r in runs
            ],
            "seconds": round(time.monotonic() - started, 1),
        }
