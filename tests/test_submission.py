"""The CSV format, against the competition's real sample_submission.csv."""

import os

import numpy as np
import pytest

from kaggle_i2p.inference.dryrun import sample_targets
from kaggle_i2p.inference.submission import check_format, read_submission, submission_frame, write_submission


def test_writing_the_sample_values_reproduces_the_sample_file_byte_for_byte(tmp_path, sample_dir):
    ids, targets = sample_targets(sample_dir / "sample_submission.csv")
    out = write_submission(ids, targets, tmp_path / "submission.csv")
    assert out.read_bytes() == (sample_dir / "sample_submission.csv").read_bytes()


def test_values_round_trip_exactly(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.standard_normal((3, 384)).astype(np.float32) * np.float32(1e-3)
    values[0, 0] = np.float32(1e-7)  # tiny values must survive too
    write_submission(["b", "a", "c"], values, tmp_path / "s.csv")
    back = read_submission(tmp_path / "s.csv")
    assert back["imgId_eId"].tolist()[:2] == ["b_0", "b_1"] and back["imgId_eId"].iloc[384] == "a_0"
    assert np.array_equal(back["val"].to_numpy(np.float32).reshape(3, 384), values)


def test_frame_matches_file(tmp_path):
    values = np.eye(2, 384, dtype=np.float32)
    frame = submission_frame(["x", "y"], values)
    assert list(frame.columns) == ["imgId_eId", "val"] and len(frame) == 768
    write_submission(["x", "y"], values, tmp_path / "s.csv")
    back = read_submission(tmp_path / "s.csv")
    assert back["imgId_eId"].tolist() == frame["imgId_eId"].tolist()
    assert np.array_equal(back["val"].to_numpy(np.float32), frame["val"].to_numpy(np.float32))


def test_refuses_nan_and_leaves_no_partial_file(tmp_path):
    values = np.ones((1, 384), dtype=np.float32)
    values[0, 5] = np.nan
    target = tmp_path / "submission.csv"
    target.write_text("previous good file")
    with pytest.raises(ValueError, match="NaN or inf"):
        write_submission(["a"], values, target)
    assert target.read_text() == "previous good file"
    assert os.listdir(tmp_path) == ["submission.csv"]


def test_write_is_atomic_when_interrupted(tmp_path, monkeypatch):
    target = tmp_path / "submission.csv"
    target.write_text("previous good file")

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        write_submission(["a"], np.ones((1, 384), np.float32), target)
    assert target.read_text() == "previous good file" and os.listdir(tmp_path) == ["submission.csv"]


def test_check_format_catches_each_problem(tmp_path, sample_dir):
    sample = sample_dir / "sample_submission.csv"
    ids, targets = sample_targets(sample)
    assert check_format(sample, sample).ok

    write_submission(ids[::-1], targets[::-1], tmp_path / "reversed.csv")
    result = check_format(tmp_path / "reversed.csv", sample)
    assert not result.ok and "row id(s) differ from the sample; first at row 1: 'f27825b2c_0' vs '20057f34d_0'" in \
        result.problems[0]

    write_submission(ids[:6], targets[:6], tmp_path / "short.csv")
    assert "2304 rows, expected 2688" in check_format(tmp_path / "short.csv", sample).problems

    text = sample.read_text().replace("imgId_eId,val", "id,value", 1).replace("0.018848453", "nan", 1)
    (tmp_path / "header.csv").write_text(text)
    problems = check_format(tmp_path / "header.csv", sample).problems
    assert "header is 'id,value', expected 'imgId_eId,val'" in problems
