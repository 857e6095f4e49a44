"""The table: per workload and target, median TPS and mean latency over the rounds."""

from __future__ import annotations

import statistics

from bench.pgbench import LATENCY_WORKLOAD, TARGETS, Run


def summarize(runs: list[Run]) -> dict[tuple[str, str], dict]:
    """Per (workload, target): median TPS and mean latency over the rounds that succeeded."""
    cells: dict[tuple[str, str], dict] = {}
    for key in dict.fromkeys((r.workload, r.target) for r in runs):
        mine = [r for r in runs if (r.workload, r.target) == key]
        ok = [r for r in mine if r.ok]
        cell = {"runs": len(mine), "failed": len(mine) - len(ok)}
        if ok:
            tps, lat = [r.tps for r in ok], [r.latency_ms for r in ok]
            cell |= {"tps": statistics.median(tps), "tps_min": min(tps), "tps_max": max(tps),
                     "lat": statistics.mean(lat), "lat_min": min(lat), "lat_max": max(lat)}
        cells[key] = cell
    return cells


def _ratio(a: dict | None, b: dict | None) -> str:
    if not (a and b and "tps" in a and "tps" in b):
        return "-"
    return f"{a['tps'] / b['tps']:.2f}"


def print_table(runs: list[Run]) -> None:
    cells = summarize(runs)
    header = ["workload", "target", "TPS median", "(min-max)", "lat ms", "(min-max)",
              "/direct", "/pgbouncer", "/router", "+µs/query", "status"]
    rows = []
    for workload in dict.fromkeys(r.workload for r in runs):
        get = {t: cells.get((workload, t)) for t in TARGETS}
        first = True
        for target in TARGETS:
            c = get[target]
            if c is None:
                continue
            row = [workload if first else "", target]
            first = False
            if "tps" in c:
                row += [f"{c['tps']:,.0f}", f"{c['tps_min']:,.0f}-{c['tps_max']:,.0f}",
                        f"{c['lat']:.3f}", f"{c['lat_min']:.3f}-{c['lat_max']:.3f}"]
            else:
                row += ["FAILED", "", "", ""]
            row.append(_ratio(c, get["direct"]) if target != "direct" else "")
            row.append(_ratio(c, get["pgbouncer"]) if target.startswith("router") or target == "floor" else "")
            row.append(_ratio(c, get["router"]) if target == "router-split" else "")
            added = _added_us(c, get["direct"]) if workload == LATENCY_WORKLOAD else None
            added = None if target == "direct" else added
            row.append("" if added is None else f"{added:+.0f}")
            row.append(f"FAILED {c['failed']}/{c['runs']}" if c["failed"] else "ok")
            rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    right = {2, 3, 4, 5, 6, 7, 8, 9}  # numbers align right

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if i in right else v.ljust(w)
                         for i, (v, w) in enumerate(zip(values, widths, strict=True))).rstrip()

    print(line(header))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))

    latency = {t: cells.get((LATENCY_WORKLOAD, t)) for t in TARGETS}
    pgb, rtr = (_added_us(latency[t], latency["direct"]) for t in ("pgbouncer", "router"))
    if pgb is not None and rtr is not None:
        ratio = f"{rtr / pgb:.2f}" if pgb > 0 else "n/a (PgBouncer added nothing)"
        print(f"\n{LATENCY_WORKLOAD}: PgBouncer adds {pgb:.0f} µs/query, the router "
              f"{rtr:.0f} µs/query; router_added / pgbouncer_added = {ratio}")
    failures = [r for r in runs if not r.ok]
    if failures:
        print("\nfailed runs (first error of each workload/target):")
        for key in dict.fromkeys((r.workload, r.target) for r in failures):
            run = next(r for r in failures if (r.workload, r.target) == key)
            print(f"  {key[0]} / {key[1]}: exit {run.returncode}")
            for err in run.errors or []:
                print(f"      {err}")


def _added_us(cell: dict | None, direct: dict | None) -> float | None:
    if not (cell and direct and "lat" in cell and "lat" in direct):
        return None
    return (cell["lat"] - direct["lat"]) * 1000.0
