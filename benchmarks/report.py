"""From a run's results: the targets and whether each is met, the Markdown summary, the table in
benchmarks/README.md, and the charts."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness import MIB, REPO_ROOT

README = REPO_ROOT / "benchmarks" / "README.md"
README_START = "<!-- run.py: latest full run (start) -->"
README_END = "<!-- run.py: latest full run (end) -->"
# Memory growth over the load/evict cycles that still counts as noise: one model's file.
GROWTH_NOISE_MODELS = 1.0
RSS_HEADROOM_MIB = 150


@dataclass(frozen=True, slots=True)
class Check:
    section: str
    measure: str
    target: str
    result: str
    met: bool | None  # None: not measured

    def to_json(self) -> dict[str, Any]:
        return {
            "section": self.section,
            "measure": self.measure,
            "target": self.target,
            "result": self.result,
            "met": self.met,
        }


def _get(data: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _throughput_checks(
    tp: dict[str, Any], figures: dict[str, Any], ratios: dict[str, Any], config: str
) -> list[Check]:
    """The section 1 targets for one multiserve configuration (default settings, or dynamic
    batching on)."""
    checks: list[Check] = []
    add = checks.append
    setting = "" if config == "multiserve" else ", max_batch_size = 16"
    ms_json = figures[f"{config}_json"]
    for body in ("json", "npy"):
        r = ratios.get(f"{config}_{body}_over_floor_{body}")
        add(
            Check(
                "1 throughput",
                f"req/s, {'JSON' if body == 'json' else '.npy'} body, vs the HTTP floor{setting}",
                ">= 0.80x",
                f"{figures[f'{config}_{body}']['requests_per_s']:.0f} vs "
                f"{figures[f'floor_{body}']['requests_per_s']:.0f} req/s = "
                f"{_fmt(r, '.2f', 'x')}",
                None if r is None else r >= 0.8,
            )
        )
    for peer, label, need in (("mlserver", "MLServer", 2.0), ("litserve", "LitServe", 1.5)):
        peer_figures = figures.get(f"{peer}_json")
        if peer_figures is None:
            why = _get(tp, "peers", peer, "error") or "not run"
            add(
                Check(
                    "1 throughput",
                    f"req/s vs {label}{setting}",
                    f">= {need:.1f}x",
                    f"not measured: {why[:120]}",
                    None,
                )
            )
            continue
        r = ratios[f"{config}_json_over_{peer}"]
        add(
            Check(
                "1 throughput",
                f"req/s vs {label} (JSON){setting}",
                f">= {need:.1f}x",
                f"{ms_json['requests_per_s']:.0f} vs {peer_figures['requests_per_s']:.0f} "
                f"req/s = {_fmt(r, '.2f', 'x')}",
                None if r is None else r >= need,
            )
        )
        add(
            Check(
                "1 throughput",
                f"p99 vs {label} (JSON){setting}",
                "no worse",
                f"{ms_json['p99_ms']:.2f} vs {peer_figures['p99_ms']:.2f} ms",
                ms_json["p99_ms"] <= peer_figures["p99_ms"],
            )
        )
    return checks


def _fmt(value: Any, spec: str, suffix: str = "") -> str:
    if value is None:
        return "not measured"
    return f"{value:{spec}}{suffix}"


def targets(results: dict[str, Any]) -> list[Check]:
    sections = results["sections"]
    checks: list[Check] = []
    add = checks.append

    tp = sections.get("throughput")
    if isinstance(tp, dict) and "figures" in tp:
        figures, ratios = tp["figures"], tp["ratios"]
        for config in ("multiserve", "multiserve_batched"):
            if f"{config}_json" in figures:
                checks += _throughput_checks(tp, figures, ratios, config)

    hs = sections.get("hotswap")
    if isinstance(hs, dict):
        for mode, run in hs.items():
            if not isinstance(run, dict) or "settings" not in run:
                continue
            label = (
                f"settle window {run['settings']['settle_window_s']:g} s"
                if mode == "settle"
                else "READY marker"
            )
            failed = (
                run["failed_requests"] + run["poller"]["failed"] + run["poller"]["wrong_answers"]
            )
            add(
                Check(
                    "2 hot swap",
                    f"failed requests, {run['settings']['versions']} versions ({label})",
                    "0",
                    f"{run['failed_requests']} of {run['requests']} (wrk), "
                    f"{run['poller']['failed']} failed + {run['poller']['wrong_answers']} wrong "
                    f"of {run['poller']['requests']} (poller)",
                    failed == 0,
                )
            )
            r = run["p99_ratio"]
            add(
                Check(
                    "2 hot swap",
                    f"p99 in swap windows vs steady ({label})",
                    "<= 2x",
                    f"{_fmt(run['p99_in_windows_ms'], '.1f')} vs "
                    f"{_fmt(run['p99_steady_ms'], '.1f')} ms = {_fmt(r, '.2f', 'x')}",
                    None if r is None else r <= 2.0,
                )
            )
            first = run["first_answer_s"]
            missing = first["versions_never_seen"]
            worst = first["poller_max"]
            add(
                Check(
                    "2 hot swap",
                    f"file complete to first answer from it ({label})",
                    "< 1 s",
                    f"median {_fmt(first['poller_median'], '.3f', ' s')}, max "
                    f"{_fmt(worst, '.3f', ' s')}" + (f"; never seen: {missing}" if missing else ""),
                    None if worst is None else (worst < 1.0 and not missing),
                )
            )

    cold = sections.get("coldload")
    if isinstance(cold, dict) and "ratio" in cold:
        r = cold["ratio"]
        add(
            Check(
                "3 cold load",
                f"first request to an unloaded {cold['model_bytes'] / 1e6:.0f} MB model vs "
                "session + run in-process",
                "<= 1.2x",
                f"{cold['multiserve_first_request_median_s'] * 1e3:.0f} vs "
                f"{cold['inprocess_session_and_run_median_s'] * 1e3:.0f} ms = "
                f"{_fmt(r, '.2f', 'x')}",
                None if r is None else r <= 1.2,
            )
        )
        conc = cold["concurrent"]
        add(
            Check(
                "3 cold load",
                f"{conc['requests']} concurrent cold requests",
                "exactly 1 load, all 200",
                f"{conc['loads']} load(s), statuses {conc['statuses']}",
                conc["loads"] == 1 and conc["statuses"] == {"200": conc["requests"]},
            )
        )

    mem = sections.get("memory")
    if isinstance(mem, dict) and "peak_rss_bytes" in mem:
        budget_mib = mem["budget_bytes"] / MIB
        peak_mib = mem["peak_rss_bytes"] / MIB
        settings = mem["settings"]
        add(
            Check(
                "4 memory",
                f"peak RSS, {settings['models']} models through a cache of "
                f"{settings['max_models']} ({budget_mib:.0f} MiB budget)",
                f"<= budget + {RSS_HEADROOM_MIB} MiB",
                f"{peak_mib:.0f} MiB = budget {mem['peak_over_budget_mib']:+.0f} MiB "
                f"(idle {mem['idle_rss_bytes'] / MIB:.0f} MiB)",
                peak_mib <= budget_mib + RSS_HEADROOM_MIB,
            )
        )
        failed = sum(n for status, n in mem["statuses"].items() if status != "200")
        add(
            Check(
                "4 memory",
                f"failed requests while {settings['models']} models go through the cache "
                f"({settings['client_threads']} clients)",
                "0 (not a target of the issue; must hold)",
                f"{failed} of {sum(mem['statuses'].values())}, statuses {mem['statuses']}",
                failed == 0,
            )
        )
        cycles = mem["cycles"]
        noise = GROWTH_NOISE_MODELS * settings["model_bytes"] / MIB
        cycle_failures = sum(cycles["failures"].values())
        add(
            Check(
                "4 memory",
                f"failed admin calls in {cycles['cycles']} load/evict cycles; models refused "
                "before them",
                "0 (must hold)",
                f"{cycle_failures} failed {cycles['failures'] or ''}; refused: "
                f"{', '.join(cycles['refused_before_cycles']) or 'none'}",
                cycle_failures == 0 and not cycles["refused_before_cycles"],
            )
        )
        trend = cycles.get("trend_growth_mib", cycles["growth_after_first_tenth_mib"])
        add(
            Check(
                "4 memory",
                f"RSS growth over {cycles['cycles']} load/evict cycles (trend after the first "
                "tenth)",
                f"no growth beyond noise (<= {noise:.1f} MiB, one model's file)",
                f"{trend:+.1f} MiB by the least-squares trend "
                f"({cycles.get('slope_kib_per_cycle', float('nan')):+.1f} KiB/cycle); readings "
                f"{cycles['rss_after_first_tenth_mib']:.0f} -> {cycles['rss_end_mib']:.0f} MiB, "
                f"moving in a {cycles.get('rss_range_after_first_tenth_mib', float('nan')):.1f} "
                "MiB band",
                trend <= noise,
            )
        )

    sc = sections.get("scaling")
    if isinstance(sc, dict) and "figures" in sc:
        parts = [
            f"{f['model_bytes'] / 1e6:.0f} MB: {f['requests_per_s']:.0f} req/s "
            f"({_fmt(f['ratio_to_inprocess'], '.2f', 'x')} in-process)"
            for f in sc["figures"].values()
        ]
        add(Check("5 scaling", "req/s by model size", "(reported)", "; ".join(parts), None))

    pr = sections.get("protocols")
    if isinstance(pr, dict) and "figures" in pr:
        for batch in (1, 64):
            grpc_raw = pr["figures"][f"grpc_raw_b{batch}"]
            http_json = pr["figures"][f"http_json_b{batch}"]
            add(
                Check(
                    "6 protocols",
                    f"gRPC raw vs HTTP JSON, batch {batch}",
                    "(reported)",
                    f"{grpc_raw['requests_per_s']:.0f} vs {http_json['requests_per_s']:.0f} "
                    f"req/s, p99 {grpc_raw['p99_ms']:.2f} vs {http_json['p99_ms']:.2f} ms, "
                    f"failed {grpc_raw['failed']}",
                    None,
                )
            )

    for name, section in sections.items():
        if isinstance(section, dict) and "error" in section:
            add(Check(name, "section failed", "-", section["error"][:200], False))
    return checks


def _mark(met: bool | None) -> str:
    return {True: "met", False: "**not met**", None: "-"}[met]


def targets_table(checks: list[Check]) -> str:
    lines = ["| section | measure | target | result | met? |", "|---|---|---|---|---|"]
    for c in checks:
        result = c.result.replace("|", "/")
        lines.append(f"| {c.section} | {c.measure} | {c.target} | {result} | {_mark(c.met)} |")
    return "\n".join(lines)


def machine_line(results: dict[str, Any]) -> str:
    m = results["machine"]
    v = results["versions"]
    return (
        f"{m['cpu_model']}, {m['cpu_count']} CPUs, {m['memory_gib']} GiB, {m['platform']}; "
        f"Python {m['python']}; load average {m['load_average'][0]:.2f} at the start, "
        f"{results['machine_at_end']['load_average'][0]:.2f} at the end; multiserve "
        f"{results['revision']}, onnxruntime {v.get('onnxruntime')}, uvicorn {v.get('uvicorn')}, "
        f"starlette {v.get('starlette')}; {results['wrk_version']}"
    )


def _throughput_table(tp: dict[str, Any]) -> list[str]:
    lines = [
        "| server | req/s (median) | p50 ms | p99 ms | failed | req/s of each run |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for figure in tp["figures"].values():
        each = ", ".join(f"{r['requests_per_s']:.0f}" for r in figure["runs"])
        lines.append(
            f"| {figure['label']} | {figure['requests_per_s']:.0f} | {figure['p50_ms']:.2f} | "
            f"{figure['p99_ms']:.2f} | {figure['failed']} | {each} |"
        )
    for name, peer in tp["peers"].items():
        if "error" in peer:
            lines.append(f"\n{name} was left out: {peer['error'][:300]}")
    return lines


def _protocols_table(pr: dict[str, Any]) -> list[str]:
    lines = [
        "| target | req/s (median) | p50 ms | p99 ms | failed | req/s of each run |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for figure in pr["figures"].values():
        each = ", ".join(f"{r['requests_per_s']:.0f}" for r in figure["runs"])
        lines.append(
            f"| {figure['label']} | {figure['requests_per_s']:.0f} | {figure['p50_ms']:.2f} | "
            f"{figure['p99_ms']:.2f} | {figure['failed']} | {each} |"
        )
    lines.append("")
    lines += [f"- {name}: {_fmt(value, '.2f')}" for name, value in pr["ratios"].items()]
    return lines


def _revisions(results: dict[str, Any]) -> str:
    seen = {
        name: section.get("revision")
        for name, section in results["sections"].items()
        if isinstance(section, dict)
    }
    distinct = {r for r in seen.values() if r}
    if len(distinct) <= 1:
        return ""
    return (
        " Sections ran on different revisions (a commit landed during the run): "
        + ", ".join(f"{name} {revision}" for name, revision in seen.items())
        + "."
    )


def summary_markdown(results: dict[str, Any], checks: list[Check], charts: list[str]) -> str:
    sections = results["sections"]
    out = [
        f"# Benchmark summary ({results['plan']['name']} run, {results['timestamp']})",
        "",
        f"Command: `{results['command']}`, {results['seconds']:.0f} s.",
        "",
        f"Machine: {machine_line(results)}.{_revisions(results)}",
        "",
        "## Targets",
        "",
        targets_table(checks),
        "",
    ]
    tp = sections.get("throughput")
    if isinstance(tp, dict) and "figures" in tp:
        s = tp["settings"]
        out += [
            "## 1. Small-model throughput and latency",
            "",
            f"Batch 1, `{s['wrk']}`, {s['rounds']} timed runs per server (medians), taken in "
            f"turns; idle servers paused. Requests: JSON {s['json_request_bytes']} B, .npy "
            f"{s['npy_request_bytes']} B; answers: JSON {s['json_answer_bytes']} B, .npy "
            f"{s['npy_answer_bytes']} B.",
            "",
            *_throughput_table(tp),
            "",
        ]
        peer_versions = [
            f"{name} {p['versions'].get(name)} (settings {p['settings']})"
            for name, p in tp["peers"].items()
            if "versions" in p
        ]
        if peer_versions:
            out += ["Peers: " + "; ".join(peer_versions) + ".", ""]
    hs = sections.get("hotswap")
    if isinstance(hs, dict):
        out += [
            "## 2. Hot swap under load",
            "",
            "| mode | versions | req/s | failed (wrk / poller) | p99 steady ms | p99 in windows "
            "ms | first answer median / max s |",
            "|---|---:|---:|---|---:|---:|---|",
        ]
        for mode, run in hs.items():
            if not isinstance(run, dict) or "settings" not in run:
                continue
            first = run["first_answer_s"]
            out.append(
                f"| {mode} (settle {run['settings']['settle_window_s']:g} s"
                f"{', READY marker' if run['settings']['ready_marker'] else ''}) | "
                f"{run['settings']['versions']} | {run['requests_per_s']:.0f} | "
                f"{run['failed_requests']} / {run['poller']['failed']} | "
                f"{_fmt(run['p99_steady_ms'], '.1f')} | {_fmt(run['p99_in_windows_ms'], '.1f')} | "
                f"{_fmt(first['poller_median'], '.3f')} / {_fmt(first['poller_max'], '.3f')} |"
            )
        out.append("")
    cold = sections.get("coldload")
    if isinstance(cold, dict) and "ratio" in cold:
        conc = cold["concurrent"]
        served = ", ".join(f"{x * 1e3:.0f}" for x in cold["multiserve_first_request_s"])
        inprocess = ", ".join(f"{r['total_s'] * 1e3:.0f}" for r in cold["inprocess"])
        out += [
            "## 3. Cold load",
            "",
            f"Model: {cold['settings']['model']}. multiserve first request (fresh server each "
            f"time): {served} "
            f"ms; in-process session + one run (fresh process each time): "
            f"{inprocess} ms (session "
            f"alone, median {cold['inprocess_session_median_s'] * 1e3:.0f} ms). Reload after "
            f"an evict in a warm server: median {conc['reload_after_evict_median_s'] * 1e3:.0f}"
            f" ms. {conc['requests']} concurrent first requests: {conc['loads']} load, slowest "
            f"answer {_fmt(conc['latency_max_s'], '.3f', ' s')}.",
            "",
        ]
    mem = sections.get("memory")
    if isinstance(mem, dict) and "peak_rss_bytes" in mem:
        c = mem["cycles"]
        out += [
            "## 4. Memory",
            "",
            f"Idle RSS {mem['idle_rss_bytes'] / MIB:.0f} MiB; peak (VmHWM) "
            f"{mem['peak_rss_bytes'] / MIB:.0f} MiB against a {mem['budget_bytes'] / MIB:.0f} "
            f"MiB budget; cache after the passes: {mem['cache_after_passes']['models']} models, "
            f"stats {mem['cache_after_passes']['stats']}. {c['cycles']} load/evict cycles in "
            f"{c['seconds']:.0f} s: RSS (MiB) at cycle "
            + ", ".join(f"{cycle}: {mib:.0f}" for cycle, mib in c["rss_mib"])
            + ".",
            "",
        ]
    sc = sections.get("scaling")
    if isinstance(sc, dict) and "figures" in sc:
        out += [
            "## 5. Throughput by model size",
            "",
            "| model | bytes | req/s | p50 ms | p99 ms | in-process runs/s, 16 threads (1 "
            "thread) | req/s over in-process |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, f in sc["figures"].items():
            out.append(
                f"| {name} | {f['model_bytes']:,} | {f['requests_per_s']:.0f} | "
                f"{f['p50_ms']:.2f} | {f['p99_ms']:.2f} | {f['inprocess_runs_per_s']:.0f} "
                f"({f['inprocess_one_thread_runs_per_s']:.0f}) | "
                f"{_fmt(f['ratio_to_inprocess'], '.2f')} |"
            )
        out.append("")
    pr = sections.get("protocols")
    if isinstance(pr, dict) and "figures" in pr:
        out += [
            "## 6. gRPC against HTTP (Open Inference Protocol), batch 1 and 64",
            "",
            f"wrk `{pr['settings']['wrk']}`; h2load `{pr['settings']['h2load']}`.",
            "",
            *_protocols_table(pr),
            "",
        ]
    if charts:
        out += ["## Charts", ""] + [f"![{Path(c).stem}]({Path(c).name})" for c in charts] + [""]
    out += ["Every figure, setting and version is in `run.json` beside this file.", ""]
    return "\n".join(out)


def update_readme(results: dict[str, Any], checks: list[Check]) -> bool:
    """Replace the table between the README's markers; False if the markers are missing."""
    if not README.is_file():
        return False
    text = README.read_text()
    if README_START not in text or README_END not in text:
        return False
    block = "\n".join(
        [
            README_START,
            f"Full run of {results['timestamp']} (`{results['command']}`, "
            f"{results['seconds']:.0f} s). Machine: {machine_line(results)}.{_revisions(results)}",
            "",
            targets_table(checks),
            README_END,
        ]
    )
    pattern = re.compile(re.escape(README_START) + ".*?" + re.escape(README_END), re.DOTALL)
    README.write_text(pattern.sub(lambda _: block, text, count=1))
    return True


def charts(results: dict[str, Any], out_dir: Path) -> tuple[list[Path], str | None]:
    """The PNG charts written; and why there are none, if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed (pip install matplotlib): no charts"
    written = []
    for name, draw in (("hotswap.png", _hotswap_chart), ("throughput.png", _throughput_chart)):
        path = out_dir / name
        if draw(results, path, plt):
            written.append(path)
    return written, None


def _hotswap_chart(results: dict[str, Any], path: Path, plt: Any) -> bool:
    hs = results["sections"].get("hotswap")
    runs = [(m, r) for m, r in (hs or {}).items() if isinstance(r, dict) and "timeline" in r]
    if not runs:
        return False
    fig, axes = plt.subplots(len(runs), 1, figsize=(11, 3.6 * len(runs)), squeeze=False)
    for ax, (_, run) in zip(axes[:, 0], runs, strict=True):
        t = run["timeline"]
        for start, end in run["windows"]:
            ax.axvspan(start, end, color="#f2c14e", alpha=0.25, lw=0)
        for complete in run["completions"]:
            ax.axvline(complete, color="#d1495b", lw=0.5, alpha=0.6)
        ax.plot(t["t_s"], t["max_ms"], color="#bbbbbb", lw=0.6, label="max")
        ax.plot(t["t_s"], t["p99_ms"], color="#00798c", lw=1.0, label="p99")
        ax.plot(t["t_s"], t["p50_ms"], color="#30638e", lw=1.0, label="p50")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib_ticker().ScalarFormatter())
        ax.set_ylabel("latency, ms (100 ms buckets)")
        s = run["settings"]
        ax.set_title(
            f"{s['versions']} versions copied in under load, settle window "
            f"{s['settle_window_s']:g} s{', READY marker' if s['ready_marker'] else ''}: "
            f"failed {run['failed_requests']}, p99 steady {run['p99_steady_ms']} ms, in "
            f"windows {run['p99_in_windows_ms']} ms",
            fontsize=9,
        )
        ax.grid(True, which="major", alpha=0.3)
    axes[-1, 0].set_xlabel(
        "seconds since wrk started (shaded: copy start to first answer + 0.25 s; red: file "
        "complete)"
    )
    axes[0, 0].legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def matplotlib_ticker() -> Any:
    import matplotlib.ticker

    return matplotlib.ticker


def _throughput_chart(results: dict[str, Any], path: Path, plt: Any) -> bool:
    tp = results["sections"].get("throughput")
    if not isinstance(tp, dict) or "figures" not in tp:
        return False
    figures = list(tp["figures"].values())
    labels = [f["label"] for f in figures]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    left.barh(labels, [f["requests_per_s"] for f in figures], color="#30638e")
    left.set_xlabel("requests/s (median)")
    left.invert_yaxis()
    right.barh(labels, [f["p99_ms"] for f in figures], color="#00798c")
    right.set_xlabel("p99 latency, ms (median)")
    right.invert_yaxis()
    right.set_yticklabels([])
    fig.suptitle("batch-1 ONNX MLP, 16 connections (wrk)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True
