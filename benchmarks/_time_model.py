"""The shared GPU time model's prediction for one benchmark row.

``../shared/tools/gpu_time_model.py`` (beside the project checkout; not part of revify) runs a
training step on fake tensors and models its time on an H100 from every op's FLOPs, bytes and
kernels and the Python run between ops. This module only calls it, in a subprocess per row:
for ``revify-revnet`` the subprocess first makes ``revify.convert`` default to the RevNet
coupling, since the tool's own methods are ``plain``, ``timm-ckpt`` and ``revify``.
"""

from __future__ import annotations

import functools
import json
import os
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["find_tool", "predict"]

_TOOL_METHOD = {"plain": "plain", "timm-ckpt": "timm-ckpt", "revify": "revify",
                "revify-revnet": "revify"}
_REPO = Path(__file__).resolve().parent.parent


def find_tool(path: str | None = None) -> Path | None:
    """The time model's script: ``path``, else ``../shared/tools/gpu_time_model.py`` from the
    repository root; None when absent."""
    candidate = Path(path) if path else _REPO.parent / "shared" / "tools" / "gpu_time_model.py"
    return candidate if candidate.is_file() else None


def predict(tool: Path, model: str, method: str, precision: str, batch: int,
            size: int = 224) -> dict[str, Any] | None:
    """The tool's prediction for one row (``step_s``, ``host_s``, ``device_s``, ``syncs``), or
    None when the tool failed or does not model ``method`` or ``size``."""
    if method not in _TOOL_METHOD or size != 224:  # the tool runs 224 px steps
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "prediction.json")
        cmd = [sys.executable, __file__, str(tool), method, "--model", model, "--method",
               _TOOL_METHOD[method], "--precision", precision, "--batch", str(batch),
               "--json", out]
        # The tool's fake step runs on the CPU: REVIFY_FUSED_STREAMS=1 makes revify take the
        # path a CUDA step takes (its fused stream ops; NOTE [ Fused streams ] in _fused.py).
        env = dict(os.environ, REVIFY_FUSED_STREAMS=os.environ.get("REVIFY_FUSED_STREAMS", "1"))
        done = subprocess.run(cmd, cwd=_REPO, capture_output=True, text=True, env=env)
        if done.returncode != 0 or not os.path.exists(out):
            print(done.stderr[-2000:], file=sys.stderr)
            return None
        with open(out) as f:
            result = json.load(f)
    return {k: result[k] for k in ("step_s", "host_s", "device_s", "syncs") if k in result}


def _run(tool: str, method: str, argv: list[str]) -> None:
    sys.path.insert(0, str(_REPO))
    if method == "revify-revnet":
        import revify

        convert = revify.convert
        revify.convert = functools.wraps(convert)(
            lambda *a, **k: convert(*a, **{"coupling": "revnet", **k})
        )
    sys.argv = [tool, *argv]
    runpy.run_path(tool, run_name="__main__")


if __name__ == "__main__":
    _run(sys.argv[1], sys.argv[2], sys.argv[3:])
