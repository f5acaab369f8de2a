"""The terminal report of ``distill export``: one row per format, MXNet as the reference."""
from ..report import format_table

__all__ = ["export_table"]


def _num(v, fmt):
    return "-" if v is None or v != v else fmt.format(v)


def export_table(card):
    """Format, files, size, top-1, agreement with MXNet, batch-1 latency and check, per format."""
    ref = card["reference"]
    rlat = (ref.get("latency_ms") or {}).get("b1")
    rows = [["MXNet (reference, fused)", "", _num(ref.get("top1"), "{:.2f}"), "", "",
             _num(rlat, "{:.3f}"), "", "", ""]]
    for name in card["export_run"]["formats"]:
        e = card["exports"][name]
        p = e.get("parity") or {}
        lat = (e.get("latency_ms") or {}).get("b1")
        if name == "mxnet":
            lat = None                      # the reference row is MXNet's latency
        label = name + (" (fp16)" if e.get("precision") == "fp16" else "")
        rows.append([label, f"{e['bytes'] / 2**20:.2f}",
                     _num(p.get("top1"), "{:.2f}"), _num(p.get("max_abs_diff"), "{:.1e}"),
                     _num(p.get("top1_agreement"), "{:.2f}"), _num(lat, "{:.3f}"),
                     _num(rlat / lat if rlat and lat else None, "{:.2f}×"),
                     "ok" if e["check"]["passed"] else "FAILED", " + ".join(e["files"])])
    title = (f"\nexport {card['name']} ({card['model']['role']}) → {card['export_run'].get('out_dir', '')}"
             f"\ntest split: {card['test_split']['images']} images; latency at batch 1, best of "
             f"{card['export_run']['repeats']} repeats, {card['export_run']['threads']} thread(s)")
    table = format_table(["format", "MiB", "top-1 %", "max |Δ|", "agree %", "ms b1", "speed-up",
                          "check", "files"], rows, title)
    notes = [f"{n}: {card['exports'][n]['check']['message']}" for n in card["export_run"]["formats"]
             if not card["exports"][n]["check"]["passed"]]
    q = card["exports"].get("onnx-int8") if "onnx-int8" in card["export_run"]["formats"] else None
    if q and q.get("mxnet_int8"):
        m = q["mxnet_int8"]
        notes.append(f"onnx-int8 top-1 {q['parity']['top1']:.2f}% vs MXNet int8 {m['top1']:.2f}% "
                     f"(rebuilt with the same {q['quantization']['calibration_images']} calibration "
                     f"images, thresholds and fp32 layers; predictions agree on "
                     f"{m['top1_agreement']:.2f}%)"
                     + (f"; distill quantize's model-int8: {m['distill_quantize_top1']:.2f}%"
                        if m.get("distill_quantize_top1") is not None else ""))
    for n in card["export_run"]["formats"]:
        notes += card["exports"][n].get("report_notes") or []     # a format's own lines (ncnn-int8)
    for n, why in (card["export_run"].get("skipped") or {}).items():
        notes.append(f"skipped {n}: {why}")
    cal = card.get("calibration")
    if cal and cal.get("list"):
        notes.append(f"ncnn int8 on the device: {cal['images']} calibration images listed in "
                     f"{cal['list']}; commands in MODEL_CARD.md")
    return table + ("\n" + "\n".join(notes) if notes else "") + "\nmodel card: MODEL_CARD.md, model_card.json"
