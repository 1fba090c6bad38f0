"""Writers of a run's record: the stdout table, JSON, a markdown table and a PNG plot."""
from __future__ import annotations

import json
from pathlib import Path

from roi_cupy._bench.record import OK, UNCHECKED, Record, Row

HEADERS = ("workload", "pass", "backend", "median ms", "q1-q3 ms", "GB/s", "of floor",
           "vs torchvision", "extra MiB", "status")

NOTES = (
    "median and quartiles of {repeat} timed calls after {warmup} untimed ones; error = the "
    "check's largest error against the float64 reference, over the data scale",
    "GB/s = the fewest bytes the pass must move (inputs read once, outputs written once) / median",
    "of floor = that many bytes at the measured copy bandwidth / median (1.00 = copy speed)",
    "vs torchvision = torchvision's median on the same device in this run / this median "
    "(> 1: faster)",
    "extra MiB = for roi_cupy on the CPU, the most memory one call holds beyond its inputs and "
    "the arrays it returns (tracemalloc's peak; not measured for other rows)",
    "roi_cupy rows without a suffix use validate=True (the default); deterministic=True rows run "
    "the backward passes in fixed point (their ratio to the validate=False row is its cost)",
)


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}" if v >= 1000 else f"{v:#.4g}"


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def cells(row: Row) -> tuple[str, ...]:
    """One row of the table, as text."""
    s = row.stats
    if row.status == OK:
        status = OK if row.max_error is None else f"ok (error {row.max_error:.0e})"
    else:
        status = row.status if row.status == UNCHECKED else f"{row.status}: {row.detail}"
    return (
        row.workload, row.pass_, row.backend,
        _ms(s.median_ms if s else None),
        f"{_ms(s.q1_ms)}-{_ms(s.q3_ms)}" if s else "-",
        _num(row.gbps, ".0f" if (row.gbps or 0) >= 100 else "#.3g"),
        _num(row.floor_fraction, "#.2g"),
        _num(row.speedup, ".2f") + ("x" if row.speedup is not None else ""),
        _num(row.extra_mib, "#.3g"),
        status,
    )


def header_lines(record: Record) -> list[str]:
    """What was run: variant, devices, bandwidth, repetitions."""
    env = record.environment
    lines = []
    if record.variant == "quick":
        lines.append("QUICK variant: shrunk workloads (channels/16, boxes/16, maps/4) and few "
                     "repetitions; run with --full for the real sizes.")
    else:
        lines.append("full variant: the workloads at their real sizes.")
    lines.append(f"date {record.timestamp}, host {env.get('host')}, CPU {env.get('cpu')} "
                 f"({env.get('cpu_count')} cores), GPU {env.get('gpu') or 'none'}")
    versions = ", ".join(f"{k} {env.get(k)}" for k in
                         ("roi_cupy", "numpy", "cupy", "torch", "torchvision", "cuda_runtime",
                          "driver", "torch_threads") if env.get(k) is not None)
    lines.append(f"versions: {versions}")
    for device, bw in record.bandwidth.items():
        lines.append(f"copy bandwidth {device}: {bw['gbps']:.1f} GB/s ({bw['method']}, "
                     f"{bw['bytes'] >> 20} MiB)")
    return lines


def footer_lines(record: Record) -> list[str]:
    lines = [n.format(repeat=record.repeat, warmup=record.warmup) for n in NOTES]
    for s in record.skipped:
        where = s["workloads"] if isinstance(s["workloads"], str) else ", ".join(s["workloads"])
        lines.append(f"skipped {s['backend']} ({where}): {s['reason']}")
    for reason in dict.fromkeys(r.detail for r in record.rows if r.status == UNCHECKED):
        lines.append(f"unchecked rows were timed without a check: {reason}")
    if record.plot:
        lines.append(f"plot: {record.plot.get('path') or 'skipped, ' + record.plot['skipped']}")
    failed = record.failed
    if failed:
        lines.append(f"{len(failed)} measurement(s) INVALID or in ERROR: their numbers are not "
                     "to be trusted (see the status column)")
    return lines


def table(record: Record) -> str:
    """The plain-text table printed on stdout, with its header and notes."""
    rows = [HEADERS] + [cells(r) for r in record.rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADERS) - 1)]
    body = []
    for r in rows:
        body.append("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    body.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * len(HEADERS[-1]))
    return "\n".join(header_lines(record) + [""] + body + [""] + footer_lines(record))


def markdown(record: Record) -> str:
    """A markdown page: header, the table, the workload definitions and the notes."""
    out = [f"# roi_cupy benchmark, {record.date} ({record.variant})", ""]
    out += [f"- {line}" for line in header_lines(record)]
    out += ["", "| " + " | ".join(HEADERS) + " |",
            "|" + "|".join("---:" if h.endswith(("ms", "GB/s", "floor", "torchvision", "MiB"))
                           else "---" for h in HEADERS) + "|"]
    for r in record.rows:
        c = list(cells(r))
        if r.status != OK:
            c[-1] = f"**{c[-1]}**"
        out.append("| " + " | ".join(x.replace("|", "\\|") for x in c) + " |")
    if record.plot.get("path"):
        out += ["", f"![speed-up and sweep]({Path(record.plot['path']).name})"]
    out += ["", "## Workloads", ""]
    for name, w in record.workloads.items():
        out.append(f"- **{name}**: {w['description']}; as run: op {w['op']}, features "
                   f"[{w['batch']}, {w['channels']}, {w['height']}, {w['width']}] {w['dtype']}, "
                   f"{w['batch'] * w['boxes_per_image']} boxes, output {w['output_size']}, "
                   f"spatial_scale {w['spatial_scale']:g}, sampling_ratio "
                   f"{w['sampling_ratio']}, aligned {w['aligned']}, seed {w['seed']}")
    out += ["", "## Notes", ""] + [f"- {line}" for line in footer_lines(record)]
    out += ["", f"Command: `python -m roi_cupy bench {' '.join(record.command)}`".rstrip(), ""]
    return "\n".join(out)


def write_json(record: Record, path: Path) -> None:
    path.write_text(json.dumps(record.as_dict(), indent=1) + "\n")


def read_json(path: Path) -> Record:
    return Record.from_dict(json.loads(Path(path).read_text()))


# ----------------------------------------------------------------------------- plot
def write_plot(record: Record, path: Path) -> dict:
    """Speed-up over torchvision per workload (one panel per pass) above time against boxes for
    the sweep.

    Returns:
        dict: ``{"path": str(path)}``, or ``{"skipped": reason}`` when matplotlib is missing.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return {"skipped": "matplotlib is not installed (pip install 'roi_cupy[demo]')"}
    passes = list(dict.fromkeys(r.pass_ for r in record.rows)) or ["forward"]
    sweep = any(w.get("group") == "sweep" for w in record.workloads.values())
    layout = [passes] + ([["sweep"] * len(passes)] if sweep else [])
    fig = Figure(figsize=(5 * len(passes), 9 if sweep else 5), layout="constrained")
    axes = fig.subplot_mosaic(layout)
    for p in passes:
        _speedup_panel(axes[p], record, p)
    if sweep:
        _sweep_panel(axes["sweep"], record)
    fig.suptitle(f"roi_cupy benchmark {record.date} ({record.variant}), "
                 f"{record.environment.get('gpu') or record.environment.get('cpu')}")
    fig.savefig(path, dpi=100)
    return {"path": str(path)}


def _speedup_panel(ax, record: Record, pass_: str) -> None:
    rows = [r for r in record.rows if r.speedup is not None and r.pass_ == pass_
            and not r.backend.startswith("torchvision")]
    ax.set_title(f"{pass_}: speed-up over torchvision")
    if not rows:
        ax.text(0.5, 0.5, "no roi_cupy row with a torchvision peer", ha="center",
                transform=ax.transAxes)
        ax.set_axis_off()
        return
    names = list(dict.fromkeys(r.workload for r in rows))
    backends = list(dict.fromkeys(r.backend for r in rows))
    width = 0.8 / len(backends)
    for j, b in enumerate(backends):
        by_name = {r.workload: r.speedup for r in rows if r.backend == b}
        xs = [i + (j - (len(backends) - 1) / 2) * width for i in range(len(names))]
        bars = ax.bar(xs, [by_name.get(n, float("nan")) for n in names], width,
                      label=_label(b), color=f"C{j}")
        if len(names) <= 4:
            ax.bar_label(bars, fmt="%.2fx", fontsize=8)
    ax.axhline(1.0, color="black", linewidth=0.8)
    values = [r.speedup for r in rows] + [1.0]
    if max(values) / min(values) > 20:
        ax.set_yscale("log")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=8)
    ax.set_ylabel("torchvision median / this median")
    ax.legend(fontsize=7)


def _sweep_panel(ax, record: Record) -> None:
    sweep = {n: w for n, w in record.workloads.items() if w.get("group") == "sweep"}
    rows = [r for r in record.rows if r.workload in sweep and r.stats is not None]
    ax.set_title("sweep: time against boxes")
    if not rows:
        ax.text(0.5, 0.5, "no sweep row was timed", ha="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    styles = {"forward": "-", "backward": "--", "fwd+bwd": ":"}
    colours = {b: f"C{i}" for i, b in enumerate(dict.fromkeys(r.backend for r in rows))}
    for (b, p) in dict.fromkeys((r.backend, r.pass_) for r in rows):
        pts = sorted((sweep[r.workload]["batch"] * sweep[r.workload]["boxes_per_image"],
                      r.stats.median_ms) for r in rows if r.backend == b and r.pass_ == p)
        ax.plot(*zip(*pts), styles.get(p, "-"), color=colours[b], marker="o",
                label=f"{_label(b)} {p}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("boxes (sweep: W1 shapes)")
    ax.set_ylabel("median ms")
    ax.legend(fontsize=7)


def _label(backend: str) -> str:
    return backend if "(" in backend or backend.startswith("torch") else \
        f"{backend}(validate=True)"
