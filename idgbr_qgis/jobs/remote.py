"""One backend job on a remote service: the runner's job, with its files sent up and brought back.

The runner (`jobs.runner`) describes each backend job with paths on this computer (input, coarse, output,
confidence), as for the local service. A remote service cannot read those: `run_job` uploads the input and the
coarse map with the files GDAL reads beside them, submits the job naming the uploads, follows it (cancel
cancels it there), downloads the output (with its .aux.xml: the class names) and the confidence into temporary
files beside their targets, each checked by SHA-256, and puts them in place together once all arrived. The
job's files on the service are deleted afterwards, also after a failure or a cancel.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..backend_client import BackendError
from ..backend_client import JobCancelled as BackendCancelled
from ..i18n import tr
from .outcome import JobError

OUTPUT_NAME = "output.tif"  # the service's names of a job's results (idgbr.service.uploads)
CONFIDENCE_NAME = "confidence.tif"
AUX = ".aux.xml"
# Shares of one job's progress (percent): sending its rasters, then the run there, then fetching the results.
UPLOAD_SHARE = 10.0
DOWNLOAD_SHARE = 10.0
MB = 1024 * 1024
POLL_S = 0.25

Progress = Callable[[float, str], None]  # (percent 0-100 of this job, message)


def run_job(client: Any, fields: Dict[str, Any], progress: Progress,
            is_cancelled: Callable[[], bool]) -> Dict[str, Any]:
    """Run the job FIELDS (the local job's fields: ``input``, ``output`` and optional ``coarse`` and ``confidence``
    are paths here) on the remote CLIENT; its final status once the results are in place. Raises the client's
    BackendError (JobFailed, JobCancelled, ...) or JobError; nothing is written then."""
    job = dict(fields)
    source, output = Path(job.pop("input")), Path(job.pop("output"))
    coarse = _optional_path(job.pop("coarse", None))
    confidence = _optional_path(job.pop("confidence", None))
    groups = [("input", raster_files(source, "input"))]
    if coarse is not None:
        groups.append(("coarse", raster_files(coarse, "coarse")))
    sizes = _check_sizes(client, groups)

    uploads: List[str] = []  # not yet the job's: deleted here when anything fails
    job_id: Optional[str] = None
    temps: List[Path] = []
    try:
        total, sent = max(1, sum(sizes.values())), 0
        for parameter, files in groups:
            ids = []
            for file, name in zip(files, upload_names(files)):
                def sent_so_far(done: int, _size: int, before: int = sent, label: str = file.name) -> None:
                    progress(UPLOAD_SHARE * (before + done) / total,
                             tr("Uploading '{name}' to the remote backend: {done:.1f} of {size:.1f} MB").format(
                                 name=label, done=(before + done) / MB, size=total / MB))

                ids.append(client.upload(file, name, on_progress=sent_so_far, is_cancelled=is_cancelled))
                uploads.append(ids[-1])
                sent += sizes[file]
            job[f"{parameter}_upload"] = ids[0]
            if ids[1:]:
                job[f"{parameter}_sidecars"] = ids[1:]
        if confidence is not None:
            job["write_confidence"] = True

        job_id = client.submit(**job)
        uploads.clear()  # the job's own now: deleted with it
        running = 100.0 - UPLOAD_SHARE - DOWNLOAD_SHARE
        status = client.wait(job_id, on_progress=lambda percent, message: progress(
            UPLOAD_SHARE + running * max(0.0, min(100.0, percent)) / 100.0, message),
            is_cancelled=is_cancelled, poll=POLL_S)
        if is_cancelled():  # it finished as the cancel was sent: its results are not wanted
            raise BackendCancelled("cancelled; nothing was written")

        wanted = [(output, OUTPUT_NAME)] + ([(confidence, CONFIDENCE_NAME)] if confidence is not None else [])
        plan = _downloads(client, status, wanted)
        total = max(1, sum(int(info.get("size") or 0) for _target, _name, info in plan if info is not None))
        fetched = 0
        replacements: List[Tuple[Path, Optional[Path]]] = []
        for target, name, info in plan:
            if info is None:
                replacements.append((target, None))  # an older side file would describe another raster
                continue

            def received(done: int, _size: int, before: int = fetched) -> None:
                progress(100.0 - DOWNLOAD_SHARE + DOWNLOAD_SHARE * (before + done) / total,
                         tr("Downloading the results: {done:.1f} of {size:.1f} MB").format(
                             done=(before + done) / MB, size=total / MB))

            temp = client.fetch(job_id, name, target, size=info.get("size"), sha256=info.get("sha256"),
                                on_progress=received, is_cancelled=is_cancelled)
            temps.append(temp)
            replacements.append((target, temp))
            fetched += int(info.get("size") or 0)
        put_in_place(replacements)
        temps.clear()
        return status
    finally:
        for temp in temps:
            with contextlib.suppress(OSError):
                temp.unlink()
        for upload_id in uploads:
            client.delete_upload(upload_id)
        if job_id is not None:
            client.forget_job(job_id)


def _optional_path(value: Any) -> Optional[Path]:
    return Path(value) if value is not None else None


def _downloads(client: Any, status: Dict[str, Any],
               wanted: List[Tuple[Path, str]]) -> List[Tuple[Path, str, Optional[Dict[str, Any]]]]:
    """(local target, the service's file name, its {size, sha256} or None) of each result and its side file."""
    raw = status.get("result")
    result: Dict[str, Any] = raw if isinstance(raw, dict) else {}
    listed = result.get("files")
    files: Dict[str, Any] = listed if isinstance(listed, dict) else {}
    plan: List[Tuple[Path, str, Optional[Dict[str, Any]]]] = []
    for target, name in wanted:
        if not isinstance(files.get(name), dict):
            raise BackendError(f"the backend at {getattr(client, 'base_url', '?')} did not list {name} among the "
                               "job's files: update it to the plugin's version")
        for suffix in ("", AUX):
            info = files.get(name + suffix)
            plan.append((target.with_name(target.name + suffix), name + suffix,
                         info if isinstance(info, dict) else None))
    return plan


def put_in_place(replacements: List[Tuple[Path, Optional[Path]]]) -> None:
    """Move each checked download onto its target (None: remove the target), all or none: files already there
    are moved aside first and put back should any move fail."""
    aside: List[Tuple[Path, Path]] = []
    done: List[Path] = []
    try:
        for target, _temp in replacements:
            if target.exists():
                keep = target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.old")
                os.replace(target, keep)
                aside.append((target, keep))
        for target, temp in replacements:
            if temp is not None:
                os.replace(temp, target)
                done.append(target)
    except OSError as exc:
        for target in done:
            with contextlib.suppress(OSError):
                target.unlink()
        for target, keep in aside:
            with contextlib.suppress(OSError):
                os.replace(keep, target)
        names = ", ".join(str(target) for target, temp in replacements if temp is not None)
        raise JobError(tr("Could not put the results in place at {names} ({reason}); the files there before are "
                          "unchanged. Close them in other programs and check that the folder is writable.").format(
            names=names, reason=exc.strerror or exc), "output") from exc
    for _target, keep in aside:
        with contextlib.suppress(OSError):
            keep.unlink()


def raster_files(path: Path, parameter: str) -> List[Path]:
    """PATH and the files GDAL reads beside it (.aux.xml, a world file, overviews ...), which go up with it."""
    from osgeo import gdal  # QGIS's own GDAL: the plugin never loads the backend's

    try:
        dataset = gdal.OpenEx(str(path), gdal.OF_RASTER)
        listed = list(dataset.GetFileList() or []) if dataset is not None else []
    except RuntimeError:  # GDAL set to raise: the service then reports what it cannot read
        listed = []
    finally:
        dataset = None
    main = path.resolve()
    files = [path]
    for text in listed:
        file = Path(text)
        if not file.is_file() or file.resolve() == main:
            continue  # GDAL may list /vsi paths or files it merely looked for
        if file.resolve().parent != main.parent:
            raise JobError(tr("'{name}' reads {other} from another folder, which a remote backend does not receive: "
                              "save the layer as a GeoTIFF (Raster ▸ Conversion ▸ Translate) and use that.").format(
                name=path.name, other=file), parameter)
        files.append(file)
    return files


def upload_names(files: List[Path]) -> List[str]:
    """Names the service accepts for a raster and its side files, changed alike (character by character), so
    GDAL still pairs them there ("my map.tif", "my map.tif.aux.xml" -> "my_map.tif", "my_map.tif.aux.xml")."""
    names = [re.sub(r"[^A-Za-z0-9._-]", "_", path.name) for path in files]
    return names if re.match(r"^[A-Za-z0-9]", names[0]) else ["f" + name for name in names]


def _check_sizes(client: Any, groups: List[Tuple[str, List[Path]]]) -> Dict[Path, int]:
    """Each file's size; JobError naming the layer when one is over the service's upload limit."""
    limit = getattr(client, "max_upload_bytes", None)
    sizes: Dict[Path, int] = {}
    for parameter, files in groups:
        for file in files:
            try:
                sizes[file] = file.stat().st_size
            except OSError as exc:
                raise JobError(tr("Cannot read {file} ({reason}): check that it still exists.").format(
                    file=file, reason=exc.strerror or exc), parameter) from exc
            if isinstance(limit, int) and sizes[file] > limit:
                raise JobError(tr(
                    "{file} is {size:.1f} MB, over the upload limit of the remote backend ({limit:.1f} MB, its "
                    "--max-upload-mb): cut the raster to the area you need first (Raster ▸ Extraction ▸ Clip Raster "
                    "by Extent), or have the service started with a larger --max-upload-mb.").format(
                    file=file, size=sizes[file] / MB, limit=limit / MB), parameter)
    return sizes
