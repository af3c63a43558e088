"""Calibration and evaluation text: built-in corpora, local files and `datasets` names, as token windows."""

from brickwork.data.corpora import CORPORA, DEFAULT_CALIBRATION, DEFAULT_EVALUATION, prepare_corpora
from brickwork.data.sources import describe_source, iter_documents, iter_token_windows, token_windows

__all__ = [
    "CORPORA",
    "DEFAULT_CALIBRATION",
    "DEFAULT_EVALUATION",
    "describe_source",
    "iter_documents",
    "iter_token_windows",
    "prepare_corpora",
    "token_windows",
]
