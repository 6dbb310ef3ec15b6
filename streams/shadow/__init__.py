"""Shadow traffic, compared offline: the comparator pairs primary and candidate answers
(`comparator.py`), reports read the comparisons (`report.py`), and recorded shadow logs are
replayed to a candidate (`replay.py`). Answers here never reach users."""
