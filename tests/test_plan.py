"""`kaggle-i2p plan`: the projection's arithmetic, the timing loop on a fake clock, and the command end to end (no
time is asserted)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from kaggle_i2p.cli import main
from kaggle_i2p.core.errors import OptionError
from kaggle_i2p.inference.plan import RunPlan, ViewTiming, parse_budget, time_views


def _plan(budget_h: float) -> RunPlan:
    views = [ViewTiming("eva", "r336", 10.0, 30.0, 0.5),  # 1600 s for 16k images
             ViewTiming("vit", "r336", 4.0, 0.0, 0.3),  # 4000 s
             ViewTiming("convnext", "r448", 2.0, 0.0, 0.2)]  # 8000 s
    return RunPlan(images=16_000, budget_s=budget_h * 3600, margin=0.15, startup_s=10.0, decode_images_per_s=100.0,
                   views=views, device="cuda")


def test_the_projection_adds_startup_compiling_and_the_larger_of_compute_and_decoding():
    plan = _plan(9)
    assert plan.compile_s() == 30.0
    assert plan.total_s() == pytest.approx((10 + 30 + 13_600) * 1.15)
    assert plan.fits and plan.drops() == [] and "fits in 9.00 h" in plan.report()
    slow_decoding = RunPlan(16_000, 9 * 3600, 0.0, 0.0, 1.0, plan.views)  # 16,000 s of decoding, more than compute
    assert slow_decoding.total_s() == pytest.approx(30 + 16_000)


def test_a_run_that_does_not_fit_drops_the_least_weight_per_hour_first():
    plan = _plan(3)  # 10,800 s: the full run needs 15,686 s
    assert not plan.fits
    assert [v.tower for v in plan.drops()] == ["convnext"]  # 0.2 of the weight for 8000 s: the cheapest loss
    assert "to fit, drop convnext r448 (20.0% of the ensemble): 1.80 h" in plan.report()
    hopeless = _plan(0.01)  # start-up and decoding alone take 195.5 s
    assert len(hopeless.drops()) == 3 and "even with no views left it does not fit" in hopeless.report()
    assert json.loads(hopeless.to_json())["fits"] is False


def test_views_are_timed_first_batch_apart_on_the_clock_given():
    """A fake clock: each view's first batch takes 5 s, its 3 timed batches 2 s in all (4 images each)."""
    ticks = iter([0.0, 5.0, 5.0, 7.0, 10.0, 15.0, 15.0, 17.0])
    spec = SimpleNamespace(name="t", views=[SimpleNamespace(name="a"), SimpleNamespace(name="b")])
    runner = SimpleNamespace(spec=spec, device=torch.device("cpu"), compute_views=lambda pixels, names: None)
    timings = time_views(runner, torch.zeros(4, 3, 8, 8), 3, {("t", "a"): 0.7}, clock=lambda: next(ticks))
    assert [(t.view, t.images_per_s, t.first_batch_s, t.share) for t in timings] == [
        ("a", 6.0, pytest.approx(5 - 4 / 6), 0.7), ("b", 6.0, pytest.approx(5 - 4 / 6), 0.0)]


def test_budgets_are_read_in_hours_minutes_or_seconds():
    assert [parse_budget(b) for b in ("9h", "90m", "5400s", "2.5")] == [32_400, 5400, 5400, 9000]
    for bad in ("nine", "0h", "-1h", "9d"):
        with pytest.raises(OptionError, match="give hours, minutes or seconds"):
            parse_budget(bad)


def test_plan_command_times_every_tower_and_view(toy_manifest, capsys):
    assert main(["plan", "--manifest", str(toy_manifest), "--device", "cpu", "--repeats", "1", "--workers", "0",
                 "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [(v["tower"], v["view"]) for v in plan["views"]] == [
        ("toy_timm_vit", "r64"), ("toy_timm_vit", "r64_flip"), ("toy_timm_vit", "r96"), ("toy_timm_vit", "r96_flip"),
        ("toy_open_clip_vit", "r64"), ("toy_open_clip_vit", "r80")]
    assert all(v["images_per_s"] > 0 for v in plan["views"]) and plan["decode_images_per_s"] > 0
    assert sum(v["share"] for v in plan["views"]) == pytest.approx(1.0) and plan["fits"] is True
    assert main(["plan", "--manifest", str(toy_manifest), "--budget", "soon"]) == 2
    assert "budget 'soon'" in capsys.readouterr().err
