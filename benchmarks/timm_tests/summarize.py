"""Summarize the JSON-lines logs of an unconverted and a converted run (REVIFY_TIMM_LOG).

    python benchmarks/timm_tests/summarize.py UNCONVERTED.jsonl[,MORE.jsonl] CONVERTED.jsonl \
        [OUT.json]

Prints per test function: collected, passed unconverted, passed converted, and the tests that pass
unconverted but fail converted (model, first line of the error, convert warnings).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def load(paths: str) -> tuple[dict, list]:
    tests, converts = {}, []
    for path in paths.split(","):
        for line in open(path):
            r = json.loads(line)
            if r["kind"] == "test":
                tests[r["nodeid"].split("::", 1)[1]] = r
            else:
                converts.append(r)
    return tests, converts


def split(tid: str) -> tuple[str, str]:
    fn, params = tid.split("[", 1)
    return fn, params.rstrip("]").split("-", 1)[-1]


# (class, cause) by the first line of the converted run's error; see docs/timm_tests.md
CAUSES = [
    (
        "'_LazyContainer' object has no attribute '__globals__'",
        "b",
        "torchscript: container forward",
    ),
    (
        "Inference tensors do not track version counter",
        "b",
        "lazy container plan under inference_mode",
    ),
    ("example_input gave", "b", "lazy container: optional positional args"),
    (
        "its parameters are not the ones the forward used",
        "b",
        "fx GraphModule backward: parameter check",
    ),
    ("traced into a", "c", "fx: traced into a unit (ViT/EVA)"),
    ("cannot be scripted with torch.jit.script", "c", "torchscript: refused, names revify.revert"),
    ("is not held by a module of its own", "c", "fx: stage not held by one module"),
    (
        "was called directly but cannot be converted on its own",
        "c",
        "container called directly, refused",
    ),
    ("Tensor-likes are not close", "a", "forward_intermediates != forward_features"),
]


def classify(error: str) -> tuple[str, str]:
    for pattern, cls, cause in CAUSES:
        if pattern in error:
            return cls, cause
    return "?", "unclassified"


def main() -> None:
    un, _ = load(sys.argv[1])
    co, converts = load(sys.argv[2])
    by_fn = defaultdict(lambda: dict(n=0, un=0, co=0, un_skip=0, co_skip=0))
    regress = []
    for tid, r in sorted(co.items()):
        fn, model = split(tid)
        u = un.get(tid)
        if u is None:
            continue
        row = by_fn[fn]
        row["n"] += 1
        row["un"] += u["outcome"] == "passed"
        row["co"] += r["outcome"] == "passed"
        row["un_skip"] += u["outcome"] == "skipped"
        row["co_skip"] += r["outcome"] == "skipped"
        if u["outcome"] == "passed" and r["outcome"] != "passed":
            warns = sorted(
                {
                    w
                    for c in converts
                    if c["test"] and c["test"].endswith(tid)
                    for w in c["warnings"]
                }
            )
            cls, cause = classify(r["error"])
            regress.append(
                dict(test=fn, model=model, error=r["error"], warnings=warns, cls=cls, cause=cause)
            )
    print("| test | run | passed unconverted | passed converted | skipped (un/conv) |")
    print("|---|---:|---:|---:|---|")
    for fn, row in sorted(by_fn.items()):
        print(
            f"| {fn} | {row['n']} | {row['un']} | {row['co']} | {row['un_skip']}/{row['co_skip']} |"
        )
    print()
    print("| test | model | class | error (first line) |")
    print("|---|---|---|---|")
    for x in regress:
        print(f"| {x['test']} | `{x['model']}` | ({x['cls']}) | {x['error'][:200]} |")
    print()
    counts = defaultdict(int)
    for x in regress:
        counts[(x["cls"], x["cause"])] += 1
    for (cls, cause), n in sorted(counts.items()):
        print(f"({cls}) {cause}: {n}")
    if len(sys.argv) > 3:
        json.dump(
            dict(by_fn=by_fn, regress=regress, converts=converts), open(sys.argv[3], "w"), indent=1
        )


if __name__ == "__main__":
    main()
