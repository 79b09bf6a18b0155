"""A finding's identifiers replaced by keyed pseudonyms (``privacy.pseudonymise``, issue 10). Pure.

What a finding carries that names a patient, a study or a peer: the study, series and SOP instance UIDs (also
as the driving instance of each label and of the heat map, and the failed instances), the accession number and
both AE titles. ``finding_id`` (the Nats-Msg-Id) is a hash of the series UID: ``build_finding`` derives it from
the pseudonymised series UID, so it is keyed too, and so is the heat map's file name, which is the finding id.
What stays: site, modality, body part, route, model, scores, boxes, times and the agent's host name, which
name the site's own set-up, not a patient or a peer.
"""

from __future__ import annotations

import dataclasses

from edge_agent.bus.finding import FindingInput, message_id
from edge_agent.privacy import Pseudonymiser


def pseudonymise(inp: FindingInput, p: Pseudonymiser) -> FindingInput:
    """The same finding with every identifier replaced by its pseudonym, marked ``pseudonymised``."""
    heatmap = inp.heatmap
    if heatmap is not None:
        heatmap = dataclasses.replace(heatmap, driving_instance_uid=p.uid(heatmap.driving_instance_uid))
    return dataclasses.replace(
        inp,
        study_instance_uid=p.uid(inp.study_instance_uid),
        series_instance_uid=p.uid(inp.series_instance_uid),
        sop_instance_uids=[p.uid(u) for u in inp.sop_instance_uids],
        failed_instance_uids=[p.uid(u) for u in inp.failed_instance_uids],
        accession_number=p.accession(inp.accession_number),
        calling_ae_title=p.ae_title(inp.calling_ae_title),
        called_ae_title=p.ae_title(inp.called_ae_title),
        labels=[dataclasses.replace(r, driving_instance_uid=p.uid(r.driving_instance_uid)) for r in inp.labels],
        heatmap=heatmap,
        pseudonymised=True,
    )


def finding_message_id(
    series_uid: str, model: str, model_version: str, revision: int, opened: float, p: Pseudonymiser | None
) -> str:
    """The Nats-Msg-Id (and finding_id) of a finding whose series is ``series_uid``, as ``build_finding`` will
    compute it: from the pseudonymised series UID when ``p`` is given, so it cannot be recomputed from the UID."""
    return message_id(p.uid(series_uid) if p is not None else series_uid, model, model_version, revision, opened)
