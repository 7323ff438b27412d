"""The benchmark's text tables."""

from __future__ import annotations

from typing import Any

from digi2real.bench.measure import STAGES


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(headers, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "pass" if value else "FAIL"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1000 or abs(value) < 10 ** -(digits - 1):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}"
    return str(value)


def paths_table(paths: list[dict[str, Any]]) -> str:
    rows = []
    naive = paths[0]
    metrics = [
        ("images", "images"),
        ("batch", "batch"),
        ("dtype", "dtype"),
        ("compile", "compile"),
        ("wall s", "wall_s"),
        ("images/s", "images_per_s"),
        ("s/image", "s_per_image"),
        *[(f"{s} s", s) for s in STAGES],
        ("postprocess exposed s", "postprocess_exposed_s"),
        ("peak memory MiB", "peak_memory_mb"),
        ("achieved TFLOP/s", "achieved_tflops"),
        ("fraction of peak", "fraction_of_peak"),
    ]
    for label, key in metrics:
        row = [label]
        for path in paths:
            value = path["stages_s"][key] if key in STAGES else path.get(key)
            if key == "postprocess_exposed_s" and path["path"] == "naive":
                value = path["stages_s"]["postprocess"]
            if key == "compile" and isinstance(value, bool):
                value = "on" if value else "off"  # fmt() would print a bool as pass/FAIL
            row.append(fmt(value))
        rows.append(row)
    rows.append(
        ["speedup vs naive"] + [fmt(p["images_per_s"] / naive["images_per_s"]) for p in paths]
    )
    return table(["metric", *[p["path"] + f" (b{p['batch']})" for p in paths]], rows)


def modes_table(report: dict[str, Any]) -> str:
    """One row per mode: its settings, TFLOP per image, the measured rate and the ratios to
    ``default``; how the time was measured in the header."""
    rows = []
    ratios = report.get("mode_ratios", {})
    for row in report["modes"]:
        s = row["settings"]
        ratio = ratios.get(row["mode"], {})
        rows.append(
            [
                row["mode"],
                f"{s['sampler']} {s['steps']}",
                fmt(s["guidance"]),
                s["decoder"],
                s["dtype"],
                str(s["batch_size"]),
                fmt(row["flops_per_image"] / 1e12),
                fmt(ratio.get("flops")),
                fmt(row.get("images_per_s")) if "skipped" not in row else row["skipped"][:40],
                fmt(row.get("s_per_image")),
                fmt(ratio.get("time")),
            ]
        )
    methods = sorted({r["method"] for r in report["modes"]})
    how = {
        "composed": "seconds per image COMPOSED from measured single UNet, decode and encode "
        "calls: (steps x UNet + decode + encode) / batch, no post-processing",
        "end-to-end": "images/s of the engine end to end (batches, decode, post-processing)",
    }
    header = "modes: " + "; ".join(how[m] for m in methods)
    return (
        header
        + "\n"
        + table(
            [
                "mode",
                "sampler",
                "guidance",
                "decoder",
                "dtype",
                "batch",
                "TFLOP/image",
                "x default",
                "images/s",
                "s/image",
                "time x default",
            ],
            rows,
        )
    )


def render(report: dict[str, Any]) -> str:
    out = []
    head = report["run"]
    out.append(
        f"digi2real bench: profile {head['profile']}, device {head['device_name']}, "
        f"{head['resolution']}x{head['resolution']}, matmul peak "
        f"{fmt(report['peak']['tflops'])} TFLOP/s ({report['peak']['dtype']}); FLOPs counted on "
        "meta-device copies of this architecture"
    )
    if report.get("modes"):
        out.append(modes_table(report))
        fast4 = report.get("mode_ratios", {}).get("fast4")
        if fast4:
            line = f"fast4 / default: FLOPs per image x{fmt(fast4['flops'])}"
            if "time" in fast4:
                line += f", time per image x{fmt(fast4['time'])}"
            out.append(line)
    if report.get("paths"):
        out.append(
            f"\nnaive loop vs engine: {head['steps']} steps, guidance {head['guidance']}, "
            f"{fmt(report['flops_per_image'] / 1e12)} TFLOP/image"
        )
        out.append(paths_table(report["paths"]))
    if report.get("variants"):
        rows = [
            [
                v["variant"],
                fmt(v.get("unet_s")),
                fmt(v.get("vae_decode_s")),
                fmt(v.get("unet_speedup")),
                fmt(v.get("vae_speedup")),
                fmt(v.get("unet_rel_error")),
                fmt(v.get("vae_rel_error")),
                fmt(v.get("tolerance")),
                fmt(v.get("passed")) if "error" not in v else v["error"][:60],
            ]
            for v in report["variants"]
        ]
        out.append(
            "\nper-call speed options (batch "
            f"{report['variant_batch']}), relative error against fp32 (TF32 off):\n"
            + table(
                ["variant", "UNet s", "VAE s", "UNet x", "VAE x", "UNet err", "VAE err", "tol", ""],
                rows,
            )
        )
    if report.get("trajectories"):
        rows = [
            [
                t["check"],
                fmt(t.get("max_grey_levels")),
                fmt(t.get("mean_grey_levels")),
                fmt(t.get("tolerance")),
                fmt(t.get("passed")) if "error" not in t else t["error"][:60],
            ]
            for t in report["trajectories"]
        ]
        out.append(
            "\nfull trajectories (max/mean grey levels vs fp32 batch 1):\n"
            + table(["check", "max", "mean", "tol", ""], rows)
        )
    embed = report.get("embedding")
    if embed:
        lines = [
            f"\nembedding stage, IResNet {embed['arch']} (random weights), batch {embed['batch']}:"
        ]
        for key in ("torch", "onnxruntime"):
            if key not in embed:
                continue
            entry = embed[key]
            if key == "torch":
                lines.append(
                    f"  {entry['runtime']}: {fmt(entry['faces_per_s'])} faces/s"
                    + (
                        f" ({fmt(entry['faces_per_s_per_core'])} per core)"
                        if "faces_per_s_per_core" in entry
                        else ""
                    )
                )
            else:
                for name, value in entry.items():
                    if name.endswith("_threads"):
                        lines.append(
                            f"  {entry['runtime']}, {name.replace('_', ' ')}: "
                            f"{fmt(value['faces_per_s'])} faces/s "
                            f"({fmt(value['faces_per_s_per_core'])} per core)"
                        )
        out.append("\n".join(lines))
    plan = report.get("plan_memory")
    if plan:
        if "error" in plan:
            out.append(f"\nplanning memory: failed: {plan['error']}")
        else:
            out.append(
                f"\nplanning memory: {plan['images']:,} images in {plan['identities']:,} "
                f"identities: peak RSS {fmt(plan['peak_rss_mb'])} MiB (target < 2048: "
                f"{fmt(plan['passed'])}), plan.parquet {fmt(plan['plan_parquet_mb'])} MiB, "
                f"{fmt(plan['seconds'])} s"
            )
    for note in report["run"]["notes"]:
        out.append(f"note: {note}")
    return "\n".join(out)
