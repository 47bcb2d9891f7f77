"""Result UIDs derived from the job: a rerun writes the same SOP Instance UIDs.

A job that runs again (an actor or node lost mid-job, a restart after the export, ``aenode
retry``) must not make a second copy of its results at the destination: with the same SOP
Instance UID the PACS replaces the object (Orthanc with ``OverwriteInstances: true``).
:class:`ResultUids` derives each result's Series and SOP Instance UID from (job id, study,
input series and their revisions, model, model version) and the object's kind (the inputs
keep two stores' job 1 on different series of one study apart, as after ``aenode run``): a
name-based UUID (RFC 4122 version 5, the standard library's :func:`uuid.uuid5`) written as a
``2.25.<decimal>`` UID (PS3.5 B.2), so the same job gives the same UIDs in every run and
different jobs, inputs, models or versions never share one.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from pydicom.uid import UID

from aenode.records import Job

__all__ = ["NAMESPACE", "ResultUids"]

NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/aenode/aenode/result-uids")
"""The UUID namespace of aenode's result UIDs (fixed: changing it changes every UID)."""


@dataclass(frozen=True)
class ResultUids:
    """Deterministic UIDs of one job's result objects.

    Attributes
    ----------
    job_id : int
        The job's row id in the store.
    study_uid : str
        The job's study (so that job ids of two stores never collide at one PACS).
    inputs : tuple of str
        ``role=series_uid:revision`` of each input, sorted.
    model, version : str
        The card's name and version (a new model version writes new objects).
    """

    job_id: int
    study_uid: str
    inputs: tuple[str, ...]
    model: str
    version: str

    @classmethod
    def for_job(cls, job: Job, model: str, version: str) -> ResultUids:
        """The UIDs of ``job``'s results by the model card's ``name`` and ``version``."""
        inputs = tuple(
            f"{role}={s.series_uid}:{s.revision}" for role, s in sorted(job.inputs.items())
        )
        return cls(job.id or 0, job.study_uid, inputs, model, version)

    def uid(self, kind: str, what: str) -> UID:
        """The UID of ``what`` (``series``, ``sop``) of the ``kind`` object (SEG, report, SR).

        Returns
        -------
        pydicom.uid.UID
            ``2.25.<decimal>``, at most 64 characters, the same for the same arguments.
        """
        parts = [str(self.job_id), self.study_uid, *self.inputs, self.model, self.version]
        name = "\x1f".join([*parts, kind, what])
        return UID(f"2.25.{uuid.uuid5(NAMESPACE, name).int}")

    def series(self, kind: str) -> UID:
        """Series Instance UID of the ``kind`` result series."""
        return self.uid(kind, "series")

    def sop(self, kind: str) -> UID:
        """SOP Instance UID of the ``kind`` result object."""
        return self.uid(kind, "sop")
