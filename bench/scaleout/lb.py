"""Two `unlock-serve` replicas on one registry behind nginx, under a bounded mixed load, with one replica
killed (SIGKILL) and restarted in the middle (issue 12). Prints and saves what happened:

- requests by outcome: status code, and for 5xx whether the request was in flight on the killed replica;
- steered and unsteered outputs compared with a single server's (the reference is replica A alone after the
  run, each content registered under a name of its own): a steered answer must equal the output of a content
  its name held at some point while the request ran (give or take the poll interval);
- propagation delay of every upload, replace and delete made through the balancer, for uploads and replaces
  (until usable elsewhere) and for deletes (until refused elsewhere) apart (p50, p99, max), measured twice:
  - `propagation_s`, from outside: from the write's response until both replicas, asked directly, reflect it.
    The replicas not yet reflecting it are asked at once every CHECK_S (50 ms) through their capability
    listing (no blob read); each figure includes that request's own time, long on a loaded machine;
  - `propagation_measured_by_the_other_replica_s`: the delay the replica the write did not go through
    reports for it (`registry.propagation`: from the manifest write until requests there see it; a new
    content is offered once its registration is sent to the engine, and its first requests wait for the
    engine's answer), and `registered_on_the_engine_after_write_s`, until that answer (the replicas' logs);
  and each replica's own histogram and syncs by trigger. The replicas hear changes pushed (inotify on the
  directory, LISTEN/NOTIFY with PostgreSQL) and poll only as the fallback, every POLL_S (the server's
  default);
- the end state: both replicas list the same registry, equal to what the admin's successful writes left, with
  nothing lost and no blob left over.

The replicas run the tiny random-weight test model (eager), each vLLM CPU engine on its own core
(`VLLM_CPU_OMP_THREADS_BIND`), nginx from Debian's packages (`apt-get install nginx`). The load clients run
in a process of their own, so the propagation probes of this one are not slowed by their share of its
interpreter lock.

`--engine-nice N` runs each replica's engine processes (engine core and worker, all their threads, after
every start) at nice N. On a GPU host the forward passes run on the GPU, and the API server, the database
and the listener never wait for a core behind them; here the two CPU engines keep both cores busy and
everything else queues behind their threads. With N > 0 the engines still take every cycle nothing else
wants (the load is the same), but a notification or a request is served as soon as it arrives. The saved
files then end in `-nice{N}`.

  .venv/bin/python bench/scaleout/lb.py [--backend file|postgres] [--duration 150] [--engine-nice 0]
    [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import multiprocessing.synchronize
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "tests"), str(REPO)]
from serve_harness import ServerProcess, capability_bytes, free_port, tiny_server  # noqa: E402
from tiny_models import TARGET, make_model  # noqa: E402

ADMIN_KEY = "lb-admin"
POLL_S = 2.0  # the fallback poll (the server's default): propagation by push must not depend on it
CHECK_S = 0.05  # how often the propagation check asks a replica that does not reflect a write yet
PROMPTS = [
    "Question: A train travels 60 miles in 2 hours. What is its speed?\nAnswer:",
    "Question: Tom has 3 apples and buys 5 more. How many apples does he have?\nAnswer:",
    "The capital of France is",
    "Once upon a time, in a small village,",
]
NAMES = [f"cap{i}" for i in range(5)]
STRENGTH = 3.0  # random directions in a random model: strong enough to change the greedy tokens
NGINX_CONF = """
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log;
events {{ worker_connections 512; }}
http {{
  access_log {dir}/nginx-access.log;
  upstream unlock {{
    server 127.0.0.1:{a} max_fails=1 fail_timeout=2s;
    server 127.0.0.1:{b} max_fails=1 fail_timeout=2s;
    keepalive 32;
  }}
  server {{
    listen 127.0.0.1:{port};
    client_max_body_size 64m;
    location / {{
      proxy_pass http://unlock;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_read_timeout 300s;
      proxy_buffering off;
      # A request the replica failed (refused, reset, died) goes to the other one, POSTs too: unlock-serve's
      # POSTs are safe to repeat (a completion changes nothing; an upload of the same content is a no-op).
      proxy_next_upstream error timeout non_idempotent;
      add_header X-Upstream $upstream_addr always;
    }}
  }}
}}
"""


@dataclass
class Request:
    kind: str  # "plain" or "steered"
    name: str | None
    prompt: int
    start: float
    end: float = 0.0
    status: int = 0
    upstream: str = ""
    text: str | None = None
    error: str = ""


@dataclass
class Write:
    op: str  # upload | replace | delete
    name: str
    sha256: str | None  # content after the write (None: deleted)
    start: float
    end: float = 0.0
    status: int = 0
    propagation: float | None = None  # until both replicas reflect it
    # The other replica's own measure: from the manifest write to its registration there (its
    # `registry.propagation` once it reflects the write), free of this script's requests.
    measured_there: float | None = None
    response: str = ""


@dataclass
class Run:
    requests: list[Request] = field(default_factory=list)
    writes: list[Write] = field(default_factory=list)
    kill_at: float = 0.0
    restarted_at: float = 0.0
    down: set[int] = field(default_factory=set)  # indices of replicas killed and not yet back
    lock: threading.Lock = field(default_factory=threading.Lock)


def headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_KEY}"}


def content(name: str, version: int) -> bytes:
    return capability_bytes(name, seed=1000 * NAMES.index(name) + version, strength=STRENGTH)


def sha_of(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def look(probe: httpx.Client, name: str) -> tuple[str | None, float | None]:
    """The sha256 the replica `probe` talks to offers for `name` (ready; None when it does not) and its own
    measure of the last change another replica made; raises while it is down. Reads the listing: one
    capability's own page also summarizes its blob, too slow for a 50 ms check. One kept client per replica:
    a new one per check cost more than the check on a loaded host (the TLS context httpx builds for any
    client)."""
    r = probe.get("/v1/capabilities")
    r.raise_for_status()
    body = r.json()
    found = [c for c in body["data"] if c["name"] == name and c["status"] == "ready"]
    return (found[0]["sha256"] if found else None), body["registry"]["propagation"]


def client_loop(lb: str, run: Run, stop: multiprocessing.synchronize.Event, seed: int) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=lb, timeout=120, headers=headers()) as client:
        while not stop.is_set():
            steered = rng.random() < 0.7
            req = Request("steered" if steered else "plain", rng.choice(NAMES) if steered else None,
                          rng.randrange(len(PROMPTS)), time.monotonic())  # fmt: skip
            body = {"model": "tiny", "prompt": PROMPTS[req.prompt], "max_tokens": 12, "temperature": 0}
            if steered:
                body["capabilities"] = [req.name]
            try:
                r = client.post("/v1/completions", json=body)
                req.status, req.upstream = r.status_code, r.headers.get("x-upstream", "")
                if r.status_code == 200:
                    req.text = r.json()["choices"][0]["text"]
                else:
                    req.error = r.text[:300]
            except httpx.HTTPError as err:
                req.status, req.error = -1, f"{type(err).__name__}: {err}"
            req.end = time.monotonic()
            with run.lock:
                run.requests.append(req)


def clients_process(
    lb: str, stop: multiprocessing.synchronize.Event, seeds: list[int], out: multiprocessing.Queue
) -> None:
    """The load clients, one thread each, in a process of their own: the admin loop's propagation probes, in
    the benchmark's main process, then do not queue behind them for an interpreter lock. (One process for
    all: sharing its lock bounds the load they make as it was when they ran beside the probes.)"""
    run = Run()
    threads = [threading.Thread(target=client_loop, args=(lb, run, stop, seed)) for seed in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put([asdict(r) for r in run.requests])


def admin_loop(
    lb: str, replicas: list[ServerProcess], run: Run, stop: multiprocessing.synchronize.Event, seed: int
) -> None:
    """Uploads, replaces and deletes through the balancer; after each, waits until every replica that is up
    reflects it (a replica that is down gets everything when it starts: the end state checks it)."""
    rng = random.Random(seed)
    versions = dict.fromkeys(NAMES, 0)
    present: dict[str, str] = {}
    probes = [httpx.Client(base_url=r.url, timeout=10, headers=headers()) for r in replicas]
    with httpx.Client(base_url=lb, timeout=120, headers=headers()) as client:
        while not stop.is_set():
            name = rng.choice(NAMES)
            if name in present and rng.random() < 0.35:
                write = Write("delete", name, None, time.monotonic())
                r = client.delete(f"/v1/capabilities/{name}")
            else:
                versions[name] += 1
                data = content(name, versions[name])
                op = "replace" if name in present else "upload"
                write = Write(op, name, sha_of(data), time.monotonic())
                r = client.post("/v1/capabilities", content=data, params={"replace": "true"})
            write.status, write.end = r.status_code, time.monotonic()
            ok = r.status_code in (200, 201)
            write.response = r.headers.get("x-upstream", "") if ok else r.text[:300]
            if r.status_code in (200, 201):
                present.pop(name, None) if write.sha256 is None else present.__setitem__(name, write.sha256)
                write.propagation, write.measured_there = wait_reflected(
                    replicas, probes, run.down, name, write.sha256, write.end, write.response
                )
            with run.lock:
                run.writes.append(write)
            time.sleep(rng.uniform(0.2, 1.0))
    for probe in probes:
        probe.close()


def wait_reflected(
    replicas: list[ServerProcess],
    probes: list[httpx.Client],
    down: set[int],
    name: str,
    sha: str | None,
    since: float,
    upstream: str,
) -> tuple[float | None, float | None]:
    """Seconds from `since` until every replica that is up offers `sha` under `name` (None: refuses it), the
    replicas not yet reflecting it asked at once every CHECK_S (None past a minute); and the delay measured by
    the replica the write did not go through (`upstream` names the one it did), None if it was down."""
    pending, there = set(range(len(replicas))), None
    with ThreadPoolExecutor(len(replicas)) as pool:
        while time.monotonic() < since + 60:
            asked = {i: pool.submit(look, probes[i], name) for i in pending - down}
            for i, answer in asked.items():
                try:
                    held, measured = answer.result()
                except httpx.HTTPError:
                    continue  # killed just now
                if held == sha:
                    pending.discard(i)
                    if not upstream.endswith(f":{replicas[i].port}"):
                        there = measured
            if not pending - down:
                return time.monotonic() - since, there
            time.sleep(CHECK_S)
    return None, there


def nginx(work: Path, a: int, b: int) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        raise SystemExit("nginx is not installed: apt-get install nginx")
    port = free_port()
    (work / "nginx.conf").write_text(NGINX_CONF.format(dir=work, a=a, b=b, port=port))
    proc = subprocess.Popen([binary, "-p", str(work), "-c", str(work / "nginx.conf"), "-g", "daemon off;"])
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            httpx.get(url + "/health", timeout=2)
            return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit("nginx did not start; see nginx-error.log")


def references(server: ServerProcess, shas: dict[str, bytes]) -> tuple[dict[tuple[str, int], str], list[str]]:
    """Outputs of one server alone: per (sha256, prompt) under a name of its own, and unsteered per prompt."""

    def complete(prompt: int, name: str | None = None) -> str:
        body = {"model": "tiny", "prompt": PROMPTS[prompt], "max_tokens": 12, "temperature": 0}
        if name:
            body["capabilities"] = [name]
        r = httpx.post(f"{server.url}/v1/completions", json=body, headers=headers(), timeout=120)
        r.raise_for_status()
        return r.json()["choices"][0]["text"]

    out = {}
    for sha, data in shas.items():
        name = f"ref-{sha[:12]}"
        r = httpx.post(f"{server.url}/v1/capabilities", content=data, params={"name": name},
                       headers=headers(), timeout=120)  # fmt: skip
        assert r.status_code in (200, 201), r.text
        for p in range(len(PROMPTS)):
            out[(sha, p)] = complete(p, name)
        httpx.delete(f"{server.url}/v1/capabilities/{name}", headers=headers(), timeout=60)
    return out, [complete(p) for p in range(len(PROMPTS))]


def held_during(writes: list[Write], name: str, start: float, end: float) -> set[str | None]:
    """What `name` may have held for a request that ran in [start, end]: contents, and None when absent.

    A write takes effect on the replica that makes it at some moment between its request and its response,
    and on the other replica up to a poll interval plus a registration later (slack). So the state a write
    leaves may be seen from its request's start until the next write's response plus the slack.
    """
    slack = POLL_S + 2.0
    timeline = sorted((w.start, w.end, w.sha256) for w in writes if w.name == name and w.status in (200, 201))
    states = [(None, -math.inf)] + [(sha, began) for began, _, sha in timeline]
    until = [ended + slack for _, ended, _ in timeline] + [math.inf]
    return {sha for (sha, since), last in zip(states, until, strict=True) if since <= end and last >= start}


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(delays: list[float]) -> dict[str, float | int | None]:
    return {
        "n": len(delays),
        "p50": round(statistics.median(delays), 3) if delays else None,
        "p99": round(quantile(delays, 0.99), 3) if delays else None,
        "max": round(max(delays), 3) if delays else None,
    }


def report(run: Run, refs: dict, plain_refs: list[str], killed_port: str, final: dict, args) -> dict:
    codes: dict[str, int] = {}
    in_flight_on_killed = 0
    mismatches, wrong_refusals, other_failures, checked, refused_unknown = [], [], [], 0, 0
    for r in run.requests:
        codes[str(r.status)] = codes.get(str(r.status), 0) + 1
        if r.status >= 500 or r.status == -1:
            if r.upstream.endswith(killed_port) and r.start <= run.kill_at <= r.end:
                in_flight_on_killed += 1
            else:  # with when it ran, from the kill, and how long it took
                other_failures.append({**asdict(r), "start": round(r.start - run.kill_at, 2),
                                       "end": round(r.end - run.kill_at, 2)})  # fmt: skip
        if r.status == 400 and "unknown capability" in r.error:
            refused_unknown += 1
            if None not in held_during(run.writes, r.name, r.start, r.end):
                wrong_refusals.append(asdict(r))  # the name held content the whole time
        if r.status != 200:
            continue
        checked += 1
        if r.kind == "plain":
            if r.text != plain_refs[r.prompt]:
                mismatches.append(asdict(r))
        else:
            held = held_during(run.writes, r.name, r.start, r.end) - {None}
            allowed = {refs[(sha, r.prompt)] for sha in held}
            if r.text not in allowed:
                mismatches.append({**asdict(r), "allowed": sorted(allowed)})
    # Writes made while b was down reached only a; b's restart registered them (checked by the end state).
    both_up = lambda w: not (run.kill_at <= w.end <= run.restarted_at)  # noqa: E731
    measured = [w for w in run.writes if w.propagation is not None and both_up(w)]
    kinds = {"upload_or_replace": lambda w: w.sha256 is not None, "delete": lambda w: w.sha256 is None}
    # upload_or_replace: until usable on the other replica; delete: until refused there.
    delays = {kind: [w.propagation for w in measured if of(w)] for kind, of in kinds.items()}
    there = {kind: [w.measured_there for w in measured if of(w) and w.measured_there is not None]
             for kind, of in kinds.items()}  # fmt: skip
    unpropagated = [asdict(w) for w in run.writes if w.status in (200, 201) and w.propagation is None]
    return {
        "backend": args.backend,
        "duration_s": args.duration,
        "clients": args.clients,
        "engine_nice": args.engine_nice,
        "requests": len(run.requests),
        "by_status": dict(sorted(codes.items())),
        "5xx_in_flight_on_killed_replica": in_flight_on_killed,
        "5xx_other": len(other_failures),
        "5xx_other_examples": other_failures[:5],  # start and end: seconds after the kill
        "refused_unknown_capability": refused_unknown,
        "refused_while_registered": len(wrong_refusals),
        "wrong_refusal_examples": wrong_refusals[:5],
        "outputs_checked": checked,
        "output_mismatches": len(mismatches),
        "mismatch_examples": mismatches[:5],
        "writes": {op: sum(w.op == op for w in run.writes) for op in ("upload", "replace", "delete")},
        "write_status": {
            str(s): sum(w.status == s for w in run.writes) for s in sorted({w.status for w in run.writes})
        },
        "writes_while_b_was_down": sum(not both_up(w) for w in run.writes),
        "poll_interval_s": POLL_S,
        "propagation_s": {
            **{kind: summary(values) for kind, values in delays.items()},
            "all": summary([d for values in delays.values() for d in values]),
        },
        "propagation_measured_by_the_other_replica_s": {
            **{kind: summary(values) for kind, values in there.items()},
            "all": summary([d for values in there.values() for d in values]),
        },
        "writes_never_reflected": unpropagated,
        "kill_at_s": round(run.kill_at - run.requests[0].start, 1) if run.requests else None,
        "restart_took_s": round(run.restarted_at - run.kill_at, 1),
        **final,
    }


SEEN = re.compile(
    r"generation (\d+) \(by \S+\) seen here ([\d.]+) s after its write: "
    r"heard on (\w+) after ([\d.]+) s, synced after ([\d.]+) s, locked after ([\d.]+) s, "
    r"read after ([\d.]+) s, offered in ([\d.]+) s"
)
# The engine's answer to that registration, which requests offered the change wait for (an engine step).
REGISTERED = re.compile(
    r"capability content [0-9a-f]+ of generation (\d+) \(by \S+\) registered on the engine ([\d.]+) s after"
)


WRITTEN = re.compile(r"generation (\d+), committed ([\d.]+) s after its write")


def replica_logs(work: Path) -> dict[str, str]:
    return {log.stem: log.read_text(errors="replace") for log in sorted(work.glob("[ab].log"))}


def registrations(work: Path) -> dict[str, float | int | None]:
    """Seconds from another replica's write until the engine here registered its content, over both
    replicas' logs: what requests that arrive as soon as the change is offered wait for."""
    return summary([float(t) for text in replica_logs(work).values() for _, t in REGISTERED.findall(text)])


def slowest_seen(work: Path, top: int = 5) -> list[dict]:
    """The replicas' own account of their slowest propagations (their log lines): where the time went, the
    writer's commit included (None when its line is not in the logs)."""
    seen, logs = [], replica_logs(work)
    committed = {int(g): float(t) for text in logs.values() for g, t in WRITTEN.findall(text)}
    for replica, text in logs.items():
        registered_after = {int(g): float(t) for g, t in REGISTERED.findall(text)}
        for match in SEEN.finditer(text):
            generation, total, trigger, heard, synced, locked, read, offered = match.groups()
            seen.append(
                {
                    "replica": replica,
                    "generation": int(generation),
                    "seen_s": float(total),
                    "trigger": trigger,
                    "committed_after_s": committed.get(int(generation)),
                    "heard_after_s": float(heard),
                    "synced_after_s": float(synced),
                    "locked_after_s": float(locked),
                    "read_after_s": float(read),
                    "offered_in_s": float(offered),
                    "registered_after_s": registered_after.get(int(generation)),  # None: a delete
                }
            )
    return sorted(seen, key=lambda r: -r["seen_s"])[:top]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=("file", "postgres"), default="file")
    p.add_argument("--duration", type=float, default=150, help="seconds of load (the kill is at a third)")
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine-nice", type=int, default=0, help="the engine processes' nice")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "scaleout" / "results")
    args = p.parse_args()
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    work = Path(tempfile.mkdtemp(prefix="unlock-lb-"))
    model = make_model(TARGET, work / "model")
    registry = work / "registry"
    extra = ["--admin-key", ADMIN_KEY, "--registry-poll-interval", str(POLL_S)]
    with _registry_backend(args.backend) as url:
        if url:
            extra += ["--registry-url", url]

        def replica(label: str, core: str) -> ServerProcess:
            env = {"VLLM_CPU_OMP_THREADS_BIND": core}
            return tiny_server(model, registry, work / f"{label}.log", *extra, env=env)

        def start(server: ServerProcess, port: int | None = None) -> None:
            server.start(port=port)
            if args.engine_nice:
                renice_engine(server, args.engine_nice)

        a, b = replica("a", "0"), replica("b", "1")
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(start, (a, b)))
        proxy, lb = nginx(work, a.port, b.port)
        run = Run()
        forked = multiprocessing.get_context("fork")  # no thread of this process runs at this point
        stop, answers = forked.Event(), forked.Queue()  # one stop for the admin thread and the clients
        seeds = [args.seed + i for i in range(args.clients)]
        clients = forked.Process(target=clients_process, args=(lb, stop, seeds, answers))
        admin = threading.Thread(target=admin_loop, args=(lb, [a, b], run, stop, args.seed))
        started = time.monotonic()
        clients.start()
        admin.start()
        try:
            time.sleep(args.duration / 3)
            run.kill_at = time.monotonic()
            killed_port = str(b.port)
            run.down.add(1)
            os.killpg(b.proc.pid, signal.SIGKILL)
            b.proc.wait()
            start(b, port=b.port)  # the same port: nginx's upstream list names it
            run.restarted_at = time.monotonic()
            run.down.discard(1)
            time.sleep(max(0.0, started + args.duration - time.monotonic()))
        finally:
            stop.set()
            run.requests += [Request(**r) for r in answers.get(timeout=600)]  # before the join: it waits
            clients.join()  # for its answers to be taken
            admin.join()
            run.requests.sort(key=lambda r: r.start)
        time.sleep(2 * POLL_S + 1)
        list_a, list_b = (_listing(s) for s in (a, b))
        expected = {}
        for w in run.writes:
            if w.status in (200, 201):
                expected.pop(w.name, None) if w.sha256 is None else expected.__setitem__(w.name, w.sha256)
        blobs = sorted(p.stem for p in (registry / "blobs").iterdir())
        final = {
            "replicas_agree": list_a == list_b,
            "entries_expected": len(expected),
            "entries_lost": sorted(set(expected.items()) - {(n, s) for n, s, _ in list_a}),
            "entries_unexpected": sorted({(n, s) for n, s, _ in list_a} - set(expected.items())),
            "not_ready": [n for n, _, status in list_a + list_b if status != "ready"],
            "blobs_left_over": sorted(set(blobs) - set(expected.values())),
            "propagation_histograms": {label: _histogram(s) for label, s in (("a", a), ("b (restarted)", b))},
            "sync": {label: _sync(s) for label, s in (("a", a), ("b (restarted)", b))},
            "registered_on_the_engine_after_write_s": registrations(work),
            "slowest_seen_by_replicas": slowest_seen(work),
        }
        proxy.terminate()
        proxy.wait()
        b.stop()
        shas = {w.sha256: content(w.name, _version_of(w, run.writes)) for w in run.writes if w.sha256}
        refs, plain_refs = references(a, shas)
        a.stop()
    result = report(run, refs, plain_refs, killed_port, final, args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"lb-{args.backend}" + (f"-nice{args.engine_nice}" if args.engine_nice else "")
    path = args.out / f"{stem}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    events = [{"event": "write", **asdict(w)} for w in run.writes]
    events += [{"event": "kill", "at": run.kill_at}, {"event": "restarted", "at": run.restarted_at}]
    with (args.out / f"{stem}-events.jsonl").open("w") as f:
        f.writelines(json.dumps(e) + "\n" for e in sorted(events, key=lambda e: e.get("end", e.get("at"))))
    print(json.dumps({k: v for k, v in result.items() if k != "mismatch_examples"}, indent=1))
    print("wrote", path)
    shutil.rmtree(work, ignore_errors=True)


def renice_engine(server: ServerProcess, nice: int) -> None:
    """Set every thread of the replica's engine processes (its engine core and the worker that runs the
    forward passes: every process the API server started) to `nice`. Linux keeps a nice per thread, and the
    threads started later inherit it."""
    engine = psutil.Process(server.proc.pid).children(recursive=True)
    if not any("EngineCore" in p.name() for p in engine):
        raise RuntimeError(f"no engine core process under {server.proc.pid}: {engine}")
    for process in engine:
        for thread in process.threads():
            os.setpriority(os.PRIO_PROCESS, thread.id, nice)


def _version_of(write: Write, writes: list[Write]) -> int:
    """Which version of its name's content a write uploaded (versions count per name from 1)."""
    uploads = [w for w in writes if w.name == write.name and w.sha256 is not None]
    return uploads.index(write) + 1


def _listing(server: ServerProcess) -> list[tuple[str, str, str]]:
    data = httpx.get(f"{server.url}/v1/capabilities", headers=headers(), timeout=30).json()["data"]
    return [(c["name"], c["sha256"], c["status"]) for c in data]


def _histogram(server: ServerProcess) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    out = {}
    for line in text.splitlines():
        if line.startswith("unlock_registry_propagation_seconds_") and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            if key.endswith(("_count", "_sum")):
                out[key.rsplit("_", 1)[1]] = float(value)
    return out


def _sync(server: ServerProcess) -> dict:
    """How the replica hears changes (its /health `registry.sync`) and its syncs by trigger (/metrics)."""
    status = httpx.get(f"{server.url}/health", timeout=30).json()["registry"]
    syncs = {}
    for line in httpx.get(f"{server.url}/metrics", timeout=30).text.splitlines():
        if line.startswith("unlock_registry_syncs_total{"):
            key, value = line.rsplit(" ", 1)
            syncs[key.split('trigger="', 1)[1].split('"', 1)[0]] = float(value)
    return {"mode": status["sync"], "listening": status["listening"], "syncs": syncs}


class _registry_backend:
    """A throwaway PostgreSQL server for --backend postgres (tests/postgres_server.py), else nothing."""

    def __init__(self, backend: str):
        self.backend, self.context = backend, None

    def __enter__(self) -> str | None:
        if self.backend == "file":
            return None
        from postgres_server import fresh_database, postgres_server

        self.context = postgres_server()
        return fresh_database(self.context.__enter__())

    def __exit__(self, *exc) -> None:
        if self.context is not None:
            self.context.__exit__(*exc)


if __name__ == "__main__":
    main()
