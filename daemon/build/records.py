"""The database rows a new build starts with: the build, and each step pending."""

from __future__ import annotations

import json

from amber.daemon.build.build import Build
from amber.daemon.build.state import BuildStatus, StepStatus
from amber.daemon.storage.db import BuildRecord, StepRecord


def new_build_records(build: Build, seq: int) -> tuple[BuildRecord, list[StepRecord]]:
    spec = build.spec
    record = BuildRecord(
        id=build.id,
        seq=seq,
        uid=build.uid,
        name=spec.name,
        spec=json.dumps(spec.to_dict(), default=str),
        spec_path=build.spec_path,
        status=BuildStatus.QUEUED.value,
        created=build.created,
    )
    steps = [
        StepRecord(
            build_id=build.id,
            idx=i,
            name=s.name,
            key=None,
            status=StepStatus.PENDING.value,
            definition=json.dumps(
                {**s.definition(), "env": spec.step_env(s), "workdir": spec.workdir}
            ),
        )
        for i, s in enumerate(spec.steps)
    ]
    return record, steps
