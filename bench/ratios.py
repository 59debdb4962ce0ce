"""Reading a ``python -m bench`` result: its expert runs, and every moed figure
divided by the limit or peer it is judged against (``ratios``). ``bench.__main__``
writes them into the result; ``bench.report`` shows them and can derive them again."""

from __future__ import annotations


def dig(d, *keys):
    """d[k1][k2]... or None where a level is missing or not a map."""
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def expert_runs(m: dict) -> list[dict]:
    """experts_bench's lazy configurations of one model as a flat list, whichever of its layouts it wrote."""
    runs = []
    for name, r in (m.get("configs") or {}).items():
        runs.append(dict(r, name=name, prefetch=r.get("prefetch", "prefetch" in name)))
    for r in m.get("lazy") or []:
        runs.append(dict(r, name=f"{r.get('residency', 0):.0%}{' prefetch' if r.get('prefetch') else ''}"))
    for r in runs:
        r.setdefault("hit_rate", dig(r, "stats", "hit_rate"))
        r.setdefault("exact", r.get("exact_every_round"))
        # checked-N: all resident with the exactness check on (the ceiling of partial residency)
        r["checked"] = r["name"].startswith("checked")
        r["tag"] = f"{'checked_' if r['checked'] else ''}{r.get('residency', 0):.0%}{'_prefetch' if r['prefetch'] else ''}"
    return runs


def _ratio(value, limit, what: str, unit: str = "") -> dict:
    ok = isinstance(value, (int, float)) and isinstance(limit, (int, float)) and limit
    return {"ratio": value / limit if ok else None, "moed": value, "limit": limit, "what": what, "unit": unit}


def ratios(limits: dict, disk: dict, peers: dict, moed: dict) -> dict:
    out = {}
    stock = dig(peers, "stock", "decode_tok_s")
    daemon = moed.get("daemon", {})
    single = daemon.get("single", {})
    out["daemon_vs_stock_decode"] = _ratio(single.get("daemon_decode_tok_s"), stock,
                                           "moed daemon, one client, all resident / stock mlx-lm in process", "tok/s")
    out["daemon_vs_in_process_same_run"] = _ratio(single.get("daemon_decode_tok_s"), single.get("in_process_decode_tok_s"),
                                                  "same, in-process figure taken alternately by daemon_bench", "tok/s")
    if single.get("ratio") is not None:
        out["daemon_vs_in_process_paired"] = {"ratio": single["ratio"], "moed": None, "limit": None, "unit": "",
                                              "what": "median over rounds of daemon / stream_generate run back to back (the issue-3 target, >= 0.97)"}
    out["daemon_ttft_vs_stock"] = _ratio(single.get("daemon_ttft_s"), dig(peers, "stock", "ttft_s"),
                                         "time to first token, daemon / stock (lower is better)", "s")
    server_runs = {r["clients"]: r for r in dig(peers, "server", "runs") or []}
    for r in dig(daemon, "concurrency", "runs") or []:
        n = r["clients"]
        out[f"daemon_vs_mlx_server_{n}_clients"] = _ratio(
            r.get("aggregate_tok_s"), dig(server_runs, n, "aggregate_tok_s"),
            f"aggregate tok/s with {n} clients: moed daemon / mlx_lm server", "tok/s")
    ipc = limits.get("ipc", {})
    out["ping_vs_zmq_floor"] = _ratio(dig(daemon, "ipc", "ping_p50_us"), ipc.get("round_trip_us_p50"),
                                      "daemon ping p50 / bare zmq+msgpack round trip p50 (lower is better)", "us")
    out["token_ipc_vs_stream_floor"] = _ratio(dig(daemon, "ipc", "per_token_overhead_us"), ipc.get("stream_us_per_msg"),
                                              "per-token overhead through the daemon / bare zmq stream cost per message", "us")
    random_best = disk.get("random_best_gb_s")
    sequential = dig(disk, "sequential", "gb_s")
    for r in dig(moed, "daemon_residency", "runs") or []:
        tag = f"{r['residency']:.0%}{'_prefetch' if r['prefetch'] else ''}"
        out[f"daemon_lazy_{tag}_vs_stock"] = _ratio(r.get("decode_tok_s"), stock,
                                                    f"moed daemon, lazy experts at {tag}, one client / stock all resident", "tok/s")
        e = r.get("experts") or {}
        if e.get("bytes_read") and e.get("load_time_s"):
            out[f"daemon_lazy_{tag}_load_vs_random_pread"] = _ratio(
                e["bytes_read"] / e["load_time_s"] / 1e9, random_best,
                "daemon's expert-load bandwidth (bytes read / load time) / best 1-4 MB random pread bandwidth", "GB/s")
        if e.get("disk_bytes_per_token") and r.get("decode_tok_s"):
            out[f"daemon_lazy_{tag}_disk_demand_vs_sequential"] = _ratio(
                e["disk_bytes_per_token"] * r["decode_tok_s"] / 1e9, sequential,
                "expert bytes read per token x tok/s / uncached sequential disk bandwidth (above 1: served from the page cache)", "GB/s")
    for m in dig(moed, "experts", "models") or []:
        for r in expert_runs(m):
            tag = r["tag"]
            out[f"lazy_{tag}_vs_stock"] = _ratio(r.get("decode_tps"), dig(m, "stock", "decode_tps"),
                                                 f"in-process lazy experts at {tag} / stock, same run (experts_bench)", "tok/s")
            out[f"lazy_{tag}_load_vs_random_pread"] = _ratio(r.get("load_gb_s"), random_best,
                                                             "expert-load bandwidth / best 1-4 MB random pread bandwidth", "GB/s")
            out[f"lazy_{tag}_load_vs_expert_pread"] = _ratio(r.get("load_gb_s"), dig(m, "raw_pread", "gb_s"),
                                                             "expert-load bandwidth / raw preads of the same expert extents", "GB/s")
            if r.get("disk_bytes_per_token") and r.get("decode_tps"):
                demand = r["disk_bytes_per_token"] * r["decode_tps"] / 1e9
                out[f"lazy_{tag}_disk_demand_vs_sequential"] = _ratio(
                    demand, sequential, "disk bytes/token x tok/s / sequential read bandwidth (1.0 = disk-bound)", "GB/s")
        raw = dig(m, "raw_pread", "gb_s")
        out["expert_extent_pread_vs_random_pread"] = _ratio(raw, random_best,
                                                            "raw preads of expert extents / 1-4 MB random preads", "GB/s")
    return out
