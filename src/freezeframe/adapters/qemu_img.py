"""The Images port over ``qemu-img``: the one place that runs it.

Every call pins the format: ``-f FMT`` for a whole file, or a ``json:`` filename naming the driver for a byte range
of a file (a disk inside an OVA) and for images from outside (``"backing": null``: never open a file the header
names). Failures map to typed errors: tool missing or too slow or failing -> HypervisorError with qemu-img's own
line, a full filesystem -> InsufficientSpace.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from freezeframe.errors import HypervisorError, InsufficientSpace, InvalidRequest
from freezeframe.ports import ImageCheck, ImageInfo, ImageRef, ProgressCallback

INFO_TIMEOUT_S = 120.0
CREATE_TIMEOUT_S = 120.0
CHECK_TIMEOUT_S = 3600.0
_FORMATS = frozenset({"qcow2", "raw", "vmdk", "vpc", "vdi", "vhdx", "qed"})
_OPTION = re.compile(r"[A-Za-z0-9_]{1,32}")
_OPTION_VALUE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_PROGRESS = re.compile(rb"\((\d{1,3}(?:\.\d+)?)/100%\)")
_CHECK_STATUS = {0: "ok", 2: "corrupt", 3: "leaks", 63: "unsupported"}


def _format(fmt: str) -> str:
    if fmt not in _FORMATS:
        raise InvalidRequest(f"image format {fmt!r} is not one freezeframe opens ({', '.join(sorted(_FORMATS))})")
    return fmt


def _one_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return "; ".join(lines[-3:])


def _options(options: Mapping[str, str] | None) -> list[str]:
    if not options:
        return []
    for key, value in options.items():
        if not _OPTION.fullmatch(key) or not _OPTION_VALUE.fullmatch(value):
            raise InvalidRequest(f"image creation option {key}={value!r} is not a plain option")
    return ["-o", ",".join(f"{k}={v}" for k, v in options.items())]


def _spec(image: ImageRef) -> dict[str, Any]:
    fmt = _format(image.format)
    file: dict[str, Any] = {"driver": "file", "filename": str(image.path)}
    if image.offset or image.size is not None:
        raw: dict[str, Any] = {"driver": "raw", "offset": image.offset, "file": file}
        if image.size is not None:
            raw["size"] = image.size
        file = raw
    spec: dict[str, Any] = {"driver": fmt, "file": file}
    if not image.backing and fmt not in ("raw",):
        spec["backing"] = None
    return spec


def _plain(image: ImageRef) -> bool:
    return not image.offset and image.size is None and (image.backing or image.format == "raw")


def source_args(image: ImageRef) -> list[str]:
    """``-f FMT PATH`` for a whole file, the pinned ``json:`` filename (driver included) otherwise."""
    if _plain(image):
        return ["-f", _format(image.format), str(image.path)]
    return ["json:" + json.dumps(_spec(image), separators=(",", ":"))]


def _target_args(target: ImageRef, existing: bool) -> list[str]:
    if _plain(target):
        return ["-O", _format(target.format), str(target.path)]
    if not existing:
        raise InvalidRequest("a conversion into a byte range of a file needs an existing target image")
    return ["--target-image-opts", ",".join(_image_opts(_spec(target)))]


def _image_opts(spec: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in spec.items():
        if isinstance(value, Mapping):
            yield from _image_opts(value, f"{prefix}{key}.")
        elif value is not None:
            yield f"{prefix}{key}={str(value).replace(',', ',,')}"


def _failure(what: str, detail: str) -> Exception:
    if "No space left" in detail:
        return InsufficientSpace(f"{what}: no space left ({detail}); free space and retry")
    return HypervisorError(f"{what} failed: {detail}")


def run(argv: Sequence[str], what: str, timeout: float | None) -> subprocess.CompletedProcess[str]:
    """One qemu-img call, its failure typed; the returncode is checked by the caller when 0 is not the only good."""
    try:
        return subprocess.run(
            ["qemu-img", *argv], capture_output=True, text=True, check=False, timeout=timeout,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except FileNotFoundError as exc:
        raise HypervisorError("qemu-img is not installed (package qemu-utils); run scripts/setup-host.sh") from exc
    except subprocess.TimeoutExpired as exc:
        raise HypervisorError(f"{what}: qemu-img did not finish within {timeout:g} s") from exc


def _checked(argv: Sequence[str], what: str, timeout: float | None) -> subprocess.CompletedProcess[str]:
    result = run(argv, what, timeout)
    if result.returncode != 0:
        raise _failure(what, _one_line(result.stderr or result.stdout) or f"exit status {result.returncode}")
    return result


def _backing_name(path: Path) -> str:
    """A relative backing path stays relative: QEMU resolves it from the image's own folder."""
    return str(path) if not path.is_absolute() else str(path.resolve())


def _backing(info: Mapping[str, Any], image: ImageRef) -> str | None:
    backing = info.get("full-backing-filename") or info.get("backing-filename")
    if not backing:
        return None
    resolved = Path(backing) if Path(backing).is_absolute() else image.path.parent / backing
    return str(resolved.resolve())


class QemuImg:
    """Images over the ``qemu-img`` tool."""

    def info(self, image: ImageRef) -> ImageInfo:
        out = _checked(["info", "-U", "--output=json", *source_args(image)], f"reading {image.path}", INFO_TIMEOUT_S)
        try:
            data: dict[str, Any] = json.loads(out.stdout)
            extents = data.get("format-specific", {}).get("data", {}).get("extents")
            return ImageInfo(
                format=str(data["format"]),
                virtual_size=int(data["virtual-size"]),
                actual_size=int(data.get("actual-size", 0)),
                backing=_backing(data, image),
                backing_format=data.get("backing-filename-format"),
                extents=len(extents) if isinstance(extents, list) and data["format"] == "vmdk" else None,
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise HypervisorError(f"qemu-img info gave no usable answer for {image.path}: {exc}") from exc

    def create(
        self,
        path: Path,
        fmt: str,
        size: int | None = None,
        *,
        backing: ImageRef | None = None,
        options: Mapping[str, str] | None = None,
    ) -> None:
        argv = ["create", "-q", "-f", _format(fmt), *_options(options)]
        if backing is not None:
            if not _plain(backing):
                raise InvalidRequest("a backing image must be a whole file")
            argv += ["-F", _format(backing.format), "-b", _backing_name(backing.path)]
        elif size is None:
            raise InvalidRequest(f"creating {path}: a size is needed for an image without backing")
        argv.append(str(path))
        if size is not None:
            argv.append(str(size))
        _checked(argv, f"creating {path}", CREATE_TIMEOUT_S)

    def convert(
        self,
        source: ImageRef,
        target: ImageRef,
        *,
        existing: bool = False,
        compress: bool = False,
        options: Mapping[str, str] | None = None,
        progress: ProgressCallback | None = None,
        timeout: float | None = None,
    ) -> None:
        argv = ["convert"]
        if existing:
            argv += ["-n", "--target-is-zero"]
        if compress:
            argv.append("-c")
        argv += _options(options) + source_args(source) + _target_args(target, existing)
        what = f"copying {source.path} to {target.path}"
        if progress is None:
            _checked(argv, what, timeout)
            return
        total = self.info(source).virtual_size
        _with_progress(["qemu-img", argv[0], "-p", *argv[1:]], what, total, progress, timeout)

    def rebase(self, path: Path, fmt: str, backing: ImageRef | None) -> None:
        argv = ["rebase", "-f", _format(fmt)]
        if backing is None:
            argv += ["-b", ""]
        else:
            argv += ["-F", _format(backing.format), "-b", _backing_name(backing.path)]
        _checked([*argv, str(path)], f"rebasing {path}", None)

    def resize(self, path: Path, fmt: str, size: int) -> None:
        _checked(["resize", "-q", "-f", _format(fmt), str(path), str(size)], f"resizing {path}", CREATE_TIMEOUT_S)

    def check(self, image: ImageRef, timeout: float | None = CHECK_TIMEOUT_S) -> ImageCheck:
        result = run(["check", "--output=json", *source_args(image)], f"checking {image.path}", timeout)
        status = _CHECK_STATUS.get(result.returncode)
        if status is None:
            raise HypervisorError(f"checking {image.path} failed: {_one_line(result.stderr or result.stdout)}")
        return ImageCheck(status, _one_line(result.stderr) if status == "corrupt" else "")

    def measure(self, source: ImageRef, target_format: str) -> int:
        out = _checked(
            ["measure", "--output=json", "-O", _format(target_format), *source_args(source)],
            f"measuring {source.path}",
            INFO_TIMEOUT_S,
        )
        try:
            return int(json.loads(out.stdout)["required"])
        except (ValueError, KeyError, TypeError) as exc:
            raise HypervisorError(f"qemu-img measure gave no size for {source.path}: {out.stdout[:200]!r}") from exc

    def data_bytes(self, image: ImageRef) -> int:
        out = _checked(["map", "-U", "--output=json", *source_args(image)], f"mapping {image.path}", CHECK_TIMEOUT_S)
        try:
            extents = json.loads(out.stdout)
            return sum(int(e["length"]) for e in extents if e.get("data") and not e.get("zero"))
        except (ValueError, KeyError, TypeError) as exc:
            raise HypervisorError(f"qemu-img map gave no usable answer for {image.path}: {exc}") from exc


def _with_progress(
    argv: Sequence[str], what: str, total: int, progress: ProgressCallback, timeout: float | None
) -> None:
    """Run ``qemu-img convert -p``, turning its percentages into bytes of ``total``."""
    with tempfile.TemporaryFile() as errors:
        try:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errors, stdin=subprocess.DEVNULL)
        except FileNotFoundError as exc:
            raise HypervisorError("qemu-img is not installed (package qemu-utils); run scripts/setup-host.sh") from exc
        try:
            if proc.stdout is None:
                raise HypervisorError("qemu-img convert has no stdout pipe")
            tail = b""
            while chunk := os.read(proc.stdout.fileno(), 4096):
                tail = (tail + chunk)[-64:]
                found = _PROGRESS.findall(tail)
                if found:
                    progress(min(total, int(float(found[-1]) / 100 * total)), total)
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise HypervisorError(f"{what}: qemu-img did not finish within {timeout:g} s") from exc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        if returncode != 0:
            errors.seek(0)
            raise _failure(what, _one_line(errors.read().decode(errors="replace")) or f"exit status {returncode}")
    progress(total, total)
