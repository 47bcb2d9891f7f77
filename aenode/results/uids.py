"""Result UIDs derived from the job: a rerun writes the same SOP Instance UIDs.

A job that runs again (an actor or node lost mid-job, a restart after the export, ``aenode
retry``) must not make a second copy of its results at the destination: with the same SOP
Instance UID the PACS replaces the object (Orthanc with ``OverwriteInstances: true``).
:class:`ResultUids` derives each result's Series and SOP Instance UID from (job id, study,
model, model version) and the object's kind, with pydicom's
:func:`~pydicom.uid.generate_uid` (a ``2.25.`` UUID-derived UID from a SHA-512 of the
entropy sources), so the same job gives the same UIDs in every run and different jobs,
models or versions never share one.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.uid import UID, generate_uid

__all__ = ["ResultUids"]


@dataclass(frozen=True)
class ResultUids:
    """Deterministic UIDs of one job's result objects.

    Attributes
    ----------
    job_id : int
        The job's row id in the store.
    study_uid : str
        The job's study (so that job ids of two stores never collide at one PACS).
    model, version : str
        The card's name and version (a new model version writes new objects).
    """

    job_id: int
    study_uid: str
    model: str
    version: str

    def uid(self, kind: str, what: str) -> UID:
        """The UID of ``what`` (``series``, ``sop``) of the ``kind`` object (SEG, report, SR).

        Returns
        -------
        pydicom.uid.UID
            ``2.25.<decimal>``, at most 64 characters, the same for the same arguments.
        """
        sources = [str(self.job_id), self.study_uid, self.model, self.version, kind, what]
        return generate_uid(prefix=None, entropy_srcs=sources)

    def series(self, kind: str) -> UID:
        """Series Instance UID of the ``kind`` result series."""
        return self.uid(kind, "series")

    def sop(self, kind: str) -> UID:
        """SOP Instance UID of the ``kind`` result object."""
        return self.uid(kind, "sop")
