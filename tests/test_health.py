"""Collapse checks: hand-computed cases, and a collapsed run that says so."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _repo import DEBUG

from dadh_dist import config, health
from dadh_dist import run as runner


def test_chance_map_is_the_relevant_fraction_per_query():
    db = np.array([[1, 0], [1, 0], [0, 1], [1, 1]])
    # relevant 3/4, 2/4; the last has none: it counts 0, as mAP counts it (it was left out,
    # which put the chance level above any ranking's mAP on such splits)
    q = np.array([[1, 0], [0, 1], [0, 0]])
    assert health.chance_map(q, db) == pytest.approx((0.75 + 0.5 + 0) / 3)
    assert health.chance_of(np.array([3, 2, 0]), 4) == health.chance_map(q, db)


def test_distinct_codes_counts_rows():
    codes = np.array([[1, -1], [1, -1], [-1, -1]], np.int8)
    assert health.distinct_codes(codes) == 2
    assert health.distinct_codes(codes[:0]) == 0


def test_collapse_warning_names_each_reason_and_passes_healthy_codes():
    labels = np.eye(3, dtype=np.int8).repeat(4, 0)  # 3 classes, 4 items each
    healthy = np.array([[1, 1], [1, -1], [-1, 1]], np.int8).repeat(4, 0)
    assert health.collapse_warning(healthy, healthy, labels, labels, 0.9) is None
    same = np.ones((12, 2), np.int8)
    got = health.collapse_warning(same, healthy, labels, labels, 0.34)
    assert got.startswith("codes collapsed: 1 distinct query code(s) for 3 classes")
    assert "mAP 0.340 is at the chance level 0.333" in got
    assert "database" not in got
    assert "2 distinct database code(s)" in health.collapse_warning(
        healthy, healthy[[0, 4] * 6], labels, labels, None)


def test_collapsed_run_warns_in_log_and_final_metrics(tmp_path, capsys):
    # the old debug settings: plain CNN, gamma 2000, one short epoch; every query one code
    cfg = config.load(DEBUG, ["scaling.use_ray=false", "model.norm=none",
                              "objective.gamma=2000", "train.inner_epochs=1",
                              "train.outer_iters=2", "train.num_samples=256",
                              "log.tensorboard=false", f"log.run_dir={json.dumps(str(tmp_path))}",
                              "log.name=c"])
    final = runner.run_local(cfg)
    out = capsys.readouterr().out
    assert final["warnings"], final
    saved = json.loads((tmp_path / "c" / "final_metrics.json").read_text())
    assert saved["warnings"] == final["warnings"]
    for enc, warning in final["warnings"].items():
        assert f"WARNING: encoder {enc}: {warning}" in out
    assert final["chance_map"] == pytest.approx(0.1, abs=0.01)


def test_best_precision_at_n_is_bounded_by_each_querys_relevant_count():
    q = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], np.uint8)
    db = np.array([[1, 0], [1, 0], [1, 0], [0, 1]], np.uint8)
    relevant = health.relevant_counts(q, db)
    assert relevant.tolist() == [3, 1, 4, 0]
    assert health.best_precision_at(relevant, 2) == pytest.approx((1 + 0.5 + 1 + 0) / 4)
    assert health.best_precision_at(np.array([5, 9]), 4) == 1.0
    from dadh_dist import report

    ev = report.Evaluation("query", ["fg"], {}, 0, 1000)
    ev.health = {"distinct_database_codes": 5, "distinct_query_codes": {"fg": 3},
                 "chance_map": 0.1, "best_p_at_n": 0.16}
    assert report._health_line(ev)[1] == ("- P@1000 is at most 0.1600 here, for any ranking: "
                                          "some queries have fewer than 1000 relevant database "
                                          "images")
    ev.health["best_p_at_n"] = 1.0
    assert len(report._health_line(ev)) == 1


def test_relevant_counts_single_label_shortcut_equals_the_pairwise_count(monkeypatch):
    rng = np.random.default_rng(0)
    q = np.eye(4, dtype=np.uint8)[rng.integers(0, 4, 37)]
    db = np.eye(4, dtype=np.uint8)[rng.integers(0, 4, 101)]
    naive = np.array([sum(int((a @ b) > 0) for b in db) for a in q], np.float64)
    assert health.relevant_counts(q, db).tolist() == naive.tolist()
    multi = db.copy()
    multi[0, :] = 1  # one multi-label row: the pairwise path, in blocks of a few queries
    monkeypatch.setattr(health, "RELEVANT_BLOCK", 300)
    naive = np.array([sum(int((a @ b) > 0) for b in multi) for a in q], np.float64)
    assert health.relevant_counts(q, multi).tolist() == naive.tolist()
