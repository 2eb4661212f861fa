"""Serving benchmark: `pldr-jax serve` under a bounded Poisson load on 127.0.0.1, beside the same
requests run as static batches through `Sampler`, in one run.

The server is a real ``pldr-jax serve preset:<name>`` process (``--slots`` rows, compiled before the
load).  A load generator in this process sends ``--requests`` streamed completions (token-id
prompts, ``ignore_eos`` so each request produces exactly its ``max_tokens``) with exponential gaps
of mean 1 / ``--rate`` seconds and at most ``--max-in-flight`` open at once.  Workloads, drawn
from ``--seed`` (``--workloads``, default all three):

* ``mixed``: prompt lengths uniform in [8, 96], output lengths uniform in [8, 128];
* ``equal``: every prompt 64 tokens, every output 64 tokens;
* ``longtail``: prompts as ``mixed``, outputs log-normal (median 32, sigma 1) clipped to [4, 160]:
  many short answers and a few long ones, as chat traffic.

Per workload it reports the server's output tokens/s (all tokens / first send to last token), time to
first token (send -> first streamed token) and time per output token (per request: (last - first
streamed token) / (tokens - 1); a chunk carries an engine block's tokens) at p50 and p99, the load
generator's CPU seconds (its share of the run's wall time: it must not be the bottleneck), the
server process's CPU seconds and its engine's generate steps / blocks / admissions in the run (from
its /metrics), and the 1-minute load average; and the static batches: the same requests in arrival order,
``--slots`` per `Sampler` call (greedy, no EOS, ``max_new_tokens`` = the batch's longest, so every
row waits for it: the useful tokens are each request's own), each batch shape compiled before it
is timed.  Each workload runs ``--repeats`` times, server and static alternated; the numbers are
the median run's, ``ratio`` the median of the paired server tokens/s / static tokens/s.  Acceptance (issue 30): mixed >= 1.5,
equal >= 0.85.  The static batches are timed without arrival gaps (all requests present at once),
which favours them.  ``engine_in_process``: the same requests through `Engine` in this process, all
present at once (no HTTP), ``engine_ratio`` its paired ratio to the static batches;
``engine_arrivals``: the same with the load's arrival times (no HTTP), ``engine_arrivals_ratio``.
Together they split the server's cost: the engine alone, what the arrival gaps cost, what HTTP and
the second process cost.  Static and in-process runs report their CPU seconds too.

    python experiments/bench_serve.py                  # small preset, 8 slots, 48 requests per workload
    python experiments/bench_serve.py --json           # one JSON object
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
#: prompt and output length ranges; outputs uniform in the range, or "lognormal": median `median`,
#: sigma 1, clipped to the range (a long tail of long answers among many short ones, as chat traffic)
WORKLOADS = {"mixed": dict(prompt=(8, 96), output=(8, 128)), "equal": dict(prompt=(64, 64), output=(64, 64)),
             "longtail": dict(prompt=(8, 96), output=(4, 160), dist="lognormal", median=32)}


def draw(workload: str, n: int, vocab: int, rate: float, seed: int, max_len: int = 256) -> list[dict]:
    """n requests {"prompt", "max_tokens", "at"} (arrival offsets in seconds) of a workload; lengths
    scaled down (same proportions) when prompt + output could exceed max_len."""
    rng = np.random.default_rng(seed)
    spec = WORKLOADS[workload]
    scale = min(1.0, max_len / (spec["prompt"][1] + spec["output"][1]))
    w = {k: (max(1, int(spec[k][0] * scale)), max(1, int(spec[k][1] * scale))) for k in ("prompt", "output")}
    at = np.cumsum(rng.exponential(1.0 / rate, size=n))
    at -= at[0]
    out = []
    for i in range(n):
        P = int(rng.integers(w["prompt"][0], w["prompt"][1] + 1))
        prompt = [int(t) for t in rng.integers(4, vocab, size=P)]
        lo, hi = w["output"]
        if spec.get("dist") == "lognormal":
            m = int(np.clip(round(rng.lognormal(np.log(spec["median"] * scale), 1.0)), lo, hi))
        else:
            m = int(rng.integers(lo, hi + 1))
        out.append({"prompt": prompt, "max_tokens": m, "at": float(at[i])})
    return out


def start_server(preset: str, slots: int, max_len: int, steps_per_sync: int) -> tuple[subprocess.Popen, str, list[str]]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "pldr_jax.cli", "serve", f"preset:{preset}", "--port", "0",
                             "--slots", str(slots), "--max-seq-len", str(max_len), "--max-queue", "1024",
                             "--steps-per-sync", str(steps_per_sync)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    while True:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("the server exited:\n" + "".join(lines))
        lines.append(line.rstrip())
        if line.startswith("serving "):
            return proc, line.split(" on ")[1].split()[0].removesuffix("/v1"), lines


async def run_load(url: str, reqs: list[dict], max_in_flight: int) -> dict:
    import httpx
    sem = asyncio.Semaphore(max_in_flight)
    results = [None] * len(reqs)

    async def one(i, r, client, t0):
        await asyncio.sleep(max(0.0, t0 + r["at"] - time.perf_counter()))
        async with sem:
            body = {"prompt": r["prompt"], "max_tokens": r["max_tokens"], "temperature": 0, "stream": True,
                    "ignore_eos": True}
            sent = time.perf_counter()
            times = []
            async with client.stream("POST", "/v1/completions", json=body) as resp:
                resp.raise_for_status()
                async for line in resp.aiter_lines():
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        if chunk["choices"]:
                            times.append(time.perf_counter())
                        else:
                            usage = chunk["usage"]["completion_tokens"]
            results[i] = {"sent": sent, "times": times, "tokens": usage}

    limits = httpx.Limits(max_connections=max_in_flight, max_keepalive_connections=max_in_flight)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        await asyncio.gather(*[one(i, r, client, t0) for i, r in enumerate(reqs)])
        cpu = time.process_time() - cpu0
    tokens = sum(r["tokens"] for r in results)
    assert tokens == sum(r["max_tokens"] for r in reqs), "a request did not produce its max_tokens"
    wall = max(r["times"][-1] for r in results) - min(r["sent"] for r in results)
    ttft = np.array([r["times"][0] - r["sent"] for r in results])
    # per output token after the first (a streamed chunk carries the tokens of one engine block)
    tpot = np.array([(r["times"][-1] - r["times"][0]) / (r["tokens"] - 1) for r in results if r["tokens"] > 1])
    ms = lambda a, q: round(float(np.percentile(a, q)) * 1e3, 2)
    return {"tokens": tokens, "seconds": round(wall, 3), "tokens_per_s": round(tokens / wall, 1),
            "ttft_p50_ms": ms(ttft, 50), "ttft_p99_ms": ms(ttft, 99), "tpot_p50_ms": ms(tpot, 50),
            "tpot_p99_ms": ms(tpot, 99), "chunks": sum(len(r["times"]) for r in results),
            "loadgen_cpu_s": round(cpu, 3), "loadgen_cpu_share": round(cpu / wall, 3)}


def run_static(sampler, reqs: list[dict], slots: int, warm: bool = False) -> dict:
    batches = [reqs[i:i + slots] for i in range(0, len(reqs), slots)]
    call = lambda b: sampler([r["prompt"] for r in b], max_new_tokens=max(r["max_tokens"] for r in b), top_k=1,
                             eos_id=None)
    if warm:                   # compile every batch shape first
        for b in batches:
            call(b)
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    latencies = []
    for b in batches:
        s = time.perf_counter()
        call(b)
        latencies.append(time.perf_counter() - s)
    wall = time.perf_counter() - t0
    tokens = sum(r["max_tokens"] for r in reqs)
    return {"tokens": tokens, "seconds": round(wall, 3), "tokens_per_s": round(tokens / wall, 1),
            "cpu_s": round(time.process_time() - cpu0, 3),
            "batches": len(batches), "batch_p50_ms": round(float(np.median(latencies)) * 1e3, 1),
            "rows_computed": sum(len(b) * max(r["max_tokens"] for r in b) for b in batches)}


def run_engine(engine, reqs: list[dict], arrivals: bool = False) -> dict:
    """The same requests through `pldr_jax.serve.Engine` in this process (no HTTP): all present at
    once, or with `arrivals` submitted at their arrival offsets by a second thread while this one
    steps the engine (what the arrival gaps cost without the server around the engine)."""
    import threading

    from pldr_jax.serve import Request
    counts = {k: getattr(engine, k) for k in ("steps", "blocks", "admissions")}
    make = lambda r: Request(prompt=r["prompt"], max_tokens=r["max_tokens"], top_k=1, ignore_eos=True)
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    if arrivals:
        def feed():
            for r in reqs:
                time.sleep(max(0.0, t0 + r["at"] - time.perf_counter()))
                engine.submit(make(r))
        feeder = threading.Thread(target=feed)
        feeder.start()
        while feeder.is_alive() or not engine.idle:
            if engine.idle:
                time.sleep(0.0005)
            else:
                engine.step()
        feeder.join()
    else:
        for r in reqs:
            engine.submit(make(r))
        engine.run_until_idle()
    wall = time.perf_counter() - t0
    tokens = sum(r["max_tokens"] for r in reqs)
    return {"tokens": tokens, "seconds": round(wall, 3), "tokens_per_s": round(tokens / wall, 1),
            "cpu_s": round(time.process_time() - cpu0, 3),
            **{f"engine_{k}": getattr(engine, k) - v for k, v in counts.items()}}


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def engine_counts(url: str) -> dict:
    """The server engine's generate steps, blocks and admissions so far (its /metrics)."""
    import httpx
    text = httpx.get(url + "/metrics", timeout=60).text
    return {k: float(re.search(rf"^pldr_serve_engine_{k} (\S+)$", text, re.M).group(1))
            for k in ("steps", "blocks", "admissions")}


def run_server(proc, url: str, reqs: list[dict], max_in_flight: int) -> dict:
    """`run_load` against the server process, with the server's own CPU seconds, its engine's
    generate steps / blocks / admissions in the run, and the load average."""
    counts = engine_counts(url)
    before = process_cpu_s(proc.pid)
    out = asyncio.run(run_load(url, reqs, max_in_flight))
    after = process_cpu_s(proc.pid)
    out["server_cpu_s"] = None if before is None or after is None else round(after - before, 3)
    out.update({f"engine_{k}": int(v - counts[k]) for k, v in engine_counts(url).items()})
    out["loadavg_1m"] = round(os.getloadavg()[0], 1)
    return out


def _median_run(runs: list[dict]) -> dict:
    """The run with the median tokens/s (its other numbers with it)."""
    return sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--requests", type=int, default=48, help="requests per workload")
    ap.add_argument("--rate", type=float, default=200.0,
                    help="mean arrivals per second (Poisson; the default offers several times what the server decodes: a throughput test)")
    ap.add_argument("--max-in-flight", type=int, default=64, help="open requests at most (the load's bound)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workloads", default="mixed,equal,longtail")
    ap.add_argument("--steps-per-sync", type=int, default=32, help="the server's longest block of generate steps per device call")
    ap.add_argument("--repeats", type=int, default=3, help="server / static runs per workload, alternated")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(ROOT))
    from pldr_jax.decode import Sampler
    from pldr_jax.g_sources import load_model_spec
    from pldr_jax.serve import Engine

    cfg, params, _ = load_model_spec(f"preset:{args.preset}")     # the server's weights (same preset seed)
    sampler = Sampler(cfg, params)
    engine = Engine(cfg, params, slots=args.slots, max_len=cfg.max_seq_len, eos_id=None,
                    steps_per_sync=args.steps_per_sync)
    engine.warmup()
    proc, url, log = start_server(args.preset, args.slots, cfg.max_seq_len, args.steps_per_sync)
    out = {"preset": args.preset, "slots": args.slots, "steps_per_sync": args.steps_per_sync, "requests": args.requests, "rate": args.rate,
           "max_in_flight": args.max_in_flight, "seed": args.seed, "repeats": args.repeats, "server_log": log,
           "workloads": {}}
    try:
        for w in args.workloads.split(","):
            reqs = draw(w, args.requests, cfg.vocab_size, args.rate, args.seed, cfg.max_seq_len)
            asyncio.run(run_load(url, reqs[:args.slots], args.max_in_flight))   # warm: connections
            run_static(sampler, reqs, args.slots, warm=True)                     # compile the batch shapes
            run_engine(engine, reqs[:args.slots])
            servers, statics, engines, arriving = [], [], [], []
            for _ in range(args.repeats):       # alternated, so a drift of the machine's speed hits all
                servers.append(run_server(proc, url, reqs, args.max_in_flight))
                statics.append(run_static(sampler, reqs, args.slots))
                engines.append(run_engine(engine, reqs))
                arriving.append(run_engine(engine, reqs, arrivals=True))
            paired = lambda runs: [round(a["tokens_per_s"] / b["tokens_per_s"], 3) for a, b in zip(runs, statics)]
            ratios, e_ratios, a_ratios = paired(servers), paired(engines), paired(arriving)
            out["workloads"][w] = {"server": _median_run(servers), "static": _median_run(statics),
                                   "engine_in_process": _median_run(engines),
                                   "engine_arrivals": _median_run(arriving),
                                   "ratio": round(float(np.median(ratios)), 3), "paired_ratios": ratios,
                                   "engine_ratio": round(float(np.median(e_ratios)), 3),
                                   "engine_paired_ratios": e_ratios,
                                   "engine_arrivals_ratio": round(float(np.median(a_ratios)), 3),
                                   "engine_arrivals_paired_ratios": a_ratios}
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    need = {"mixed": 1.5, "equal": 0.85}
    out["acceptance"] = {w: {"ratio": r["ratio"], "needed": need[w], "ok": r["ratio"] >= need[w]}
                         for w, r in out["workloads"].items() if w in need}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{args.preset}, {args.slots} slots, {args.requests} requests per workload, rate {args.rate}/s")
        for w, r in out["workloads"].items():
            s, st = r["server"], r["static"]
            print(f"{w:6s} server {s['tokens_per_s']:8.1f} tok/s  TTFT p50/p99 {s['ttft_p50_ms']}/{s['ttft_p99_ms']} ms  "
                  f"TPOT p50/p99 {s['tpot_p50_ms']}/{s['tpot_p99_ms']} ms | static {st['tokens_per_s']:8.1f} tok/s | "
                  f"ratio {r['ratio']:.2f} | engine in-process {r['engine_in_process']['tokens_per_s']:8.1f} tok/s "
                  f"(ratio {r['engine_ratio']:.2f}), with arrivals {r['engine_arrivals']['tokens_per_s']:8.1f} tok/s "
                  f"(ratio {r['engine_arrivals_ratio']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
