"""Writing the results: latest.json, latest.md (Markdown tables) and PNG charts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _cell(summary: dict[str, dict[str, float]], key: str, digits: int = 1) -> str:
    if key not in summary:
        return "-"
    s = summary[key]
    if s["min"] == s["max"]:
        return f"{s['median']:.{digits}f}"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _ingest_md(result: dict[str, Any]) -> list[str]:
    lines = [
        f"Sender: {result['sender']}. Cells: median (min-max) over the repetitions; "
        "load: the machine's 1-minute load average when each run started.",
        "",
        "| data set | assoc. | receiver | inst/s | MB/s | peak RSS MiB | CPU ms/inst | load |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        if "error" in row:
            lines.append(
                f"| {row['dataset']} | {row['concurrency']} | {row['system']} | "
                f"FAILED: {row['error']} | | | | |"
            )
            continue
        s = row["summary"]
        lines.append(
            f"| {row['dataset']} | {row['concurrency']} | {row['system']} | "
            f"{_cell(s, 'instances_per_s')} | {_cell(s, 'mb_per_s')} | "
            f"{_cell(s, 'peak_rss_mib')} | {_cell(s, 'cpu_ms_per_instance', 2)} | "
            f"{_cell(s, 'load_1min')} |"
        )
    lines += [
        "",
        f"Ratios, {result['ratio_meaning']}:",
        "",
        "| data set | assoc. | node | peer | inst/s node/peer | peak RSS node/peer "
        "| CPU/inst node/peer |",
        "|---|---:|---|---|---:|---:|---:|",
    ]
    if not result["ratios"]:
        lines.append("| (no ratios: the node or every peer was left out) | | | | | | |")
    for r in result["ratios"]:
        lines.append(
            f"| {r['dataset']} | {r['concurrency']} | {r.get('node', 'node')} | {r['peer']} | "
            f"{_ratio(r['instances_per_s'])} | {_ratio(r['peak_rss'])} | "
            f"{_ratio(r['cpu_per_instance'])} |"
        )
    for item in result.get("skipped", []):
        lines.append(f"\nNot run: {item}.")
    return (
        lines
        + _durability_md(result.get("durability"))
        + _profile_md(result.get("profile"), INGEST_PROFILE)
    )


def _untimed_md(result: dict[str, Any] | None, what: str) -> list[str] | None:
    """The lines of an untimed run that did not happen (none, or why not); None if it did."""
    if not result:
        return []
    if result.get("not_measured"):
        return ["", f"{what}: not measured ({result['not_measured']})."]
    return None


def _durability_md(result: dict[str, Any] | None) -> list[str]:
    """What each receiver synced per instance before answering (bench.durability)."""
    missing = _untimed_md(result, "Sync calls per instance")
    if missing is not None or result is None:
        return missing or []
    lines = [
        "",
        f"Sync calls per instance ({', '.join(result['calls'])}) while each receiver took the "
        f"data set's first {result['instances']} instances over one association, untimed, "
        "under strace: what it makes durable before it answers, and the time it waits for "
        "the disk.",
        "",
        "| data set | receiver | data file | folder | index | all | ms/inst in syncs |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        if "error" in row:
            lines.append(f"| {row['dataset']} | {row['system']} | FAILED: {row['error']} |||||")
            continue
        lines.append(
            f"| {row['dataset']} | {row['system']} | {row['file_syncs_per_instance']:.2f} | "
            f"{row['folder_syncs_per_instance']:.2f} | {row['index_syncs_per_instance']:.2f} | "
            f"{row['syncs_per_instance']:.2f} | {row['sync_ms_per_instance']:.2f} |"
        )
    return lines


def _shares(items: list[dict[str, Any]]) -> str:
    return "; ".join(f"{i['name']} {100 * i['share']:.1f} %" for i in items)


INGEST_PROFILE = (
    "each node receiver's processes while it took the data set over one association, untimed"
)
E2E_PROFILE = (
    "the forwarding node's processes (serve and its worker process) from the first byte sent "
    "to the last instance held by Orthanc, in one more run of the system, untimed"
)


def _profile_md(result: dict[str, Any] | None, sampled: str) -> list[str]:
    """Where the node's Python time went in an untimed profiled run (bench.profile)."""
    missing = _untimed_md(result, "Node profile")
    if missing is not None or result is None:
        return missing or []
    lines = [
        "",
        f"Where the node's Python time goes: py-spy sampled {sampled} ({result['rate']} "
        "samples/s of the thread holding the interpreter lock, so waits are not counted). "
        "Shares of all samples: by the code the innermost frame runs in; the functions that "
        "run most themselves (self); the node's functions the most samples pass through "
        "(total).",
    ]
    for row in result["rows"]:
        head = f"**{row['dataset']}, {row['system']}**"
        if "error" in row:
            lines += ["", f"{head}: FAILED: {row['error']}"]
            continue
        raw = f"; stacks: `{row['raw']}`" if row.get("raw") else ""
        lines += [
            "",
            f"{head} ({row['instances']} instances, {row['samples']} samples{raw})",
            "",
            "| | |",
            "|---|---|",
            f"| by part | {_shares(row['by_part'])} |",
            f"| self | {_shares(row['self'])} |",
            f"| total (node) | {_shares(row['total_gateway'])} |",
        ]
    return lines


def _e2e_md(result: dict[str, Any]) -> list[str]:
    ds = result["dataset"]
    lines = [
        f"{result['path']}; {ds['instances']} CT instances ({ds['total_bytes'] / 1e6:.1f} MB), "
        f"one association. Time: {result['measure']}. The study route's quiet period is set "
        f"to {result['quiet_seconds']} s and subtracted; the node's worker/routing intervals "
        f"are {result['node_worker_intervals']} s; delivery workers: "
        f"{result.get('node_worker_process', 'in serve')} process.",
        "",
        f"Peer channel: {result['peer_channel']}.",
        "",
        "| path | seconds to last held | excl. quiet | sender done s | "
        "router peak RSS MiB | router CPU ms/inst | load |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        if "error" in row:
            lines.append(f"| {row['system']} | FAILED: {row['error']} | | | | | |")
            continue
        s = row["summary"]
        lines.append(
            f"| {row['system']} | {_cell(s, 'seconds', 2)} | "
            f"{_cell(s, 'seconds_excluding_quiet', 2)} | {_cell(s, 'sender_seconds', 2)} | "
            f"{_cell(s, 'router_peak_rss_mib')} | {_cell(s, 'router_cpu_ms_per_instance', 2)} | "
            f"{_cell(s, 'load_1min')} |"
        )
    pairs = [
        r for r in result["rows"] if "summary" in r and "node_a_cpu_ms_per_instance" in r["summary"]
    ]
    if pairs:
        lines += [
            "",
            "Node A -> node B over the peer channel, each node on its own:",
            "",
            "| path | A CPU ms/inst | B CPU ms/inst | A peak RSS MiB | B peak RSS MiB | "
            "A->B deliveries | B->Orthanc deliveries |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row in pairs:
            s = row["summary"]
            lines.append(
                f"| {row['system']} | {_cell(s, 'node_a_cpu_ms_per_instance', 2)} | "
                f"{_cell(s, 'node_b_cpu_ms_per_instance', 2)} | "
                f"{_cell(s, 'node_a_peak_rss_mib')} | {_cell(s, 'node_b_peak_rss_mib')} | "
                f"{_cell(s, 'peer_deliveries', 0)} | "
                f"{_cell(s, 'deliveries', 0)} |"
            )
    lines += [
        "",
        f"Ratios, {result['ratio_meaning']}:",
        "",
        "| node | peer | time node/peer |",
        "|---|---|---:|",
    ]
    for r in result["ratios"]:
        lines.append(f"| {r['node']} | {r['peer']} | {_ratio(r['time'])} |")
    return lines + _profile_md(result.get("profile"), E2E_PROFILE)


def _deid_md(result: dict[str, Any]) -> list[str]:
    sets = ", ".join(
        f"{d['name']}: {d['instances']} x {d['mean_instance_kib']:.0f} KiB"
        for d in result["datasets"]
    )
    lines = [
        f"Data sets: {sets}. Method: {result['method']} (CPU {result['cpu']}).",
        "",
        "Tools: " + "; ".join(f"`{k}`: {v}" for k, v in result["tools"].items()) + ".",
        "",
        "| data set | tool | inst/s | MB/s | CPU ms/inst | peak RSS MiB | setup s | load |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        if "error" in row:
            lines.append(
                f"| {row['dataset']} | {row['system']} | FAILED: {row['error']} | | | | | |"
            )
            continue
        s = row["summary"]
        lines.append(
            f"| {row['dataset']} | {row['system']} | {_cell(s, 'instances_per_s')} | "
            f"{_cell(s, 'mb_per_s')} | {_cell(s, 'cpu_ms_per_instance', 2)} | "
            f"{_cell(s, 'peak_rss_mib')} | {_cell(s, 'setup_seconds', 2)} | "
            f"{_cell(s, 'load_1min')} |"
        )
    lines += [
        "",
        f"Ratios, {result['ratio_meaning']}:",
        "",
        "| data set | node | /dicognito | /pydicom-deid | /faster peer | target met | "
        "CPU/inst faster peer/node |",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    if not result["ratios"]:
        lines.append("| (no ratios: the node or every peer was left out or failed) | | | | | | |")
    for r in result["ratios"]:
        faster = f"{_ratio(r['faster'])} ({r['faster_peer']})" if r.get("faster_peer") else "-"
        met = "-" if "target_met" not in r else ("yes" if r["target_met"] else "no")
        lines.append(
            f"| {r['dataset']} | {r['node']} | {_ratio(r.get('dicognito'))} | "
            f"{_ratio(r.get('pydicom-deid'))} | {faster} | {met} | "
            f"{_ratio(r.get('faster_cpu'))} |"
        )
    return lines


def _sealed_md(result: dict[str, Any]) -> list[str]:
    ds = result["dataset"]
    lines = [
        f"{ds['instances']} CT instances ({ds['total_bytes'] / 1e6:.1f} MB). Method: "
        f"{result['method']}. Quiet period {result['quiet_seconds']} s, worker/routing "
        f"intervals {result['node_worker_intervals']} s; delivery workers: "
        f"{result.get('node_worker_process', 'in serve')} process.",
        "",
        "What: " + "; ".join(f"`{k}`: {v}" for k, v in result["tools"].items()) + ".",
        "",
        "| measurement | MB/s | A->B MB/s after sender | seconds | excl. quiet | sender s | "
        "A CPU ms/inst | B CPU ms/inst | load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        if "error" in row:
            lines.append(f"| {row['system']} | FAILED: {row['error']} | | | | | | | |")
            continue
        s = row["summary"]
        lines.append(
            f"| {row['system']} | {_cell(s, 'mb_per_s')} | {_cell(s, 'a_to_b_mb_per_s')} | "
            f"{_cell(s, 'seconds', 3)} | {_cell(s, 'seconds_excluding_quiet', 2)} | "
            f"{_cell(s, 'sender_seconds', 2)} | {_cell(s, 'node_a_cpu_ms_per_instance', 2)} | "
            f"{_cell(s, 'node_b_cpu_ms_per_instance', 2)} | {_cell(s, 'load_1min')} |"
        )
    lines += [
        "",
        f"Ratios, {result['ratio_meaning']}:",
        "",
        "| ratio | MB/s |",
        "|---|---:|",
    ]
    if not result["ratios"]:
        lines.append("| (no ratios: a side was left out or failed) | |")
    for r in result["ratios"]:
        value = r["mb_per_s"]
        lines.append(f"| {r['ratio']} | {'-' if value is None else f'{value:.3g}x'} |")
    return lines


def _pixels_md(result: dict[str, Any]) -> list[str]:
    lines = [
        f"Method: {result['method']}; {result['frames']} frames per cine. No peer cleans "
        "burned-in pixels with an OCR check, so no ratio.",
        "",
        "| frame | kind | masking frames/s | CPU ms/frame | masking + OCR frames/s | "
        "CPU ms/frame |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        s = row["summary"]
        lines.append(
            f"| {row['frame']} | {row['kind']} | {_cell(s, 'masking_frames_per_s')} | "
            f"{_cell(s, 'masking_cpu_ms_per_frame', 2)} | "
            f"{_cell(s, 'masking_ocr_frames_per_s', 2)} | "
            f"{_cell(s, 'masking_ocr_cpu_ms_per_frame', 1)} |"
        )
    return lines


def _scale_md(result: dict[str, Any]) -> list[str]:
    lines = [
        f"Sender: {result['sender']}; the node with its defaults (as in ingest).",
        "",
        "| factor | CT instances | inst/s | ms/inst | peak RSS MiB | CPU ms/inst | load |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        if "error" in row:
            lines.append(
                f"| {row['factor']}x | {row['instances']} | FAILED: {row['error']} | | | | |"
            )
            continue
        s = row["summary"]
        lines.append(
            f"| {row['factor']}x | {row['instances']} | {_cell(s, 'instances_per_s')} | "
            f"{_cell(s, 'ms_per_instance', 2)} | {_cell(s, 'peak_rss_mib')} | "
            f"{_cell(s, 'cpu_ms_per_instance', 2)} | {_cell(s, 'load_1min')} |"
        )
    lines += ["", f"Growth, {result['growth_meaning']}:", "", "| factor | ratio | linear |"]
    lines.append("|---:|---:|---|")
    for g in result["growth"]:
        lines.append(
            f"| {g['factor']}x | {_ratio(g['ms_per_instance_vs_first'])} | "
            f"{'yes' if g['linear'] else 'no'} |"
        )
    return lines


PEER_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown")
"""The node is always red; peers never are."""

RENDERERS = {
    "ingest": _ingest_md,
    "e2e": _e2e_md,
    "deid": _deid_md,
    "sealed-transfer": _sealed_md,
    "pixels": _pixels_md,
    "scale": _scale_md,
}


def markdown(doc: dict[str, Any]) -> str:
    meta = doc["meta"]
    lines = [
        "# dicom-gateway benchmarks",
        "",
        f"Run {meta['started']} on {meta['host']['cpus']} CPUs, node commit "
        f"`{meta['commit']}`; scale {meta['scale']}, {meta['repeat']} repetition(s) per "
        f"measurement, systems alternating order between repetitions. Load average "
        f"before {meta['load_before']}, after {meta['load_after']}.",
        "",
        "Peers: " + "; ".join(f"{k}: {v}" for k, v in meta["peers"].items()) + ".",
    ]
    for key, result in doc["scenarios"].items():
        lines += ["", f"## {result['title']}", ""]
        if "error" in result:
            lines.append(f"FAILED: {result['error']}")
            continue
        lines += RENDERERS[key](result["result"])
    if doc.get("failures"):
        lines += ["", "## Failed measurements (no figure reported)", ""]
        lines += [f"- {item}" for item in doc["failures"]]
    if doc["not_measured"]:
        lines += ["", "## Not measured yet", ""]
    for item in doc["not_measured"]:
        lines.append(f"- {item['title']}: {item['reason']}.")
    if doc.get("node_configs"):
        lines += ["", "The node's configuration as run is in latest.json (`node_configs`)."]
    if doc.get("charts_note"):
        lines += ["", doc["charts_note"]]
    elif doc.get("charts"):
        lines += ["", "Charts: " + ", ".join(f"`{c}`" for c in doc["charts"]) + "."]
    return "\n".join(lines) + "\n"


def write_json(doc: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")


# --------------------------------------------------------------------------- charts


def charts(doc: dict[str, Any], out: Path) -> list[str]:
    """PNG charts next to latest.json; raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[str] = []
    ingest = doc["scenarios"].get("ingest", {}).get("result")
    if ingest and ingest["rows"]:
        for metric, label, fname in (
            ("instances_per_s", "instances/s (higher is better)", "ingest_throughput.png"),
            ("mb_per_s", "MB/s (higher is better)", "ingest_mb_per_s.png"),
            ("peak_rss_mib", "peak RSS, MiB (lower is better)", "ingest_peak_rss.png"),
            ("cpu_ms_per_instance", "CPU ms per instance (lower is better)", "ingest_cpu.png"),
        ):
            groups = sorted(
                {(r["dataset"], r["concurrency"]) for r in ingest["rows"]},
                key=lambda g: (
                    ingest["datasets"].index(
                        next(d for d in ingest["datasets"] if d["name"] == g[0])
                    ),
                    g[1],
                ),
            )
            systems = ingest["systems"]
            fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups) + 1, 4.2))
            axes_list = list(axes) if len(groups) > 1 else [axes]
            for ax, (dataset, conc) in zip(axes_list, groups, strict=True):
                medians, lo, hi, colors = [], [], [], []
                for i, system in enumerate(systems):
                    row = next(
                        r
                        for r in ingest["rows"]
                        if r["dataset"] == dataset
                        and r["concurrency"] == conc
                        and r["system"] == system
                    )
                    if "error" in row:
                        medians.append(0.0)
                        lo.append(0.0)
                        hi.append(0.0)
                        colors.append("white")
                        continue
                    s = row["summary"][metric]
                    medians.append(s["median"])
                    lo.append(s["median"] - s["min"])
                    hi.append(s["max"] - s["median"])
                    colors.append("tab:red" if system.startswith("node") else PEER_COLORS[i % 5])
                ax.bar(range(len(systems)), medians, yerr=[lo, hi], color=colors, capsize=3)
                ax.set_xticks(range(len(systems)))
                ax.set_xticklabels(systems, rotation=40, ha="right", fontsize=8)
                ax.set_title(f"{dataset}, {conc} assoc.", fontsize=10)
            axes_list[0].set_ylabel(label)
            fig.suptitle(f"Ingest: {label}; bars = median, whiskers = min/max")
            fig.tight_layout()
            fig.savefig(out / fname, dpi=110)
            plt.close(fig)
            written.append(fname)
    e2e = doc["scenarios"].get("e2e", {}).get("result")
    if e2e and any("error" not in row for row in e2e["rows"]):
        fig, ax = plt.subplots(figsize=(7, 3.2))
        names, medians, lo, hi = [], [], [], []
        for row in e2e["rows"]:
            if "error" in row:
                continue
            key = "seconds_excluding_quiet" if row["system"] == "node-study" else "seconds"
            s = row["summary"][key]
            names.append(row["system"] + (" (excl. quiet)" if key != "seconds" else ""))
            medians.append(s["median"])
            lo.append(s["median"] - s["min"])
            hi.append(s["max"] - s["median"])
        colors = ["tab:red" if n.startswith("node") else "tab:gray" for n in names]
        ax.barh(range(len(names)), medians, xerr=[lo, hi], color=colors, capsize=3)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names)
        ax.invert_yaxis()
        ax.set_xlabel("seconds, first byte sent -> last instance held by Orthanc (lower is better)")
        ax.set_title(f"End to end, {e2e['dataset']['instances']} CT instances")
        fig.tight_layout()
        fig.savefig(out / "e2e.png", dpi=110)
        plt.close(fig)
        written.append("e2e.png")
    deid = doc["scenarios"].get("deid", {}).get("result")
    if deid and any("error" not in row for row in deid["rows"]):
        names = [d["name"] for d in deid["datasets"]]
        systems = deid["systems"]
        fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names) + 1, 4.4))
        axes_list = list(axes) if len(names) > 1 else [axes]
        for ax, dataset in zip(axes_list, names, strict=True):
            medians, lo, hi, colors = [], [], [], []
            for i, system in enumerate(systems):
                row = next(
                    r for r in deid["rows"] if r["dataset"] == dataset and r["system"] == system
                )
                if "error" in row:
                    medians.append(0.0)
                    lo.append(0.0)
                    hi.append(0.0)
                    colors.append("white")
                    continue
                s = row["summary"]["instances_per_s"]
                medians.append(s["median"])
                lo.append(s["median"] - s["min"])
                hi.append(s["max"] - s["median"])
                node = system.startswith("node")
                colors.append(
                    ("tab:red", "salmon", "mistyrose")[i % 3] if node else PEER_COLORS[i % 5]
                )
            ax.bar(
                range(len(systems)),
                medians,
                yerr=[lo, hi],
                color=colors,
                capsize=3,
                edgecolor="black",
                linewidth=0.5,
            )
            ax.set_xticks(range(len(systems)))
            ax.set_xticklabels(systems, rotation=40, ha="right", fontsize=8)
            ratio = next(
                (
                    r
                    for r in deid["ratios"]
                    if r["dataset"] == dataset and r["node"] == "node-basic-file" and "faster" in r
                ),
                None,
            )
            title = dataset
            if ratio is not None and ratio["faster"] is not None:
                title += f" (node-basic-file {ratio['faster']:.2f}x {ratio['faster_peer']})"
            ax.set_title(title, fontsize=9)
        axes_list[0].set_ylabel("instances/s, one core (higher is better)")
        fig.suptitle("De-identification: bars = median, whiskers = min/max")
        fig.tight_layout()
        fig.savefig(out / "deid_throughput.png", dpi=110)
        plt.close(fig)
        written.append("deid_throughput.png")
    scale = doc["scenarios"].get("scale", {}).get("result")
    scale_rows = [r for r in (scale or {}).get("rows", []) if "summary" in r]
    if scale_rows:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        xs = [r["instances"] for r in scale_rows]
        ax.plot(
            xs,
            [r["summary"]["ms_per_instance"]["median"] for r in scale_rows],
            "o-",
            color="tab:red",
            label="ms per instance",
        )
        ax.set_xscale("log")
        ax.set_xlabel("CT instances ingested (one association)")
        ax.set_ylabel("ms per instance (flat is linear)")
        ax.set_ylim(bottom=0)
        ax2 = ax.twinx()
        ax2.plot(
            xs,
            [r["summary"]["peak_rss_mib"]["median"] for r in scale_rows],
            "s--",
            color="tab:gray",
            label="peak RSS MiB",
        )
        ax2.set_ylabel("peak RSS, MiB")
        ax2.set_ylim(bottom=0)
        ax.set_title("Scale: the node's ingest cost per instance and memory")
        fig.tight_layout()
        fig.savefig(out / "scale.png", dpi=110)
        plt.close(fig)
        written.append("scale.png")
    sealed = doc["scenarios"].get("sealed-transfer", {}).get("result")
    if sealed and any("error" not in row for row in sealed["rows"]):
        bars: list[tuple[str, dict[str, float], str]] = []
        for row in sealed["rows"]:
            if "error" in row:
                continue
            s = row["summary"]
            node = row["system"].startswith("peer-")
            bars.append((row["system"], s["mb_per_s"], "tab:red" if node else "tab:gray"))
            if "a_to_b_mb_per_s" in s:
                bars.append(
                    (row["system"] + " (A->B after sender)", s["a_to_b_mb_per_s"], "salmon")
                )
        fig, ax = plt.subplots(figsize=(8, 0.5 * len(bars) + 1.4))
        ax.barh(
            range(len(bars)),
            [b[1]["median"] for b in bars],
            xerr=[
                [b[1]["median"] - b[1]["min"] for b in bars],
                [b[1]["max"] - b[1]["median"] for b in bars],
            ],
            color=[b[2] for b in bars],
            capsize=3,
        )
        ax.set_xscale("log")
        ax.set_yticks(range(len(bars)))
        ax.set_yticklabels([b[0] for b in bars], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("MB/s, log scale (higher is better); whiskers = min/max")
        ax.set_title(
            f"Sealed transfer, {sealed['dataset']['instances']} CT instances, node A -> node B"
        )
        fig.tight_layout()
        fig.savefig(out / "sealed_transfer.png", dpi=110)
        plt.close(fig)
        written.append("sealed_transfer.png")
    return written
