"""The ``revify`` command line: ``revify audit MODEL`` on locally built timm models."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from revify.cli import main

SMALL = ["--batch-size", "2", "--img-size", "64"]


def test_audit_writes_json_markdown_and_plot(tmp_path, capsys) -> None:
    paths = {k: tmp_path / f"audit.{k}" for k in ("json", "md", "png")}
    code = main([
        "audit", "resnet18", *SMALL, "--json", str(paths["json"]),
        "--markdown", str(paths["md"]), "--plot", str(paths["png"]),
    ])
    assert code == 0
    data = json.loads(paths["json"].read_text())
    assert data["input_shape"] == [2, 3, 64, 64] and data["batch_size"] == 2
    assert 0 < data["saved_after"] < data["saved_before"]
    assert any(r["name"] == "layer1 [stage state]" for r in data["rows"])
    assert "| **total** |" in paths["md"].read_text()
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    assert "layer1.1" in capsys.readouterr().out  # the rich table


def test_json_to_stdout_is_pure_json(capsys) -> None:
    code = main([
        "audit", "resnet18", *SMALL, "--json", "-", "--no-checkpoint-stem", "--beta", "0.5",
    ])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["options"]["checkpoint_stem"] is False and data["options"]["beta"] == 0.5
    assert any(r["kind"] == "unchanged" and r["name"] == "stem" for r in data["report"])


def test_unknown_model_lists_close_matches(capsys) -> None:
    assert main(["audit", "resnet5O"]) == 2
    err = capsys.readouterr().err
    assert "unknown timm model 'resnet5O'" in err and "resnet50" in err


def test_bad_usage_exits_2() -> None:
    with pytest.raises(SystemExit) as info:
        main(["audit", "resnet18", "--batch-size", "0"])
    assert info.value.code == 2


def test_python_dash_m() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "revify", "audit", "resnet5O"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "resnet50" in proc.stderr


def test_unwritable_output_path_is_refused_before_the_audit(tmp_path, capsys, monkeypatch):
    """Exit 2 with one line, before the model is built (the audit itself takes minutes)."""
    import timm

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the output paths were checked")

    monkeypatch.setattr(timm, "create_model", no_model)
    cases = [("--json", "/no/such/dir/x.json", "directory /no/such/dir does not exist"),
             ("--markdown", str(tmp_path), "it is a directory"),
             ("--plot", str(tmp_path / "missing" / "a.png"), "does not exist")]
    for flag, path, why in cases:
        assert main(["audit", "resnet18", *SMALL, flag, path]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"cannot write {flag} {path}: " in err and why in err
