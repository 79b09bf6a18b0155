"""`edge-agent status` on this side: where it asks, and the text a person reads (pure, fast)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from edge_agent.config import HttpConfig
from edge_agent.status_client import base_url, duration, normalise_url, render, size

DOC: dict[str, Any] = {
    "version": "0.1.0",
    "site": "north",
    "host": "edge-box-3",
    "started_at": "2026-01-31T08:00:00.000Z",
    "uptime_seconds": 7384.2,
    "ready": True,
    "reasons": [],
    "broker": {"connected": True, "url": "nats://10.0.0.5:4222", "stream": "EDGE_FINDINGS"},
    "outbox": {"pending": 0, "rejected": 0, "oldest_pending_at": None, "oldest_pending_age_seconds": None},
    "spool": {"free_bytes": 13_207_024_435, "min_free_bytes": 1 << 30, "held_bytes": 1_572_864, "held_files": 3},
    "series": {"open": 1, "by_state": {"open": 1, "published": 12}},
    "queues": {"pending_instances": 4, "max_pending_instances": 2000, "preprocess": 2,
               "batch": {"cxr-nodule": 1}, "decoded_instances": {"cxr-nodule": 3}},
    "models": {
        "cxr-nodule": {"version": "1.0.0", "backend": "onnxruntime", "precision": "fp32", "loaded": True,
                       "problem": None, "last_finding_at": "2026-01-31T10:02:50.000Z",
                       "last_finding_age_seconds": 12.4,
                       "drift": {"state": "stable", "psi": {"score": 0.0123, "mean": 0.04}}},
    },
}


def test_a_ready_daemon_in_a_few_lines() -> None:
    assert render(DOC, "http://127.0.0.1:9108").splitlines() == [
        "edge-agent 0.1.0 at http://127.0.0.1:9108 (site north, host edge-box-3)",
        "  up 2 h 3 min, since 2026-01-31T08:00:00.000Z",
        "  ready: yes",
        "  broker: connected to nats://10.0.0.5:4222, stream EDGE_FINDINGS",
        "  outbox: 0 pending, 0 rejected",
        "  spool: 12.3 GiB free (watermark 1.0 GiB), 3 files held (1.5 MiB)",
        "  series: 1 open; by state: open 1, published 12",
        "  queues: 4 instances waiting for inference (bound 2000), 2 being decoded",
        "  models:",
        "    cxr-nodule 1.0.0 on onnxruntime fp32: batch queue 1, decoded 3; last finding 12 s ago "
        "(2026-01-31T10:02:50.000Z)",
        "      drift: stable PSI mean 0.04, score 0.0123",
    ]


def test_what_is_wrong_is_spelled_out() -> None:
    doc = copy.deepcopy(DOC)
    doc["ready"] = False
    doc["reasons"] = ["spool below its free-space watermark (spool.min_free_bytes)"]
    doc["broker"]["connected"] = False
    doc["outbox"] = {"pending": 7, "rejected": 1, "oldest_pending_age_seconds": 185.0}
    doc["models"]["ct-demo"] = {"version": None, "backend": "tensorrt", "precision": "fp16", "loaded": False,
                                "problem": "engine ct-demo: no plan for this GPU", "drift": {}}
    doc["models"]["cxr-nodule"]["drift"] = {"state": "unwatched", "reason": "the model card has no drift_reference"}
    lines = render(doc, "http://box:9108").splitlines()
    assert lines[2:4] == ["  ready: NO", "    - spool below its free-space watermark (spool.min_free_bytes)"]
    assert "  broker: NOT connected to nats://10.0.0.5:4222, stream EDGE_FINDINGS" in lines
    assert ("  outbox: 7 pending (oldest waiting 3 min 5 s), 1 rejected (fix the cause, then: edge-agent "
            "requeue-rejected)") in lines
    assert "    ct-demo on tensorrt fp16: NOT LOADED: engine ct-demo: no plan for this GPU" in lines
    assert "      drift: unwatched (the model card has no drift_reference)" in lines


@pytest.mark.parametrize(
    ("host", "url"),
    [("127.0.0.1", "http://127.0.0.1:9108"), ("0.0.0.0", "http://127.0.0.1:9108"), ("::", "http://[::1]:9108"),
     ("fd00::7", "http://[fd00::7]:9108"), ("edge-box-3.example", "http://edge-box-3.example:9108")],
)
def test_the_daemon_is_asked_where_it_listens(host: str, url: str) -> None:
    assert base_url(HttpConfig(host=host, port=9108)) == url


@pytest.mark.parametrize("given", ["127.0.0.1:9108", "http://127.0.0.1:9108", "http://127.0.0.1:9108/",
                                   "http://127.0.0.1:9108/status"])
def test_a_url_may_be_given_loosely(given: str) -> None:
    assert normalise_url(given) == "http://127.0.0.1:9108"


def test_durations_and_sizes_read_as_a_person_says_them() -> None:
    assert [duration(s) for s in (0, 59.9, 61, 3600, 90061, -3)] == ["0 s", "59 s", "1 min 1 s", "1 h 0 min",
                                                                      "1 d 1 h", "0 s"]
    assert [size(n) for n in (0, 1023, 1024, 1536 * 1024, 5 * 2**40, 2**52)] == [
        "0 B", "1023 B", "1.0 KiB", "1.5 MiB", "5.0 TiB", "4096.0 TiB"]
