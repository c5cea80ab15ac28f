"""The data contract between ``runner/`` and ``analysis/``: Parquet column names, types, units.

``ROW_COLUMNS`` is the single source of truth; the README's column table is generated from it
(``dmx schema``) so the two cannot drift apart.
"""
from __future__ import annotations

import pyarrow as pa

#: One detection box of ``det_boxes``.
DET_BOX = pa.struct([("x1", pa.float32()), ("y1", pa.float32()), ("x2", pa.float32()),
                     ("y2", pa.float32()), ("score", pa.float32()), ("class", pa.int32())])
#: One output's divergence of ``outputs`` (the out_* of that output alone).
OUTPUT_DIV = pa.struct([("name", pa.string()), ("max_abs", pa.float64()), ("rel_l2", pa.float64()),
                        ("cosine", pa.float64())])

# (name, type, unit, meaning)
ROW_COLUMNS: tuple[tuple[str, pa.DataType, str, str], ...] = (
    ("run_id", pa.string(), "", "id of the run (one per run directory)"),
    ("cell_id", pa.string(), "", "id of the cell: a hash of its non-null factors"),
    ("image_id", pa.string(), "", "image path relative to the dataset root"),
    # one string column per axis of the spec sits here (decoder, exif, resize, backend, ...)
    ("status", pa.string(), "", "ok | error | skipped"),
    ("error_stage", pa.string(), "", "read | decode | preprocess | model-build | infer | postprocess "
                                                  "(detector output decoding) | reference | worker-crash "
                                                  "(the image killed its worker on every attempt)"),
    ("error", pa.string(), "", "error message, or why the cell was skipped"),
    ("is_reference", pa.bool_(), "", "this row belongs to the reference cell"),
    ("decoded_h", pa.int32(), "px", "height of the decoded image, before any resize"),
    ("decoded_w", pa.int32(), "px", "width of the decoded image, before any resize"),
    ("shape_match", pa.bool_(), "", "decoded shape equals the reference cell's decoded shape"),
    ("px_equal", pa.bool_(), "", "model input equals the reference's, bit for bit (0-255 scale, "
                                 "after resize/crop, before normalisation)"),
    ("px_max_abs", pa.float64(), "0-255", "max abs difference of the model input vs the reference"),
    ("px_mean_abs", pa.float64(), "0-255", "mean abs difference of the model input"),
    ("px_frac_diff", pa.float64(), "0-1", "fraction of input pixels (any channel) that differ"),
    ("px_psnr", pa.float64(), "dB", "PSNR of the model input vs the reference (inf if equal)"),
    ("out_max_abs", pa.float64(), "logits", "max abs difference of the output vs the reference cell "
                                            "(several outputs: the largest over model.compare_outputs)"),
    ("out_mean_abs", pa.float64(), "logits", "mean abs difference of the output"),
    ("out_rel_l2", pa.float64(), "ratio", "||out - ref|| / ||ref||"),
    ("out_cosine", pa.float64(), "-1..1", "cosine similarity of output and reference output"),
    ("out_sqnr_db", pa.float64(), "dB", "signal-to-quantisation-noise ratio, 10 log10(|ref|^2/|out-ref|^2)"),
    ("out_worst", pa.string(), "", "the output the out_* columns describe: of the outputs compared "
                                   "(model.outputs; default all), the one with the largest out_rel_l2"),
    ("outputs", pa.list_(OUTPUT_DIV), "", "per-output divergence (name, max_abs, rel_l2, cosine) for a "
                                        "model with more than one compared output; null for one output"),
    ("out_kl", pa.float64(), "nats", "KL(softmax(ref) || softmax(out)) (classification)"),
    ("top1", pa.int32(), "class", "top-1 class of this cell (classification)"),
    ("top1_ref", pa.int32(), "class", "top-1 class of the reference cell"),
    ("top1_agree", pa.bool_(), "", "top1 == top1_ref"),
    ("top5_overlap", pa.float64(), "0-1", "|top-5 ∩ reference top-5| / 5"),
    ("top5", pa.list_(pa.int32()), "class", "top-5 classes of this cell, best first"),
    ("top5_prob", pa.list_(pa.float32()), "0-1", "softmax probabilities of top5"),
    ("label", pa.int32(), "class", "ground-truth class of the image (dataset.labels, in the model's "
                                   "class order); null when the image has no label"),
    ("correct_top1", pa.bool_(), "", "top1 == label (classification; null without a label or output)"),
    ("correct_top5", pa.bool_(), "", "label is among top5 (classification; null without a label or "
                                     "output)"),
    ("det_rank_tau", pa.float64(), "-1..1", "detection: Kendall tau-b of pre-NMS candidate scores, cell vs "
                                            "reference, over the union of both top-k candidates (k = "
                                            "detection.rank_k, default 100); 1 = same order"),
    ("det_topk_overlap", pa.float64(), "0-1", "detection: |top-k candidates ∩ reference top-k| / k"),
    ("det_n_ref", pa.int32(), "boxes", "detection: boxes the reference cell kept after NMS"),
    ("det_n", pa.int32(), "boxes", "detection: boxes this cell kept after NMS"),
    ("det_matched", pa.int32(), "boxes", "detection: boxes matched one-to-one with the reference's (greedy, "
                                          "class-agnostic, IoU >= detection.match_iou, default 0.5; boxes "
                                          "compared in decoded-image pixels)"),
    ("det_missed", pa.int32(), "boxes", "detection: reference boxes without a match (det_n_ref - det_matched)"),
    ("det_extra", pa.int32(), "boxes", "detection: boxes of this cell without a match (det_n - det_matched)"),
    ("det_mean_iou", pa.float64(), "0-1", "detection: mean IoU of the matched pairs (null if none)"),
    ("det_score_delta_max", pa.float64(), "0-1", "detection: max |score - reference score| over matched pairs"),
    ("det_class_flips", pa.int32(), "boxes", "detection: matched pairs whose class differs"),
    ("det_same", pa.bool_(), "", "detection: same final set: equal counts, all matched with IoU >= "
                                 "detection.same_iou (default 0.9), |score delta| <= detection.same_score "
                                 "(default 0.05), no class flip"),
    ("det_boxes", pa.list_(DET_BOX), "px", "detection: the boxes this cell kept after NMS, in decoded-image "
                                           "pixels (x1 y1 x2 y2, continuous), with score and class; what "
                                           "mAP against dataset.labels is computed from"),
    ("precision_effective", pa.string(), "", "precision the backend actually ran, read back from it"),
    ("threads_used", pa.int32(), "threads", "intra-op threads the backend ran with (the threads axis "
                                            "when swept; else the executor's: all cores locally, 1 per "
                                            "Ray worker)"),
    ("batch_max_abs", pa.float64(), "logits", "reuse guard, on sampled images: max abs difference of this "
                                              "image's output inferred in another batch (reversed order; "
                                              "alone) vs the output kept; null when not sampled"),
    ("batch_rel_l2", pa.float64(), "ratio", "reuse guard: the same difference as a relative L2 norm "
                                            "(norm of a - b over norm of a)"),
    ("reused", pa.bool_(), "", "output reused from another cell with a bit-identical input tensor"),
    ("out_digest", pa.string(), "", "first 16 bytes (hex) of SHA-256 over this cell's output tensor(s) "
                                    "for the image: dmx diff tells bit for bit which outputs moved"),
    ("decoder_version", pa.string(), "", "the decoding library and its version that ran (e.g. 'pillow 13.0.0')"),
    ("decoder_libjpeg", pa.string(), "", "the libjpeg(-turbo) build behind that decoder, as it reports it"),
    ("decode_ms", pa.float64(), "ms", "decode time of this image for this cell's decoder"),
    ("decode_note", pa.string(), "", "what the decoder converted beyond a plain YCbCr/RGB decode "
                                     "(e.g. 'CMYK->RGB (Pillow convert)', reduce fallbacks); null when nothing"),
    ("preprocess_ms", pa.float64(), "ms", "resize/crop/normalise time (shared with an earlier decode variant of the image whose pixels are equal)"),
    ("latency_ms", pa.float64(), "ms", "inference time per image (batch time / batch size)"),
    ("node", pa.string(), "", "the machine that computed the row: host name, and on Ray the first 8 "
                              "hex digits of its Ray node id ('host/1a2b3c4d'); its environment is "
                              "under nodes in manifest.json"),
)

FIXED_HEAD = ("run_id", "cell_id", "image_id")


def row_schema(axes: tuple[str, ...]) -> pa.Schema:
    """Schema of ``rows/`` for a spec with these axes (axis columns follow ``image_id``)."""
    fields = [pa.field(n, t) for n, t, _, _ in ROW_COLUMNS[:3]]
    fields += [pa.field(a, pa.string()) for a in axes]
    fields += [pa.field(n, t) for n, t, _, _ in ROW_COLUMNS[3:]]
    return pa.schema(fields)


CELL_COLUMNS = (
    ("cell_id", pa.string()), ("is_reference", pa.bool_()), ("status", pa.string()),
    ("skip_reason", pa.string()), ("label", pa.string()),
)


def cell_schema(axes: tuple[str, ...]) -> pa.Schema:
    return pa.schema([pa.field(n, t) for n, t in CELL_COLUMNS[:1]]
                     + [pa.field(a, pa.string()) for a in axes]
                     + [pa.field(n, t) for n, t in CELL_COLUMNS[1:]])


IMAGE_COLUMNS: tuple[tuple[str, pa.DataType], ...] = (
    ("image_id", pa.string()), ("path", pa.string()), ("format", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("subsampling", pa.string()),
    ("progressive", pa.bool_()), ("arithmetic", pa.bool_()), ("exif_orientation", pa.int32()),
    ("components", pa.int32()), ("color_mode", pa.string()), ("icc", pa.bool_()),
    ("bytes", pa.int64()), ("sha256", pa.string()), ("error", pa.string()),
)
IMAGE_SCHEMA = pa.schema([pa.field(n, t) for n, t in IMAGE_COLUMNS])


def columns_markdown() -> str:
    """The README's table of row columns."""
    lines = ["| column | type | unit | meaning |", "| --- | --- | --- | --- |"]
    for name, typ, unit, meaning in ROW_COLUMNS:
        lines.append(f"| `{name}` | {typ} | {unit} | {meaning} |")
        if name == "image_id":
            lines.append("| `<axis>` | string | | one column per axis of the spec, the cell's level "
                         "(null where the axis does not apply) |")
    return "\n".join(lines)
