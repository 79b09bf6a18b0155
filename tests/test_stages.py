"""A finding's seconds per stage: one instance's figures and a series' maximum (pure, fast)."""

from __future__ import annotations

from edge_agent.dicom.header import InstanceMeta
from edge_agent.journal import Journal
from edge_agent.stages import InstanceStages, series_stage_seconds


def test_a_series_figure_is_the_longest_instance_per_stage() -> None:
    a = InstanceStages(receive=0.02, preprocess=0.1)
    a.frames_inferred([0.003, 0.009], [0.04, 0.05])
    b = InstanceStages(receive=0.5, preprocess=0.0123456789)
    b.frames_inferred([0.001], [0.03])
    assert series_stage_seconds([a, b]) == {"receive": 0.5, "preprocess": 0.1, "queue": 0.009, "infer": 0.05}
    assert series_stage_seconds([b]) == {"receive": 0.5, "preprocess": 0.012346, "queue": 0.001, "infer": 0.03}


def test_what_no_instance_measured_is_left_out() -> None:
    resumed = InstanceStages(preprocess=0.2)  # received before a restart: no receive figure
    resumed.frames_inferred([], [])
    assert series_stage_seconds([resumed]) == {"preprocess": 0.2}
    assert series_stage_seconds([]) == {}


def test_the_outbox_backlog_says_what_waits_and_when_each_model_last_went_out(journal: Journal) -> None:
    empty = journal.outbox.backlog()
    assert (empty.pending, empty.rejected, empty.oldest_pending_at, empty.last_acked_at) == (0, 0, None, {})
    ids = []
    for i, model in enumerate(("ct-demo", "ct-demo", "cxr-nodule")):
        series = f"1.2.826.0.1.3680043.8.498.{700 + i}"
        rec = journal.record_instance(InstanceMeta(sop_instance_uid=f"{series}.1", sop_class_uid="1.2.3",
                                                   series_uid=series, modality="CT"),
                                      spool_name=f"x/{i}.dcm", size_bytes=1)
        assert journal.close_series(rec.series_id, rec.revision, lambda s, i, m=model: ("r", m)) is not None
        assert journal.outbox.enqueue(rec.series_id, rec.revision, model, f"{i:064x}", "edge.findings.x", b"{}")
        ids.append(rec.series_id)
    rows = journal.outbox.pending()
    journal.outbox.ack(rows[0].id, 1)
    journal.outbox.reject(rows[2].id, "too_large: test")
    backlog = journal.outbox.backlog()
    assert (backlog.pending, backlog.rejected) == (1, 1)
    assert backlog.oldest_pending_at == rows[1].created_at
    assert set(backlog.last_acked_at) == {"ct-demo"} and backlog.last_acked_at["ct-demo"] >= rows[0].created_at
