"""Quantisation recipes against fp32 and onnxruntime's default ``quantize_dynamic``.

Per model and recipe: size ratio, single-thread latency ratio (median of
interleaved runs, so machine load hits both sides alike) and quality (mean/min
cosine to fp32, accuracy on held-out labels where the model is a classifier).
onnxruntime's default (per-tensor weights, no pre-processing) runs in the
same process on the same data.

    .venv/bin/python benchmarks/bench_quantize.py [--quick] [--large]

``--large`` also builds a model over 2 GiB (external data) end to end; it
writes about 5 GiB to the temporary directory and needs about 8 GiB of memory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgepack.build import QualityTargetError, build_variants
from edgepack.build._util import tree_size

Feed = dict[str, np.ndarray]


def session(path: Path) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def latency_ratio(fp32: Any, other: Any, feed: Feed, rounds: int) -> tuple[float, float]:
    """Median latencies (ms) of fp32 and the variant, measured interleaved."""
    for s in (fp32, other):
        s.run(None, feed)
    a: list[float] = []
    b: list[float] = []
    for _ in range(rounds):
        for s, sink in ((fp32, a), (other, b)):
            start = time.perf_counter()
            s.run(None, feed)
            sink.append((time.perf_counter() - start) * 1000)
    return statistics.median(a), statistics.median(b)


def quality(
    fp32: Any, other: Any, batches: list[Feed], labels: np.ndarray | None
) -> dict[str, float]:
    cos: list[np.ndarray] = []
    right_ref: list[np.ndarray] = []
    right: list[np.ndarray] = []
    for feed in batches:
        x = np.asarray(fp32.run(None, feed)[-1], dtype=np.float64)
        y = np.asarray(other.run(None, feed)[-1], dtype=np.float64)
        x2, y2 = x.reshape(len(x), -1), y.reshape(len(y), -1)
        cos.append(np.sum(x2 * y2, 1) / (np.linalg.norm(x2, axis=1) * np.linalg.norm(y2, axis=1)))
        right_ref.append(x2.argmax(1))
        right.append(y2.argmax(1))
    result = {
        "mean_cos": float(np.mean(np.concatenate(cos))),
        "min_cos": float(np.min(np.concatenate(cos))),
    }
    if labels is not None:
        result["acc_fp32"] = float(np.mean(np.concatenate(right_ref) == labels))
        result["acc"] = float(np.mean(np.concatenate(right) == labels))
    return result


def bench_model(
    title: str,
    fp32: Path,
    validation: Any,
    batches: list[Feed],
    labels: np.ndarray | None,
    recipes: list[tuple[str, dict[str, Any]]],
    work: Path,
    rounds: int,
    calibration: Any = None,
) -> list[dict[str, Any]]:
    from onnxruntime.quantization import quantize_dynamic

    rows = []
    base = session(fp32)
    size = tree_size(fp32.parent)
    default = work / f"{title}-ort-default.onnx"
    quantize_dynamic(str(fp32), str(default))
    candidates: list[tuple[str, Path, str]] = [
        ("ort quantize_dynamic (default)", default, "per-tensor, no pre-processing")
    ]
    for label, options in recipes:
        start = time.perf_counter()
        try:
            staged = build_variants(
                fp32,
                hw=options.pop("hw", "intel-nuc"),
                workdir=work / f"{title}-{label}",
                validation=validation,
                calibration=calibration,
                **options,
            )
        except QualityTargetError as missed:  # report the best reached, as the builder does
            assert missed.best is not None
            note = f"target missed; best: {missed.best.recipe.label()}; {time.perf_counter() - start:.1f}s"
            candidates.append((label, missed.best.path, note))
            continue
        variant = staged.report.variants[0]
        note = f"{variant.recipe_label}; {time.perf_counter() - start:.1f}s"
        candidates.append((label, staged.variants[0].model_dir / "model.onnx", note))
    for label, path, note in candidates:
        other = session(path)
        t_fp32, t_other = latency_ratio(base, other, batches[0], rounds)
        q = quality(base, other, batches, labels)
        candidate_size = tree_size(path.parent) - (
            tree_size(path.parent / "health") if (path.parent / "health").exists() else 0
        )
        if path == default:
            candidate_size = path.stat().st_size
        rows.append(
            {
                "model": title,
                "recipe": label,
                "size_ratio": candidate_size / size,
                "latency_fp32_ms": t_fp32,
                "latency_ms": t_other,
                "speedup": t_fp32 / t_other,
                **q,
                "note": note,
            }
        )
    return rows


def print_rows(rows: list[dict[str, Any]]) -> None:
    header = "| model | recipe | size ×fp32 | latency ms (fp32 → variant) | speed-up | mean cos | min cos | accuracy fp32 → variant | chosen |"
    print(header)
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        acc = f"{r['acc_fp32']:.4f} → {r['acc']:.4f}" if "acc" in r else "—"
        print(
            f"| {r['model']} | {r['recipe']} | {r['size_ratio']:.2f} | {r['latency_fp32_ms']:.3f} → {r['latency_ms']:.3f} "
            f"| {r['speedup']:.2f}x | {r['mean_cos']:.4f} | {r['min_cos']:.4f} | {acc} | {r['note']} |"
        )
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer latency rounds, small models only"
    )
    parser.add_argument(
        "--large", action="store_true", help="also build a >2 GiB model (slow, big)"
    )
    parser.add_argument("--only", help="run only the models whose title contains this text")
    args = parser.parse_args()
    rounds = 15 if args.quick else 60
    import torch
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    from tests.build.models import TinyEncoder, tiny_encoder, token_batches, train_digits_cnn

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    xt, yt = x[1200:], y[1200:]
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as scratch:
        work = Path(scratch)
        all_rows: list[dict[str, Any]] = []

        def fp32_of(model: Any, **options: Any) -> Path:
            staged = build_variants(
                model,
                hw="intel-nuc",
                workdir=work / f"fp32-{len(all_rows)}-{time.time_ns()}",
                quantize="none",
                **options,
            )
            return staged.fp32

        int8: list[tuple[str, dict[str, Any]]] = [
            ("fp16", {"quantize": "fp16", "min_cosine": 0.9}),
            ("dynamic (profile)", {"quantize": "dynamic", "min_cosine": 0.0}),
            ("static QDQ", {"quantize": "static", "min_cosine": 0.0}),
        ]

        def wanted(title: str) -> bool:
            return args.only is None or args.only in title

        # digits CNN
        cnn = train_digits_cnn(x[:1200], y[:1200])
        images = xt.reshape(-1, 1, 8, 8)
        val_cnn = {"image": images, "labels": yt}
        path = (
            work
            if not wanted("digits CNN")
            else fp32_of(
                cnn, input_names=["image"], dynamic_axes={"image": {0: "batch"}}, validation=val_cnn
            )
        )
        batches = [{"image": images[i : i + 64]} for i in range(0, len(images), 64)]
        rows = (
            []
            if not wanted("digits CNN")
            else bench_model(
                "digits CNN",
                path,
                val_cnn,
                batches,
                yt,
                [
                    *int8,
                    (
                        "auto (accuracy drop ≤ 0.01)",
                        {"quantize": "auto", "max_accuracy_drop": 0.01},
                    ),
                ],
                work,
                rounds,
                calibration={"image": x[:256].reshape(-1, 1, 8, 8)},
            )
        )
        if rows:
            print_rows(rows)
        all_rows += rows
        # sklearn MLP
        mlp = MLPClassifier(hidden_layer_sizes=(256, 128), max_iter=60, random_state=0).fit(
            x[:1200], y[:1200]
        )
        val_mlp = {"input": xt, "labels": yt}
        path = work if not wanted("digits MLP") else fp32_of(mlp, validation=val_mlp)
        batches = [{"input": xt[i : i + 64]} for i in range(0, len(xt), 64)]
        rows = (
            []
            if not wanted("digits MLP")
            else bench_model(
                "digits MLP (sklearn)",
                path,
                val_mlp,
                batches,
                yt,
                [
                    *int8,
                    (
                        "auto (accuracy drop ≤ 0.01)",
                        {"quantize": "auto", "max_accuracy_drop": 0.01},
                    ),
                ],
                work,
                rounds,
                calibration={"input": x[:256]},
            )
        )
        if rows:
            print_rows(rows)
        all_rows += rows
        # transformers
        sizes = [("tiny encoder (64 wide, 2 layers)", 64, 2)]
        if not args.quick:
            sizes.append(("encoder (256 wide, 4 layers)", 256, 4))
        for title, width, layers in sizes:
            if not wanted(title):
                continue
            if width == 64:
                model = tiny_encoder()
            else:
                torch.manual_seed(0)
                model = TinyEncoder(vocab=1000, width=width).eval()
                model.encoder = torch.nn.TransformerEncoder(
                    torch.nn.TransformerEncoderLayer(
                        width, 4, 4 * width, batch_first=True, dropout=0.0, activation="gelu"
                    ),
                    layers,
                    enable_nested_tensor=False,
                ).eval()
                generator = torch.Generator().manual_seed(1)
                with torch.no_grad():
                    for name, parameter in model.named_parameters():
                        if parameter.ndim == 2 and not name.startswith("embed"):
                            parameter.mul_(
                                torch.exp(
                                    torch.randn(parameter.shape[0], 1, generator=generator) * 0.9
                                )
                            )
            tokens = token_batches(count=8, rows=8, seed=0)
            held_out = token_batches(count=8, rows=8, seed=2)
            calib = token_batches(count=8, rows=8, seed=1)
            padded = [
                {"ids": np.pad(b["ids"], ((0, 0), (0, 20 - b["ids"].shape[1])))} for b in calib
            ]
            path = fp32_of(
                model,
                example_inputs=(torch.from_numpy(tokens[0]["ids"]),),
                input_names=["ids"],
                dynamic_axes={"ids": {0: "batch", 1: "sequence"}},
                validation=tokens,
            )
            rows = bench_model(
                title,
                path,
                tokens,
                held_out,
                None,
                [
                    *int8,
                    ("auto (profile: cosine ≥ 0.99)", {"quantize": "auto"}),
                    ("auto (cosine ≥ 0.995)", {"quantize": "auto", "min_cosine": 0.995}),
                    ("auto (cosine ≥ 0.999)", {"quantize": "auto", "min_cosine": 0.999}),
                ],
                work,
                rounds,
                calibration=padded,
            )
            print_rows(rows)
            all_rows += rows
        if args.large:
            large_case(work)


def large_case(work: Path) -> None:
    """A >2 GiB MatMul chain with external data, built with recipe none and dynamic."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    width, layers = 8192, 9  # 9 × 8192² × 4 bytes ≈ 2.25 GiB
    folder = work / "large"
    folder.mkdir()
    rng = np.random.default_rng(0)
    inits, nodes = [], []
    current = "x"
    for i in range(layers):
        inits.append(
            numpy_helper.from_array(
                (rng.standard_normal((width, width), dtype=np.float32) / 90), f"W{i}"
            )
        )
        nodes.append(helper.make_node("MatMul", [current, f"W{i}"], [f"h{i}"], name=f"mm{i}"))
        current = f"h{i}"
    graph = helper.make_graph(
        nodes,
        "large",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", width])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, ["b", width])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(
        model, str(folder / "model.onnx"), save_as_external_data=True, location="weights.bin"
    )
    del model, graph, inits
    val = {"x": rng.standard_normal((2, width)).astype(np.float32)}
    for recipe in ("none", "dynamic"):
        start = time.perf_counter()
        staged = build_variants(
            folder / "model.onnx",
            hw="generic-x86_64",
            workdir=work / f"large-{recipe}",
            quantize=recipe,
            validation=val,
            min_cosine=0.9,
        )
        variant = staged.report.variants[0]
        files = sorted(p.name for p in staged.variants[0].model_dir.iterdir())
        print(
            f"| >2 GiB MatMul chain | {recipe} | {variant.size_ratio:.2f} | — | — | {variant.quality['mean_cosine']:.4f} "
            f"| {variant.quality['min_cosine']:.4f} | — | {files}; {time.perf_counter() - start:.0f}s |"
        )


if __name__ == "__main__":
    main()
