"""DICOMweb sources and destinations (a PACS round trip): find studies (QIDO-RS), fetch their series
(WADO-RS), segment them with the segment job, store DICOM-SEG / RTSTRUCT back (STOW-RS); may import
every stage below it (segment, io, adapter_file), never cli/ or serve/.

- :mod:`.errors`: one typed error per way a server can fail a run;
- :mod:`.limits`: what a run accepts from a server (bytes, series, pages, time), every answer read under them;
- :mod:`.session`: a dicomweb-client with HTTP basic or bearer authentication;
- :mod:`.query`: studies by patient, modality and date; our results already on the server;
- :mod:`.study`: a study's series fetched into a private folder, each instance checked against what was asked
  for, and told apart (segmentable or why not);
- :mod:`.store`: one STOW-RS request per series, after all its outputs were written;
- :mod:`.job`: :func:`segment_study` and :func:`segment_studies`, which put these together.
"""

from __future__ import annotations

from .errors import (BadAnswerError, DicomWebAuthError, DicomWebConnectionError, DicomWebError, LimitError, StoreError,
                     StudyNotFoundError)
from .job import SeriesResult, StudyResult, segment_studies, segment_study
from .limits import Limits

__all__ = ["BadAnswerError", "DicomWebAuthError", "DicomWebConnectionError", "DicomWebError", "LimitError", "Limits",
           "SeriesResult", "StoreError", "StudyNotFoundError", "StudyResult", "segment_studies", "segment_study"]
