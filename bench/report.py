"""The markdown table (and, with matplotlib, PNG plots) of a ``python -m bench`` JSON result."""

from __future__ import annotations

from pathlib import Path

from bench.ratios import dig, expert_runs, ratios


def _f(x, digits: int = 1, scale: float = 1.0) -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return "–"
    return f"{x * scale:.{digits}f}"


def rows(result: dict, label: str) -> list[dict]:
    """One row per configuration of one model: 1-client tok/s, TTFT, aggregate tok/s by clients."""
    peers, moed = result["peers"].get(label, {}), result["moed"].get(label, {})
    out = []
    stock = peers.get("stock", {})
    out.append({"name": "mlx-lm in process, all resident", "tok_s": stock.get("decode_tok_s"), "ttft_s": stock.get("ttft_s"),
                "note": stock.get("not_measured") or (stock.get("error") or "")[:80]})
    server = peers.get("server", {})
    runs = {r["clients"]: r for r in server.get("runs", [])}
    out.append({"name": "mlx_lm server (HTTP)", "tok_s": dig(runs, 1, "per_client_decode_tok_s"), "ttft_s": dig(runs, 1, "ttft_s"),
                "clients": {n: r["aggregate_tok_s"] for n, r in runs.items()},
                "note": server.get("not_measured") or server.get("error", "")[:80]})
    daemon = moed.get("daemon", {})
    single = daemon.get("single", {})
    out.append({"name": "moed daemon, all resident", "tok_s": single.get("daemon_decode_tok_s"), "ttft_s": single.get("daemon_ttft_s"),
                "exact": single.get("greedy_tokens_identical"),
                "clients": {r["clients"]: r["aggregate_tok_s"] for r in dig(daemon, "concurrency", "runs") or []},
                "note": daemon.get("not_measured", "")})
    for r in dig(moed, "daemon_residency", "runs") or []:
        out.append({"name": f"moed daemon, {r['residency']:.0%} experts resident{', prefetch' if r['prefetch'] else ''}",
                    "tok_s": r.get("decode_tok_s"), "ttft_s": r.get("ttft_s"),
                    "clients": {c["clients"]: c["aggregate_tok_s"] for c in r.get("concurrency", [])},
                    "disk_per_token": dig(r, "experts", "disk_bytes_per_token"), "hit_rate": dig(r, "experts", "hit_rate"),
                    "fill_bytes": dig(r, "experts", "fill_bytes"), "exact": r.get("exact"), "note": r.get("not_measured", "")})
    if "not_measured" in (moed.get("daemon_residency") or {}):
        out.append({"name": "moed daemon, lazy experts", "note": moed["daemon_residency"]["not_measured"]})
    for m in dig(moed, "experts", "models") or []:
        stock = m.get("stock") or {}
        out.append({"name": "mlx-lm in process (experts_bench's stock, page cache dropped)", "tok_s": stock.get("decode_tps"),
                    "note": (stock.get("error") or "")[:80]})
        for r in expert_runs(m):
            out.append({"name": f"moed in process, {r.get('residency', 0):.0%} resident{', prefetch' if r['prefetch'] else ''}"
                                f"{', check on' if r['checked'] else ''}",
                        "tok_s": r.get("decode_tps"), "disk_per_token": r.get("disk_bytes_per_token"),
                        "hit_rate": r.get("hit_rate"), "load_gb_s": r.get("load_gb_s"), "fill_bytes": r.get("fill_bytes"),
                        "exact": r.get("exact"), "note": (r.get("error") or "")[:80]})
    if "not_measured" in (moed.get("experts") or {}):
        out.append({"name": "moed in process, lazy experts", "note": moed["experts"]["not_measured"]})
    return out


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"### `{result['command']}` ({result['started']})", "",
             f"Machine: {m.get('platform')}, {m.get('cpus')} CPUs, {_f(m.get('memory_bytes'), 0, 1e-9)} GB RAM, "
             f"mlx {m.get('mlx')} on {m.get('device')}, mlx-lm {m.get('mlx_lm')}"
             + (f", {dig(m, 'accelerator', 'device_name') or ''}" if m.get("accelerator") else "")
             + f". Greedy, {result['tokens']} tokens, median of {result['repeats']}.", ""]
    lim = result.get("limits", {})
    ipc, mem = lim.get("ipc", {}), lim.get("memcpy", {})
    lines += ["| physical limit | value |", "|---|---|",
              f"| memory copy (one thread) | {_f(mem.get('host_copy_gb_s'))} GB/s |",
              f"| host -> MLX array | {_f(mem.get('host_to_mlx_gb_s'))} GB/s |",
              f"| zmq+msgpack round trip p50 / p99 | {_f(ipc.get('round_trip_us_p50'))} / {_f(ipc.get('round_trip_us_p99'))} us |",
              f"| zmq+msgpack stream | {_f(ipc.get('stream_us_per_msg'), 2)} us/msg |"]
    for label, disk in (lim.get("disk") or {}).items():
        rnd = {(r["size"] >> 20, r["threads"]): r.get("gb_s") for r in disk.get("random", [])}
        lines.append(f"| disk of `{label}`: sequential, uncached | {_f(dig(disk, 'sequential', 'gb_s'), 2)} GB/s |")
        lines.append(f"| disk of `{label}`: random 1/2/4 MB preads, 1 thread | "
                     f"{' / '.join(_f(rnd.get((s, 1)), 2) for s in (1, 2, 4))} GB/s |")
        lines.append(f"| disk of `{label}`: random 1/2/4 MB preads, 4 threads | "
                     f"{' / '.join(_f(rnd.get((s, 4)), 2) for s in (1, 2, 4))} GB/s |")
    clients = result["concurrency"]
    for label in result["peers"]:
        info = dig(result, "models", label, "info") or {}
        routing = dig(result, "models", label, "routing") or {}
        lines += ["", f"#### {label}: {_f(info.get('bytes'), 2, 1e-9)} GB, {info.get('layers')} layers x "
                      f"{info.get('experts_per_layer')} experts, top-{info.get('top_k')}"]
        if routing and "mean_token_reuse" in routing:
            lines.append(f"Routing: normalized entropy {_f(routing.get('mean_normalized_entropy'), 3)}, "
                         f"top-25% share {_f(routing.get('mean_top25_share'), 2)}, token-to-token reuse "
                         f"{_f(routing.get('mean_token_reuse'), 2)}.")
        lines += ["", "| configuration | 1 client tok/s | TTFT ms | " + " | ".join(f"{n} clients tok/s" for n in clients)
                  + " | disk MB/token | hit rate | note |",
                  "|---|---|---|" + "---|" * len(clients) + "---|---|---|"]
        for r in rows(result, label):
            cs = r.get("clients") or {}
            note = r.get("note") or ""
            if r.get("exact") is False:
                note = ("OUTPUT DIFFERS FROM STOCK " + note).strip()
            if r.get("fill_bytes"):  # the disk column counts decode steps' reads only
                note = (f"initial fill {r['fill_bytes'] / 1e6:.0f} MB " + note).strip()
            if r.get("load_gb_s"):
                note = (f"loads {r['load_gb_s']:.2f} GB/s " + note).strip()
            lines.append(f"| {r['name']} | {_f(r.get('tok_s'))} | {_f(r.get('ttft_s'), 1, 1e3)} | "
                         + " | ".join(_f(cs.get(n)) for n in clients)
                         + f" | {_f(r.get('disk_per_token'), 2, 1e-6)} | {_f(r.get('hit_rate'), 2)} | {note.replace('|', '/')} |")
        rat = result["ratios"].get(label, {})
        if rat:
            lines += ["", "| ratio | value | moed | limit or peer | what |", "|---|---|---|---|---|"]
            for name, r in rat.items():
                lines.append(f"| {name} | {_f(r['ratio'], 2)} | {_f(r['moed'], 2)} | {_f(r['limit'], 2)} | {r['what']} ({r['unit']}) |")
    return "\n".join(lines) + "\n"


def plots(result: dict, stem: Path) -> list[Path]:
    """Throughput by configuration and aggregate tok/s by clients, one PNG each per model; [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for i, label in enumerate(result["peers"]):
        data = [r for r in rows(result, label) if isinstance(r.get("tok_s"), (int, float))]
        if data:
            fig, ax = plt.subplots(figsize=(8, 0.4 * len(data) + 1.5))
            ax.barh([r["name"] for r in data][::-1], [r["tok_s"] for r in data][::-1])
            ax.set_xlabel("decode tok/s, one client")
            ax.set_title(label)
            fig.tight_layout()
            path = Path(f"{stem}-{i}-throughput.png")
            fig.savefig(path, dpi=100)
            plt.close(fig)
            written.append(path)
        curves = [r for r in rows(result, label) if r.get("clients")]
        if curves:
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for r in curves:
                ns = sorted(r["clients"])
                ax.plot(ns, [r["clients"][n] for n in ns], marker="o", label=r["name"])
            ax.set_xlabel("concurrent clients")
            ax.set_ylabel("aggregate tok/s")
            ax.set_title(label)
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = Path(f"{stem}-{i}-clients.png")
            fig.savefig(path, dpi=100)
            plt.close(fig)
            written.append(path)
    return written


if __name__ == "__main__":
    import json
    import sys

    args = [a for a in sys.argv[1:] if a != "--recompute-ratios"]
    if len(args) != 1:
        sys.exit("usage: python -m bench.report [--recompute-ratios] RESULT.json\n"
                 "  rewrites RESULT.md and the plots next to it; --recompute-ratios derives 'ratios' again from the\n"
                 "  measured sections with this version's formulas (recorded under 'ratios_recomputed')")
    path = Path(args[0])
    data = json.loads(path.read_text())
    if "--recompute-ratios" in sys.argv:
        import time

        for label in data["peers"]:
            data["ratios"][label] = ratios(data["limits"], data["limits"]["disk"].get(label, {}),
                                           data["peers"][label], data["moed"].get(label, {}))
        data["ratios_recomputed"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        path.write_text(json.dumps(data, indent=1, default=str))
    text = markdown(data)
    path.with_suffix(".md").write_text(text)
    print(text)
    plots(data, path.with_suffix(""))
