"""Terminal tables for ``distill quantize``: fp32 vs int8, the per-layer sensitivity, and the
teacher-vs-student comparison ("prune/distill first, then quantize")."""
from ..report import format_table

__all__ = ["model_report", "comparison_table", "sensitivity_table", "speed_lines", "layer_speed_lines",
           "qat_table"]


def _ms(lat, key):
    v = lat.get(key)
    return f"{v:.3f}" if v is not None else "-"


def speed_lines(section, what="int8"):
    """One sentence per batch size where int8 is slower than fp32 (empty when it never is)."""
    out = []
    for key in ("b1", "b32"):
        f, q = section["fp32"]["latency_ms"].get(key), section["latency_ms"].get(key)
        if f and q and q > f:
            out.append(f"note: {what} is SLOWER than fused fp32 at batch {key[1:]}: {q:.3f} ms vs "
                       f"{f:.3f} ms ({f / q:.2f}×). Deploy fp32 for this batch size, or check that "
                       f"the CPU has AVX512-VNNI/AMX (int8 only pays with them).")
    return out


def _speed(row, key):
    t = row.get(key) if row else None
    return t if isinstance(t, dict) else {}


def sensitivity_table(section, macs_total):
    """Rows per weight layer: top-1 when only it is int8, the output shift, whether the chosen
    model keeps it in fp32, and (with ``layer_latency``) its fused fp32 and int8 times alone.
    Either half may be missing (``--no-sensitivity``, ``--no-layer-latency``)."""
    sens = {r["layer"]: r for r in section.get("sensitivity") or []}
    speed = {r["layer"]: r for r in section.get("layer_latency") or []}
    order = [r["layer"] for r in section.get("sensitivity") or section.get("layer_latency") or []]
    if not order:
        return ""
    fp32 = section["fp32"]["top1"]
    kept = set(section["excluded"])
    ranked = sorted(sens.values(), key=lambda r: (-r["kl"], r["top1"]))
    rank = {r["layer"]: i + 1 for i, r in enumerate(ranked)}
    slow = {(name, key) for key, names in (section.get("layers_slower_than_fp32") or {}).items()
            for name in names}
    head = ["layer", "op", "MACs %"]
    if sens:
        head += ["top-1 %", "Δ top-1", "KL×1e3", "changed %", "rank"]
    if speed:
        head += ["fp32 ms b32", "int8 ms b32", "× b1", "× b32"]
    head += ["kept", "note"]
    rows = []
    for name in order:
        base = sens.get(name) or speed.get(name)
        row = [name, base["op"].replace("Convolution", "conv").replace("FullyConnected", "fc"),
               f"{100.0 * base['macs'] / max(macs_total, 1):.1f}"]
        if sens:
            r = sens.get(name)
            row += ([f"{r['top1']:.2f}", f"{r['top1'] - fp32:+.2f}", f"{r['kl'] * 1e3:.3f}",
                     f"{r['changed']:.1f}", rank[name]] if r else ["-"] * 5)
        if speed:
            b1, b32 = _speed(speed.get(name), "b1"), _speed(speed.get(name), "b32")
            row += [_num(b32.get("fp32_ms")), _num(b32.get("int8_ms")), _ratio(b1), _ratio(b32)]
        notes = [f"int8 slower b{k[1:]}" for k in ("b1", "b32") if (name, k) in slow]
        if speed and name in speed and speed[name].get("error"):
            notes.append("not timed (see log)")
        elif speed and name in speed and _speed(speed[name], "b32").get("int8_ms") is None:
            notes.append("MXNet keeps it fp32")
        row += ["fp32" if name in kept else "", ", ".join(notes)]
        rows.append(row)
    parts = []
    if sens:
        parts.append(f"sensitivity: only this layer int8, the rest fp32, on {section['split']} "
                     f"({section['split_images']} images); rank 1 = most sensitive (KL)")
    if speed:
        parts.append("latency: each fused layer timed alone (MXNet profiler, best of repeats); "
                     "× = fp32 time / int8 time")
    return format_table(head, rows, "per-layer table. " + "; ".join(parts))


def _num(v):
    return "-" if v is None else f"{v:.3f}"


def _ratio(t):
    return f"{t['speedup']:.2f}" if t.get("speedup") else "-"


def layer_speed_lines(section, what="int8"):
    """Sentences about per-layer latency: the layers int8 makes slower (or that none is), the
    summed layer times, and what an fp32 island costs in quantize/dequantize."""
    rows = section.get("layer_latency") or []
    if not rows:
        return []
    out = []
    slow = section.get("layers_slower_than_fp32") or {}
    for key in ("b1", "b32"):
        names = slow.get(key) or []
        if names:
            by = {r["layer"]: _speed(r, key) for r in rows}
            detail = ", ".join(f"{n} ({by[n]['fp32_ms']:.3f} → {by[n]['int8_ms']:.3f} ms)" for n in names)
            out.append(f"note: per layer, {what} is SLOWER than fused fp32 at batch {key[1:]} for "
                       f"{len(names)} layer(s): {detail}. Keeping one in fp32 pays off only when its "
                       f"neighbours are fp32 too (each fp32 island adds a quantize + dequantize; "
                       f"see boundary_ms in the run's metrics).")
    timed = [(r["layer"], k, _speed(r, k)) for r in rows for k in ("b1", "b32") if _speed(r, k).get("speedup")]
    if timed and not any(slow.values()):
        name, key, t = min(timed, key=lambda x: x[2]["speedup"])
        margin = ", within the 5 % timer margin" if t["speedup"] < 1 else ""
        out.append(f"per layer: no weight layer is slower in int8 than in fused fp32 (smallest gain: "
                   f"{name}, {t['speedup']:.2f}× at batch {key[1:]}{margin}).")
    for key in ("b32",):
        f = sum(_speed(r, key).get("fp32_ms") or 0 for r in rows)
        q = sum(_speed(r, key).get("int8_ms") or _speed(r, key).get("fp32_ms") or 0 for r in rows)
        if f and q:
            out.append(f"per layer, summed at batch {key[1:]}: fp32 {f:.3f} ms, int8 {q:.3f} ms "
                       f"({f / q:.2f}×) without quantize/dequantize between layers.")
    return out


def model_report(role, prefix, model, section, data):
    """The block printed for one model: sensitivity table, fp32 vs int8 table, notes."""
    parts = []
    macs_total = sum(l.macs for l in model.layers)
    table = sensitivity_table(section, macs_total)
    if table:
        parts.append(table)
    f, q = section["fp32"], section
    mib = lambda b: f"{b / 2**20:.2f}"  # noqa: E731
    ratio = lambda a, b: f"{a / b:.2f}×" if a and b else "-"  # noqa: E731
    n_kept = len(q["excluded"])
    label = f"int8 ({q['policy']}: {n_kept} layer{'s' if n_kept != 1 else ''} fp32)"
    rows = [["fp32 (oneDNN-fused)", f"{f['top1']:.2f}", "", mib(f["bytes"]), _ms(f["latency_ms"], "b1"),
             _ms(f["latency_ms"], "b32")],
            ["int8 full (none)", f"{q['full_int8_top1']:.2f}", f"{q['full_int8_top1'] - f['top1']:+.2f}",
             "", "", ""],
            [label, f"{q['top1']:.2f}", f"{q['top1'] - f['top1']:+.2f}", mib(q["bytes"]),
             _ms(q["latency_ms"], "b1"), _ms(q["latency_ms"], "b32")],
            ["speed-up fp32 / int8", "", "", ratio(f["bytes"], q["bytes"]),
             ratio(f["latency_ms"].get("b1"), q["latency_ms"].get("b1")),
             ratio(f["latency_ms"].get("b32"), q["latency_ms"].get("b32"))]]
    title = (f"\n{role} {prefix}: top-1 on {q['split']} ({q['split_images']} images); calibration "
             f"{q['calib_mode']} on {q['calib_images']} train images (seed {q['calib_seed']}); "
             f"latency best of repeats, fp32 and int8 timed alternately")
    parts.append(format_table(["model", "top-1 %", "Δ", "MiB", "ms b1", "ms b32"], rows, title))
    kept = ", ".join(q["excluded"]) if q["excluded"] else "none"
    parts.append(f"kept in fp32 ({n_kept}): {kept}")
    parts += [f"policy: {n}" for n in q["notes"]]
    if q.get("all_fp32"):
        parts.append("note: NO int8 variant holds the budget: the exported 'int8' model is the fp32 graph.")
    if q["bytes"] >= 0.9 * f["bytes"]:
        parts.append("size: MXNet's oneDNN int8 graph stores the weights in fp32 and quantizes them "
                     "when it first runs, so the file is not smaller.")
    parts += speed_lines(q)
    parts += layer_speed_lines(q)
    return "\n".join(parts)


def comparison_table(sections):
    """Dense teacher vs distilled/pruned student, each fp32 and int8."""
    rows = []
    for role in ("teacher", "student"):
        s = sections.get(role)
        if not s:
            continue
        f = s["fp32"]
        rows.append([role, f"{f['top1']:.2f}", f"{s['top1']:.2f}", f"{s['top1'] - f['top1']:+.2f}",
                     f"{s['full_int8_top1']:.2f}", _ms(f["latency_ms"], "b32"), _ms(s["latency_ms"], "b32"),
                     f"{s['speedup'].get('b32', float('nan')):.2f}×", len(s["excluded"])])
    t, st = sections.get("teacher"), sections.get("student")
    lines = [format_table(["model", "fp32 top-1", "int8 top-1", "Δ", "full int8", "fp32 ms b32",
                           "int8 ms b32", "speed-up", "fp32 layers"], rows,
                          "\nprune/distill first, then quantize (top-1 %, latency ms at batch 32):")]
    if t and st:
        speed = [_faster(t["fp32"]["latency_ms"][k], st["latency_ms"][k]) + f" at batch {k[1:]}"
                 for k in ("b32", "b1") if k in st["latency_ms"]]
        lines.append(f"dense teacher fp32 → student int8: {st['top1'] - t['fp32']['top1']:+.2f} points "
                     f"of top-1, {', '.join(speed)}.")
    return "\n".join(lines)


def _faster(ref_ms, new_ms):
    """'3.10× faster' or '1.20× SLOWER' for ``new_ms`` against ``ref_ms``."""
    r = ref_ms / new_ms
    return f"{r:.2f}× faster" if r >= 1 else f"{1 / r:.2f}× SLOWER"


def qat_table(section):
    """PTQ (``none``, ``first_last``, ``auto`` when it ran) beside QAT: top-1, its drop from fp32,
    the layers kept fp32, and latency where it was measured (a full-int8 PTQ graph has the QAT
    graph's shape, so they share its time)."""
    fp32 = section["fp32"]
    ptq, qat = section["ptq"], section["qat"]
    rows = [["fp32 (fused)", f"{fp32['top1']:.2f}", "", "all", _ms(fp32["latency_ms"], "b1"),
             _ms(fp32["latency_ms"], "b32")]]
    for name, r in ptq["policies"].items():
        lat = r.get("latency_ms") or (section["latency_ms"] if not r["excluded"] else {})
        rows.append([f"PTQ {ptq['calib_mode']}, {name}", f"{r['top1']:.2f}",
                     f"{r['top1'] - fp32['top1']:+.2f}", str(len(r["excluded"])),
                     _ms(lat, "b1"), _ms(lat, "b32")])
    n_fp32 = len(section.get("excluded") or [])
    rows.append([f"QAT {qat['epochs']} ep, simulated", f"{section['simulated_top1']:.2f}",
                 f"{section['simulated_top1'] - fp32['top1']:+.2f}", str(n_fp32), "", ""])
    rows.append([f"QAT {qat['epochs']} ep, MXNet int8", f"{section['top1']:.2f}",
                 f"{section['top1'] - fp32['top1']:+.2f}", str(n_fp32),
                 _ms(section["latency_ms"], "b1"), _ms(section["latency_ms"], "b32")])
    table = format_table(["model", "top-1 %", "Δ fp32", "fp32 layers", "ms b1", "ms b32"], rows)
    return (f"\nPTQ vs QAT (split: {section.get('split_images', '?')} held-out images; simulated "
            f"and MXNet int8 agree on {section['sim_int8_agreement']:.1f}% of them)\n{table}\n"
            f"model-int8-*: the QAT model; its fine-tuned fp32 weights and learned ranges: "
            f"{qat['fp32_prefix']}-*, {qat['thresholds_file']}")
