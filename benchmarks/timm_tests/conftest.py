"""Run timm 1.0.31's own model tests (test_models.py, copied unchanged) on revify-converted models.

Every model built by ``timm.create_model`` (also as ``timm.models.create_model`` and
``timm.models._factory.create_model``, the names test_models.py imports) goes through
``revify.convert(model)`` before the test sees it. Conversion warnings are recorded; an
exception from ``convert`` propagates (the test fails: a finding).

Environment:
  REVIFY_CONVERT=0|1       (default 1) 0 runs the same selection unconverted (the baseline).
  REVIFY_TIMM_MODELS       comma-separated model names (default: MODELS below).
  REVIFY_TIMM_TESTS        comma-separated test function names (default: TESTS below).
  REVIFY_TIMM_LOG          path of a JSON-lines log: one line per convert call and per test result.
  REVIFY_TIMM_RESUME       a log: leave out the tests it already has a result for.
  REVIFY_TIMM_FULL=1       run SUBSET_TESTS on every model too (default: on SUBSET only).
  REVIFY_TIMM_TEST_TIMEOUT per-test wall-clock limit in seconds (default 180; SIGALRM).
"""

from __future__ import annotations

import json
import os
import signal
import time
import warnings

import pytest
import timm
import timm.models
import timm.models._factory

import revify

CONVERT = os.environ.get("REVIFY_CONVERT", "1") != "0"
LOG = os.environ.get("REVIFY_TIMM_LOG")
TEST_TIMEOUT = int(os.environ.get("REVIFY_TIMM_TEST_TIMEOUT", "180"))

MODELS = [
    # ResNet family
    "resnet18",
    "resnet26d",
    "resnext26ts",
    "cspresnet50",
    # ConvNeXt-like
    "convnext_atto",
    "inception_next_atto",
    "mambaout_femto",
    # ViT family
    "vit_tiny_patch16_224",
    "vit_small_patch16_224",
    "deit_tiny_patch16_224",
    "deit_tiny_distilled_patch16_224",
    "eva02_tiny_patch14_224",
    "beit_base_patch16_224",
    "xcit_nano_12_p16_224",
    # windowed / hierarchical transformers
    "swin_tiny_patch4_window7_224",
    "maxvit_rmlp_pico_rw_256",
    "tiny_vit_5m_224",
    "levit_128s",
    "poolformer_s12",
    "pit_ti_224",
    # mobile / efficient
    "efficientnet_b0",
    "mobilenetv3_small_050",
    "mobilenetv2_050",
    "ghostnet_050",
    "fastvit_t8",
    "efficientformer_l1",
    "edgenext_xx_small",
    # others
    "regnetx_002",
    "regnety_002",
    "densenet121",
    "dla34",
    "resmlp_12_224",
]
TESTS = [
    "test_model_forward",
    "test_model_backward",
    "test_model_default_cfgs",
    "test_model_default_cfgs_non_std",
    "test_model_forward_intermediates",
    "test_model_forward_features",
    "test_model_forward_fx",
    "test_model_backward_fx",
    "test_model_forward_torchscript",
]
# the costliest tests (an fx trace of the whole model, features_only wrappers) run on a subset
SUBSET = [
    "resnet18",
    "convnext_atto",
    "vit_tiny_patch16_224",
    "deit_tiny_distilled_patch16_224",
    "swin_tiny_patch4_window7_224",
    "maxvit_rmlp_pico_rw_256",
    "eva02_tiny_patch14_224",
    "levit_128s",
    "poolformer_s12",
    "efficientnet_b0",
    "mobilenetv3_small_050",
    "ghostnet_050",
    "regnetx_002",
    "dla34",
]
SUBSET_TESTS = {"test_model_forward_fx", "test_model_backward_fx", "test_model_forward_features"}
if os.environ.get("REVIFY_TIMM_FULL") == "1":  # every selected model in every selected test
    SUBSET_TESTS = set()
SELECTED_MODELS = set(
    filter(None, os.environ.get("REVIFY_TIMM_MODELS", ",".join(MODELS)).split(","))
)
SELECTED_TESTS = set(filter(None, os.environ.get("REVIFY_TIMM_TESTS", ",".join(TESTS)).split(",")))

_current_test = {"nodeid": None}


def _log(record: dict) -> None:
    if LOG:
        with open(LOG, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")


_orig_create_model = timm.models._factory.create_model


def create_model(model_name, *args, **kwargs):
    model = _orig_create_model(model_name, *args, **kwargs)
    if not CONVERT:
        return model
    record = {
        "kind": "convert",
        "test": _current_test["nodeid"],
        "model": model_name,
        "kwargs": {k: v for k, v in kwargs.items() if k != "pretrained"},
        "model_class": type(model).__name__,
    }
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            revify.convert(model)
        except BaseException as e:  # recorded, then re-raised: the test fails
            record["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            raise
        finally:
            record["seconds"] = round(time.perf_counter() - t0, 2)
            record["warnings"] = sorted(
                {f"{w.category.__name__}: {str(w.message).splitlines()[0]}" for w in caught}
            )
            try:
                record["stages"] = len(revify.stages(model))
            except Exception as e:  # noqa: BLE001
                record["stages"] = f"error {type(e).__name__}"
            _log(record)
    return model


create_model.__wrapped__ = _orig_create_model
timm.create_model = create_model
timm.models.create_model = create_model
timm.models._factory.create_model = create_model


def _resumed() -> set[str]:
    """REVIFY_TIMM_RESUME=log.jsonl: leave out the tests that log already has a result for."""
    path = os.environ.get("REVIFY_TIMM_RESUME")
    if not path or not os.path.exists(path):
        return set()
    done = set()
    for line in open(path):
        r = json.loads(line)
        if r["kind"] == "test" and r.get("converted") == CONVERT:
            done.add(r["nodeid"])
    return done


_done = _resumed()


def pytest_collection_modifyitems(config, items):
    # the cfg tests are parametrized over tagged names ('resnet18.a1_in1k'): keep the first tag
    keep, drop, seen = [], [], set()
    for item in items:
        name = getattr(item, "originalname", None) or item.name.split("[")[0]
        params = getattr(getattr(item, "callspec", None), "params", {})
        base = str(params.get("model_name", "")).split(".")[0]
        ok = name in SELECTED_TESTS and base in SELECTED_MODELS and (name, base) not in seen
        ok = ok and (name not in SUBSET_TESTS or base in SUBSET) and item.nodeid not in _done
        if ok:
            seen.add((name, base))
        (keep if ok else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep


class _TestTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise _TestTimeout(f"test exceeded {TEST_TIMEOUT}s (REVIFY_TIMM_TEST_TIMEOUT)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    _current_test["nodeid"] = item.nodeid
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(TEST_TIMEOUT)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    _current_test["nodeid"] = item.nodeid
    yield


def pytest_runtest_logreport(report):
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        first = ""
        if report.outcome == "failed":
            exc = getattr(report.longrepr, "reprcrash", None)
            first = (
                exc.message.splitlines()[0]
                if exc is not None and exc.message
                else str(report.longrepr).splitlines()[-1]
            )
        elif report.outcome == "skipped" and isinstance(report.longrepr, tuple):
            first = report.longrepr[2]
        _log(
            {
                "kind": "test",
                "nodeid": report.nodeid,
                "outcome": report.outcome,
                "converted": CONVERT,
                "seconds": round(report.duration, 2),
                "error": first,
            }
        )
