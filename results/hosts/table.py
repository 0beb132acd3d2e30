"""results/hosts/README.md from the records of run.sh: each cache's perplexity on every host, and its spread."""
from __future__ import annotations

import sys
from pathlib import Path

from kvcompress.records import read_records, record_settings


def host_key(r: dict) -> str:
    h = r.get("host") or {}
    return f"{h.get('isa', '?')}, {h.get('threads', '?')} thr"


def main(path: str) -> None:
    ok = [r for r in read_records(Path(path)) if r["status"] == "ok"]
    hosts = list(dict.fromkeys(host_key(r) for r in ok))
    table: dict[str, dict[str, float]] = {}
    for r in ok:  # the last record of a (cache, host) wins
        table.setdefault(f"{r['cache']} {record_settings(r)}".strip(), {})[host_key(r)] = r["metrics"]["ppl"]
    cpus = sorted({(r.get("host") or {}).get("cpu", "?") for r in ok})
    print("# The same runs on two simulated hosts\n")
    print(f"SmolLM2-135M, fp32, WikiText-2 (4 windows of 256 tokens, chunk 16) on {', '.join(cpus)}, under two vector "
          "ISAs and thread counts (AVX2 with 2 threads; the scalar/SSE4.2 paths, `ATEN_CPU_CAPABILITY=default` and "
          "`MKL_ENABLE_INSTRUCTIONS=SSE4_2`, with 1). Produced by `bash results/hosts/run.sh`.\n")
    print("| cache | " + " | ".join(hosts) + " | spread % |")
    print("|---|" + "---:|" * (len(hosts) + 1))
    for name, by_host in table.items():
        values = list(by_host.values())
        spread = 100 * (max(values) - min(values)) / min(values)
        print(f"| {name} | " + " | ".join(f"{by_host[h]:.6f}" if h in by_host else "—" for h in hosts)
              + f" | {spread:.2g} |")
    print("\nspread = (max - min) / min over the hosts.")


if __name__ == "__main__":
    main(sys.argv[1])
