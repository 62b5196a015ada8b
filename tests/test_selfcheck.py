"""`kaggle-i2p selfcheck`: each library's and kind's own example served on the bundled sample and compared with the
tower's own forward; a broken one is a FAIL line and exit 1, one without an example a skip, an unknown name exit 2."""

from __future__ import annotations

from kaggle_i2p.cli import main
from kaggle_i2p.core.registry import LIBRARIES
from kaggle_i2p.inference.selfcheck import check_pairs, home_library


def test_selfcheck_serves_the_examples_as_their_own_forward(capsys):
    assert main(["selfcheck", "--library", "torchscript", "--kind", "prior", "--kind", "caption"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out[:3]] == ["ok   torchscript x regressor", "ok   timm x prior",
                                                         "ok   transformers x caption"]
    assert all("7 images served as the tower's own forward (lowest cosine 1.000000)" in line for line in out[:3])
    assert out[3] == "kaggle_i2p selfcheck: 3 of 3 passed or had no example"


def test_selfcheck_names_what_breaks_and_skips_what_has_no_example(capsys, monkeypatch):
    onnx, export = LIBRARIES.get("onnx"), LIBRARIES.get("export")
    monkeypatch.setattr(type(onnx), "example", lambda self, folder, features=None: "missing.onnx")
    monkeypatch.setattr(type(export), "example", lambda self, folder, features=None: None)
    assert main(["selfcheck", "--library", "onnx", "--library", "export"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("FAIL onnx x regressor: FileNotFoundError: ") and "missing.onnx" in out[0]
    assert out[1].startswith("skip export x regressor: library 'export' has no example here")
    assert out[2] == "kaggle_i2p selfcheck: 1 of 2 passed or had no example; failed: onnx x regressor"


def test_selfcheck_refuses_an_unknown_name_and_checks_everything_by_default(capsys):
    assert main(["selfcheck", "--kind", "anchored"]) == 2
    assert "--kind anchored: 'anchored' is not one of regressor, retrieval" in capsys.readouterr().err
    pairs = check_pairs()
    assert pairs[:len(LIBRARIES.names())] == [(name, "regressor") for name in LIBRARIES.names()]
    assert ("transformers", "caption") in pairs and ("open_clip", "interrogator") in pairs
    assert home_library("fusion") == "timm" and len(pairs) == len(set(pairs))


def test_selfcheck_of_a_manifest_checks_what_its_towers_use(capsys, demo_manifest):
    from kaggle_i2p.inference.selfcheck import manifest_uses

    assert manifest_uses(demo_manifest) == (["timm"], ["retrieval", "prior"])
    assert main(["selfcheck", "--manifest", str(demo_manifest)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out[:-1]] == ["ok   timm x regressor", "ok   timm x retrieval",
                                                          "ok   timm x prior"]
