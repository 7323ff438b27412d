"""Start-up check of the install: exactly one onnxruntime and one OpenCV distribution.

insightface declares ``onnxruntime`` and ``opencv-python``; digi2real uses
``onnxruntime-gpu`` and ``opencv-python-headless``. Each pair installs into the same module
folder, so with both present whichever was installed last silently wins (and uninstalling
one breaks the other). pyproject alone cannot prevent it; the set-up installs insightface
without its dependencies, and this check says how to repair a clash.
"""

from __future__ import annotations

import importlib.metadata as md
import logging

logger = logging.getLogger(__name__)

ONNXRUNTIME = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino")
OPENCV = (
    "opencv-python",
    "opencv-python-headless",
    "opencv-contrib-python",
    "opencv-contrib-python-headless",
)
WANTED = {"onnxruntime": "onnxruntime-gpu", "opencv": "opencv-python-headless"}


class EnvironmentClashError(RuntimeError):
    pass


def installed(names: tuple[str, ...]) -> list[str]:
    found = []
    for name in names:
        try:
            md.version(name)
        except md.PackageNotFoundError:
            continue
        found.append(name)
    return found


def problems() -> list[str]:
    out = []
    for family, names in (("onnxruntime", ONNXRUNTIME), ("opencv", OPENCV)):
        found = installed(names)
        wanted = WANTED[family]
        if len(found) > 1:
            others = " ".join(n for n in found if n != wanted)
            version = md.version(wanted) if wanted in found else ""
            pin = f"=={version}" if version else ""
            out.append(
                f"{len(found)} {family} distributions are installed ({', '.join(found)}); they "
                f"share one module folder and the last installed wins. Fix: `pip uninstall -y "
                f"{others} {wanted} && pip install --no-deps {wanted}{pin}`"
            )
        elif not found:
            out.append(f"no {family} distribution installed: `pip install {wanted}`")
    return out


def check_environment(*, strict: bool = True) -> list[str]:
    """Raise (strict) or log each install problem; returns them."""
    found = problems()
    if found and strict:
        raise EnvironmentClashError("\n".join(found))
    for line in found:
        logger.warning("%s", line)
    return found


if __name__ == "__main__":
    import sys

    issues = problems()
    for line in issues:
        print(f"error: {line}", file=sys.stderr)
    raise SystemExit(1 if issues else 0)
