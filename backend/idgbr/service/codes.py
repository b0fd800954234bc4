"""Machine-readable codes of the service's refusals (``code`` in every error body), beside the codes of failed
jobs in idgbr.errors. Programs branch on these, never on the message."""

from __future__ import annotations

INVALID_REQUEST = "invalid_request"  # not a job request at all (malformed, too deep, no such route)
UNAUTHORIZED = "unauthorized"
NOT_FOUND = "not_found"
OUTPUT_BUSY = "output_busy"
ALREADY_FINISHED = "already_finished"
QUEUE_FULL = "queue_full"
TOO_LARGE = "too_large"
# Uploads and downloads of remote jobs (idgbr.service.uploads).
CHECKSUM_MISMATCH = "checksum_mismatch"  # the bytes received are not the ones announced
INCOMPLETE = "incomplete"  # the upload ended before all its bytes arrived
BUSY = "busy"  # the upload is being received by another request
NO_SPACE = "no_space"  # the service's disk cannot hold the upload
NOT_READY = "not_ready"  # the job has not finished: nothing to download yet
